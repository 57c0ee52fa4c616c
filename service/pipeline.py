"""The request path of one image: decode -> preprocess -> batch -> infer -> postprocess.

``create_app`` builds one :class:`Pipeline`; /predict, /render and v2 inference (REST and gRPC,
through ``service.dataplane``) each admit their request (``service.admission``), resolve its options
once (:meth:`Pipeline.resolve`) and hand every image to :meth:`Pipeline.run`, so they share the
batcher, the engine pool, the limits, the deadline and the per-stage metrics. A route only reads its
body and shapes its answer.

Each stage is a span of the request's trace when tracing is on (``service.tracing``).

Host work (decode, preprocess, postprocess) runs in worker threads niced by ``settings.host_nice``:
on a small CPU the next request's host work then fills the engine's idle moments instead of
slowing its threads, which wait on each other at every layer.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from starlette.concurrency import run_in_threadpool

from service.admission import Admission
from service.batcher import Batched, Batcher
from service.decode import check_pixels, decode_opened, open_image, upright_size
from service.backends.base import NO_MASK_LIMIT
from service.engine_pool import EngineItem, EnginePool, ImageOutputs
from service.exceptions import ClientDisconnected, DeadlineExceeded
from service.manifest import ClassTable
from service.metrics import Metrics
from service.postprocess import ImageDetections, postprocess_image
from service.preprocess import PreparedImage, prepare_image
from service.request import PredictOptions, RequestOptions, resolve_options
from service.settings import Settings
from service.stages import StageSeconds
from service.tracing import Tracing

T = TypeVar("T")

ImageSource = bytes | np.ndarray
"""An encoded image (JPEG, PNG, WebP, BMP), or its pixels already decoded: uint8 ``[h, w, 3]`` RGB
(no EXIF orientation applies then; the pixel limits do)."""


@dataclass(frozen=True)
class Inference:
    """One image's detections, its geometry and the seconds each stage took.

    ``pixels`` is the decoded image, uint8 ``[h0, w0, 3]`` RGB, when :meth:`Pipeline.run` was asked
    to keep it (to draw on), else None.
    """

    detections: ImageDetections
    image: PreparedImage
    seconds: StageSeconds
    pixels: np.ndarray | None = None


class Pipeline:
    """decode -> preprocess -> batch -> infer -> postprocess for one image at a time, many at once.

    Use as ``async with pipeline:`` (starts and stops its batcher).
    """

    def __init__(self, settings: Settings, pool: EnginePool, metrics: Metrics, tracing: Tracing | None = None) -> None:
        """``tracing``: where the stages' spans go (default: nowhere)."""
        self.settings = settings
        self.pool = pool
        self.tracing = tracing or Tracing()
        self.classes = ClassTable.from_entries(pool.manifest.classes)
        self._spec = pool.input_spec
        self._metrics = metrics
        self.max_batch_size = pool.manifest.images_per_call(settings.max_batch_size)
        self.batcher: Batcher[EngineItem, ImageOutputs] = Batcher(
            pool.infer,
            max_batch_size=self.max_batch_size,
            max_wait_s=settings.max_wait_ms / 1000,
            max_queue_depth=settings.max_queue_depth,
            num_workers=pool.size,
            group_key=pool.padded_hw,  # images that pad to the same shape batch without extra padding
            retry_after_s=settings.retry_after_s,
            on_worker_restart=lambda why: metrics.worker_restarts.inc(),
            on_batch=metrics.batch_size.observe,
            trace_batch=self.tracing.batch,
        )

    async def __aenter__(self) -> Pipeline:
        await self.batcher.__aenter__()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.batcher.__aexit__(*exc_info)

    def resolve(self, options: PredictOptions) -> RequestOptions:
        """The request's options resolved against the manifest, once; every stage reads the result.

        Raises:
            InvalidParameters: more detections than the engine makes, an unknown class.
        """
        return resolve_options(options, self.pool.manifest.postprocess, self.classes)

    async def run(
        self, source: ImageSource, options: RequestOptions, admission: Admission[Any], *, keep_pixels: bool = False
    ) -> Inference:
        """Detect the objects of one image of an admitted request.

        The image's pixels and engine input are held in ``admission``'s share of the memory budget
        before they are decoded; the pixels are given back after preprocessing unless
        ``keep_pixels`` (then they are returned in :attr:`Inference.pixels`, to draw on).

        Raises:
            ServiceError subclasses: a bad image, memory or queue full, deadline, client gone,
            engine failure.
        """
        seconds = StageSeconds()
        admission.check_deadline("decode")
        with self._stage(seconds, "decode"):
            rgb, orig_hw, held = await self._decode(source, admission, keep_pixels)
        admission.check_deadline("preprocess")
        with self._stage(seconds, "preprocess"):
            prepared = await self._on_host(prepare_image, rgb, self._spec, orig_hw)
        pixels = rgb if keep_pixels else None
        if not keep_pixels:
            del rgb
            held.release_pixels()
        admission.check_deadline("queue")
        with self.tracing.engine_wait() as ran:
            batched = ran(await self._batch(engine_item(prepared, options), admission))
        seconds.queue_wait, seconds.inference = batched.queue_wait_s, batched.run_s
        outputs = batched.value
        with self._stage(seconds, "postprocess"):
            detections = await self._on_host(
                postprocess_image, outputs.dets, outputs.labels, outputs.masks, prepared.scale_factor,
                prepared.orig_hw, score_threshold=options.score_threshold, mask_threshold=options.mask_threshold,
                max_detections=options.max_detections, keep_classes=options.keep_classes,
                with_masks=options.with_masks, paste=options.paste,
            )
        seconds.total = asyncio.get_running_loop().time() - admission.started
        self._metrics.observe_stages(seconds)
        return Inference(detections, prepared, seconds, pixels)

    async def _decode(self, source: ImageSource, admission: Admission[Any], keep_pixels: bool):
        """``(rgb, (h0, w0), hold)``: the image's pixels, its own size, and what it holds of the budget."""
        settings = self.settings
        if isinstance(source, np.ndarray):
            rgb = check_pixels(source, max_pixels=settings.max_pixels, min_side=settings.min_side)
            height, width = rgb.shape[:2]
            return rgb, (height, width), admission.hold_image(
                width, height, self._spec.resized_hw((height, width)), decoded=False)
        header = await self._on_host(
            open_image, source, max_bytes=settings.max_bytes, max_pixels=settings.max_pixels,
            min_side=settings.min_side,
        )
        width, height = upright_size(header)
        resized_h, resized_w = self._spec.resized_hw((height, width))
        held = admission.hold_image(width, height, (resized_h, resized_w))
        # kept pixels are drawn on at full size
        reduce_to = (resized_w, resized_h) if settings.decode_jpeg_reduced and not keep_pixels else None
        return await self._on_host(decode_opened, header, reduce_to), (height, width), held

    async def _batch(self, item: EngineItem, admission: Admission[Any]) -> Batched[ImageOutputs]:
        """The engine's outputs for the image, batched with others; unless the deadline passes or
        the client leaves first (then the image is withdrawn from the queue)."""
        future = self.batcher.submit(item, admission.deadline, admission.slot())
        loop = asyncio.get_running_loop()
        disconnected = asyncio.ensure_future(admission.disconnected())
        try:
            await asyncio.wait(
                {future, disconnected}, timeout=max(0.0, admission.deadline - loop.time()),
                return_when=asyncio.FIRST_COMPLETED,
            )
            if future.done():  # also when the timeout raced the batcher's own deadline check
                return future.result()
            if disconnected.done():
                raise ClientDisconnected("the client closed the connection while its image waited")
            raise DeadlineExceeded("the request's deadline passed while its image waited for or ran on the engine")
        finally:
            disconnected.cancel()
            future.cancel()

    async def _on_host(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await on_host(self.settings.host_nice, fn, *args, **kwargs)

    @contextlib.contextmanager
    def _stage(self, seconds: StageSeconds, stage: str) -> Iterator[None]:
        """Time the block into ``seconds.<stage>``, in a span of that name."""
        started = time.perf_counter()
        try:
            with self.tracing.span(stage):
                yield
        finally:
            setattr(seconds, stage, time.perf_counter() - started)


def engine_item(prepared: PreparedImage, options: RequestOptions) -> EngineItem:
    """The image for the engine with the detections that need masks: those the request gets back.
    With a class filter the host picks the best ``max_detections`` among the wanted classes, which
    the graph does not know, so every detection above the threshold gets its mask then."""
    if not options.with_masks:
        return EngineItem(prepared, options.score_threshold, 0)
    limit = NO_MASK_LIMIT if options.keep_classes is not None else options.max_detections
    return EngineItem(prepared, options.score_threshold, limit)


async def on_host(nice: int, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` in a worker thread at niceness ``nice`` (never below the process's own)."""
    return await run_in_threadpool(_at_host_priority, nice, fn, *args, **kwargs)


_host_thread = threading.local()


def _at_host_priority(nice: int, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    if getattr(_host_thread, "nice", 0) < nice:  # worker threads are reused: set once each (it only rises)
        with contextlib.suppress(OSError, AttributeError):  # not Linux, or not permitted: same priority
            # Relative to the process: a thread niced below the process (allowed for root) would
            # run the host stages ahead of the engine threads.
            target = max(os.getpriority(os.PRIO_PROCESS, os.getpid()), nice)
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), target)
        _host_thread.nice = nice
    return fn(*args, **kwargs)
