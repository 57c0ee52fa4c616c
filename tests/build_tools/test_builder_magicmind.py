"""MagicMind build: what is MagicMind's own beyond the contract (tests/build_tools/test_builders.py):
its refusal without the SDK, the builder-config and calibration logic (pure Python), and (on an MLU
machine) an int8 build calibrated on photos. Its registration and availability are
tests/service/test_backend_magicmind.py's."""

from __future__ import annotations

import json

import numpy as np
import pytest

from build_tools.backends import get_builder
from build_tools.pipeline import compile_step
from service.backends import BackendUnavailable, get_backend
from service.backends.base import UnsupportedPrecision
from service.manifest import BatchProfile, ShapeProfile

magicmind = get_backend("magicmind")
build = get_builder("magicmind")
ok, reason = magicmind.available()
needs_magicmind = pytest.mark.skipif(not ok, reason=reason)
without_magicmind = pytest.mark.skipif(ok, reason="MagicMind and an MLU are present here")
FIXED_B1 = {"images": (1, 3, -1, -1), "image_sizes": (1, 2)}


@without_magicmind
def test_compile_without_magicmind_raises_backend_unavailable(tmp_path):
    with pytest.raises(BackendUnavailable, match="magicmind is not installed.*Cambricon's container images"):
        build.compile(tmp_path / "model.onnx", tmp_path / "out", "force_float16")


@pytest.mark.parametrize("precision, mode", [
    ("fp32", "force_float32"), ("fp16", "force_float16"), ("int8", "qint8_mixed_float16"),
])
def test_builder_config_of_a_fixed_batch(precision, mode):
    config = build.builder_config(precision, FIXED_B1)
    assert config["precision_config"]["precision_mode"] == mode
    assert ("activation_quant_algo" in config["precision_config"]) == (precision == "int8")
    # H and W stay mutable with a fixed batch; the static image_sizes input needs no range
    assert config["graph_shape_mutable"] is True
    assert config["dim_range"] == {"0": {"min": [1, 3, 32, 32], "max": [1, 3, 1344, 1344]}}
    assert "archs" not in config
    assert json.loads(json.dumps(config)) == config


def test_builder_config_of_a_mutable_batch_with_archs():
    profile = ShapeProfile(batch=BatchProfile(mutable=True, min=1, max=8), min_hw=(64, 64), opt_hw=(800, 1344),
                           max_hw=(1344, 1344))
    config = build.builder_config("fp16", {"images": (-1, 3, -1, -1), "image_sizes": (-1, 2)}, profile, ["mtp_372"])
    assert config["dim_range"] == {
        "0": {"min": [1, 3, 64, 64], "max": [8, 3, 1344, 1344]},
        "1": {"min": [1, 2], "max": [8, 2]},
    }
    assert config["archs"] == ["mtp_372"]


def test_builder_config_of_a_static_graph():
    config = build.builder_config("fp32", {"images": (1, 3, 800, 1344), "image_sizes": (1, 2)})
    assert config["graph_shape_mutable"] is False and "dim_range" not in config


def test_reads_input_shapes_from_the_onnx(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["images"], ["dets"])], "g",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, "height", "width"]),
         helper.make_tensor_value_info("image_sizes", TensorProto.INT64, [1, 2])],
        [helper.make_tensor_value_info("dets", TensorProto.FLOAT, [1, 3, "height", "width"])],
    )
    onnx.save(helper.make_model(graph), tmp_path / "model.onnx")
    assert build.onnx_input_shapes(tmp_path / "model.onnx") == FIXED_B1


def test_calibration_feeds_share_one_shape():
    feeds = [
        {"images": np.ones((1, 3, 800, 1216), np.float32), "image_sizes": np.array([[800, 1201]])},
        {"images": np.ones((1, 3, 1216, 800), np.float32), "image_sizes": np.array([[1201, 800]])},
    ]
    padded = build.padded_feeds(iter(feeds))
    assert [f["images"].shape for f in padded] == [(1, 3, 1216, 1216)] * 2
    assert [f["image_sizes"].tolist() for f in padded] == [[[800, 1201]], [[1201, 800]]]
    assert padded[1]["images"][..., :1216, :800].all() and not padded[1]["images"][..., 800:].any()
    with pytest.raises(UnsupportedPrecision, match="calibration got no images"):
        build.padded_feeds([])


@needs_magicmind
def test_magicmind_int8_calibrates_on_photos(export_dir, photos, tmp_path):
    manifest = compile_step(export_dir, tmp_path / "mm", backend="magicmind", precision="int8",
                            calib_images=photos, calib_count=2, verify_images=photos, verify_count=2,
                            allow_parity_failure=True, progress=False)
    assert manifest.tools.backend["calibration_batches"] == 2
    assert manifest.parity.engine_detections == manifest.parity.reference_detections == 200
