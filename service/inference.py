"""One image through the request path: decode -> preprocess -> batcher (engine pool) -> postprocess.

Every inference route (/predict, /render, the KServe v2 infer) is admitted by :func:`admitted`
(readiness, queue room, deadline, memory for the body, then the body read) and runs each image
through :func:`detect`, so they share the batcher, the pool, the limits, the deadline and the
per-stage metrics; a route only reads its body and shapes its answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from service.batcher import Batched
from service.admission import Reservation, image_bytes
from service.decode import check_size, decode_opened, open_image, upright_size
from service.errors import ClientDisconnected, DeadlineExceeded, InvalidImage, ServiceError
from service.postprocess import ImageDetections, postprocess_image
from service.preprocess import PreparedImage, prepare_image
from service.request import PredictOptions, body_bytes_to_hold, discard_body
from service.runtime import Runtime
from service.settings import Settings

T = TypeVar("T")
P = TypeVar("P")


@dataclass(frozen=True)
class Inference:
    """One image's detections, its geometry, and the seconds each stage took (``response.STAGES``).

    ``pixels`` is the decoded image, uint8 ``[h0, w0, 3]`` RGB, when ``detect`` was asked to keep it
    (to draw on), else None.
    """

    detections: ImageDetections
    image: PreparedImage
    seconds: dict[str, float]
    pixels: np.ndarray | None = None


@dataclass(frozen=True)
class Admission(Generic[P]):
    """An admitted request: its read body (``payload``), event-loop ``started`` and ``deadline``
    times, and its share of the memory budget (the body is held there)."""

    payload: P
    started: float
    deadline: float
    reservation: Reservation


@asynccontextmanager
async def admitted(
    runtime: Runtime,
    request: Request,
    timeout_ms: float | None,
    read_body: Callable[[Request, int], Awaitable[P]],
) -> AsyncIterator[Admission[P]]:
    """Admit one inference request, then read its body with ``read_body(request, max_body_bytes)``.

    Admission happens before the body is read: readiness, queue room, whether the deadline
    (``timeout_ms``, default the setting) can be met, memory for the body. A request refused then,
    or whose body is refused, has the rest of its body drained before the error is raised. The
    request counts as in flight, and holds its reservation, until the block ends.

    Raises:
        NotReady, Overloaded, DeadlineUnreachable (503); whatever ``read_body`` raises.
    """
    started = asyncio.get_running_loop().time()
    settings = runtime.settings
    deadline = started + (timeout_ms or settings.request_timeout_ms) / 1000
    with runtime.budget.reservation() as reservation, runtime.metrics.in_flight.track_inprogress():
        try:
            runtime.require_ready()
            runtime.batcher.check_capacity()
            runtime.batcher.check_deadline(deadline)
            reservation.hold("body", body_bytes_to_hold(request, settings.max_body_bytes), "the request body")
            payload = await read_body(request, settings.max_body_bytes)
        except ServiceError:
            await discard_body(request, settings.max_drain_bytes)
            raise
        yield Admission(payload, started, deadline, reservation)


async def detect(
    runtime: Runtime,
    request: Request,
    image: bytes | np.ndarray,
    options: PredictOptions,
    started: float,
    deadline: float,
    reservation: Reservation,
    *,
    keep_pixels: bool = False,
) -> Inference:
    """Detect the objects of one image.

    Args:
        runtime: the app's runtime (settings, batcher, pool, metrics, classes, memory budget).
        request: the HTTP request, watched for the client going away while the image waits.
        image: the encoded image, or its pixels already decoded: uint8 ``[h, w, 3]`` RGB (no
            EXIF orientation applies then; the pixel limits do).
        options: the answer's options (thresholds, classes, masks).
        started: event-loop time the request arrived; ``deadline``: event-loop time it must end by.
        reservation: this image's share of the memory budget; its pixels and tensor are held
            there before they are decoded (released again as they are freed). Several images of
            one request each need their own, as parts are released by name.
        keep_pixels: return the decoded pixels in ``Inference.pixels`` (they stay held).

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
    if isinstance(image, np.ndarray):
        rgb = _checked_pixels(image, settings.max_pixels, settings.min_side)
        height, width = rgb.shape[:2]
        reservation.hold("tensor", image_bytes(width, height, spec.resized_hw((height, width)))[1],
                         f"the engine input of a {width}x{height} image")
    else:
        header = await _on_host(
            settings, open_image, image, max_bytes=settings.max_bytes, max_pixels=settings.max_pixels,
            min_side=settings.min_side,
        )
        width, height = upright_size(header)
        resized_h, resized_w = spec.resized_hw((height, width))
        decode_bytes, tensor_bytes = image_bytes(width, height, (resized_h, resized_w))
        reservation.hold("pixels", decode_bytes, f"decoding a {width}x{height} image")
        reservation.hold("tensor", tensor_bytes, f"the engine input of a {width}x{height} image")
        # kept pixels are drawn on at full size
        reduce_to = (resized_w, resized_h) if settings.decode_jpeg_reduced and not keep_pixels else None
        rgb = await _on_host(settings, decode_opened, header, reduce_to)
        del header
    seconds["decode"] = time.perf_counter() - t0
    _check_deadline(deadline, "preprocess")
    prepared = await _timed(seconds, "preprocess", settings, prepare_image, rgb, spec, (height, width))
    pixels = rgb if keep_pixels else None
    if not keep_pixels:
        del rgb
        reservation.release("pixels")
    _check_deadline(deadline, "queue")
    batched = await _await_batch(runtime.batcher.submit(prepared, deadline), request, deadline)
    seconds["queue_wait"], seconds["inference"] = batched.queue_wait_s, batched.run_s
    outputs = batched.value
    detections = await _timed(
        seconds, "postprocess", settings, postprocess_image, outputs.dets, outputs.labels, outputs.masks,
        prepared.scale_factor, prepared.orig_hw, **postprocess_options,
    )
    seconds["total"] = asyncio.get_running_loop().time() - started
    runtime.metrics.observe_stages(seconds)
    return Inference(detections, prepared, seconds, pixels)


