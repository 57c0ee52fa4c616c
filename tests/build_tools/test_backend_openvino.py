"""OpenVINO backend: the same fidelity bar as ONNX Runtime at fp32, on the same cached export."""

from __future__ import annotations

import pytest

from build_tools.pipeline import compile_step, input_spec_of
from build_tools.verify import Tolerance, check_tolerance, list_images, verify
from service.backends import get_backend, load_engine

from engine_reference import EngineAsReference

openvino = get_backend("openvino")
ok, reason = openvino.available()
pytestmark = pytest.mark.skipif(not ok, reason=reason)


def test_openvino_fp32_matches_eager(export_dir, reference_model, photos, tmp_path):
    manifest = compile_step(export_dir, tmp_path / "ov", backend="openvino", precision="fp32",
                            verify_images=photos, verify_count=1, progress=False)
    assert manifest.backend == "openvino" and manifest.model_file == "model.xml"
    assert manifest.parity["passed"]
    engine = load_engine(tmp_path / "ov")
    paths = list_images(photos)[1:3]
    report = verify(reference_model, engine, paths, input_spec_of(manifest.inference_config), progress=False)
    assert report["reference_detections"] == 100 * len(paths)
    assert not check_tolerance(report, Tolerance.for_precision("fp32")), report


def test_openvino_refuses_what_it_cannot_build(export_dir, tmp_path):
    from service.backends.base import UnsupportedPrecision

    with pytest.raises(UnsupportedPrecision, match="openvino builds"):
        compile_step(export_dir, tmp_path / "x", backend="openvino", precision="fp16", run_verify=False)


def test_openvino_fp32_matches_onnxruntime_fp32(export_dir, engine_dir, photos, tmp_path):
    """The same export compiled by both CPU backends: OpenVINO held to the fp32 bar with ORT as reference."""
    compile_step(export_dir, tmp_path / "ov", backend="openvino", precision="fp32", run_verify=False)
    engine, reference = load_engine(tmp_path / "ov"), load_engine(engine_dir)
    assert reference.manifest.backend == "onnxruntime" and reference.manifest.precision == "fp32"
    paths = list_images(photos)[:3]
    report = verify(EngineAsReference(reference), engine, paths, input_spec_of(engine.manifest.inference_config),
                    progress=False)
    assert report["reference_detections"] == 100 * len(paths)
    assert not check_tolerance(report, Tolerance.for_precision("fp32")), report
