"""Cambricon MagicMind backend (MLU): runs the serialized ``model.mm`` that
``build_tools/backends/magicmind.py`` builds from the exported ONNX.

Written against Cambricon's published MagicMind Python API (``magicmind.python.runtime`` as the
vendor's public samples use it: Model, IEngine, IContext, Device, Queue) and never run in this
project: the SDK ships only inside Cambricon's container images and no MLU was available.
docs/backends.md lists what to check on a first run.

Precisions: ``fp32`` (``force_float32``), ``fp16`` (``force_float16``), ``int8``
(``qint8_mixed_float16``).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from service.backends.base import (
    OUTPUT_NAMES,
    BackendUnavailable,
    EngineBase,
)
from service.manifest import Manifest

NAME = "magicmind"
PRECISIONS = ("fp32", "fp16", "int8")


def runtime_module():
    """``magicmind.python.runtime``, imported only when a MagicMind build or engine is asked for.

    Raises:
        BackendUnavailable: the SDK is not installed here.
    """
    try:
        return importlib.import_module("magicmind.python.runtime")
    except (ImportError, OSError) as exc:  # OSError: the module is there but its libraries are not
        raise BackendUnavailable(
            f"magicmind is not installed ({exc}); the MagicMind SDK ships only inside Cambricon's "
            "container images (no package registry has it): build and serve in the MLU image, see docker/README.md"
        ) from exc


def available() -> tuple[bool, str]:
    try:
        mm = runtime_module()
    except BackendUnavailable as exc:
        return False, str(exc)
    try:
        count = mm.System().device_count()
    except Exception as exc:  # a driver problem can surface as any exception type from the SDK
        return False, f"MagicMind cannot list MLU devices ({exc})"
    if count < 1:
        return False, "no MLU device visible (check /dev/cambricon_dev*, the driver and MLU_VISIBLE_DEVICES)"
    return True, ""


def check_status(status, action: str, error: type[Exception] = BackendUnavailable) -> None:
    """Raise ``error`` when a MagicMind call returned a failed ``mm.Status`` (calls that return nothing pass)."""
    if status is not None and not status.ok():
        raise error(f"MagicMind {action} failed: {status}")


class MagicMindEngine(EngineBase):
    """One model, engine, context and queue on MLU 0 (pick the card with ``MLU_VISIBLE_DEVICES``);
    one worker drives it. Written against the published API, never run here."""

    def __init__(self, model_path: Path, manifest: Manifest):
        mm = runtime_module()
        super().__init__(manifest)
        self._device = mm.Device()
        self._device.id = 0
        self._device.active()
        self._model = mm.Model()
        check_status(self._model.deserialize_from_file(str(model_path)), f"loading {model_path}")
        inputs = manifest.input.names
        if (self._model.get_input_num(), self._model.get_output_num()) != (len(inputs), len(OUTPUT_NAMES)):
            raise BackendUnavailable(f"{model_path} has {self._model.get_input_num()} inputs and "
                                     f"{self._model.get_output_num()} outputs, expected "
                                     f"{len(inputs)} and {len(OUTPUT_NAMES)}")
        engine_config = mm.Model.EngineConfig()
        engine_config.device_type = "MLU"
        self._engine = self._model.create_i_engine(engine_config)
        if self._engine is None:
            raise BackendUnavailable(f"MagicMind could not create an MLU engine for {model_path}")
        self._context = self._engine.create_i_context()
        self._queue = self._device.create_queue()

    def _run(self, feed: dict[str, np.ndarray]) -> Sequence[np.ndarray]:
        # the pool's worker thread is not the thread that loaded the engine: bind the MLU to it
        self._device.active()
        inputs = self._context.create_inputs()
        for tensor, array in zip(inputs, feed.values()):
            tensor.from_numpy(array)
            tensor.to(self._device)
        outputs = []
        check_status(self._context.enqueue(inputs, outputs, self._queue), "enqueue")
        check_status(self._queue.sync(), "queue sync")
        # outputs come in the graph's order; MLU integer outputs may be int32 (the base converts them)
        return [t.asnumpy() for t in outputs]


def load(artifact_dir: Path, manifest: Manifest, threads: int | None = None,
         options: Mapping[str, Any] | None = None) -> MagicMindEngine:
    """Open ``model.mm`` on the MLU; ``threads`` is ignored (the MLU does the work) and MagicMind
    takes no ``options``."""
    return MagicMindEngine(Path(artifact_dir) / manifest.model_file, manifest)
