"""Typed service errors and the ONE table that maps them to HTTP responses.

Every error a client can cause is raised as a subclass of :class:`ServiceError`; its docstring
names the HTTP status. The stages that know nothing of HTTP (preprocess, postprocess, the class
table) raise their own errors, which :data:`STAGE_ERRORS` translates. :func:`install_error_handlers`
maps all of these, FastAPI's request validation errors and Starlette's routing errors (404, 405)
to one body shape::

    {"error": {"code": "payload_too_large", "message": "image is 25000000 bytes; ..."}}

Under :data:`PROTOCOL_PREFIX` (the KServe v2 / Open Inference Protocol routes) the same table
renders the protocol's shape instead, ``{"error": "image is 25000000 bytes; ..."}``, with the
statuses of :data:`PROTOCOL_STATUSES` changed (the protocol has no 422: a bad parameter is a 400).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.postprocess import InvalidDetectionsError
from service.preprocess import InvalidImageError
from service.response import OrjsonResponse, UnknownClasses

log = logging.getLogger(__name__)


class ServiceError(Exception):
    """Base class: an HTTP status, a stable machine-readable code and a message a person can act on."""

    status_code: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class BadRequest(ServiceError):
    """400: the request body is malformed (e.g. invalid JSON)."""

    status_code = 400
    code = "bad_request"


class InvalidImage(BadRequest):
    """400: the payload is not a decodable JPEG, PNG, WebP or BMP image, or is unusably small."""

    code = "invalid_image"


class Unauthorized(ServiceError):
    """401: an API key is configured and the request did not present it."""

    status_code = 401
    code = "unauthorized"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class PayloadTooLarge(ServiceError):
    """413: the body or the image exceeds the byte or pixel limit."""

    status_code = 413
    code = "payload_too_large"


class UnsupportedMediaType(ServiceError):
    """415: the Content-Type is not one /predict accepts."""

    status_code = 415
    code = "unsupported_media_type"


class InvalidParameters(ServiceError):
    """422: a request parameter (query, JSON field, form field or header) is invalid."""

    status_code = 422
    code = "invalid_parameters"


class ClientDisconnected(ServiceError):
    """499 (nginx's "client closed request"): the client went away; nobody reads this response."""

    status_code = 499
    code = "client_closed_request"


class InferenceFailed(ServiceError):
    """500: the engine raised on a batch, or returned outputs that do not match its inputs."""

    status_code = 500
    code = "inference_failed"


class Unavailable(ServiceError):
    """503 with Retry-After: the service cannot take the request now (base of the two reasons)."""

    status_code = 503
    code = "unavailable"

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_s)})


class Overloaded(Unavailable):
    """503 with Retry-After: the batch queue is full."""

    code = "overloaded"


class DeadlineUnreachable(Unavailable):
    """503 with Retry-After: by the measured service times, the request would finish after its
    deadline, so it is refused before any work is spent on it."""

    code = "deadline_unreachable"


class NotReady(Unavailable):
    """503 with Retry-After: the engine is not loaded and warmed up yet, or is shutting down."""

    code = "not_ready"


class ModelNotFound(ServiceError):
    """404: a KServe v2 request names a model (or model version) this server does not serve."""

    status_code = 404
    code = "model_not_found"


class DeadlineExceeded(ServiceError):
    """504: the request's deadline passed before its result was ready."""

    status_code = 504
    code = "deadline_exceeded"


# A stage's own error -> the service error the client gets, and a prefix for its message.
STAGE_ERRORS: dict[type[Exception], tuple[type[ServiceError], str]] = {
    InvalidImageError: (InvalidImage, ""),
    UnknownClasses: (InvalidParameters, ""),
    InvalidDetectionsError: (InferenceFailed, "the engine's outputs break the output contract: "),
}


class EngineTimeout(DeadlineExceeded):
    """504: an engine call took longer than the engine timeout; its session is being replaced."""

    code = "engine_timeout"


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorBody(BaseModel):
    """The body of every error response (but those under ``PROTOCOL_PREFIX``)."""

    error: ErrorDetail


class ProtocolErrorBody(BaseModel):
    """The body of every error response under ``PROTOCOL_PREFIX`` (the Open Inference Protocol's)."""

    error: str


PROTOCOL_PREFIX = "/v2"
PROTOCOL_STATUSES = {InvalidParameters.status_code: BadRequest.status_code}


def _error_response(
    request: Request, status_code: int, code: str, message: str, headers: dict[str, str] | None = None
) -> OrjsonResponse:
    path = request.url.path
    if path == PROTOCOL_PREFIX or path.startswith(PROTOCOL_PREFIX + "/"):
        return OrjsonResponse({"error": message}, status_code=PROTOCOL_STATUSES.get(status_code, status_code),
                              headers=headers)
    return OrjsonResponse(
        {"error": {"code": code, "message": message}}, status_code=status_code, headers=headers
    )


def describe_validation_errors(errors: Sequence[Mapping[str, Any]]) -> str:
    """One line from pydantic/FastAPI validation errors: ``"query.score_threshold: Input should be ..."``."""
    parts = []
    for err in errors:
        where = ".".join(str(p) for p in err.get("loc", ()))
        message = str(err.get("msg", "invalid"))
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts) or "invalid request"


async def _service_error(request: Request, exc: ServiceError) -> OrjsonResponse:
    return _error_response(request, exc.status_code, exc.code, exc.message, exc.headers)


async def _stage_error(request: Request, exc: Exception) -> OrjsonResponse:
    error_type, prefix = next(STAGE_ERRORS[t] for t in type(exc).__mro__ if t in STAGE_ERRORS)
    if error_type.status_code >= 500:
        log.error("%s: %s", type(exc).__name__, exc)
    return await _service_error(request, error_type(prefix + str(exc)))


async def _validation_error(request: Request, exc: RequestValidationError) -> OrjsonResponse:
    return _error_response(request, InvalidParameters.status_code, InvalidParameters.code,
                           describe_validation_errors(exc.errors()))


async def _http_error(request: Request, exc: StarletteHTTPException) -> OrjsonResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return _error_response(request, exc.status_code, code, str(exc.detail), dict(exc.headers or {}))


async def _unexpected_error(request: Request, exc: Exception) -> OrjsonResponse:
    log.exception("unhandled error", exc_info=exc)
    return _error_response(request, 500, ServiceError.code, f"{type(exc).__name__}: {exc}")


def install_error_handlers(app: FastAPI) -> None:
    """The one place where exceptions become HTTP responses."""
    app.add_exception_handler(ServiceError, _service_error)
    for stage_error in STAGE_ERRORS:
        app.add_exception_handler(stage_error, _stage_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
