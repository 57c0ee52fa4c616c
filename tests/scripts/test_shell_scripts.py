"""Every shell script of scripts/ and docker/ parses (``-n`` with the shell its ``#!`` line names)
and is executable; what serve.sh (the main job) passes on."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted(p.relative_to(ROOT).as_posix() for folder in ("scripts", "docker") for p in (ROOT / folder).rglob("*.sh"))


def test_the_scripts_are_found():
    assert {"scripts/run_all.sh", "scripts/serve.sh", "docker/build-engine.sh"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_shell_script_parses_and_is_executable(script):
    path = ROOT / script
    first = path.read_text().splitlines()[0]
    assert first.startswith("#!"), f"{script} has no #! line"
    words = first[2:].split()
    shell = Path(words[1] if Path(words[0]).name == "env" else words[0]).name
    assert shell in ("sh", "bash"), f"{script}: {first}"
    result = subprocess.run([shell, "-n", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert path.stat().st_mode & 0o111, f"{script} is not executable"


def test_serve_sh_passes_labelled_images_to_the_build_and_a_wrong_path_fails_at_once(tmp_path):
    # VERIFY_ANN reaches maskrcnn-build's --verify-ann, which refuses a missing file before exporting
    env = {**os.environ, "ENGINE": str(tmp_path / "engine"), "CHECKPOINT": str(tmp_path / "unused.pth"),
           "VERIFY_ANN": str(tmp_path / "missing.json")}
    result = subprocess.run(["bash", str(ROOT / "scripts/serve.sh")], capture_output=True, text=True, env=env,
                            timeout=120)
    assert result.returncode != 0
    assert f"--verify-ann {tmp_path / 'missing.json'}: no such file" in result.stderr
    assert "exporting" not in result.stderr and not (tmp_path / "engine").exists()


@pytest.mark.parametrize("setting, shown", [(None, "auto:2"), ("none", "none")])
def test_serve_sh_serves_openvino_with_learned_shape_buckets_unless_told_otherwise(
        export_dir, tmp_path_factory, setting, shown):
    """The main job on an OpenVINO engine: ``auto`` shape buckets by default (the engine info on
    /metrics says so), ``MASKRCNN_OPENVINO_SHAPE_BUCKETS`` overrides it."""
    import httpx

    from build_tools.pipeline import compile_step
    from scripts.tools.service_process import free_port
    from scripts.tools.wait_ready import wait_ready
    from service.backends import get_backend

    ok, reason = get_backend("openvino").available()
    if not ok:
        pytest.skip(reason)
    engine = tmp_path_factory.getbasetemp() / "serve-sh-openvino"
    if not (engine / "manifest.json").is_file():
        compile_step(export_dir, engine, backend="openvino", precision="fp32", run_verify=False, progress=False)
    env = {k: v for k, v in os.environ.items() if k != "MASKRCNN_OPENVINO_SHAPE_BUCKETS"}
    env["ENGINE"] = str(engine)
    if setting is not None:
        env["MASKRCNN_OPENVINO_SHAPE_BUCKETS"] = setting
    port = free_port()
    server = subprocess.Popen(["bash", str(ROOT / "scripts/serve.sh"), "--port", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, alive=lambda: server.poll() is None, timeout_s=300)
        metrics = httpx.get(f"{url}/metrics").text
        assert 'backend="openvino"' in metrics and f'shape_buckets="{shown}"' in metrics
    finally:
        server.terminate()
        server.wait(timeout=60)
