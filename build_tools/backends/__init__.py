"""One build module per engine backend: how its library compiles the exported ONNX.

``build_tools/backends/<name>.py`` pairs with the runtime module ``service/backends/<name>.py`` of
the same registry name (``service.backends.backend_names()``; no second table here). The runtime
module says whether the backend is usable (``available()``), what it offers (``PRECISIONS``) and
loads artifacts; the build module only compiles, so the service never imports a compiler.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

import numpy as np

from service.backends import BackendUnavailable, backend_names
from service.manifest import ShapeProfile


class Builder(Protocol):
    """A build module (``build_tools.backends.<name>``)."""

    def compile(
        self,
        onnx_path: Path,
        out_dir: Path,
        precision: str,
        calibration: Iterable[dict[str, np.ndarray]] | None = None,
        *,
        shape_profile: ShapeProfile | None = None,
        **options,
    ) -> tuple[str, dict]:
        """Build the backend's model file in ``out_dir`` from the exported ONNX.

        Args:
            onnx_path: the export's ``model.onnx``.
            out_dir: the artifact folder (created if missing).
            precision: a precision name or alias; the backend must offer it.
            calibration: for int8, input feeds (``images`` float32 ``[B,3,H,W]``, ``image_sizes``
                int64 ``[B,2]``) of real images.
            shape_profile: the shapes the artifact serves (the manifest's); backends that build
                for fixed shape ranges follow it.
            options: the backend's own build options (keyword arguments its ``compile`` names).

        Returns:
            (model file name relative to ``out_dir``, backend facts for the manifest's ``tools.backend``).

        Raises:
            UnsupportedPrecision: a precision it does not build, or int8 without calibration feeds.
            BackendUnavailable: its library or device is missing.
            BuildFailed: its compiler ran and produced no engine.
        """


def get_builder(name: str) -> Builder:
    """The build module of backend ``name``.

    Raises:
        BackendUnavailable: ``name`` is not a registered backend.
    """
    if name not in backend_names():
        raise BackendUnavailable(f"unknown backend {name!r}; known backends: {', '.join(backend_names())}")
    return importlib.import_module(f"{__name__}.{name}")  # type: ignore[return-value]
