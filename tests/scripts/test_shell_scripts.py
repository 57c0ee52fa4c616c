"""Every shell script of scripts/ and docker/ parses (``-n`` with the shell its ``#!`` line names)
and is executable."""

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
