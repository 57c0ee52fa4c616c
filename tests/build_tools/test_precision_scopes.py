"""Reduced precision goes where the arithmetic is, and coordinates stay fp32 (build_tools/precision_scopes.py).

Checked on real builds of the random-init export, by what each runtime reports it runs: ONNX
Runtime int8 (which nodes read DequantizeLinear weights), OpenVINO int8 (which layers NNCF put
FakeQuantize in front of) and OpenVINO bf16 (the CPU plugin's runtime precision of each node).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import openvino_has_bf16
from onnx import numpy_helper

from build_tools.pipeline import compile_step
from build_tools.precision_scopes import FP32_LAYERS, reduced_precision_allowed
from service.backends import load_engine
from service.preprocess import pad_batch, prepare_image
from build_tools.images import read_rgb

pytestmark = pytest.mark.slow


def test_the_scopes_split_compute_from_numbers_read_as_numbers():
    allowed = ["/backbone/body/layer1/layer1.0/conv1/Conv", "/backbone/fpn/layer_blocks.0/Conv", "/head/conv/conv.0/Conv",
               "/box_head/fc6/Gemm", "/mask_head/mask_head.0/mask_head.0.0/Conv", "/mask_predictor/conv5_mask/ConvTranspose"]
    kept = ["/head/cls_logits/Conv", "/head/bbox_pred_3/Conv", "/box_predictor/cls_score/Gemm",
            "/box_predictor/bbox_pred/Gemm", "/mask_predictor/mask_fcn_logits/Conv", "/RoiAlign", "/Softmax",
            "/NonMaxSuppression", "/anchor_generator/Mul", "/Div_15"]
    assert all(reduced_precision_allowed(n) for n in allowed)
    assert not any(reduced_precision_allowed(n) for n in kept)


def _calibration(tmp_path: Path, photos: Path) -> Path:
    folder = tmp_path / "calib"
    folder.mkdir()
    for name in ("coffee.png", "chelsea.png"):
        (folder / name).write_bytes((photos / name).read_bytes())
    return folder


def test_onnxruntime_int8_quantizes_compute_layers_only(export_dir, photos, tmp_path):
    manifest = compile_step(export_dir, tmp_path / "ort-int8", precision="int8", calib_images=_calibration(tmp_path, photos),
                            run_verify=False, progress=False)
    graph = onnx.load(str(tmp_path / "ort-int8" / manifest.model_file)).graph
    producer = {out: node for node in graph.node for out in node.output}
    quantized, float_layers = set(), set()
    for node in graph.node:
        if node.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            weight = producer.get(node.input[1])
            (quantized if weight is not None and weight.op_type == "DequantizeLinear" else float_layers).add(node.name)
    assert quantized and all(reduced_precision_allowed(n) for n in quantized)
    assert {n for n in float_layers if not reduced_precision_allowed(n)} == float_layers
    assert any(n.startswith("/box_predictor/") for n in float_layers) and any(n.startswith("/head/cls_logits") for n in float_layers)
    assert sum(n.startswith("/backbone/") for n in quantized) > 50
    facts = manifest.tools.backend
    assert facts["fp32_excluded_nodes"] == len(float_layers) and facts["reduced_precision_scopes"]


def test_openvino_int8_puts_fake_quantize_before_compute_layers_only(export_dir, photos, tmp_path):
    import openvino as ov

    from build_tools.backends.openvino import onnx_name

    manifest = compile_step(export_dir, tmp_path / "ov-int8", backend="openvino", precision="int8",
                            calib_images=_calibration(tmp_path, photos), run_verify=False, progress=False)
    model = ov.Core().read_model(str(tmp_path / "ov-int8" / manifest.model_file))
    fed_by_fq = {onnx_name(consumer.get_node())
                 for op in model.get_ordered_ops() if op.get_type_name() == "FakeQuantize"
                 for consumer in op.output(0).get_target_inputs()}
    layers = {n for n in fed_by_fq if "Conv" in n or "Gemm" in n or "MatMul" in n}
    assert layers and all(reduced_precision_allowed(n) for n in layers), sorted(layers)[:5]
    assert "/mask_predictor/conv5_mask/ConvTranspose" in layers
    assert not any(n.startswith(("/box_predictor/", "/head/cls_logits", "/head/bbox_pred")) for n in fed_by_fq)


@pytest.mark.skipif(not openvino_has_bf16(), reason="this CPU has neither AVX512_BF16 nor AMX: OpenVINO has no bf16 here")
def test_openvino_bf16_keeps_softmax_and_nms_fp32(export_dir, photos, tmp_path):
    # RoIAlign and its coordinate chain: tests/build_tools/test_builder_openvino.py
    manifest = compile_step(export_dir, tmp_path / "ov-bf16", backend="openvino", precision="bf16",
                            run_verify=False, progress=False)
    assert manifest.tools.backend["precision_anchors"] == 16  # 4 levels x (box, mask) x (RoIs, batch indices)
    engine = load_engine(tmp_path / "ov-bf16")
    precision = {}
    for op in engine.compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        precision[op.get_friendly_name()] = (info["layerType"].astype(str), info["runtimePrecision"].astype(str))
    assert {p for t, p in precision.values() if t == "Softmax"} == {"f32"}
    assert {p for t, p in precision.values() if t == "NonMaxSuppression"} == {"f32"}
    convolutions = [p for n, (t, p) in precision.items() if t == "Convolution" and n.startswith("/backbone/")]
    assert convolutions and set(convolutions) == {"bf16"}
    # the layers whose outputs are read as numbers stay fp32 (marked ``precise``), their inputs' FCs do not
    layers = {n: p for n, (t, p) in precision.items() if t in ("Convolution", "FullyConnected")}
    predictors = {n: p for n, p in layers.items() if n.startswith(FP32_LAYERS)}
    assert {"/box_predictor/cls_score/Gemm", "/box_predictor/bbox_pred/Gemm"} <= predictors.keys()
    assert any(n.startswith("/mask_predictor/mask_fcn_logits") for n in predictors)
    assert set(predictors.values()) == {"f32"}, predictors
    assert {layers["/box_head/fc6/Gemm"], layers["/box_head/fc7/Gemm"]} == {"bf16"}
    assert manifest.tools.backend["predictor_precision"] == "fp32" and manifest.tools.backend["fp32_predictor_nodes"] > 0

    spec = manifest.input.spec
    images, sizes = pad_batch([prepare_image(read_rgb(photos / "coffee.png"), spec)], spec.pad_divisor)
    out = engine.infer(images, sizes)
    assert set(out) == {"dets", "labels", "masks"} and out["dets"].shape[-1] == 5
    assert np.isfinite(out["dets"]).all()


@pytest.mark.skipif(openvino_has_bf16(), reason="this CPU has bf16: the refusal cannot happen here")
def test_openvino_bf16_is_refused_on_a_cpu_without_it(export_dir, tmp_path):
    from service.backends.base import UnsupportedPrecision

    with pytest.raises(UnsupportedPrecision, match="bf16 needs a CPU with AVX512_BF16 or AMX"):
        compile_step(export_dir, tmp_path / "ov-bf16", backend="openvino", precision="bf16", run_verify=False,
                     progress=False)
    assert not (tmp_path / "ov-bf16").exists() and not (tmp_path / "ov-bf16.partial").exists()


def _activation_scales(model_path: Path) -> dict[str, float]:
    """Scale of each activation tensor's QuantizeLinear (weights are stored quantised, not quantised in the graph)."""
    graph = onnx.load(str(model_path)).graph
    initializers = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    return {node.input[0]: float(initializers[node.input[1]]) for node in graph.node
            if node.op_type == "QuantizeLinear" and node.input[0] not in initializers}


