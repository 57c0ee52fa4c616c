"""ONNX Runtime backend: the embedded default (CPU provider; CUDA where onnxruntime-gpu is present).

Runs ``fp32`` and ``int8`` (static QDQ) artifacts; ``build_tools/backends/onnxruntime.py`` builds them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from service.backends.base import OUTPUT_NAMES, EngineBase, cpu_cores
from service.manifest import Manifest

NAME = "onnxruntime"
PRECISIONS = ("fp32", "int8")


def available() -> tuple[bool, str]:
    try:
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        return False, f"onnxruntime is not installed ({exc})"
    return True, ""


class OnnxRuntimeEngine(EngineBase):
    """One ``InferenceSession``; ``infer`` may be called from one thread at a time per engine.

    ``threads``: intra-op threads, default all cores (on a small CPU one session using every core
    beats two)."""

    def __init__(self, model_path: Path, manifest: Manifest, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or cpu_cores()
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        super().__init__(manifest, options.intra_op_num_threads)
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
        self.session = ort.InferenceSession(str(model_path), options, providers=providers)
        self.providers = self.session.get_providers()

    def _run(self, feed: dict[str, np.ndarray]) -> Sequence[np.ndarray]:
        return self.session.run(list(OUTPUT_NAMES), feed)


def load(artifact_dir: Path, manifest: Manifest, threads: int | None = None,
         options: Mapping[str, Any] | None = None) -> OnnxRuntimeEngine:
    """Open the artifact's ONNX model; ONNX Runtime takes no backend ``options``."""
    return OnnxRuntimeEngine(Path(artifact_dir) / manifest.model_file, manifest, threads)
