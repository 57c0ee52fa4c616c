"""Engine backends behind one registry.

Each backend is one runtime module here exposing ``NAME``, ``PRECISIONS``, ``available()`` and
``load()`` (the contract is ``base``), and one build module of the same name in
``build_tools/backends/`` (its ``compile()``); ``_MODULES`` below is the one registration. Callers
go through ``get_backend(name)`` and ``load_engine(artifact_dir)``; nothing outside the registries
branches on a backend's name. Backend libraries are imported inside the modules' functions, so a
missing library only makes its backend unavailable, and serving never imports a compiler.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from service.backends.base import Backend, BackendUnavailable, Engine, canonical_precision
from service.manifest import Manifest

# registry name -> module implementing it
_MODULES = {
    "onnxruntime": "service.backends.onnxruntime",
    "openvino": "service.backends.openvino",
    "tensorrt": "service.backends.tensorrt",
    "magicmind": "service.backends.magicmind",
}


def backend_names() -> list[str]:
    return list(_MODULES)


def get_backend(name: str) -> Backend:
    if name not in _MODULES:
        raise BackendUnavailable(f"unknown backend {name!r}; known backends: {', '.join(_MODULES)}")
    return importlib.import_module(_MODULES[name])  # type: ignore[return-value]


def load_engine(
    artifact_dir: str | Path,
    threads: int | None = None,
    backend_options: Mapping[str, Mapping[str, Any]] | None = None,
) -> Engine:
    """Open the artifact in ``artifact_dir`` with the backend its manifest names.

    ``backend_options`` holds options per backend name (``Settings.backend_options()``); the
    engine gets its own backend's."""
    manifest = Manifest.load(artifact_dir)
    backend = get_backend(manifest.backend)
    ok, reason = backend.available()
    if not ok:
        raise BackendUnavailable(f"backend {manifest.backend!r} is not available here: {reason}")
    options = (backend_options or {}).get(manifest.backend)
    return backend.load(Path(artifact_dir), manifest, threads=threads, options=options)


__all__ = [
    "Backend", "BackendUnavailable", "Engine", "backend_names", "canonical_precision", "get_backend", "load_engine",
]
