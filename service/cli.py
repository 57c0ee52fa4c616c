"""``maskrcnn-serve``: run the service on an engine artifact.

Every setting is a flag (``--max-batch-size 4``) and an environment variable
(``MASKRCNN_MAX_BATCH_SIZE=4``); flags win. The API key is read from ``MASKRCNN_API_KEY`` only,
so it never shows in the process list. A bad value is reported with the flag or variable it came
from; a ``MASKRCNN_*`` variable that is no setting stops the start when it is close to one (a typo:
the message names the setting meant), else it is reported and ignored.

On SIGTERM (or SIGINT) the server stops accepting connections, finishes in-flight and queued
requests within ``--grace-period-s``, and exits 0.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from types import FrameType
from typing import Any

import uvicorn
from pydantic import ValidationError

from service.app import create_app
from service.errors import install_connection_cap_answer
from service.settings import Settings
from service.tracing import uvicorn_log_config

ENV_ONLY = ("api_key",)
STARTUP_FAILURE = 3  # uvicorn's exit code when the app fails to start
ENV_PREFIX: str = Settings.model_config["env_prefix"]
# MASKRCNN_* variables that are no settings: the compose stack's and the image builds' (docker/) and
# the tests'. They may well be set where the server starts, so they are never taken for typos.
OTHER_VARIABLES = frozenset(ENV_PREFIX + name for name in (
    "REPLICAS", "ENGINE_NAME", "ARTIFACTS", "BUILD_ARGS", "IMAGE", "BUILDER_IMAGE", "BASE_IMAGE", "ONNXRUNTIME",
    "EXTRAS", "TEST_CACHE", "DEMO_DATA", "DEMO_CHECKPOINT",
))


def setting_variable(name: str) -> str:
    """The environment variable of setting ``name``: ``max_batch_size`` -> ``MASKRCNN_MAX_BATCH_SIZE``."""
    return ENV_PREFIX + name.upper()


def unknown_variables(environ: Mapping[str, str]) -> list[tuple[str, list[str]]]:
    """The ``MASKRCNN_*`` variables of ``environ`` that name no setting (and none of
    :data:`OTHER_VARIABLES`), each with the setting variables close to it (difflib on the part
    after the prefix; none when nothing is close)."""
    names = {name.upper(): name for name in Settings.model_fields}
    unknown = []
    for key in sorted(environ):
        upper = key.upper()
        if upper.startswith(ENV_PREFIX) and upper[len(ENV_PREFIX):] not in names and upper not in OTHER_VARIABLES:
            near = difflib.get_close_matches(upper[len(ENV_PREFIX):], names, n=3, cutoff=0.6)
            unknown.append((key, [ENV_PREFIX + n for n in near]))
    return unknown


def _environment_value(environ: Mapping[str, str], name: str) -> str | None:
    """The variable of setting ``name`` as pydantic-settings reads it (case-insensitively), or None."""
    wanted = setting_variable(name)
    return next((value for key, value in environ.items() if key.upper() == wanted), None)


def describe_settings_errors(errors: Sequence[Mapping[str, Any]], flags: Mapping[str, str],
                             flag_names: Mapping[str, str], environ: Mapping[str, str]) -> str:
    """One line per bad value, naming where it came from: ``--max-batch-size many: Input should
    be ...`` for a flag, ``MASKRCNN_MAX_BATCH_SIZE=many: ...`` for a variable (secrets not shown)."""
    lines = []
    for error in errors:
        loc = error.get("loc", ())
        name = str(loc[0]) if loc else ""
        secret = name in ENV_ONLY
        if name in flags:
            where = f"{flag_names[name]} {flags[name]}"
        elif (value := _environment_value(environ, name)) is not None:
            where = setting_variable(name) + ("" if secret else f"={value}")
        else:
            where = name or "settings"
        lines.append(f"{where}: {error.get('msg', 'invalid')}")
    return "; ".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maskrcnn-serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for name, field in Settings.model_fields.items():
        if name in ENV_ONLY:
            continue
        flags = ["--" + name.replace("_", "-")]
        if name == "engine_dir":
            flags.insert(0, "--engine")
        # Values stay strings here; Settings validates and converts them with the env values. A
        # switch also works bare (--decode-jpeg-reduced means true).
        switch = {"nargs": "?", "const": "true"} if field.annotation is bool else {}
        parser.add_argument(
            *flags, dest=name, metavar=name.upper(), **switch,
            help=f"{field.description or ''} [env {setting_variable(name)}, default {field.default}]",
        )
    return parser


def _exit_cleanly(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    environ = dict(os.environ)
    for variable, near in unknown_variables(environ):
        if near:
            parser.error(f"{variable} is no setting; did you mean {' or '.join(near)}? Rename or unset it")
        print(f"{parser.prog}: warning: {variable} is no setting of {parser.prog}; ignored "
              "(`maskrcnn-serve --help` lists the settings and their variables)", file=sys.stderr)
    flags = {k: v for k, v in vars(args).items() if v is not None}
    try:
        settings = Settings(**flags)
    except ValidationError as exc:
        flag_names = {action.dest: action.option_strings[0] for action in parser._actions if action.option_strings}
        parser.error(describe_settings_errors(exc.errors(), flags, flag_names, environ))
    if settings.engine_dir is None:
        parser.error("--engine DIR (or MASKRCNN_ENGINE_DIR) is required")
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    install_connection_cap_answer(settings.retry_after_s)  # beyond the cap: JSON 503 like every refusal
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(settings),
            host=settings.host,
            port=settings.port,
            log_level=settings.log_level,
            log_config=uvicorn_log_config(settings),  # with traces on, access lines name the trace
            timeout_graceful_shutdown=settings.grace_period_s,
            # uvicorn counts connections, which the app cannot see; beyond the cap it answers 503 with
            # Connection: close before the app runs, so a flood of sockets costs no request work.
            limit_concurrency=settings.max_connections,
        )
    )
    # uvicorn drains on SIGTERM/SIGINT, then re-raises the signal to the handler that was there
    # before it; these make a drained server exit 0 instead of dying by the signal.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    signal.signal(signal.SIGINT, _exit_cleanly)
    server.run()
    return 0 if server.started else STARTUP_FAILURE


if __name__ == "__main__":
    sys.exit(main())
