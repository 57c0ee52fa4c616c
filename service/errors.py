"""The ONE place where errors become HTTP responses.

The stages raise the typed errors of ``service.exceptions`` (each carries its status and code);
:func:`install_error_handlers` maps those, FastAPI's request validation errors and Starlette's
routing errors (404, 405) to one body shape::

    {"error": {"code": "payload_too_large", "message": "image is 25000000 bytes; ..."}}

Under :data:`PROTOCOL_PREFIX` (the KServe v2 / Open Inference Protocol routes) the same table
renders the protocol's shape instead, ``{"error": "image is 25000000 bytes; ..."}``, with the
statuses of :data:`PROTOCOL_STATUSES` changed (the protocol has no 422: a bad parameter is a 400).

One refusal happens before the app runs: uvicorn answers a request beyond ``--max-connections``
itself. :func:`install_connection_cap_answer` makes that answer this module's shape too (503,
``Retry-After``, ``Connection: close``).
"""

from __future__ import annotations

import importlib
import logging

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.exceptions import (
    BadRequest,
    InvalidParameters,
    ServiceError,
    TooManyConnections,
    describe_validation_errors,
)
from service.response import OrjsonResponse

log = logging.getLogger(__name__)


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


def _error_content(path: str, status_code: int, code: str, message: str) -> tuple[dict, int]:
    """The body and status of an error answer to a request for ``path``: the protocol's shape under
    ``PROTOCOL_PREFIX``, ours elsewhere."""
    if path == PROTOCOL_PREFIX or path.startswith(PROTOCOL_PREFIX + "/"):
        return {"error": message}, PROTOCOL_STATUSES.get(status_code, status_code)
    return {"error": {"code": code, "message": message}}, status_code


def _error_response(
    request: Request, status_code: int, code: str, message: str, headers: dict[str, str] | None = None
) -> OrjsonResponse:
    content, status = _error_content(request.url.path, status_code, code, message)
    return OrjsonResponse(content, status_code=status, headers=headers)


async def _service_error(request: Request, exc: ServiceError) -> OrjsonResponse:
    if exc.status_code == 500:
        log.error("%s: %s", type(exc).__name__, exc.message)
    return _error_response(request, exc.status_code, exc.code, exc.message, exc.headers)


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
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)


# uvicorn's HTTP protocol modules: each picks ``service_unavailable`` (its own plain-text 503) for a
# request beyond ``limit_concurrency``, by a name it imported.
_UVICORN_PROTOCOLS = ("h11_impl", "httptools_impl", "zttp_impl", "zttp_h2_impl")


def connection_cap_answer(retry_after_s: int):
    """An ASGI app answering :class:`TooManyConnections` as the exception handlers answer every
    other error (the protocol's body shape under ``PROTOCOL_PREFIX``)."""
    refusal = TooManyConnections(retry_after_s=retry_after_s)
    headers = [(name.lower().encode(), value.encode()) for name, value in refusal.headers.items()]

    async def answer(scope, receive, send) -> None:
        content, status = _error_content(scope.get("path", ""), refusal.status_code, refusal.code, refusal.message)
        body = orjson.dumps(content)
        await send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    return answer


def install_connection_cap_answer(retry_after_s: int) -> int:
    """Put :func:`connection_cap_answer` where uvicorn's protocol modules look for their answer
    beyond the connection cap; the number of modules changed. Patching by name is the one way in
    (the choice is inside each module's request handler); a uvicorn without the name keeps its
    plain-text 503, and the log says so."""
    answer = connection_cap_answer(retry_after_s)
    patched = 0
    for name in _UVICORN_PROTOCOLS:
        try:
            module = importlib.import_module(f"uvicorn.protocols.http.{name}")
        except ImportError:  # not in this uvicorn, or its parser library is not installed
            continue
        if hasattr(module, "service_unavailable"):
            module.service_unavailable = answer
            patched += 1
    if not patched:
        log.warning("uvicorn answers requests beyond --max-connections in plain text: none of its protocol "
                    "modules has the answer this service replaces")
    return patched
