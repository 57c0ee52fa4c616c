"""The Open Inference Protocol (KServe v2) over gRPC: ``inference.GRPCInferenceService``.

:func:`serving` runs it with ``grpc.aio`` on ``settings.grpc_port`` (``settings.host``) in the app's
own event loop, started and stopped with the app; off when the port is unset. The message classes
and the servicer base are the ones ``tritonclient[grpc]`` generates from the protocol's published
``grpc_service.proto``. Every RPC is a thin adapter over ``service.dataplane``, as the REST routes
of ``service.kserve`` are: the same admission, memory budget, deadline, pipeline, metrics and
error table, and the same inputs, outputs and parameters as that module's docstring describes.

==============  ==================================================================================
RPC             answer
==============  ==================================================================================
ServerLive      ``live: true``
ServerReady     ``ready``: warmed up, at least one engine session serving, not shutting down
ModelReady      ``ready``: as ServerReady, and the name (and version, when given) are the model's
ServerMetadata  name, version, extensions
ModelMetadata   as REST ``GET /v2/models/{name}``
ModelInfer      the detections as REST's outputs, every output in ``raw_output_contents``
==============  ==================================================================================

The other RPCs of the service answer UNIMPLEMENTED. ModelInfer reads its one input from
``raw_input_contents`` (what tritonclient sends: a BYTES element is a 4-byte little-endian length
then its bytes; UINT8 pixels are the bytes themselves) or from ``contents`` (``bytes_contents`` of
raw image bytes, ``uint_contents`` of pixels).

- Deadline: the call's gRPC deadline is the request's (at most an hour); without one,
  ``request_timeout_ms``.
- API key: when the server has one, every RPC but the three health RPCs needs metadata
  ``authorization: Bearer KEY`` or ``x-api-key: KEY``.
- Message size: requests up to ``settings.grpc_receive_limit`` bytes (default the REST body limit),
  answers up to ``settings.grpc_max_send_bytes``; gRPC's own 4 MiB default is never in force. gRPC
  receives a message whole before the handler runs, so admission then holds the message's size
  of the memory budget as it holds a REST body of that length.
- Errors: the typed errors of ``service.exceptions`` become the status codes of :data:`GRPC_CODES`
  with the same message; those that carry ``Retry-After`` over HTTP carry a ``google.rpc.RetryInfo``
  in the status details (``grpc-status-details-bin``).
- Metrics: ``maskrcnn_requests_total{protocol="grpc", endpoint="/inference.GRPCInferenceService/<RPC>"}``
  with ``status``, the HTTP status of the same answer (200 for OK); an access log line a call
  (logger ``service.grpc_server.access``).
- Traces (``service.tracing``): the gRPC instrumentation's server span continues the caller's
  ``traceparent`` metadata; the request path's spans are its children.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import struct
from collections.abc import AsyncIterator
from typing import Any

import grpc
import numpy as np
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from pydantic import ValidationError
from starlette.requests import Request
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from service import dataplane
from service.exceptions import (
    BadRequest,
    ClientDisconnected,
    DeadlineExceeded,
    DeadlineUnreachable,
    InferenceFailed,
    InvalidParameters,
    ModelNotFound,
    Overloaded,
    PayloadTooLarge,
    ServiceError,
    Unauthorized,
    Unavailable,
    UnsupportedMediaType,
    describe_validation_errors,
)
from service.kserve_codec import OUTPUTS, InferAnswer, InferRequest, ParsedInfer, read_infer_request, tensor_bytes
from service.runtime import Runtime
from service.tracing import current_trace_id

log = logging.getLogger(__name__)
# as uvicorn's access log: one line a call, with the HTTP status of the same answer
access_log = logging.getLogger(f"{__name__}.access")

SERVICE = "inference.GRPCInferenceService"
MAX_TIMEOUT_MS = 3_600_000  # as the REST deadline header's limit
# Most specific class first is not needed: a raised error's own class, then its bases, are looked up.
GRPC_CODES: dict[type[ServiceError], grpc.StatusCode] = {
    ServiceError: grpc.StatusCode.INTERNAL,
    BadRequest: grpc.StatusCode.INVALID_ARGUMENT,
    InvalidParameters: grpc.StatusCode.INVALID_ARGUMENT,
    UnsupportedMediaType: grpc.StatusCode.INVALID_ARGUMENT,
    # an image over the byte or pixel limit: the client must send another, retrying cannot help
    PayloadTooLarge: grpc.StatusCode.INVALID_ARGUMENT,
    Unauthorized: grpc.StatusCode.UNAUTHENTICATED,
    ModelNotFound: grpc.StatusCode.NOT_FOUND,
    ClientDisconnected: grpc.StatusCode.CANCELLED,
    InferenceFailed: grpc.StatusCode.INTERNAL,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    # refused at once because the measured service times cannot meet the call's deadline
    DeadlineUnreachable: grpc.StatusCode.DEADLINE_EXCEEDED,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def grpc_code(error: ServiceError) -> grpc.StatusCode:
    """The gRPC status code of ``error``: that of its class, or of its nearest base in :data:`GRPC_CODES`."""
    return next(GRPC_CODES[cls] for cls in type(error).__mro__ if cls in GRPC_CODES)


def error_status(error: ServiceError) -> grpc.Status:
    """The status a call that raised ``error`` ends with: its code, its message, and a RetryInfo of
    its ``Retry-After`` when it has one."""
    details = []
    retry_after = error.headers.get("Retry-After")
    if retry_after is not None:
        info = error_details_pb2.RetryInfo()
        info.retry_delay.FromSeconds(int(retry_after))
        packed = any_pb2.Any()
        packed.Pack(info)
        details.append(packed)
    code = grpc_code(error)
    return rpc_status.to_status(status_pb2.Status(code=code.value[0], message=error.message, details=details))


class InferenceServicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    """The six RPCs of the module docstring over ``runtime``."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    async def ServerLive(self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext) -> pb.ServerLiveResponse:
        async with self._answering("ServerLive", context, guarded=False):
            return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext) -> pb.ServerReadyResponse:
        async with self._answering("ServerReady", context, guarded=False):
            return pb.ServerReadyResponse(ready=_succeeds(self.runtime.admission.require_ready))

    async def ModelReady(self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext) -> pb.ModelReadyResponse:
        async with self._answering("ModelReady", context, guarded=False):
            ready = _succeeds(lambda: dataplane.model_ready(self.runtime, request.name, request.version or None))
            return pb.ModelReadyResponse(ready=ready)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        async with self._answering("ServerMetadata", context):
            return pb.ServerMetadataResponse(**dataplane.server_metadata())

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        async with self._answering("ModelMetadata", context):
            metadata = dataplane.model_metadata(self.runtime, request.name, request.version or None)
            tensors = {side: [pb.ModelMetadataResponse.TensorMetadata(**t) for t in metadata.pop(side)]
                       for side in ("inputs", "outputs")}
            return pb.ModelMetadataResponse(**metadata, **tensors)

    async def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> pb.ModelInferResponse:
        async with self._answering("ModelInfer", context):
            remaining_s = context.time_remaining()
            timeout_ms = None if remaining_s is None else min(max(remaining_s * 1000, 1.0), MAX_TIMEOUT_MS)
            max_images = self.runtime.settings.max_queue_depth

            async def read_request(_: Request, max_body_bytes: int) -> ParsedInfer:
                return read_infer_request(*infer_request(request), max_images)

            return await dataplane.infer(
                self.runtime, _call_as_request(context, "ModelInfer", request.ByteSize()), timeout_ms,
                request.model_name, request.model_version or None, read_request, infer_response,
            )

    @contextlib.asynccontextmanager
    async def _answering(self, rpc: str, context: grpc.aio.ServicerContext, *, guarded: bool = True) -> AsyncIterator[None]:
        """Check the API key (when ``guarded``), end the call with the status of a raised error, and
        count the call."""
        status = 200
        try:
            if guarded:
                self._check_api_key(context)
            yield
        except ServiceError as error:
            status = error.status_code
            if status == 500:
                log.error("%s: %s", type(error).__name__, error.message)
            await context.abort_with_status(error_status(error))
        except asyncio.CancelledError:  # the client cancelled, or its deadline passed, first
            status = ClientDisconnected.status_code
            raise
        except Exception as error:
            status = 500
            log.exception("unhandled error in %s", rpc)
            await context.abort(grpc.StatusCode.INTERNAL, f"{type(error).__name__}: {error}")
        finally:
            self.runtime.metrics.requests.labels(f"/{SERVICE}/{rpc}", str(status), "grpc").inc()
            access_log.info('%s - "%s" %d trace_id=%s', context.peer(), rpc, status, current_trace_id())

    def _check_api_key(self, context: grpc.aio.ServicerContext) -> None:
        expected = self.runtime.settings.api_key
        if expected is None:
            return
        metadata = dict(context.invocation_metadata() or ())
        bearer = metadata.get("authorization", "")
        given = bearer[len("Bearer "):] if bearer.startswith("Bearer ") else metadata.get("x-api-key")
        if given is None or not hmac.compare_digest(str(given).encode(), expected.get_secret_value().encode()):
            raise Unauthorized("a valid API key is required: send metadata 'authorization: Bearer KEY' or 'x-api-key: KEY'")


