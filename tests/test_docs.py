"""The docs say what the program does: every command line, flag, setting, route and metric that
README.md, docs/ and docker/README.md quote exists in the program, checked against the real argparse
parsers, the settings class, the app's routes and the metrics registry (no engine is loaded).

When a test here fails, the message names the file and what to change: the doc, or the program.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from starlette.routing import Match, Mount

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "docker" / "README.md"]
COMMANDS = ("build", "serve", "eval", "perf", "loadtest", "draw", "demo")
# maskrcnn-NAME followed by its arguments (not an image tag such as maskrcnn-serve:cpu or an extra)
COMMAND = re.compile(r"maskrcnn-(" + "|".join(COMMANDS) + r")(?=[ \t]|$)")
MODULE = re.compile(r"python -m (scripts\.(?:tools|bench)\.\w+)(?=[ \t]|$)")
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9_-]*")
# Flags of other programs the docs show (pip, docker, kubectl, curl, pytest, kustomize, git).
OTHER_PROGRAMS_FLAGS = {"--no-deps", "--scale", "--build-arg", "--target", "--build", "--no-build", "--remove-orphans",
                        "--help", "--device", "--gpus", "--rm", "--secret", "--from-literal"}


def doc_texts() -> Iterator[tuple[str, str]]:
    """(name, text) of every doc, backslash-continued lines joined."""
    for path in DOCS:
        yield path.relative_to(ROOT).as_posix(), re.sub(r"\\\n\s*", " ", path.read_text())


def code(text: str) -> list[str]:
    """The inline code spans and the lines of the code blocks of a markdown text."""
    blocks = re.findall(r"^```[a-z]*\n(.*?)^```", text, flags=re.S | re.M)
    prose = re.sub(r"^```[a-z]*\n.*?^```", "", text, flags=re.S | re.M)
    return re.findall(r"`([^`\n]+)`", prose) + [line for block in blocks for line in block.splitlines()]


def command_lines(pattern: re.Pattern) -> Iterator[tuple[str, str, str]]:
    """(doc, command, its arguments) for every command line the docs show as code: its arguments
    run to the end of the span or line, or to a shell comment, ``&&`` or ``;``."""
    for doc, text in doc_texts():
        for line in code(text):
            line = re.sub(r"(^|\s)#.*", "", line)  # a shell comment
            for match in pattern.finditer(line):
                # the command runs: at the start, after a folder (.venv/bin/) or variable assignments
                if re.fullmatch(r"\s*(\w+=\S*\s+)*(\S*/)?", line[:match.start()]):
                    yield doc, match.group(1), re.split(r"&&|;", line[match.end():])[0]


def option_strings(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> dict[tuple[str, ...], set[str]]:
    """Per (sub)command path, the option strings its parser takes."""
    found = {path: {s for action in parser._actions for s in action.option_strings}}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.update(option_strings(sub, (*path, name)))
    return found


def help_flags(main, *args: str) -> set[str]:
    """The flags ``main(args + ["--help"])`` prints (for CLIs that build their parser inside main)."""
    shown = io.StringIO()
    with contextlib.redirect_stdout(shown), pytest.raises(SystemExit) as exited:
        main([*args, "--help"])
    assert exited.value.code == 0
    return set(FLAG.findall(shown.getvalue()))


@pytest.fixture(scope="module")
def parsers() -> dict[str, dict[tuple[str, ...], set[str]]]:
    """Per maskrcnn-* command, the option strings of each of its (sub)commands, from the real parsers."""
    from build_tools.cli import parser as build_parser
    from scripts.demo import cli as demo_cli
    from scripts.tools import draw, eval_replay, loadtest, perf
    from service import cli as serve

    found = {
        "build": option_strings(build_parser()),
        "serve": option_strings(serve.build_parser()),
        "eval": option_strings(eval_replay.build_parser()),
        "loadtest": option_strings(loadtest.build_parser()),
        "draw": option_strings(draw.build_parser()),
        "perf": {(): help_flags(perf.main)},
    }
    demo = {(): {"--help"}}
    for sub in ("data", "train", "eval"):
        demo[(sub,)] = help_flags(demo_cli.main, sub)
    found["demo"] = demo
    return found


def module_flags(module: str) -> set[str]:
    """The flags of a ``python -m scripts...`` module: its parser's option strings. Benchmarks are
    leaves nothing imports, so theirs are read from their source's option literals."""
    if module == "scripts.tools.wait_ready":
        return {"--pid", "--timeout", "--help"} & set(FLAG.findall((ROOT / "scripts/tools/wait_ready.py").read_text()))
    source = (ROOT / (module.replace(".", "/") + ".py")).read_text()
    return set(re.findall(r"[\"'](--[a-z][a-z0-9_-]*)[\"']", source)) | {"--help"}


