"""HTTP routes: each is admitted (``service.admission``), hands its image to the pipeline (decode ->
preprocess -> batch -> infer -> postprocess, ``service.pipeline``) and shapes the answer with
``service.response``.
"""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool
from starlette.responses import FileResponse, Response

from service.draw import overlay_png
from service.errors import ErrorBody
from service.exceptions import Unauthorized
from service.manifest import Manifest
from service.pipeline import Inference
from service.request import PredictOptions, RequestOptions, merge_options, read_payload, request_body_openapi
from service.response import CocoResult, OrjsonResponse, PredictResponse, build_response
from service.runtime import Runtime

TIMEOUT_HEADER = "X-Request-Timeout-Ms"
PAGE_DIR = Path(__file__).with_name("page")  # the browser page's static files, served under /page
DOCS_ASSETS = "/docs/assets"  # Swagger UI's and ReDoc's scripts and styles (fastapi-offline's copies)

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


# The errors of every route that runs an image through the request path.
INFERENCE_ERRORS = {
    status: {"model": ErrorBody, "description": description}
    for status, description in {
        400: "undecodable or unsupported image, malformed body",
        413: "body or image over the byte or pixel limit",
        415: "Content-Type not accepted",
        422: "bad parameter",
        500: "the engine failed on this request's batch",
        503: "overloaded or not ready; see Retry-After",
        504: "deadline exceeded",
    }.items()
}
TimeoutHeader = Annotated[
    float | None,
    Header(alias=TIMEOUT_HEADER, gt=0, le=3_600_000, description="Deadline of this request in milliseconds; "
           "default MASKRCNN_REQUEST_TIMEOUT_MS. Past it the answer is 504."),
]


@api.post(
    "/predict",
    tags=["inference"],
    summary="Detect and segment the objects in one image",
    response_model=PredictResponse | list[CocoResult],
    responses={
        200: {"description": "format=native: an object; format=coco: a list of COCO results-file entries"},
        **INFERENCE_ERRORS,
    },
    openapi_extra={"requestBody": request_body_openapi()},
)
async def predict(
    request: Request, runtime: RuntimeDep, query: Annotated[PredictOptions, Query()], timeout_ms: TimeoutHeader = None
) -> Response:
    async with _detected(runtime, request, query, timeout_ms) as (options, result):
        with runtime.pipeline.tracing.span("encode"):
            return build_response(result.detections, runtime.pipeline.classes, result.image.orig_hw, result.seconds,
                                  response_format=options.format, image_id=options.image_id)


@api.post(
    "/render",
    tags=["inference"],
    summary="The image with its detections drawn on it (masks, boxes, 'name score' labels), as PNG",
    response_class=Response,
    responses={
        200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
              "description": "the image (EXIF orientation applied) with the overlay; the options filter what is drawn"},
        **INFERENCE_ERRORS,
    },
    openapi_extra={"requestBody": request_body_openapi()},
)
async def render(
    request: Request, runtime: RuntimeDep, query: Annotated[PredictOptions, Query()], timeout_ms: TimeoutHeader = None
) -> Response:
    async with _detected(runtime, request, query, timeout_ms, keep_pixels=True) as (_, result):
        png = await run_in_threadpool(overlay_png, result.pixels, result.detections, runtime.pipeline.classes)
        return Response(png, media_type="image/png")


@asynccontextmanager
async def _detected(
    runtime: Runtime, request: Request, query: PredictOptions, timeout_ms: float | None, keep_pixels: bool = False
) -> AsyncIterator[tuple[RequestOptions, Inference]]:
    """/predict's and /render's request: admitted, its body read, its options resolved, its image
    run through the pipeline; the request holds its memory until the block ends. Admission is a
    span of the request's trace, as the pipeline's stages are."""
    async with AsyncExitStack() as admitted:
        with runtime.pipeline.tracing.span("admission"):
            admission = await admitted.enter_async_context(runtime.admission.admit(request, timeout_ms, read_payload))
        options = runtime.pipeline.resolve(merge_options(query, admission.payload.options))
        yield options, await runtime.pipeline.run(admission.payload.image, options, admission, keep_pixels=keep_pixels)


@probes.get("/healthz", summary="Liveness: the process is up")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@probes.get(
    "/readyz",
    summary="Readiness: the engine is loaded and warmed up",
    responses={503: {"model": ErrorBody, "description": "not loaded or warmed up yet, or shutting down"}},
)
async def readyz(runtime: RuntimeDep) -> dict[str, str]:
    runtime.admission.require_ready()
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


# The browser page: public like the probes (it sends the API key it is given to /predict).
page = APIRouter(include_in_schema=False)


@page.get("/")
async def index() -> FileResponse:
    return FileResponse(PAGE_DIR / "index.html", media_type="text/html")