def test_onnxruntime_int8_activation_ranges_are_the_mean_of_the_images_unless_asked(export_dir, photos, tmp_path):
    calib = _calibration(tmp_path, photos)
    mean = compile_step(export_dir, tmp_path / "mean", precision="int8", calib_images=calib, run_verify=False,
                        progress=False)
    extreme = compile_step(export_dir, tmp_path / "extreme", precision="int8", calib_images=calib, run_verify=False,
                           progress=False, backend_options={"onnxruntime": {"activation_ranges": "extreme"}})
    assert mean.tools.backend["activation_ranges"].startswith("mean")
    assert extreme.tools.backend["activation_ranges"].startswith("extreme")
    by_mean, by_extreme = _activation_scales(tmp_path / "mean" / mean.model_file), _activation_scales(
        tmp_path / "extreme" / extreme.model_file)
    assert by_mean.keys() == by_extreme.keys() and len(by_mean) > 50
    # the extremes over two images hold each image's range, so their mean's is never wider ...
    assert all(by_extreme[t] >= by_mean[t] * (1 - 1e-6) for t in by_mean)
    # ... and two different photos make it narrower for most tensors
    assert sum(by_extreme[t] > by_mean[t] * 1.01 for t in by_mean) > len(by_mean) // 2


def test_onnxruntime_int8_activation_ranges_is_a_build_flag(tmp_path):
    from build_tools import cli

    args = cli.parser().parse_args(["compile", str(tmp_path), "--out", str(tmp_path / "o"),
                                    "--onnxruntime-int8-ranges", "extreme"])
    assert cli._backend_options(args) == {"onnxruntime": {"activation_ranges": "extreme"}}
    from build_tools.backends import onnxruntime as onnxruntime_build

    with pytest.raises(ValueError, match="activation_ranges must be one of mean, extreme"):
        onnxruntime_build.compile(tmp_path / "model.onnx", tmp_path / "never", "int8", activation_ranges="median")
    assert not (tmp_path / "never").exists()
