"""OpenVINO build (CPU): the exported ONNX converted to an IR.

``fp32``: converted as is. ``bf16``: the same fp32 IR, run with OpenVINO's
``INFERENCE_PRECISION_HINT`` bf16 (CPUs with AVX512_BF16 or AMX; refused elsewhere). ``int8``: NNCF
post-training quantisation calibrated on real images, saved as an int8 IR.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from service.backends.base import (
    UnsupportedPrecision,
    check_precision,
    require_calibration,
)
from service.backends.openvino import NAME, PRECISIONS, cpu_capabilities
from service.manifest import ShapeProfile

MODEL_FILE = "model.xml"
# The inference precision each artifact precision runs at (the runtime reads it from the facts).
_HINT = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}


def compile(
    onnx_path: Path,
    out_dir: Path,
    precision: str,
    calibration: Iterable[dict[str, np.ndarray]] | None = None,
    *,
    shape_profile: ShapeProfile | None = None,
) -> tuple[str, dict]:
    """``model.xml`` (+ ``model.bin``) in ``out_dir``. ``shape_profile`` is not needed: the IR keeps
    the graph's dynamic axes."""
    precision = check_precision(NAME, PRECISIONS, precision)
    feeds = require_calibration(calibration) if precision == "int8" else None
    import openvino as ov

    if precision == "bf16" and "BF16" not in cpu_capabilities():
        raise UnsupportedPrecision("bf16 needs a CPU with AVX512_BF16 or AMX; this one has neither")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = ov.convert_model(str(onnx_path))
    facts = {"inference_precision_hint": _HINT[precision], "openvino": ov.get_version()}
    if feeds is not None:
        import nncf

        model = nncf.quantize(
            model,
            nncf.Dataset(feeds),
            subset_size=len(feeds),
            # symmetric weights, asymmetric activations: the activations after ReLU-free adds
            # (FPN sums) are not centred on zero
            preset=nncf.QuantizationPreset.MIXED,
        )
        facts.update({"graph": "NNCF post-training int8", "calibration_images": len(feeds), "nncf": nncf.__version__})
    else:
        facts["graph"] = "exported ONNX converted to IR, fp32 weights"
    ov.save_model(model, str(out_dir / MODEL_FILE), compress_to_fp16=False)
    return MODEL_FILE, facts
