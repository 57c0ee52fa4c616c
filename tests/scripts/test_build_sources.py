"""Benchmarks' cached exports and engines are keyed by the code that builds them
(``scripts.tools.build_sources``): a change to the model or a backend's build is a new key."""

from __future__ import annotations

import shutil

from conftest import ROOT

from scripts.tools.build_sources import build_source_files, build_sources_digest


def test_the_key_follows_the_model_and_backend_code_and_nothing_else(tmp_path):
    files = build_source_files(ROOT)
    names = {p.relative_to(ROOT).as_posix() for p in files}
    assert {"build_tools/model.py", "build_tools/backends/openvino.py", "service/backends/openvino.py",
            "service/manifest.py"} <= names
    assert not any(n.startswith(("tests/", "scripts/")) for n in names)
    for path in files:
        copy = tmp_path / path.relative_to(ROOT)
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, copy)
    key = build_sources_digest(tmp_path)
    assert key == build_sources_digest(ROOT) and len(key) == 16
    (tmp_path / "README.md").write_text("not build code")
    assert build_sources_digest(tmp_path) == key
    model = tmp_path / "build_tools/model.py"
    model.write_text(model.read_text() + "\n# changed\n")
    assert build_sources_digest(tmp_path) != key
