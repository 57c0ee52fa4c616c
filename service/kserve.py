"""The Open Inference Protocol (KServe v2) over REST, with the binary tensor data extension.

Routes (``name`` is ``settings.model_name``, ``maskrcnn`` by default; each model route also
answers under ``/v2/models/{name}/versions/{version}``)::

    GET  /v2                         server metadata (name, version, extensions)
    GET  /v2/health/live             200 while the process runs
    GET  /v2/health/ready            200 once the engine is warmed up, else 503
    GET  /v2/models/{name}           model metadata: inputs and outputs
    GET  /v2/models/{name}/ready     as /v2/health/ready, for the model
    POST /v2/models/{name}/infer     inference

The model's version is the first 12 hex digits of the SHA-256 of its artifact's manifest (canonical
JSON): it changes with the weights, the backend, the precision and the shape profile.

Inputs (exactly one of them):

- ``image``: ``BYTES [B]``, B encoded images (JPEG, PNG, WebP, BMP). In the JSON form each element
  is the image in base64 (a ``data:`` URL prefix is allowed); in the binary form, the image bytes.
  The images run concurrently through the same batcher as /predict and are answered in order;
  B is at most ``max_queue_depth``.
- ``image_rgb``: ``UINT8 [H, W, 3]``, one image's RGB pixels (no decoding, no EXIF orientation).

Request parameters: ``score_threshold`` (float), ``max_detections`` (int) and ``classes`` (names
or COCO ids, comma-separated), as /predict's options; ``binary_data_output`` (bool, all outputs in
binary). Per requested output, ``binary_data`` (bool). Protocol parameters tritonclient may send
(``timeout``, ``priority``, ``sequence_*``) are accepted and ignored; the deadline is set, as for
/predict, by the ``X-Request-Timeout-Ms`` header. Any other parameter is a 400.

Outputs: the detections of all B images, concatenated in image order (each image's by score,
descending); row ``i`` belongs to image ``image_index[i]``, so image ``b``'s boxes are
``boxes[image_index == b]``. With B = 1 that is simply that image's N detections.

==============  ========  ======  =========================================================
name            datatype  shape   meaning
==============  ========  ======  =========================================================
``boxes``       FP32      [N, 4]  ``x1, y1, x2, y2`` in the original image's pixels
``scores``      FP32      [N]     detection scores
``labels``      INT64     [N]     category ids (COCO's for COCO models), as /predict's
``classes``     BYTES     [N]     class names
``masks``       BYTES     [N]     COCO RLE as JSON, ``{"size": [h, w], "counts": "..."}``
``image_index`` INT64     [N]     which request image (0-based) the row belongs to
==============  ========  ======  =========================================================

A request may name the outputs it wants; masks are only computed when ``masks`` is among them
(or no outputs are named). Binary data: a request body may be a JSON header of
``Inference-Header-Content-Length`` bytes followed by the inputs' binary data (each input with
``parameters.binary_data_size``; a BYTES element is a 4-byte little-endian length then its bytes);
the answer uses the same layout when any output is binary (``Content-Type:
application/octet-stream``). Errors are ``{"error": "message"}`` (``service.errors`` renders the
protocol's shape under /v2): a malformed request, an unknown input or output, a wrong datatype or
shape or a bad parameter is 400; an unknown model or version 404; every other error is /predict's.
The documents and the tensor codec are in ``service.kserve_codec``; the operations, shared with the
same protocol over gRPC (``service.grpc_server``), in ``service.dataplane``.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Request
from starlette.responses import Response

from service import dataplane
from service.errors import ProtocolErrorBody
from service.exceptions import UnsupportedMediaType
from service.kserve_codec import (
    BINARY,
    HEADER_LENGTH,
    InferRequest,
    InferResponse,
    Liveness,
    ModelMetadata,
    ParsedInfer,
    Readiness,
    ServerMetadata,
    encode_infer_response,
    parse_infer_request,
)
from service.request import read_body
from service.routes import API_KEY_GUARD, TIMEOUT_HEADER, RuntimeDep

# --- the routes -------------------------------------------------------------------------------

PROTOCOL_ERRORS = {
    status: {"model": ProtocolErrorBody, "description": description}
    for status, description in {
        400: "malformed request, unknown input/output/parameter, wrong datatype or shape, bad image",
        404: "unknown model or version",
        413: "body or image over the byte or pixel limit",
        415: "compressed request bodies are not accepted",
        500: "the engine failed on this request's batch",
        503: "overloaded or not ready; see Retry-After",
        504: "deadline exceeded",
    }.items()
}
_NOT_FOUND = {404: PROTOCOL_ERRORS[404]}
_NOT_READY = {503: PROTOCOL_ERRORS[503]}

# Health of the process and the engine, like /healthz and /readyz: never behind the API key.
probes = APIRouter(prefix="/v2", tags=["kserve v2"])
# Metadata and inference; create_app adds this guard, when a key is set, as it adds /predict's.
api = APIRouter(prefix="/v2", tags=["kserve v2"])
PROTOCOL_KEY_GUARD = {
    "dependencies": API_KEY_GUARD["dependencies"],
    "responses": {401: {"model": ProtocolErrorBody, "description": "API key missing or wrong"}},
}


@probes.get("/health/live", summary="KServe v2 server liveness", response_model=Liveness)
async def server_live() -> dict[str, bool]:
    return {"live": True}


@probes.get("/health/ready", summary="KServe v2 server readiness", response_model=Readiness, responses=_NOT_READY)
async def server_ready(runtime: RuntimeDep) -> dict[str, bool]:
    runtime.admission.require_ready()
    return {"ready": True}


@api.get("", summary="KServe v2 server metadata", response_model=ServerMetadata)
async def server_metadata() -> dict[str, Any]:
    return dataplane.server_metadata()


@api.get("/models/{name}", summary="KServe v2 model metadata", response_model=ModelMetadata, responses=_NOT_FOUND)
@api.get("/models/{name}/versions/{version}", summary="KServe v2 model metadata (one version)",
         response_model=ModelMetadata, responses=_NOT_FOUND)
async def model_metadata(runtime: RuntimeDep, name: str, version: str | None = None) -> dict[str, Any]:
    return dataplane.model_metadata(runtime, name, version)


@api.get("/models/{name}/ready", summary="KServe v2 model readiness", response_model=Readiness,
         responses={**_NOT_FOUND, **_NOT_READY})
@api.get("/models/{name}/versions/{version}/ready", summary="KServe v2 model readiness (one version)",
         response_model=Readiness, responses={**_NOT_FOUND, **_NOT_READY})
async def model_ready(runtime: RuntimeDep, name: str, version: str | None = None) -> dict[str, bool]:
    dataplane.model_ready(runtime, name, version)
    return {"ready": True}


_INFER_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": InferRequest.model_json_schema()},
    BINARY: {"schema": {"type": "string", "format": "binary",
                        "description": f"JSON header of {HEADER_LENGTH} bytes, then the inputs' binary data"}},
}}}


_INFER_RESPONSES = {
    200: {"content": {BINARY: {}}, "description": f"JSON, or with binary outputs the JSON header ({HEADER_LENGTH} "
          "bytes) then their data"},
    **PROTOCOL_ERRORS,
}


@api.post("/models/{name}/infer", summary="KServe v2 inference", response_model=InferResponse,
          responses=_INFER_RESPONSES, openapi_extra=_INFER_BODY)
@api.post("/models/{name}/versions/{version}/infer", summary="KServe v2 inference (one version)",
          response_model=InferResponse, responses=_INFER_RESPONSES, openapi_extra=_INFER_BODY)
async def infer(
    request: Request,
    runtime: RuntimeDep,
    name: str,
    version: str | None = None,
    header_length: Annotated[str | None, Header(alias=HEADER_LENGTH, include_in_schema=False)] = None,
    timeout_ms: Annotated[float | None, Header(alias=TIMEOUT_HEADER, gt=0, le=3_600_000)] = None,
) -> Response:
    async def read_request(request: Request, max_body_bytes: int) -> ParsedInfer:
        if request.headers.get("content-encoding", "identity").lower() != "identity":
            raise UnsupportedMediaType("compressed request bodies (Content-Encoding) are not accepted")
        body = await read_body(request, max_body_bytes)
        return parse_infer_request(body, header_length, runtime.settings.max_queue_depth)

    return await dataplane.infer(runtime, request, timeout_ms, name, version, read_request, encode_infer_response)
