"""HTTP routes: each reads its request, hands the image to ``service.inference.detect`` (decode ->
preprocess -> batcher -> engine pool -> postprocess) and shapes the answer with ``service.response``.
"""

from __future__ import annotations

import asyncio
import hmac
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.responses import Response

from service.errors import ErrorBody, ServiceError, Unauthorized
from service.inference import detect
from service.manifest import Manifest
from service.request import (
    PredictOptions,
    body_bytes_to_hold,
    discard_body,
    merge_options,
    read_payload,
    request_body_openapi,
)
from service.response import CocoResult, OrjsonResponse, PredictResponse, build_response
from service.runtime import Runtime

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
# The inference routes; create_app adds the API-key guard (and its OpenAPI scheme) only when a key is set.
api = APIRouter()
API_KEY_GUARD = {
    "dependencies": [Depends(require_api_key)],
    "responses": {401: {"model": ErrorBody, "description": "API key missing or wrong"}},
}


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
    with runtime.budget.reservation() as reservation, runtime.metrics.in_flight.track_inprogress():
        try:  # admission, before the body is read: readiness, queue room, the deadline, memory
            runtime.require_ready()
            runtime.batcher.check_capacity()
            runtime.batcher.check_deadline(deadline)
            reservation.hold("body", body_bytes_to_hold(request, settings.max_body_bytes), "the request body")
            payload = await read_payload(request, settings.max_body_bytes)
        except ServiceError:
            await discard_body(request, settings.max_drain_bytes)
            raise
        options = merge_options(query, payload.options)
        result = await detect(runtime, request, payload.image, options, started, deadline, reservation)
        return build_response(result.detections, runtime.classes, result.image.orig_hw, result.seconds,
                              response_format=options.format, image_id=options.image_id)


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
