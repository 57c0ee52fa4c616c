"""Engine pool: N engine sessions, each driven by its own worker thread.

A batch of :class:`EngineItem` (a prepared image and which of its detections need a mask) goes to
an idle session; its worker pads the batch (``pad_batch``), runs the engine and splits the outputs
back into one :class:`ImageOutputs` per image, after checking that the engine answered every slot.

A call that has not returned after ``engine_timeout_s`` fails its batch with :class:`EngineTimeout`
(504) and retires the session: its thread is abandoned (a thread cannot be stopped) and, when the
pool has a factory, a replacement session is opened in the background and counted
(``on_replace``). Until one is back, the pool serves with the sessions it has left; with none it
is not :attr:`~EnginePool.serving`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from service.backends import Engine, load_engine
from service.backends.base import NO_MASK_LIMIT, OUTPUT_NAMES
from service.exceptions import EngineTimeout, InferenceFailed
from service.manifest import Manifest
from service.preprocess import PreparedImage, pad_batch, padded_hw


@dataclass(frozen=True)
class EngineItem:
    """One image for the engine, and which of its detections the request will get back (those
    get masks; the graph skips the mask head for the others): score at least
    ``mask_score_threshold``, the first ``mask_max_detections`` of them by score (0: no masks)."""

    image: PreparedImage
    mask_score_threshold: float = 0.0
    mask_max_detections: int = NO_MASK_LIMIT


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


log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Session:
    engine: Engine
    worker: ThreadPoolExecutor


class EnginePool:
    """Runs batches on whichever of its sessions is idle; all sessions share one manifest."""

    def __init__(
        self,
        engines: Sequence[Engine],
        *,
        factory: Callable[[], Engine] | None = None,
        engine_timeout_s: float | None = None,
        on_replace: Callable[[str], None] | None = None,
        on_call: Callable[[str, int], None] | None = None,
    ) -> None:
        """``engines``: the open sessions; ``factory`` opens a replacement for a retired one (None:
        none is opened); ``engine_timeout_s``: how long one call may take (None: no limit);
        ``on_call(shape, images)`` after every call that answered: the engine's compiled shape that
        ran it (``Engine.last_shape``: a shape bucket's ``HxW`` or ``dynamic``) and the images in it."""
        if not engines:
            raise ValueError("an engine pool needs at least one engine")
        self.manifest: Manifest = engines[0].manifest
        self.batch_size: int | None = engines[0].batch_size
        self.input_spec = self.manifest.input.spec
        self._min_hw = self.manifest.shape_profile.min_hw
        self._factory = factory
        self._engine_timeout_s = engine_timeout_s
        self._on_replace = on_replace
        self._on_call = on_call
        self._names = itertools.count()
        self._sessions = [self._session(engine) for engine in engines]
        self.size = len(self._sessions)
        self._idle: asyncio.Queue[_Session] = asyncio.Queue()
        for session in self._sessions:
            self._idle.put_nowait(session)

    def _session(self, engine: Engine) -> _Session:
        return _Session(engine, ThreadPoolExecutor(1, thread_name_prefix=f"engine-{next(self._names)}"))

    @property
    def shape_buckets(self) -> list[tuple[int, int]]:
        """The padded ``(H, W)`` sizes the engines run as static shapes (none: dynamic only)."""
        return list(getattr(self._sessions[0].engine, "shape_buckets", []))

    @property
    def auto_buckets(self) -> int:
        """How many shape buckets each engine may still learn while serving (0: none)."""
        return int(getattr(self._sessions[0].engine, "auto_buckets", 0))

    @property
    def serving(self) -> bool:
        """Whether at least one session can take a batch (the others may be being replaced)."""
        return bool(self._sessions)

    @classmethod
    def load(
        cls,
        artifact_dir: str | Path,
        sessions: int,
        threads: int | None,
        backend_options: Mapping[str, Mapping[str, Any]] | None = None,
        **options: Any,
    ) -> EnginePool:
        """Open ``sessions`` engines on the artifact, each with ``threads`` intra-op threads and the
        options of its backend (see ``load_engine``); ``options`` are the pool's keywords."""
        def factory() -> Engine:
            return load_engine(artifact_dir, threads, backend_options)

        return cls([factory() for _ in range(sessions)], factory=factory, **options)

    def padded_hw(self, item: EngineItem) -> tuple[int, int]:
        """``(H, W)`` this item's image pads to alone; images that agree on it batch without extra padding."""
        return padded_hw(item.image.resized_hw, self.input_spec.pad_divisor)

    async def infer(self, images: Sequence[EngineItem]) -> list[ImageOutputs]:
        """Run one batch (``len(images) <= max_batch_size``) on an idle session.

        Raises:
            InferenceFailed: the engine raised, or its outputs do not cover the batch.
        """
        session = await self._idle.get()
        loop = asyncio.get_running_loop()
        call = loop.run_in_executor(session.worker, self._infer_on, session.engine, images)
        try:
            result = await asyncio.wait_for(asyncio.shield(call), self._engine_timeout_s)
        except asyncio.TimeoutError:
            self._retire(session, f"a call took longer than {self._engine_timeout_s} s")
            raise EngineTimeout(
                f"the engine did not answer a batch of {len(images)} within {self._engine_timeout_s} s "
                "(MASKRCNN_ENGINE_TIMEOUT_S); its session is being replaced"
            ) from None
        except BaseException:
            self._idle.put_nowait(session)
            raise
        self._idle.put_nowait(session)
        return result

    def _retire(self, session: _Session, why: str) -> None:
        """Take ``session`` out of service and, with a factory, open a replacement in the background."""
        log.error("engine session retired: %s", why)
        self._sessions.remove(session)
        session.worker.shutdown(wait=False, cancel_futures=True)
        if self._factory is not None:
            asyncio.get_running_loop().create_task(self._replace(why))

    async def _replace(self, why: str) -> None:
        loop = asyncio.get_running_loop()
        with ThreadPoolExecutor(1, thread_name_prefix="engine-open") as opener:
            try:
                engine = await loop.run_in_executor(opener, self._factory)
            except Exception:
                log.exception("opening a replacement engine session failed")
                return
        session = self._session(engine)
        self._sessions.append(session)
        self._idle.put_nowait(session)
        if self._on_replace is not None:
            self._on_replace(why)
        log.info("a replacement engine session is serving")

    async def warm_up(self, image: EngineItem) -> None:
        """Run one full batch of ``image`` on every session (first runs allocate and tune)."""
        loop = asyncio.get_running_loop()
        batch = [image] * (self.batch_size or 1)
        for session in self._sessions:
            await loop.run_in_executor(session.worker, self._infer_on, session.engine, batch)

    def close(self) -> None:
        for session in self._sessions:
            session.worker.shutdown(wait=False, cancel_futures=True)

    def _infer_on(self, engine: Engine, items: Sequence[EngineItem]) -> list[ImageOutputs]:
        try:
            batch, image_sizes = pad_batch(
                [item.image for item in items], self.input_spec.pad_divisor, batch_size=self.batch_size,
                min_hw=self._min_hw,
            )
            # the graph's padding slots (a fixed batch larger than the items) get no masks
            thresholds = np.zeros(len(batch), np.float32)
            limits = np.zeros(len(batch), np.int64)
            for i, item in enumerate(items):
                thresholds[i], limits[i] = item.mask_score_threshold, item.mask_max_detections
            outputs = engine.infer(batch, image_sizes, thresholds, limits)
        except Exception as exc:
            raise InferenceFailed(f"the engine failed on a batch of {len(items)}: {type(exc).__name__}: {exc}") from exc
        for name in OUTPUT_NAMES:
            got = outputs.get(name)
            if got is None or got.shape[:1] != (batch.shape[0],):
                shape = None if got is None else list(got.shape)
                raise InferenceFailed(
                    f"the engine returned {name} of shape {shape} for a batch of {batch.shape[0]} images"
                )
        if self._on_call is not None:
            self._on_call(getattr(engine, "last_shape", "dynamic"), len(items))
        dets, labels, masks = (outputs[name] for name in OUTPUT_NAMES)
        return [ImageOutputs(dets[i], labels[i], masks[i]) for i in range(len(items))]
