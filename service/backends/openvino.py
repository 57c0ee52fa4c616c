"""OpenVINO backend (CPU): runs the IR that ``build_tools/backends/openvino.py`` builds.

Precisions: ``fp32``; ``bf16`` (the fp32 IR compiled with ``INFERENCE_PRECISION_HINT`` bf16, on
CPUs with AVX512_BF16 or AMX); ``int8`` (an NNCF-quantised IR). The artifact's facts name the
inference precision hint to compile with.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from service.backends.base import OUTPUT_NAMES, BackendUnavailable, EngineBase
from service.manifest import Manifest

NAME = "openvino"
PRECISIONS = ("fp32", "bf16", "int8")
# One worker drives one engine with one infer request, so LATENCY (one stream using all the
# threads) is the default; the service's OpenVINO settings choose others for other layouts.
DEFAULT_PERFORMANCE_HINT = "LATENCY"


# Names of the extra outputs a bf16 build adds (build_tools/backends/openvino.py).
PRECISION_ANCHOR_PREFIX = "precision_anchor_"


def available() -> tuple[bool, str]:
    try:
        import openvino  # noqa: F401
    except ImportError as exc:
        return False, f"openvino is not installed ({exc}); pip install openvino"
    return True, ""


def cpu_capabilities() -> list[str]:
    """The CPU plugin's ``OPTIMIZATION_CAPABILITIES`` here (e.g. ``FP32``, ``BF16``, ``INT8``)."""
    import openvino as ov

    return list(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


class OpenVinoEngine(EngineBase):
    """One compiled model and one infer request; one worker drives it.

    Args:
        threads: ``INFERENCE_NUM_THREADS`` (None: OpenVINO's default, all cores).
        performance_hint: ``LATENCY``, ``THROUGHPUT`` or ``CUMULATIVE_THROUGHPUT``.
        streams: ``NUM_STREAMS`` (None: what the hint implies).
    """

    def __init__(self, model_path: Path, manifest: Manifest, threads: int | None = None,
                 performance_hint: str = DEFAULT_PERFORMANCE_HINT, streams: int | None = None):
        import openvino as ov

        super().__init__(manifest, threads)
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": manifest.tools.backend["inference_precision_hint"],
                                  "PERFORMANCE_HINT": performance_hint}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        if streams is not None:
            config["NUM_STREAMS"] = streams
        core = ov.Core()
        self.compiled = core.compile_model(core.read_model(str(model_path)), "CPU", config)
        # The graph's outputs come first; a bf16 build appends one-element precision anchors
        # (``PRECISION_ANCHOR_PREFIX``) that keep RoIAlign and its coordinates in fp32, read by nobody.
        self.outputs = list(self.compiled.outputs[:len(OUTPUT_NAMES)])
        extra = [port.get_any_name() for port in self.compiled.outputs[len(OUTPUT_NAMES):]]
        if len(self.outputs) != len(OUTPUT_NAMES) or not all(n.startswith(PRECISION_ANCHOR_PREFIX) for n in extra):
            raise BackendUnavailable(f"{model_path} has outputs {[p.get_any_name() for p in self.compiled.outputs]}, "
                                     f"expected {len(OUTPUT_NAMES)} ({', '.join(OUTPUT_NAMES)}) and precision anchors")
        self.request = self.compiled.create_infer_request()

    def _run(self, feed: dict[str, np.ndarray]) -> Sequence[np.ndarray]:
        # outputs keep the graph's order (the ONNX names do not always survive conversion); copies,
        # as the request reuses its output memory on the next call
        results = self.request.infer(feed)
        return [np.array(results[port]) for port in self.outputs]


def load(artifact_dir: Path, manifest: Manifest, threads: int | None = None,
         options: Mapping[str, Any] | None = None) -> OpenVinoEngine:
    """Open the IR for the CPU plugin; ``options``: ``performance_hint`` and ``streams`` (see
    :class:`OpenVinoEngine`), the service's OpenVINO settings."""
    options = options or {}
    return OpenVinoEngine(Path(artifact_dir) / manifest.model_file, manifest, threads,
                          performance_hint=options.get("performance_hint") or DEFAULT_PERFORMANCE_HINT,
                          streams=options.get("streams"))
