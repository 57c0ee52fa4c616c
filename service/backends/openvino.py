"""OpenVINO backend (CPU).

Precisions: ``fp32``; ``bf16`` (the fp32 IR compiled with OpenVINO's ``INFERENCE_PRECISION_HINT``
bf16, which runs on CPUs with AVX512_BF16 or AMX and is refused elsewhere); ``int8`` (NNCF
post-training quantisation calibrated on real images, saved as an int8 IR).
"""

from __future__ import annotations

import os

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from service.backends.base import BackendUnavailable, UnsupportedPrecision, canonical_precision
from service.manifest import Manifest

NAME = "openvino"
PRECISIONS = ("fp32", "bf16", "int8")
MODEL_FILE = "model.xml"
OUTPUT_NAMES = ("dets", "labels", "masks")
# The inference precision each artifact precision runs at.
_HINT = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}


def available() -> tuple[bool, str]:
    try:
        import openvino  # noqa: F401
    except ImportError as exc:
        return False, f"openvino is not installed ({exc}); pip install openvino"
    return True, ""


def cpu_capabilities() -> list[str]:
    import openvino as ov

    return list(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def compile(
    onnx_path: Path,
    out_dir: Path,
    precision: str,
    calibration: Iterable[dict[str, np.ndarray]] | None = None,
    **options,
) -> tuple[str, dict]:
    import openvino as ov

    precision = canonical_precision(precision)
    if precision not in PRECISIONS:
        raise UnsupportedPrecision(f"openvino builds {', '.join(PRECISIONS)}, not {precision}")
    if precision == "bf16" and "BF16" not in cpu_capabilities():
        raise UnsupportedPrecision("bf16 needs a CPU with AVX512_BF16 or AMX; this one has neither")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = ov.convert_model(str(onnx_path))
    facts = {"inference_precision_hint": _HINT[precision], "openvino": ov.get_version()}
    if precision == "int8":
        if calibration is None:
            raise UnsupportedPrecision("int8 needs calibration images (--calib-images DIR)")
        import nncf

        feeds = list(calibration)
        if not feeds:
            raise UnsupportedPrecision("int8 calibration got no images")
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


class OpenVinoEngine:
    """One compiled model and one infer request; one worker drives it."""

    def __init__(self, model_path: Path, manifest: Manifest, threads: int | None = None):
        import openvino as ov

        self.manifest = manifest
        hint = manifest.tools.get("backend", {}).get("inference_precision_hint", "f32")
        # one worker drives one engine with one infer request, so LATENCY (one stream using all the
        # threads) is the default; MASKRCNN_OPENVINO_STREAMS / _PERFORMANCE_HINT override for other layouts
        config = {"INFERENCE_PRECISION_HINT": hint,
                  "PERFORMANCE_HINT": os.environ.get("MASKRCNN_OPENVINO_PERFORMANCE_HINT", "LATENCY")}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        if os.environ.get("MASKRCNN_OPENVINO_STREAMS"):
            config["NUM_STREAMS"] = os.environ["MASKRCNN_OPENVINO_STREAMS"]
        core = ov.Core()
        self.compiled = core.compile_model(core.read_model(str(model_path)), "CPU", config)
        if len(self.compiled.outputs) != len(OUTPUT_NAMES):
            raise BackendUnavailable(f"{model_path} has {len(self.compiled.outputs)} outputs, expected 3")
        self.request = self.compiled.create_infer_request()

    @property
    def batch_size(self) -> int | None:
        return self.manifest.batch_size

    def infer(self, images: np.ndarray, image_sizes: np.ndarray) -> dict[str, np.ndarray]:
        # outputs keep the graph's order; the ONNX names do not always survive conversion
        results = self.request.infer({
            "images": np.ascontiguousarray(images, dtype=np.float32),
            "image_sizes": np.ascontiguousarray(image_sizes, dtype=np.int64),
        })
        return {name: np.array(results[port]) for name, port in zip(OUTPUT_NAMES, self.compiled.outputs)}


def load(artifact_dir: Path, manifest: Manifest, threads: int | None = None) -> OpenVinoEngine:
    return OpenVinoEngine(Path(artifact_dir) / manifest.model_file, manifest, threads)
