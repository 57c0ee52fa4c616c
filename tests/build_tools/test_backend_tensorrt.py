"""TensorRT backend: clear refusals where TensorRT or a GPU is missing, the pure shape/precision
logic, and (on a GPU machine with TensorRT) parity with ONNX Runtime fp32 on the same export."""

from __future__ import annotations

import json

import numpy as np
import pytest

from build_tools.pipeline import BuildError, compile_step, input_spec_of
from build_tools.verify import Tolerance, check_tolerance, list_images, verify
from service.backends import BackendUnavailable, backend_names, get_backend, load_engine
from service.backends.base import UnsupportedPrecision
from service.manifest import Manifest

from engine_reference import EngineAsReference

tensorrt = get_backend("tensorrt")
ok, reason = tensorrt.available()
needs_tensorrt = pytest.mark.skipif(not ok, reason=reason)
without_tensorrt = pytest.mark.skipif(ok, reason="TensorRT and a GPU are present here")


def test_registered_with_its_precisions():
    assert "tensorrt" in backend_names()
    assert tensorrt.NAME == "tensorrt"
    assert tensorrt.PRECISIONS == ("fp32", "fp16", "int8")


def test_availability_is_a_reason_not_an_exception():
    assert isinstance(ok, bool) and (ok or "tensorrt" in reason or "CUDA" in reason)
    cuda_ok, cuda_reason = tensorrt.cuda_status()
    assert cuda_ok or cuda_reason


@without_tensorrt
def test_compile_without_tensorrt_raises_backend_unavailable(tmp_path):
    with pytest.raises(BackendUnavailable, match="tensorrt cannot build here") as info:
        tensorrt.compile(tmp_path / "model.onnx", tmp_path / "out", "fp32")
    assert reason in str(info.value)


@without_tensorrt
def test_pipeline_refuses_with_build_error(tmp_path):
    (tmp_path / "export.json").write_text(json.dumps({}))
    with pytest.raises(BuildError, match="backend tensorrt is not available here"):
        compile_step(tmp_path, tmp_path / "artifact", backend="tensorrt", precision="fp16")


@without_tensorrt
def test_load_engine_without_tensorrt_raises_backend_unavailable(tmp_path):
    Manifest(backend="tensorrt", precision="fp32", model_file="model.plan", origin="random-init", input={},
             shape_profile={"batch": {"mutable": False, "size": 1}}, outputs={}, postprocess={}).save(tmp_path)
    (tmp_path / "model.plan").write_bytes(b"")
    with pytest.raises(BackendUnavailable, match="backend 'tensorrt' is not available here") as info:
        load_engine(tmp_path)
    assert reason in str(info.value)


def test_refuses_precisions_it_does_not_build(tmp_path):
    with pytest.raises(UnsupportedPrecision, match="tensorrt builds fp32, fp16, int8, not bf16"):
        tensorrt.compile(tmp_path / "model.onnx", tmp_path, "bf16")
    with pytest.raises(UnsupportedPrecision, match="int8 needs calibration images"):
        tensorrt.compile(tmp_path / "model.onnx", tmp_path, "qint8_mixed_float16")


def test_builder_flags_per_precision():
    assert tensorrt.builder_flags("fp32") == []
    assert tensorrt.builder_flags("fp16") == ["FP16"]
    assert tensorrt.builder_flags("int8") == ["FP16", "INT8"]


def test_profile_defaults_keep_the_graphs_fixed_batch():
    shapes = tensorrt.profile_shapes({"images": (2, 3, -1, -1), "image_sizes": (2, 2)})
    assert shapes["images"] == ((2, 3, 32, 32), (2, 3, 800, 1344), (2, 3, 1344, 1344))
    assert shapes["image_sizes"] == ((2, 2),) * 3
    assert list(shapes) == ["images", "image_sizes"]


def test_profile_follows_the_manifests_shape_profile():
    profile = {"batch": {"mutable": False, "size": 1}, "min_hw": [64, 96], "opt_hw": [480, 640], "max_hw": [640, 640]}
    shapes = tensorrt.profile_shapes({"images": (1, 3, -1, -1), "image_sizes": (1, 2)}, profile)
    assert shapes["images"] == ((1, 3, 64, 96), (1, 3, 480, 640), (1, 3, 640, 640))


