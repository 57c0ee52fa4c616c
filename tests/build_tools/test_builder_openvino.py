"""OpenVINO build: its own build flags (running what it builds is tests/service/test_backend_openvino.py's)."""

from __future__ import annotations

from build_tools import cli


def test_bf16_roi_align_precision_is_a_build_flag(tmp_path):
    args = cli.parser().parse_args(["compile", str(tmp_path), "--out", str(tmp_path / "o"),
                                    "--openvino-bf16-roi-align", "bf16"])
    assert cli._backend_options(args) == {"openvino": {"roi_align_precision": "bf16"}}
    assert cli._backend_options(cli.parser().parse_args(["compile", str(tmp_path), "--out", "o"])) == {}
