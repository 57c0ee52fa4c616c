"""One image through the request path: decode -> preprocess -> batcher (engine pool) -> postprocess.

Every inference route (/predict today) runs its image through :func:`detect`, so they share the
batcher, the pool, the limits, the deadline and the per-stage metrics; a route only reads its
body and shapes its answer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from service.batcher import Batched
from service.admission import Reservation, image_bytes
from service.decode import decode_opened, open_image, upright_size
from service.errors import ClientDisconnected, DeadlineExceeded
from service.postprocess import ImageDetections, postprocess_image
from service.preprocess import PreparedImage, prepare_image
from service.request import PredictOptions
from service.runtime import Runtime

T = TypeVar("T")


@dataclass(frozen=True)
class Inference:
    """One image's detections, its geometry, and the seconds each stage took (``response.STAGES``)."""

    detections: ImageDetections
    image: PreparedImage
    seconds: dict[str, float]


async def detect(
    runtime: Runtime,
    request: Request,
    image: bytes,
    options: PredictOptions,
    started: float,
    deadline: float,
    reservation: Reservation,
) -> Inference:
    """Detect the objects of one encoded image.

    Args:
        runtime: the app's runtime (settings, batcher, pool, metrics, classes, memory budget).
        request: the HTTP request, watched for the client going away while the image waits.
        image: the encoded image.
        options: the answer's options (thresholds, classes, masks).
        started: event-loop time the request arrived; ``deadline``: event-loop time it must end by.
        reservation: the request's share of the memory budget; the image's pixels and tensor are
            held there before they are decoded (released again as they are freed).

    Raises:
        ServiceError subclasses (bad image, memory or queue full, deadline, client gone, engine
        failure) and the stages' own errors, which ``errors.STAGE_ERRORS`` maps.
    """
    settings = runtime.settings
    spec = runtime.pool.input_spec
    postprocess_options = runtime.postprocess_options(options)
    seconds: dict[str, float] = {}
    _check_deadline(deadline, "decode")
    t0 = time.perf_counter()
    header = await run_in_threadpool(
        open_image, image, max_bytes=settings.max_bytes, max_pixels=settings.max_pixels, min_side=settings.min_side
    )
    width, height = upright_size(header)
    resized_h, resized_w = spec.resized_hw((height, width))
    decode_bytes, tensor_bytes = image_bytes(width, height, (resized_h, resized_w))
    reservation.hold("pixels", decode_bytes, f"decoding a {width}x{height} image")
    reservation.hold("tensor", tensor_bytes, f"the engine input of a {width}x{height} image")
    reduce_to = (resized_w, resized_h) if settings.decode_jpeg_reduced else None
    rgb = await run_in_threadpool(decode_opened, header, reduce_to)
    seconds["decode"] = time.perf_counter() - t0
    _check_deadline(deadline, "preprocess")
    prepared = await _timed(seconds, "preprocess", prepare_image, rgb, spec, (height, width))
    del rgb, header
    reservation.release("pixels")
    _check_deadline(deadline, "queue")
    batched = await _await_batch(runtime.batcher.submit(prepared, deadline), request, deadline)
    seconds["queue_wait"], seconds["inference"] = batched.queue_wait_s, batched.run_s
    outputs = batched.value
    detections = await _timed(
        seconds, "postprocess", postprocess_image, outputs.dets, outputs.labels, outputs.masks,
        prepared.scale_factor, prepared.orig_hw, **postprocess_options,
    )
    seconds["total"] = asyncio.get_running_loop().time() - started
    runtime.metrics.observe_stages(seconds)
    return Inference(detections, prepared, seconds)


async def _timed(seconds: dict[str, float], stage: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run ``fn`` in a worker thread and record its wall time under ``stage``."""
    t0 = time.perf_counter()
    result = await run_in_threadpool(fn, *args, **kwargs)
    seconds[stage] = time.perf_counter() - t0
    return result


def _check_deadline(deadline: float, stage: str) -> None:
    if asyncio.get_running_loop().time() >= deadline:
        raise DeadlineExceeded(f"the request's deadline passed before {stage}")


async def _await_batch(future: asyncio.Future[Batched[T]], request: Request, deadline: float) -> Batched[T]:
    """The batch result, unless the deadline passes or the client leaves first (then the item is withdrawn)."""
    loop = asyncio.get_running_loop()
    disconnected = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait(
            {future, disconnected}, timeout=max(0.0, deadline - loop.time()), return_when=asyncio.FIRST_COMPLETED
        )
        if future.done():  # also when the timeout raced the batcher's own deadline check
            return future.result()
        if disconnected.done():
            raise ClientDisconnected("the client closed the connection while its image waited")
        raise DeadlineExceeded("the request's deadline passed while its image waited for or ran on the engine")
    finally:
        disconnected.cancel()
        future.cancel()


async def _disconnected(request: Request) -> None:
    """Return once the client disconnects (the body has been read, so only that message remains)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
