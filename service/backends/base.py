"""The narrow contract every backend implements: named numpy arrays in, named arrays out."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

import numpy as np

from service.manifest import Manifest

# The seed's MagicMind precision names are accepted as aliases.
PRECISION_ALIASES = {
    "force_float32": "fp32",
    "float32": "fp32",
    "force_float16": "fp16",
    "float16": "fp16",
    "qint8_mixed_float16": "int8",
}
PRECISIONS = ("fp32", "fp16", "bf16", "int8")


class BackendUnavailable(RuntimeError):
    """The backend's library or hardware is not present, or the name is unknown."""


class UnsupportedPrecision(ValueError):
    """The backend cannot build the requested precision."""


def canonical_precision(name: str) -> str:
    """``fp32``/``fp16``/``bf16``/``int8`` for a precision name or one of the seed's aliases."""
    precision = PRECISION_ALIASES.get(name, name)
    if precision not in PRECISIONS:
        known = ", ".join([*PRECISIONS, *PRECISION_ALIASES])
        raise UnsupportedPrecision(f"unknown precision {name!r}; expected one of {known}")
    return precision


class Engine(Protocol):
    """A loaded engine. Not thread-safe unless the backend says so: one worker drives one engine."""

    manifest: Manifest

    @property
    def batch_size(self) -> int | None:
        """Fixed batch size of the graph, or None when the batch is mutable."""

    def infer(self, images: np.ndarray, image_sizes: np.ndarray) -> dict[str, np.ndarray]:
        """``images`` float32 [B,3,H,W], ``image_sizes`` int64 [B,2] -> ``dets``, ``labels``, ``masks``."""


class Backend(Protocol):
    NAME: str
    PRECISIONS: tuple[str, ...]

    def available(self) -> tuple[bool, str]:
        """(True, "") when usable here, else (False, why)."""

    def compile(
        self,
        onnx_path: Path,
        out_dir: Path,
        precision: str,
        calibration: Iterable[dict[str, np.ndarray]] | None = None,
        **options,
    ) -> tuple[str, dict]:
        """Build the backend's model file in ``out_dir`` from the exported ONNX.

        Returns (model file name relative to ``out_dir``, backend facts for the manifest).
        ``calibration`` yields input feeds (``images``, ``image_sizes``) for int8.
        """

    def load(self, artifact_dir: Path, manifest: Manifest, threads: int | None = None) -> Engine:
        """Open a built artifact for inference."""