def _checked_pixels(rgb: np.ndarray, max_pixels: int, min_side: int) -> np.ndarray:
    """Decoded pixels within the pixel limits (``decode.check_size``, as encoded images are checked).

    Raises:
        InvalidImage: not uint8 ``[h, w, 3]``, or a side shorter than ``min_side``.
        PayloadTooLarge: more than ``max_pixels`` pixels.
    """
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise InvalidImage(f"raw pixels must be uint8 [height, width, 3] RGB, got {rgb.dtype} {list(rgb.shape)}")
    height, width = rgb.shape[:2]
    check_size(width, height, max_pixels=max_pixels, min_side=min_side)
    return np.ascontiguousarray(rgb)


async def _timed(
    seconds: dict[str, float], stage: str, settings: Settings, fn: Callable[..., T], *args: Any, **kwargs: Any
) -> T:
    """:func:`_on_host`, recording the wall time under ``stage``."""
    t0 = time.perf_counter()
    result = await _on_host(settings, fn, *args, **kwargs)
    seconds[stage] = time.perf_counter() - t0
    return result


async def _on_host(settings: Settings, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run host work (decode, preprocess, postprocess) in a worker thread niced by
    ``settings.host_nice``: on a small CPU the next request's host work then fills the engine's
    idle moments instead of slowing its threads (which wait on each other at every layer)."""
    return await run_in_threadpool(_at_host_priority, settings.host_nice, fn, *args, **kwargs)


_host_thread = threading.local()


def _at_host_priority(nice: int, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    if getattr(_host_thread, "nice", 0) < nice:  # worker threads are reused: set once each (it only rises)
        with contextlib.suppress(OSError, AttributeError):  # not Linux, or not permitted: same priority
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
        _host_thread.nice = nice
    return fn(*args, **kwargs)


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
