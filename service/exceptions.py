"""The typed errors of the request path, in one module that knows nothing of HTTP transports.

Every error a client (or a broken engine) can cause is a subclass of :class:`ServiceError`; its
docstring names the HTTP status it is answered with, and ``status_code``/``code`` carry the status
and a stable machine-readable code as data. The stages (decode, request, admission, preprocess,
batcher, engine pool, postprocess, the class table) raise these and nothing else for a request's
fault; ``service.errors`` is the one place that turns them into responses.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar


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


class SlowBody(ServiceError):
    """408 with ``Connection: close``: the request body paused too long, arrived too slowly or was
    still arriving at the request's deadline; ``reason`` is ``idle``, ``rate`` or ``deadline``."""

    status_code = 408
    code = "request_timeout"

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message, headers={"Connection": "close"})
        self.reason = reason


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


class TooManyConnections(Unavailable):
    """503 with Retry-After and ``Connection: close``: the server holds as many connections as
    ``--max-connections`` allows (answered by uvicorn before the app runs, see
    ``service.errors.install_connection_cap_answer``)."""

    code = "too_many_connections"

    def __init__(self, *, retry_after_s: int) -> None:
        super().__init__("the server holds as many connections as it serves (--max-connections); "
                         "retry after the delay", retry_after_s=retry_after_s)
        self.headers["Connection"] = "close"


class ModelNotFound(ServiceError):
    """404: a KServe v2 request names a model (or model version) this server does not serve."""

    status_code = 404
    code = "model_not_found"


class DeadlineExceeded(ServiceError):
    """504: the request's deadline passed before its result was ready."""

    status_code = 504
    code = "deadline_exceeded"


class EngineTimeout(DeadlineExceeded):
    """504: an engine call took longer than the engine timeout; its session is being replaced."""

    code = "engine_timeout"


class InvalidEngineOutputs(InferenceFailed):
    """500: the engine's outputs (or the postprocess settings from its manifest) break the output
    contract of docs/architecture.md: shapes that disagree, non-finite boxes, a bad threshold."""

    def __init__(self, message: str) -> None:
        super().__init__(f"the engine's outputs break the output contract: {message}")


def describe_validation_errors(errors: Sequence[Mapping[str, Any]]) -> str:
    """One line from pydantic/FastAPI validation errors: ``"query.score_threshold: Input should be ..."``."""
    parts = []
    for err in errors:
        where = ".".join(str(p) for p in err.get("loc", ()))
        message = str(err.get("msg", "invalid"))
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts) or "invalid request"
