"""OpenVINO runtime: what is OpenVINO's own beyond the contract (tests/service/test_backends.py):
the same export compiled by both CPU backends agrees at the fp32 bar, and the service's OpenVINO
settings reach the compiled model. Its build flags are tests/build_tools/test_builder_openvino.py's."""

from __future__ import annotations

import numpy as np
import pytest
from engine_reference import EngineAsReference

from build_tools.images import list_images
from build_tools.pipeline import compile_step
from build_tools.verify import Tolerance, check_tolerance, verify
from service.backends import get_backend, load_engine
from service.manifest import BatchProfile, Manifest
from service.preprocess import pad_batch, prepare_image
from service.settings import Settings
from scripts.tools.service_process import serving
from service_images import encode, gradient

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


@needs_openvino
def test_shape_buckets_are_parsed_against_the_profile(openvino_fp32):
    manifest = Manifest.load(openvino_fp32)
    assert openvino.shape_buckets("opt", manifest) == [(800, 1344), (1344, 800)]
    assert openvino.shape_buckets("none", manifest) == []
    assert openvino.shape_buckets("800x1088,800x1088,320x320", manifest) == [(800, 1088), (320, 320)]
    for bad in ("801x1344", "800x2048"):
        with pytest.raises(ValueError, match="shape bucket"):
            openvino.shape_buckets(bad, manifest)
    mutable = manifest.model_copy(update={"shape_profile": manifest.shape_profile.model_copy(
        update={"batch": BatchProfile(mutable=True, min=1, max=4)})})
    assert openvino.shape_buckets("opt", mutable) == []  # buckets are static batches too
    assert [openvino.auto_buckets(spec, manifest) for spec in ("auto", "auto:1", "auto:0", "opt", "none")] \
        == [openvino.AUTO_DEFAULT_MAX, 1, 0, 0, 0]
    assert openvino.shape_buckets("auto:3", manifest) == [] and openvino.auto_buckets("auto", mutable) == 0


@needs_openvino
def test_a_bucketed_size_runs_static_and_others_fall_back_to_dynamic(openvino_fp32):
    """Served through the app: a 64x48 image pads to 800x1088, a compiled bucket; a 48x64 one to
    1088x800, which is not one. Both answer as the dynamic model does, and /metrics counts them."""
    settings = Settings(engine_dir=openvino_fp32, openvino_shape_buckets="800x1088")
    with serving(settings) as server:
        assert server.app.state.runtime.pool.shape_buckets == [(800, 1088)]
        landscape, portrait = encode(gradient(48, 64, seed=1), "PNG"), encode(gradient(64, 48, seed=1), "PNG")
        before = {bucket: server.metric("maskrcnn_shape_bucket_images_total", bucket=bucket)
                  for bucket in ("800x1088", "dynamic")}  # the warm-up's image ran already
        answers = [server.post(image, "image/png", params={"score_threshold": 0.1}) for image in (landscape, portrait)]
        assert [a.status_code for a in answers] == [200, 200]
        for bucket in before:
            assert server.metric("maskrcnn_shape_bucket_images_total", bucket=bucket) == before[bucket] + 1
    dynamic = load_engine(openvino_fp32)
    static = openvino.load(openvino_fp32, dynamic.manifest, options={"shape_buckets": "800x1088"})
    prepared = prepare_image(gradient(48, 64, seed=1), dynamic.manifest.input.spec)
    images, sizes = pad_batch([prepared], 32, batch_size=1)
    assert images.shape[2:] == (800, 1088)
    ours, theirs = static.infer(images, sizes), dynamic.infer(images, sizes)
    assert static.last_shape == "800x1088" and dynamic.last_shape == "dynamic"
    np.testing.assert_array_equal(ours["labels"], theirs["labels"])
    np.testing.assert_allclose(ours["dets"], theirs["dets"], atol=1e-2)
    np.testing.assert_allclose(ours["masks"], theirs["masks"], atol=1e-3)


@needs_openvino
def test_auto_buckets_are_learned_from_the_sizes_served(openvino_fp32, caplog):
    """``auto:1``: the third call at 800x1088 starts its bucket's compilation; once it is ready that
    size runs static with the dynamic model's answers; a second size gets none (at most one), and
    is not even counted."""
    engine = openvino.load(openvino_fp32, Manifest.load(openvino_fp32), options={"shape_buckets": "auto:1"})
    assert engine.shape_buckets == [] and engine.auto_buckets == 1
    spec = engine.manifest.input.spec
    landscape = pad_batch([prepare_image(gradient(48, 64, seed=2), spec)], 32, batch_size=1)
    portrait = pad_batch([prepare_image(gradient(64, 48, seed=2), spec)], 32, batch_size=1)
    assert landscape[0].shape[2:] == (800, 1088) and portrait[0].shape[2:] == (1088, 800)
    with caplog.at_level("INFO", logger="service.backends.openvino"):
        dynamic = [engine.infer(*landscape) for _ in range(openvino.AUTO_AFTER)]
        assert engine.last_shape == "dynamic"
        engine.wait_for_buckets(timeout_s=300)
    assert engine.shape_buckets == [(800, 1088)]
    assert any("shape bucket 800x1088 compiled after 3 dynamic calls" in r.getMessage() for r in caplog.records)
    static = engine.infer(*landscape)
    assert engine.last_shape == "800x1088"
    np.testing.assert_array_equal(static["labels"], dynamic[0]["labels"])
    np.testing.assert_allclose(static["dets"], dynamic[0]["dets"], atol=1e-2)
    np.testing.assert_allclose(static["masks"], dynamic[0]["masks"], atol=1e-3)
    for _ in range(openvino.AUTO_AFTER + 1):
        engine.infer(*portrait)
        assert engine.last_shape == "dynamic"
    engine.wait_for_buckets(timeout_s=300)
    assert engine.shape_buckets == [(800, 1088)]
    # with the cap reached, sizes are no longer counted: memory stays bounded whatever sizes clients send
    assert (1088, 800) not in engine._dynamic_calls


@needs_openvino
def test_auto_buckets_stop_where_memory_would_not_hold_one(openvino_fp32, caplog):
    """With more memory needed than any machine has left, no bucket is compiled and the log says why."""
    manifest = Manifest.load(openvino_fp32)
    engine = openvino.OpenVinoEngine(openvino_fp32 / manifest.model_file, manifest, auto_buckets=2,
                                     auto_min_free_bytes=2**60)
    feed = pad_batch([prepare_image(gradient(48, 64, seed=3), manifest.input.spec)], 32, batch_size=1)
    with caplog.at_level("WARNING", logger="service.backends.openvino"):
        for _ in range(openvino.AUTO_AFTER + 1):
            engine.infer(*feed)
    engine.wait_for_buckets(timeout_s=300)
    assert engine.shape_buckets == [] and engine.auto_buckets == 0 and engine.last_shape == "dynamic"
    assert any("not compiling a 800x1088 shape bucket" in r.getMessage() for r in caplog.records)
