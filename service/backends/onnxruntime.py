"""ONNX Runtime backend: the embedded default (CPU provider; CUDA where onnxruntime-gpu is present).

Precisions: ``fp32`` (the exported graph as is) and ``int8`` (static QDQ quantisation of the
convolutions and fully connected layers, per-channel weights, activations calibrated on real
images). ``fp16`` is refused: the CPU provider has no fp16 convolution kernels, so a converted graph
only adds casts.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from service.backends.base import UnsupportedPrecision, canonical_precision
from service.manifest import Manifest

NAME = "onnxruntime"
PRECISIONS = ("fp32", "int8")
# Quantising the 3x3/1x1 convolutions (backbone, FPN, RPN, mask head) and the two box-head FCs
# covers almost all of the arithmetic; the NMS/TopK/RoiAlign machinery stays float.
QUANTIZED_OP_TYPES = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def available() -> tuple[bool, str]:
    try:
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        return False, f"onnxruntime is not installed ({exc})"
    return True, ""


def default_threads() -> int:
    """All cores the process may use: on a small CPU one session using every core beats two."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


class _FeedReader:
    """Adapts an iterable of input feeds to ONNX Runtime's ``CalibrationDataReader`` protocol."""

    def __init__(self, feeds: Iterable[dict[str, np.ndarray]]):
        self._feeds = iter(feeds)
        self.count = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        feed = next(self._feeds, None)
        if feed is not None:
            self.count += 1
        return feed


def compile(
    onnx_path: Path,
    out_dir: Path,
    precision: str,
    calibration: Iterable[dict[str, np.ndarray]] | None = None,
    **options,
) -> tuple[str, dict]:
    precision = canonical_precision(precision)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / "model.onnx"
    if precision == "fp32":
        shutil.copyfile(onnx_path, target)
        return target.name, {"graph": "exported ONNX, unchanged"}
    if precision == "int8":
        if calibration is None:
            raise UnsupportedPrecision("int8 needs calibration images (--calib-images DIR)")
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        reader = _FeedReader(calibration)
        quantize_static(
            str(onnx_path),
            str(target),
            reader,
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(QUANTIZED_OP_TYPES),
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            # MinMax calibration reduces each activation to its min/max inside the augmented graph,
            # so memory stays small however many images are fed
            extra_options={"ActivationSymmetric": False},
        )
        if reader.count == 0:
            raise UnsupportedPrecision("int8 calibration got no images")
        return target.name, {
            "graph": "static QDQ int8",
            "quantized_op_types": list(QUANTIZED_OP_TYPES),
            "per_channel": True,
            "calibration_method": "MinMax",
            "calibration_images": reader.count,
        }
    raise UnsupportedPrecision(
        f"onnxruntime builds {', '.join(PRECISIONS)}; {precision} is not offered because the CPU "
        "provider has no kernels for it (use another backend)"
    )


class OnnxRuntimeEngine:
    """One ``InferenceSession``; ``infer`` may be called from one thread at a time per engine."""

    def __init__(self, model_path: Path, manifest: Manifest, threads: int | None = None):
        import onnxruntime as ort

        self.manifest = manifest
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or default_threads()
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
        self.session = ort.InferenceSession(str(model_path), options, providers=providers)
        self.threads = options.intra_op_num_threads
        self.providers = self.session.get_providers()

    @property
    def batch_size(self) -> int | None:
        return self.manifest.batch_size

    def infer(self, images: np.ndarray, image_sizes: np.ndarray) -> dict[str, np.ndarray]:
        dets, labels, masks = self.session.run(
            ["dets", "labels", "masks"],
            {"images": np.ascontiguousarray(images, dtype=np.float32),
             "image_sizes": np.ascontiguousarray(image_sizes, dtype=np.int64)},
        )
        return {"dets": dets, "labels": labels, "masks": masks}


def load(artifact_dir: Path, manifest: Manifest, threads: int | None = None) -> OnnxRuntimeEngine:
    return OnnxRuntimeEngine(Path(artifact_dir) / manifest.model_file, manifest, threads)