def _succeeds(check: Any) -> bool:
    try:
        check()
    except ServiceError:
        return False
    return True


def _call_as_request(context: grpc.aio.ServicerContext, rpc: str, message_bytes: int) -> Request:
    """The call as admission reads a request: a body of ``message_bytes`` already read (gRPC
    received it whole), and a disconnect once the call ends (cancelled, or its deadline passed)."""
    ended = asyncio.Event()
    context.add_done_callback(lambda _: ended.set())

    async def receive() -> dict[str, Any]:
        await ended.wait()
        return {"type": "http.disconnect"}

    scope = {
        "type": "http", "method": "POST", "path": f"/{SERVICE}/{rpc}", "query_string": b"",
        "headers": [(b"content-length", str(message_bytes).encode()), (b"content-type", b"application/grpc")],
        "state": {"body_done": True},
    }
    return Request(scope, receive)


def infer_request(message: pb.ModelInferRequest) -> tuple[InferRequest, memoryview]:
    """The request as the codec reads it: each input's values as binary data (its
    ``parameters.binary_data_size``), with the one input's bytes.

    Raises:
        BadRequest: raw contents that do not match the inputs, or bad ``contents``.
    """
    raw = message.raw_input_contents
    if raw and len(raw) != len(message.inputs):
        raise BadRequest(f"{len(raw)} raw_input_contents for {len(message.inputs)} inputs")
    inputs, blobs = [], []
    for i, tensor in enumerate(message.inputs):
        blob = raw[i] if raw else _contents_bytes(tensor)
        blobs.append(blob)
        inputs.append({"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape),
                       "parameters": {**_values(tensor.parameters), "binary_data_size": len(blob)}})
    document = {
        "id": message.id or None,
        "parameters": _values(message.parameters),
        "inputs": inputs,
        "outputs": [{"name": o.name, "parameters": _values(o.parameters)} for o in message.outputs] or None,
    }
    try:
        request = InferRequest.model_validate(document)
    except ValidationError as exc:
        raise BadRequest(f"malformed inference request: {describe_validation_errors(exc.errors())}") from None
    return request, memoryview(blobs[0] if blobs else b"")