def test_every_command_line_in_the_docs_parses_flag_by_flag(parsers):
    wrong = []
    for doc, command, rest in command_lines(COMMAND):
        flags = parsers[command]
        path: tuple[str, ...] = ()
        words = rest.split()
        if len(flags) > 1 and words and not words[0].startswith("-"):
            if (words[0],) not in flags:
                wrong.append(f"{doc}: maskrcnn-{command} has no subcommand {words[0]!r} ({rest.strip()})")
                continue
            path = (words[0],)
        # without its subcommand (`maskrcnn-build --backend magicmind`), a flag of any of them
        takes = flags[path] if path or len(flags) == 1 else set().union(*flags.values())
        for flag in FLAG.findall(rest):
            if flag not in takes:
                wrong.append(f"{doc}: maskrcnn-{' '.join((command, *path))} has no {flag} ({rest.strip()})")
    assert not wrong, "\n".join(wrong)


def test_every_python_module_command_in_the_docs_takes_its_flags():
    wrong = [f"{doc}: python -m {module} has no {flag}"
             for doc, module, rest in command_lines(MODULE) for flag in FLAG.findall(rest)
             if flag not in module_flags(module)]
    assert not wrong, "\n".join(wrong)


def test_every_flag_the_docs_quote_belongs_to_a_command(parsers):
    """Flags quoted without their command (``--verify-ann ANN.json`` in the build section) must
    still be some command's."""
    known = set(OTHER_PROGRAMS_FLAGS)
    for per_command in parsers.values():
        for flags in per_command.values():
            known |= flags
    for path in sorted((ROOT / "scripts").rglob("*.py")):
        known |= set(re.findall(r"[\"'](--[a-z][a-z0-9_-]*)[\"']", path.read_text()))
    wrong = []
    for doc, text in doc_texts():
        for span in code(text):
            # a family of flags (--renorm-*) is known when one of its members is
            wrong += [f"{doc}: {flag} (in `{span.strip()[:80]}`)" for flag in FLAG.findall(span) if flag not in known
                      and not (flag.endswith("-") and any(k.startswith(flag) for k in known))]
    assert not wrong, "no command takes these flags:\n" + "\n".join(sorted(set(wrong)))


def test_settings_and_their_variables_match_the_docs():
    from service.cli import OTHER_VARIABLES, setting_variable
    from service.settings import Settings

    settings = {setting_variable(name) for name in Settings.model_fields}
    wrong = []
    for doc, text in doc_texts():
        wrong += [f"{doc}: {name} is no setting (service/settings.py) nor one of service.cli.OTHER_VARIABLES"
                  for name in sorted(set(re.findall(r"MASKRCNN_[A-Z0-9][A-Z0-9_]*", text)))
                  if name not in settings and name not in OTHER_VARIABLES]
    readme = (ROOT / "README.md").read_text()
    table = set(re.findall(r"^\| `(MASKRCNN_[A-Z0-9_]+)` \|", readme, flags=re.M))
    wrong += [f"README.md: the settings table lacks {name}: add its row (variable, flag, default, what)"
              for name in sorted(settings - table)]
    assert not wrong, "\n".join(wrong)


def test_compose_passes_every_setting_to_the_replicas():
    from service.cli import setting_variable
    from service.settings import Settings

    compose = yaml.safe_load((ROOT / "docker" / "docker-compose.yml").read_text())
    environment = compose["services"]["maskrcnn"]["environment"]
    passed = {entry.partition("=")[0] for entry in environment}
    fixed_by_image = {"MASKRCNN_HOST", "MASKRCNN_PORT"}  # docker/Dockerfile's ENV
    missing = {setting_variable(name) for name in Settings.model_fields} - passed - fixed_by_image
    assert not missing, f"docker/docker-compose.yml does not pass {sorted(missing)} to the replicas"


