"""Engine pool: N engine sessions, each driven by its own worker thread.

A batch of prepared images goes to an idle session; its worker pads the batch (``pad_batch``),
runs the engine and splits the outputs back into one :class:`ImageOutputs` per image, after
checking that the engine answered every slot.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from service.backends import Engine, load_engine
from service.backends.base import OUTPUT_NAMES
from service.errors import InferenceFailed
from service.manifest import Manifest
from service.preprocess import PreparedImage, pad_batch, padded_hw


@dataclass(frozen=True)
class ImageOutputs:
    """One image's slice of the engine outputs (N = the manifest's max detections).

    Attributes:
        dets: float32 ``[N, 5]``: ``x1, y1, x2, y2, score`` in resized-input pixels.
        labels: int64 ``[N]``: class index, -1 on padding rows.
        masks: float32 ``[N, 28, 28]``: mask probabilities in the box frame.
    """

    dets: np.ndarray
    labels: np.ndarray
    masks: np.ndarray


@dataclass(frozen=True)
class _Session:
    engine: Engine
    worker: ThreadPoolExecutor


class EnginePool:
    """Runs batches on whichever of its sessions is idle; all sessions share one manifest."""

    def __init__(self, engines: Sequence[Engine]) -> None:
        if not engines:
            raise ValueError("an engine pool needs at least one engine")
        self.manifest: Manifest = engines[0].manifest
        self.batch_size: int | None = engines[0].batch_size
        self.input_spec = self.manifest.input.spec
        self._min_hw = self.manifest.shape_profile.min_hw
        self._sessions = [
            _Session(engine, ThreadPoolExecutor(1, thread_name_prefix=f"engine-{i}")) for i, engine in enumerate(engines)
        ]
        self._idle: asyncio.Queue[_Session] = asyncio.Queue()
        for session in self._sessions:
            self._idle.put_nowait(session)

    @classmethod
    def load(
        cls,
        artifact_dir: str | Path,
        sessions: int,
        threads: int | None,
        backend_options: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> EnginePool:
        """Open ``sessions`` engines on the artifact, each with ``threads`` intra-op threads and the
        options of its backend (see ``load_engine``)."""
        return cls([load_engine(artifact_dir, threads, backend_options) for _ in range(sessions)])

    @property
    def size(self) -> int:
        return len(self._sessions)

    def max_batch_size(self, requested: int) -> int:
        """Images per engine call: the graph's fixed batch size, else ``requested`` capped at the
        largest batch a mutable-batch artifact was built for (manifest ``shape_profile.batch.max``)."""
        return self.batch_size or min(requested, self.manifest.max_batch_size)

    def padded_hw(self, image: PreparedImage) -> tuple[int, int]:
        """``(H, W)`` this image pads to alone; images that agree on it batch without extra padding."""
        return padded_hw(image.resized_hw, self.input_spec.pad_divisor)

    async def infer(self, images: Sequence[PreparedImage]) -> list[ImageOutputs]:
        """Run one batch (``len(images) <= max_batch_size``) on an idle session.

        Raises:
            InferenceFailed: the engine raised, or its outputs do not cover the batch.
        """
        session = await self._idle.get()
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(session.worker, self._infer_on, session.engine, images)
        finally:
            self._idle.put_nowait(session)

    async def warm_up(self, image: PreparedImage) -> None:
        """Run one full batch of ``image`` on every session (first runs allocate and tune)."""
        loop = asyncio.get_running_loop()
        batch = [image] * (self.batch_size or 1)
        for session in self._sessions:
            await loop.run_in_executor(session.worker, self._infer_on, session.engine, batch)

    def close(self) -> None:
        for session in self._sessions:
            session.worker.shutdown(wait=False, cancel_futures=True)

    def _infer_on(self, engine: Engine, images: Sequence[PreparedImage]) -> list[ImageOutputs]:
        try:
            batch, image_sizes = pad_batch(
                images, self.input_spec.pad_divisor, batch_size=self.batch_size, min_hw=self._min_hw
            )
            outputs = engine.infer(batch, image_sizes)
        except Exception as exc:
            raise InferenceFailed(f"the engine failed on a batch of {len(images)}: {type(exc).__name__}: {exc}") from exc
        for name in OUTPUT_NAMES:
            got = outputs.get(name)
            if got is None or got.shape[:1] != (batch.shape[0],):
                shape = None if got is None else list(got.shape)
                raise InferenceFailed(
                    f"the engine returned {name} of shape {shape} for a batch of {batch.shape[0]} images"
                )
        dets, labels, masks = (outputs[name] for name in OUTPUT_NAMES)
        return [ImageOutputs(dets[i], labels[i], masks[i]) for i in range(len(images))]