def _contents_bytes(tensor: pb.ModelInferRequest.InferInputTensor) -> bytes:
    """A tensor's ``contents`` in the binary form."""
    contents = tensor.contents
    if tensor.datatype == "BYTES":
        return b"".join(struct.pack("<I", len(v)) + v for v in contents.bytes_contents)
    pixels = np.array(contents.uint_contents, dtype=np.uint64)
    if pixels.size and pixels.max() > 255:
        raise BadRequest(f"input {tensor.name!r}: UINT8 elements must be integers from 0 to 255")
    return pixels.astype(np.uint8).tobytes()


def _values(parameters: Any) -> dict[str, Any]:
    """A protobuf ``map<string, InferParameter>`` as plain values."""
    return {key: getattr(p, p.WhichOneof("parameter_choice")) for key, p in parameters.items()
            if p.WhichOneof("parameter_choice") is not None}


def infer_response(answer: InferAnswer) -> pb.ModelInferResponse:
    """The answer over gRPC: every output's values in ``raw_output_contents``, in output order."""
    response = pb.ModelInferResponse(model_name=answer.model_name, model_version=answer.model_version,
                                     id=answer.id or "")
    for name, values in answer.tensors.items():
        datatype = OUTPUTS[name][0]
        response.outputs.add(name=name, datatype=datatype, shape=list(values.shape))
        response.raw_output_contents.append(tensor_bytes(datatype, values))
    return response


@contextlib.asynccontextmanager
async def serving(runtime: Runtime) -> AsyncIterator[int | None]:
    """Serve the protocol over gRPC while the block runs; yields the bound port (``settings.grpc_port``,
    or the one picked for 0), or None when gRPC is off. On exit, calls in flight get
    ``grace_period_s`` to finish."""
    settings = runtime.settings
    if settings.grpc_port is None:
        yield None
        return
    server = grpc.aio.server(interceptors=runtime.pipeline.tracing.grpc_interceptors(), options=[
        ("grpc.max_receive_message_length", settings.grpc_receive_limit),
        ("grpc.max_send_message_length", settings.grpc_max_send_bytes),
    ])
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(runtime), server)
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    port = server.add_insecure_port(f"{host}:{settings.grpc_port}")
    await server.start()
    log.info("KServe v2 gRPC on %s:%d", host, port)
    try:
        yield port
    finally:
        await server.stop(settings.grace_period_s)