def test_every_route_the_docs_quote_is_served():
    from service.app import create_app
    from service.settings import Settings

    def never_called():
        raise AssertionError("no engine is opened: the routes exist without one")

    def routes(candidates) -> Iterator:
        for route in candidates:
            if hasattr(route, "path"):
                yield route
            else:  # a router FastAPI included: its own routes (included without a prefix here)
                yield from routes(route.original_router.routes)

    served = list(routes(create_app(Settings(), engine_factory=never_called).router.routes))
    wrong = []
    for doc, text in doc_texts():
        for method, path in re.findall(r"`(?:(GET|POST) )?(/(?:v1|v2|predict|render|healthz|readyz|metrics|docs|redoc|"
                                       r"openapi\.json|page)[^`\s]*)`", text):
            if "..." in path or (path.endswith("/*") and any(r.path.startswith(path[:-1]) for r in served)):
                continue
            # placeholders (NAME, VERSION, {name}) become one concrete path
            concrete = re.sub(r"\{[^}]+\}|\b[A-Z]+\b", "x", path)
            concrete += "/x" if concrete in {r.path for r in served if isinstance(r, Mount)} else ""
            scope = {"type": "http", "path": concrete, "method": method or "GET", "root_path": ""}
            matches = {route.matches(scope)[0] for route in served}
            if Match.FULL not in matches and not (not method and Match.PARTIAL in matches):
                wrong.append(f"{doc}: {method or ''} {path}")
    assert not wrong, "the app serves no such route:\n" + "\n".join(wrong)


def test_every_metric_and_stage_the_docs_quote_exists():
    from prometheus_client import Histogram

    from build_tools.checkpoint import KNOWN_CHECKPOINTS
    from service.metrics import Metrics
    from service.stages import STAGES

    metrics = Metrics()
    names = set()
    for family in metrics.registry.collect():
        names |= {family.name} | {sample.name for sample in family.samples}
    names |= {f"{name}_{suffix}" for name in list(names) for suffix in ("bucket", "count", "sum", "total")}
    assert isinstance(metrics.stage_seconds, Histogram)
    wrong = []
    for doc, text in doc_texts():
        wrong += [f"{doc}: metric {name}" for name in sorted(set(re.findall(r"\b(maskrcnn_[a-z_]+)", text)))
                  if name not in names and not any(c.startswith(name) for c in KNOWN_CHECKPOINTS)]
    readme = (ROOT / "README.md").read_text()
    stages = re.search(r"latency per stage \(([^)]*)\)", readme)
    assert stages is not None, "README.md no longer lists the latency stages of /metrics"
    assert set(re.findall(r"`(\w+)`", stages.group(1))) == set(STAGES), "README's stage names are not service.stages'"
    assert not wrong, "no such metric in service/metrics.py:\n" + "\n".join(wrong)


def test_every_file_the_docs_quote_exists():
    wrong = []
    for doc, text in doc_texts():
        for span in code(text):
            for path in re.findall(r"(?<![\w./$-])((?:service|build_tools|scripts|tests|docs|docker)/[\w./-]+\."
                                   r"(?:py|sh|json|yml|yaml|md|txt|png))\b", span):
                if not (ROOT / path).exists():
                    wrong.append(f"{doc}: {path}")
    assert not wrong, "no such file:\n" + "\n".join(sorted(set(wrong)))


def test_every_section_the_docs_refer_to_exists():
    headings = {re.sub(r"`", "", h).strip() for h in re.findall(r"^#+ (.+)$", (ROOT / "README.md").read_text(), re.M)}
    wrong = []
    for doc, text in doc_texts():
        for name in re.findall(r"(?:see|README,|README's)\s+\"([^\"]+)\"", text):
            name = " ".join(name.split())
            if not any(h.startswith(name) for h in headings):
                wrong.append(f"{doc}: \"{name}\"")
    assert not wrong, "README.md has no such section:\n" + "\n".join(wrong)


def test_the_architecture_names_every_module():
    text = (ROOT / "docs" / "architecture.md").read_text()
    modules = [path for folder in ("service", "build_tools", "scripts/tools", "scripts/demo")
               for path in sorted((ROOT / folder).glob("*.py")) if path.name != "__init__.py"]
    missing = [path.relative_to(ROOT).as_posix() for path in modules if path.name not in text]
    assert not missing, f"docs/architecture.md does not say what these are: {missing}"
