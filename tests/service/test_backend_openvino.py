"""OpenVINO runtime: what is OpenVINO's own beyond the contract (tests/service/test_backends.py):
the same export compiled by both CPU backends agrees at the fp32 bar, and the service's OpenVINO
settings reach the compiled model. Its build flags are tests/build_tools/test_builder_openvino.py's."""

from __future__ import annotations

import pytest
from engine_reference import EngineAsReference

from build_tools.images import list_images
from build_tools.pipeline import compile_step
from build_tools.verify import Tolerance, check_tolerance, verify
from service.backends import get_backend, load_engine
from service.manifest import Manifest

openvino = get_backend("openvino")
ok, reason = openvino.available()
needs_openvino = pytest.mark.skipif(not ok, reason=reason)


@pytest.fixture(scope="module")
def openvino_fp32(export_dir, tmp_path_factory):
    if not ok:
        pytest.skip(reason)
    folder = tmp_path_factory.mktemp("openvino") / "ov"
    compile_step(export_dir, folder, backend="openvino", precision="fp32", run_verify=False)
    return folder


@needs_openvino
def test_openvino_fp32_matches_onnxruntime_fp32(openvino_fp32, engine_dir, photos):
    """The same export compiled by both CPU backends: OpenVINO held to the fp32 bar with ORT as reference."""
    engine, reference = load_engine(openvino_fp32), load_engine(engine_dir)
    assert reference.manifest.backend == "onnxruntime" and reference.manifest.precision == "fp32"
    paths = list_images(photos)[:3]
    report = verify(EngineAsReference(reference), engine, paths, engine.manifest.input.spec, progress=False)
    assert report.reference_detections == 100 * len(paths)
    assert not check_tolerance(report, Tolerance.for_precision("fp32")), report


@needs_openvino
def test_service_settings_reach_the_compiled_model(openvino_fp32):
    manifest = Manifest.load(openvino_fp32)
    default = openvino.load(openvino_fp32, manifest)
    assert str(default.compiled.get_property("PERFORMANCE_HINT")).endswith("LATENCY")
    tuned = openvino.load(openvino_fp32, manifest, threads=2,
                          options={"performance_hint": "THROUGHPUT", "streams": 2})
    assert str(tuned.compiled.get_property("PERFORMANCE_HINT")).endswith("THROUGHPUT")
    assert int(tuned.compiled.get_property("NUM_STREAMS")) == 2
    assert tuned.threads == 2
