"""TensorRT build: what is TensorRT's own beyond the contract (tests/build_tools/test_builders.py):
its refusals without TensorRT or a GPU, builder flags, optimisation-profile shapes, calibration
padding, and (on a GPU machine with TensorRT) fp16 with a shared timing cache and int8 calibration.
Running a built engine is tests/service/test_backend_tensorrt.py's."""

from __future__ import annotations

import numpy as np
import pytest

from build_tools import cli
from build_tools.backends import get_builder
from build_tools.pipeline import compile_step
from build_tools.shapes import pad_to, profile_shapes
from service.backends import BackendUnavailable, get_backend
from service.manifest import BatchProfile, ShapeProfile

tensorrt = get_backend("tensorrt")
build = get_builder("tensorrt")
ok, reason = tensorrt.available()
needs_tensorrt = pytest.mark.skipif(not ok, reason=reason)
without_tensorrt = pytest.mark.skipif(ok, reason="TensorRT and a GPU are present here")
DEFAULT_HW = {"min_hw": (32, 32), "opt_hw": (800, 1344), "max_hw": (1344, 1344)}


def profile(batch: BatchProfile, **hw) -> ShapeProfile:
    return ShapeProfile(batch=batch, **{**DEFAULT_HW, **hw})


@without_tensorrt
def test_compile_without_tensorrt_raises_backend_unavailable(tmp_path):
    with pytest.raises(BackendUnavailable, match="tensorrt cannot build here") as info:
        build.compile(tmp_path / "model.onnx", tmp_path / "out", "fp32")
    assert reason in str(info.value)


def test_builder_flags_per_precision():
    assert build.builder_flags("fp32") == []
    assert build.builder_flags("fp16") == ["FP16"]
    assert build.builder_flags("int8") == ["FP16", "INT8"]


def test_profile_defaults_keep_the_graphs_fixed_batch():
    shapes = profile_shapes({"images": (2, 3, -1, -1), "image_sizes": (2, 2)})
    assert shapes["images"] == ((2, 3, 32, 32), (2, 3, 800, 1344), (2, 3, 1344, 1344))
    assert shapes["image_sizes"] == ((2, 2),) * 3
    assert list(shapes) == ["images", "image_sizes"]


def test_profile_follows_the_manifests_shape_profile():
    fixed = profile(BatchProfile(mutable=False, size=1), min_hw=(64, 96), opt_hw=(480, 640), max_hw=(640, 640))
    shapes = profile_shapes({"images": (1, 3, -1, -1), "image_sizes": (1, 2)}, fixed)
    assert shapes["images"] == ((1, 3, 64, 96), (1, 3, 480, 640), (1, 3, 640, 640))


def test_profile_of_a_dynamic_batch():
    dynamic = {"images": (-1, 3, -1, -1), "image_sizes": (-1, 2)}
    shapes = profile_shapes(dynamic, profile(BatchProfile(mutable=True, min=1, max=4)))
    assert shapes["images"] == ((1, 3, 32, 32), (4, 3, 800, 1344), (4, 3, 1344, 1344))
    assert shapes["image_sizes"] == ((1, 2), (4, 2), (4, 2))
    assert profile_shapes(dynamic)["image_sizes"] == ((1, 2), (8, 2), (8, 2))
    fixed = profile_shapes(dynamic, profile(BatchProfile(mutable=False, size=2)))
    assert fixed["image_sizes"] == ((2, 2),) * 3


def test_profile_rejects_what_the_model_cannot_have():
    with pytest.raises(ValueError, match="differs from the graph's fixed batch 1"):
        profile_shapes({"images": (1, 3, -1, -1)}, profile(BatchProfile(mutable=False, size=2)))
    with pytest.raises(ValueError, match="dimension 1 is dynamic"):
        profile_shapes({"images": (1, -1, -1, -1)})
    with pytest.raises(ValueError, match="out of order"):
        profile_shapes({"images": (1, 3, -1, -1)},
                       profile(BatchProfile(mutable=False, size=1), min_hw=(800, 800), opt_hw=(640, 640)))


def test_calibration_feeds_pad_like_the_host():
    images = np.ones((1, 3, 64, 96), np.float32)
    padded = pad_to(images, (1, 3, 128, 128))
    assert padded.shape == (1, 3, 128, 128) and padded.dtype == np.float32
    assert padded[..., :64, :96].all() and padded.sum() == images.sum()
    assert pad_to(np.array([[64, 96]]), (2, 2)).tolist() == [[64, 96], [0, 0]]
    with pytest.raises(ValueError, match="cannot pad"):
        pad_to(images, (1, 3, 32, 128))


def test_timing_cache_is_a_build_flag(tmp_path):
    args = cli.parser().parse_args(["compile", str(tmp_path), "--out", str(tmp_path / "o"),
                                    "--tensorrt-timing-cache", str(tmp_path / "t.cache")])
    assert cli._backend_options(args) == {"tensorrt": {"timing_cache": tmp_path / "t.cache"}}
    assert cli._backend_options(cli.parser().parse_args(["compile", str(tmp_path), "--out", "o"])) == {}


@needs_tensorrt
def test_tensorrt_fp16_within_tolerance_with_a_shared_timing_cache(export_dir, photos, tmp_path):
    shared = tmp_path / "shared" / "timing.cache"
    # random weights score all proposals alike, so fp16 may reorder them: the AP tolerance is for
    # real checkpoints (conftest lets int8 miss it for the same reason); here every row must be there
    manifest = compile_step(export_dir, tmp_path / "trt", backend="tensorrt", precision="fp16",
                            verify_images=photos, verify_count=2, allow_parity_failure=True, progress=False,
                            backend_options={"tensorrt": {"timing_cache": shared}})
    assert manifest.parity.engine_detections == manifest.parity.reference_detections == 200
    assert manifest.tools.backend["builder_flags"] == ["FP16"]
    assert shared.stat().st_size > 0


@needs_tensorrt
def test_tensorrt_int8_calibrates_on_photos(export_dir, photos, tmp_path):
    manifest = compile_step(export_dir, tmp_path / "trt", backend="tensorrt", precision="int8",
                            calib_images=photos, calib_count=2, verify_images=photos, verify_count=1,
                            allow_parity_failure=True, progress=False)
    facts = manifest.tools.backend
    assert facts["calibration_batches"] == 2 and (tmp_path / "trt" / facts["calibration_cache"]).stat().st_size > 0
    assert manifest.parity.engine_detections == manifest.parity.reference_detections == 100
