"""OpenVINO build: its own build flags and what the CPU plugin makes of a bf16 build (running what it
builds is tests/service/test_backend_openvino.py's)."""

from __future__ import annotations

import pytest
from conftest import cached_export, openvino_has_bf16

from build_tools import cli
from build_tools.pipeline import compile_step
from service.backends import openvino as openvino_backend
from service.manifest import Manifest

needs_openvino = pytest.mark.skipif(not openvino_backend.available()[0], reason="OpenVINO is not installed")
needs_bf16 = pytest.mark.skipif(not openvino_has_bf16(),
                                reason="OpenVINO missing or this CPU has neither AVX512_BF16 nor AMX: bf16 builds are refused")
# Where a coordinate chain starts: the layers that run at the hint's precision (the plugin's fp32 graph
# tail stops there) and ShapeOf, which reads a feature map's dims (anchor grids), not its values.
_CHAIN_STARTS = ("Convolution", "FullyConnected", "ShapeOf")


def test_bf16_roi_align_precision_is_a_build_flag(tmp_path):
    args = cli.parser().parse_args(["compile", str(tmp_path), "--out", str(tmp_path / "o"),
                                    "--openvino-bf16-roi-align", "fp32"])
    assert cli._backend_options(args) == {"openvino": {"roi_align_precision": "fp32"}}
    assert cli._backend_options(cli.parser().parse_args(["compile", str(tmp_path), "--out", "o"])) == {}
    args = cli.parser().parse_args(["compile", str(tmp_path), "--out", "o", "--openvino-bf16-predictors", "bf16"])
    assert cli._backend_options(args) == {"openvino": {"predictor_precision": "bf16"}}


@needs_openvino
def test_build_options_are_checked_before_any_work(tmp_path):
    from build_tools.backends import openvino as openvino_build

    for option in ({"activations": "unsigned"}, {"roi_align_precision": "f16"}, {"predictor_precision": "int8"}):
        with pytest.raises(ValueError, match=next(iter(option))):
            openvino_build.compile(tmp_path / "missing.onnx", tmp_path / "out", "int8", **option)
    assert not (tmp_path / "out").exists()


def _runtime_roi_aligns(folder):
    """The ROIAlign nodes of the bf16 artifact in ``folder`` as the CPU plugin compiled them."""
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(folder / "model.xml")), "CPU", {"INFERENCE_PRECISION_HINT": "bf16"})
    return [op for op in compiled.get_runtime_model().get_ordered_ops() if _info(op, "layerType") == "ROIAlign"]


def _info(op, key: str) -> str:
    return str(op.get_rt_info()[key].astype(str))


def _parent(op, port: int):
    return op.input(port).get_source_output().get_node()


def _coordinate_chain(roi_align) -> list:
    """The runtime nodes that compute ``roi_align``'s RoI boxes and batch indices, back to the
    convolutions, FCs and shapes they start from (those excluded)."""
    chain, seen, todo = [], set(), [_parent(roi_align, 1), _parent(roi_align, 2)]
    while todo:
        op = todo.pop()
        if op.get_friendly_name() in seen or _info(op, "layerType") in _CHAIN_STARTS:
            continue
        seen.add(op.get_friendly_name())
        chain.append(op)
        todo.extend(_parent(op, i) for i in range(op.get_input_size()))
    return chain


@pytest.fixture(scope="module")
def bf16_builds(tmp_path_factory):
    """The random-init export built as OpenVINO bf16 with each ``roi_align_precision``, by value."""
    folders = {}
    for roi_align_precision in ("bf16", "fp32"):
        folder = tmp_path_factory.mktemp("openvino-bf16") / roi_align_precision
        options = {} if roi_align_precision == "bf16" else {"openvino": {"roi_align_precision": "fp32"}}
        compile_step(cached_export(), folder, backend="openvino", precision="bf16", run_verify=False,
                     backend_options=options)
        folders[roi_align_precision] = folder
    return folders


@needs_bf16
def test_default_bf16_build_samples_bf16_features_at_fp32_coordinates(bf16_builds):
    assert Manifest.load(bf16_builds["bf16"]).tools.backend["roi_align_precision"] == "bf16"
    roi_aligns = _runtime_roi_aligns(bf16_builds["bf16"])
    assert len(roi_aligns) == 8  # four FPN levels for the box head, four for the mask head
    for roi_align in roi_aligns:
        assert _info(roi_align, "runtimePrecision") == "bf16"
        assert _info(_parent(roi_align, 0), "outputPrecisions") == "bf16"
        chain = _coordinate_chain(roi_align)
        assert chain, "RoIAlign's coordinates come from somewhere"
        # A Reorder at the chain's start widens a convolution's bf16 output; what it hands on is fp32.
        in_bf16 = [f"{_info(op, 'layerType')} {op.get_friendly_name()}" for op in chain
                   if "bf16" in _info(op, "outputPrecisions")
                   or (_info(op, "layerType") != "Reorder" and _info(op, "runtimePrecision") == "bf16")]
        assert in_bf16 == [], f"{roi_align.get_friendly_name()}'s coordinate chain runs bf16 at {in_bf16}"


@needs_bf16
def test_fp32_roi_align_option_keeps_the_blocked_layout(bf16_builds):
    # fp32 RoIAlign on features the plugin widened itself ran planar ("abcd"), 6-7x the time.
    for roi_align in _runtime_roi_aligns(bf16_builds["fp32"]):
        assert _info(roi_align, "runtimePrecision") == "f32"
        assert _info(roi_align, "outputLayouts") != "abcd"
        assert all(_info(op, "runtimePrecision") != "bf16" for op in _coordinate_chain(roi_align)
                   if _info(op, "layerType") != "Reorder")


@needs_openvino
def test_int8_scope_names_a_transposed_convolution_by_its_onnx_name():
    # The converter names the mask head's ConvTranspose ``ConvolutionBackpropData_<n>``; judged by
    # that name it fell outside the compute scopes and ran fp32 in int8 engines (92 ms at 800x1344).
    import numpy as np
    from openvino import opset13 as ops

    from build_tools.backends.openvino import onnx_name
    from build_tools.precision_scopes import reduced_precision_allowed

    x = ops.parameter([1, 256, 14, 14], np.float32)
    deconv = ops.convolution_backprop_data(x, ops.constant(np.zeros((256, 256, 2, 2), np.float32)), [2, 2], [0, 0], [0, 0], [1, 1])
    bias = ops.add(deconv, ops.constant(np.zeros((1, 256, 1, 1), np.float32)), name="/mask_predictor/conv5_mask/ConvTranspose")
    assert onnx_name(deconv) == bias.get_friendly_name() == "/mask_predictor/conv5_mask/ConvTranspose"
    assert reduced_precision_allowed(onnx_name(deconv))
