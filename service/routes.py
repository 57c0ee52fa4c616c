"""HTTP routes. ``predict`` reads top to bottom as the data flows:
decode -> preprocess -> batcher (engine pool) -> postprocess -> response.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Header, Query, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from service.batcher import Batched
from service.decode import decode_image
from service.errors import ClientDisconnected, DeadlineExceeded, ErrorBody, Unauthorized
from service.manifest import Manifest
from service.postprocess import postprocess_image
from service.preprocess import prepare_image
from service.request import PredictOptions, merge_options, read_payload, request_body_openapi
from service.response import CocoResult, OrjsonResponse, PredictResponse, build_response
from service.runtime import Runtime

T = TypeVar("T")
TIMEOUT_HEADER = "X-Request-Timeout-Ms"

_bearer = HTTPBearer(auto_error=False, description="The server's MASKRCNN_API_KEY, when it sets one.")
_api_key = APIKeyHeader(name="X-API-Key", auto_error=False, description="The server's MASKRCNN_API_KEY, when it sets one.")


def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


def require_api_key(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
    api_key: Annotated[str | None, Security(_api_key)],
) -> None:
    """401 unless the server has no API key or the request presents it (Bearer or X-API-Key)."""
    expected = request.app.state.settings.api_key
    if expected is None:
        return
    given = bearer.credentials if bearer is not None else api_key
    if given is None or not hmac.compare_digest(given.encode(), expected.get_secret_value().encode()):
        raise Unauthorized("a valid API key is required: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'")


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]

probes = APIRouter(tags=["operations"])
api = APIRouter(dependencies=[Depends(require_api_key)], responses={401: {"model": ErrorBody, "description": "API key missing or wrong"}})


@api.post(
    "/predict",
    tags=["inference"],
    summary="Detect and segment the objects in one image",
    response_model=PredictResponse | list[CocoResult],
    responses={
        200: {"description": "format=native: an object; format=coco: a list of COCO results-file entries"},
        400: {"model": ErrorBody, "description": "undecodable or unsupported image, malformed body"},
        413: {"model": ErrorBody, "description": "body or image over the byte or pixel limit"},
        415: {"model": ErrorBody, "description": "Content-Type not accepted"},
        422: {"model": ErrorBody, "description": "bad parameter"},
        500: {"model": ErrorBody, "description": "the engine failed on this request's batch"},
        503: {"model": ErrorBody, "description": "overloaded or not ready; see Retry-After"},
        504: {"model": ErrorBody, "description": "deadline exceeded"},
    },
    openapi_extra={"requestBody": request_body_openapi()},
)
async def predict(
    request: Request,
    runtime: RuntimeDep,
    query: Annotated[PredictOptions, Query()],
    timeout_ms: Annotated[
        float | None,
        Header(alias=TIMEOUT_HEADER, gt=0, le=3_600_000, description="Deadline of this request in milliseconds; "
               "default MASKRCNN_REQUEST_TIMEOUT_MS. Past it the answer is 504."),
    ] = None,
) -> Response:
    loop = asyncio.get_running_loop()
    started = loop.time()
    settings = runtime.settings
    deadline = started + (timeout_ms or settings.request_timeout_ms) / 1000
    runtime.require_ready()
    runtime.batcher.check_capacity()  # refuse before reading the body when the queue is full
    with runtime.metrics.in_flight.track_inprogress():
        payload = await read_payload(request, settings.max_body_bytes)
        options = merge_options(query, payload.options)
        postprocess_options = runtime.postprocess_options(options)
        seconds: dict[str, float] = {}

        _check_deadline(deadline, "decode")
        rgb = await _timed(
            seconds, "decode", decode_image, payload.image,
            max_bytes=settings.max_bytes, max_pixels=settings.max_pixels, min_side=settings.min_side,
        )
        _check_deadline(deadline, "preprocess")
        prepared = await _timed(seconds, "preprocess", prepare_image, rgb, runtime.pool.input_spec)
        _check_deadline(deadline, "queue")
        batched = await _await_batch(runtime.batcher.submit(prepared, deadline), request, deadline)
        seconds["queue_wait"], seconds["inference"] = batched.queue_wait_s, batched.run_s
        outputs = batched.value
        detections = await _timed(
            seconds, "postprocess", postprocess_image, outputs.dets, outputs.labels, outputs.masks,
            prepared.scale_factor, prepared.orig_hw, **postprocess_options,
        )
        seconds["total"] = loop.time() - started
        runtime.metrics.observe_stages(seconds)
        return build_response(detections, runtime.classes, prepared.orig_hw, seconds,
                              response_format=options.format, image_id=options.image_id)


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


@probes.get("/healthz", summary="Liveness: the process is up")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@probes.get(
    "/readyz",
    summary="Readiness: the engine is loaded and warmed up",
    responses={503: {"model": ErrorBody, "description": "not loaded or warmed up yet, or shutting down"}},
)
async def readyz(runtime: RuntimeDep) -> dict[str, str]:
    runtime.require_ready()
    return {"status": "ready"}


@api.get("/v1/models", tags=["inference"], summary="The engine artifact's manifest", response_model=Manifest)
async def models(runtime: RuntimeDep) -> Response:
    return OrjsonResponse(runtime.pool.manifest.to_dict())


@probes.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}, "description": "Prometheus text format"}},
)
async def metrics(runtime: RuntimeDep) -> Response:
    return Response(runtime.metrics.render(), media_type=CONTENT_TYPE_LATEST)
