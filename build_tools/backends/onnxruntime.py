"""ONNX Runtime build: ``fp32`` is the exported graph as is; ``int8`` is static QDQ quantisation of
the convolutions and fully connected layers where the arithmetic is (``build_tools.precision_scopes``:
backbone, FPN, RPN head, box and mask heads; per-channel weights, activations calibrated on real
images), every other node excluded, so predictors' outputs, coordinates, RoIAlign, softmax and NMS
stay fp32. Each activation's range is the mean over the calibration images of its per-image min and
max (``activation_ranges="mean"``, the default; NNCF's OpenVINO int8 does the same) or their
extremes over all images (``"extreme"``: one outlier image widens a range for every request).
``fp16`` is refused: the CPU provider has no fp16 convolution kernels, so a converted graph only
adds casts.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from build_tools import precision_scopes
from service.backends.base import (
    UnsupportedPrecision,
    canonical_precision,
    check_precision,
    require_calibration,
)
from service.backends.onnxruntime import NAME, PRECISIONS
from service.manifest import ShapeProfile

MODEL_FILE = "model.onnx"
# Op types QDQ may quantise; of those nodes, only the ones in build_tools.precision_scopes' compute
# scopes are (the NMS/TopK/RoiAlign machinery has none of these types and stays float anyway).
QUANTIZED_OP_TYPES = ("Conv", "ConvTranspose", "Gemm", "MatMul")
ACTIVATION_RANGES = ("mean", "extreme")  # the first is the default


class _FeedReader:
    """Adapts a list of input feeds to ONNX Runtime's ``CalibrationDataReader`` protocol."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self._feeds = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def compile(
    onnx_path: Path,
    out_dir: Path,
    precision: str,
    calibration: Iterable[dict[str, np.ndarray]] | None = None,
    *,
    shape_profile: ShapeProfile | None = None,
    activation_ranges: str = ACTIVATION_RANGES[0],
) -> tuple[str, dict]:
    """``model.onnx`` in ``out_dir``: the export copied (fp32) or quantised (int8). ``shape_profile``
    is not needed: the graph keeps its dynamic axes. ``activation_ranges`` (int8): ``mean`` or
    ``extreme`` of the per-image activation min/max over the calibration images."""
    if activation_ranges not in ACTIVATION_RANGES:
        raise ValueError(f"activation_ranges must be one of {', '.join(ACTIVATION_RANGES)}, got {activation_ranges!r}")
    precision = canonical_precision(precision)
    try:
        check_precision(NAME, PRECISIONS, precision)
    except UnsupportedPrecision as exc:
        raise UnsupportedPrecision(f"{exc}: the CPU provider has no kernels for it (use another backend)") from None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / MODEL_FILE
    if precision == "fp32":
        shutil.copyfile(onnx_path, target)
        return target.name, {"graph": "exported ONNX, unchanged"}
    feeds = require_calibration(calibration)
    import onnx
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    excluded = precision_scopes.fp32_nodes(n.name for n in graph.node if n.op_type in QUANTIZED_OP_TYPES)
    quantize_static(
        str(onnx_path),
        str(target),
        _FeedReader(feeds),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=list(QUANTIZED_OP_TYPES),
        per_channel=True,
        nodes_to_exclude=excluded,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
        # MinMax calibration reduces each activation to its min/max inside the augmented graph,
        # so its memory stays small however many images are fed
        extra_options={"ActivationSymmetric": False, "CalibMovingAverage": activation_ranges == "mean"},
    )
    return target.name, {
        "graph": "static QDQ int8",
        "quantized_op_types": list(QUANTIZED_OP_TYPES),
        **precision_scopes.summary(),
        "fp32_excluded_nodes": len(excluded),
        "per_channel": True,
        "calibration_method": "MinMax",
        "activation_ranges": f"{activation_ranges} of per-image min/max",
        "calibration_images": len(feeds),
    }