def test_profile_of_a_dynamic_batch():
    dynamic = {"images": (-1, 3, -1, -1), "image_sizes": (-1, 2)}
    shapes = tensorrt.profile_shapes(dynamic, {"batch": {"mutable": True, "max": 4}})
    assert shapes["images"] == ((1, 3, 32, 32), (4, 3, 800, 1344), (4, 3, 1344, 1344))
    assert shapes["image_sizes"] == ((1, 2), (4, 2), (4, 2))
    assert tensorrt.profile_shapes(dynamic)["image_sizes"] == ((1, 2), (8, 2), (8, 2))
    fixed = tensorrt.profile_shapes(dynamic, {"batch": {"mutable": False, "size": 2}})
    assert fixed["image_sizes"] == ((2, 2),) * 3


def test_profile_rejects_what_the_model_cannot_have():
    with pytest.raises(ValueError, match="differs from the graph's fixed batch 1"):
        tensorrt.profile_shapes({"images": (1, 3, -1, -1)}, {"batch": {"mutable": False, "size": 2}})
    with pytest.raises(ValueError, match="dimension 1 is dynamic"):
        tensorrt.profile_shapes({"images": (1, -1, -1, -1)})
    with pytest.raises(ValueError, match="out of order"):
        tensorrt.profile_shapes({"images": (1, 3, -1, -1)}, {"min_hw": [800, 800], "opt_hw": [640, 640]})


def test_calibration_feeds_pad_like_the_host():
    images = np.ones((1, 3, 64, 96), np.float32)
    padded = tensorrt.pad_to(images, (1, 3, 128, 128))
    assert padded.shape == (1, 3, 128, 128) and padded.dtype == np.float32
    assert padded[..., :64, :96].all() and padded.sum() == images.sum()
    assert tensorrt.pad_to(np.array([[64, 96]]), (2, 2)).tolist() == [[64, 96], [0, 0]]
    with pytest.raises(ValueError, match="cannot pad"):
        tensorrt.pad_to(images, (1, 3, 32, 128))


@needs_tensorrt
def test_tensorrt_fp32_matches_onnxruntime(export_dir, engine_dir, photos, tmp_path):
    manifest = compile_step(export_dir, tmp_path / "trt", backend="tensorrt", precision="fp32",
                            verify_images=photos, verify_count=1, progress=False)
    assert manifest.model_file == "model.plan" and manifest.parity["passed"], manifest.parity
    assert (tmp_path / "trt" / "timing.cache").stat().st_size > 0
    engine = load_engine(tmp_path / "trt")
    reference = load_engine(engine_dir)
    assert reference.manifest.backend == "onnxruntime" and reference.manifest.precision == "fp32"
    # the photos differ in aspect ratio: input shapes change between calls, buffers grow and are reused
    paths = list_images(photos)
    spec = input_spec_of(manifest.inference_config)
    report = verify(EngineAsReference(reference), engine, paths, spec, progress=False)
    assert report["reference_detections"] == 100 * len(paths)
    assert not check_tolerance(report, Tolerance.for_precision("fp32")), report
    out = engine.infer(np.zeros((1, 3, 800, 1216), np.float32), np.array([[800, 1216]], np.int64))
    assert {k: (v.dtype, v.shape) for k, v in out.items()} == {
        "dets": (np.float32, (1, 100, 5)), "labels": (np.int64, (1, 100)), "masks": (np.float32, (1, 100, 28, 28))}


@needs_tensorrt
def test_tensorrt_fp16_within_tolerance_with_a_shared_timing_cache(export_dir, photos, tmp_path, monkeypatch):
    shared = tmp_path / "shared" / "timing.cache"
    monkeypatch.setenv(tensorrt.TIMING_CACHE_ENV, str(shared))
    # random weights score all proposals alike, so fp16 may reorder them: the AP tolerance is for
    # real checkpoints (conftest lets int8 miss it for the same reason); here every row must be there
    manifest = compile_step(export_dir, tmp_path / "trt", backend="tensorrt", precision="fp16",
                            verify_images=photos, verify_count=2, allow_parity_failure=True, progress=False)
    assert manifest.parity["engine_detections"] == manifest.parity["reference_detections"] == 200
    assert manifest.tools["backend"]["builder_flags"] == ["FP16"]
    assert shared.stat().st_size > 0


@needs_tensorrt
def test_tensorrt_int8_calibrates_on_photos(export_dir, photos, tmp_path):
    manifest = compile_step(export_dir, tmp_path / "trt", backend="tensorrt", precision="int8",
                            calib_images=photos, calib_count=2, verify_images=photos, verify_count=1,
                            allow_parity_failure=True, progress=False)
    facts = manifest.tools["backend"]
    assert facts["calibration_batches"] == 2 and (tmp_path / "trt" / facts["calibration_cache"]).stat().st_size > 0
    assert manifest.parity["engine_detections"] == manifest.parity["reference_detections"] == 100
