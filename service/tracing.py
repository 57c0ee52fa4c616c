"""OpenTelemetry traces of the request path: off unless ``settings.otlp_endpoint`` is set (or
``create_app`` is handed a tracer provider, as the tests hand one with an in-memory exporter).

The spans of one request (names as the exporter shows them)::

    POST /v2/models/{name}/infer        the server span (FastAPI's instrumentation; over gRPC, the
    |                                   gRPC instrumentation's /inference.GRPCInferenceService/ModelInfer),
    |                                   continuing the caller's W3C traceparent (header or metadata)
    +- admission                        readiness, batcher place, deadline, memory, reading the body (v2)
    +- decode, preprocess               per image
    +- queue wait                       per image: from its submission to the start of its batch
    +- inference                        per image: its batch's engine call; batch.size, and a link to
    |                                   the batch's span
    +- postprocess                      per image
    +- encode                           the protocol's answer (v2)

    engine batch                        one per engine call (batch.size): a trace of its own, since
                                        it serves several requests; each of them links to it

/predict and /render get the server span and the per-image spans. With tracing on, the access log
lines (uvicorn's, through ``maskrcnn-serve``'s log configuration, and gRPC's) end with the
request's ``trace_id``.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, SpanContext, Status, StatusCode

if TYPE_CHECKING:
    from fastapi import FastAPI
    from opentelemetry.sdk.trace import TracerProvider

    from service.batcher import Batched
    from service.settings import Settings

SERVICE_NAME = "maskrcnn-serve"
BATCH_SIZE = "batch.size"
# Probes and scrapes would be most of the spans and tell nothing.
UNTRACED_URLS = "/healthz$,/readyz$,/metrics$,/v2/health/"


def tracer_provider(settings: Settings) -> TracerProvider | None:
    """An SDK tracer provider exporting to ``settings.otlp_endpoint`` (OTLP over gRPC) in batches,
    sampling ``trace_sampling_ratio`` of new traces and following a caller's sampling decision; None
    when no endpoint is set."""
    if settings.otlp_endpoint is None:
        return None
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    provider = TracerProvider(resource=Resource.create({"service.name": SERVICE_NAME}),
                              sampler=ParentBased(TraceIdRatioBased(settings.trace_sampling_ratio)))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=settings.otlp_endpoint)))
    return provider


class Tracing:
    """What the request path opens its spans with: ``provider``'s tracer, or a no-op one (None).
    ``owned``: the provider was made here (:meth:`from_settings`), so :meth:`close` shuts it down."""

    def __init__(self, provider: TracerProvider | None = None, *, owned: bool = False) -> None:
        self.provider = provider
        self.owned = owned
        self.tracer = provider.get_tracer(SERVICE_NAME) if provider is not None else trace.NoOpTracer()

    @classmethod
    def from_settings(cls, settings: Settings) -> Tracing:
        """Traces to ``settings.otlp_endpoint``, or none."""
        return cls(tracer_provider(settings), owned=True)

    def instrument(self, app: FastAPI) -> None:
        """Give ``app`` its server spans (FastAPI's instrumentation), when tracing is on."""
        if self.provider is None:
            return
        from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

        FastAPIInstrumentor.instrument_app(app, tracer_provider=self.provider, excluded_urls=UNTRACED_URLS,
                                           exclude_spans=["receive", "send"])

    def grpc_interceptors(self) -> list[Any]:
        """The gRPC server's interceptors: its server spans, when tracing is on."""
        if self.provider is None:
            return []
        from opentelemetry.instrumentation.grpc import aio_server_interceptor

        return [aio_server_interceptor(tracer_provider=self.provider)]

    def close(self) -> None:
        """Send what is left and stop exporting (a provider made here only)."""
        if self.owned and self.provider is not None:
            self.provider.shutdown()

    def span(self, name: str) -> contextlib.AbstractContextManager[trace.Span]:
        """A child of the current span for the block; an exception escaping it is recorded on it."""
        return self.tracer.start_as_current_span(name)

    @contextlib.contextmanager
    def batch(self, size: int) -> Iterator[SpanContext]:
        """The span of one engine call of ``size`` images, the root of a trace of its own; yields
        its context, for the images' inference spans to link to."""
        with self.tracer.start_as_current_span("engine batch", context=Context(), attributes={BATCH_SIZE: size}) as span:
            yield span.get_span_context()

    @contextlib.contextmanager
    def engine_wait(self) -> Iterator[Callable[[Batched[Any]], Batched[Any]]]:
        """Spans of one image's wait for the engine and its batch's run: use as
        ``with tracing.engine_wait() as ran: batched = ran(await ...)``. ``queue wait`` runs from
        entering the block to the start of the image's batch (or to the error that ends the wait);
        ``inference`` over the batch's run, linked to the batch's span (:meth:`batch`)."""
        loop = asyncio.get_running_loop()
        submitted = loop.time()
        waiting = self.tracer.start_span("queue wait")
        done = False

        def ran(batched: Batched[Any]) -> Batched[Any]:
            nonlocal done
            done = True
            epoch_ns = _epoch_ns(loop)
            started = epoch_ns(submitted + batched.queue_wait_s)
            waiting.end(end_time=started)
            batch = batched.trace
            links = [Link(batch)] if isinstance(batch, SpanContext) and batch.is_valid else []
            inference = self.tracer.start_span("inference", start_time=started, links=links,
                                               attributes={BATCH_SIZE: batched.batch_size})
            inference.end(end_time=started + int(batched.run_s * 1e9))
            return batched

        try:
            yield ran
        except BaseException as exc:
            if not done:
                waiting.record_exception(exc)
                waiting.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
                waiting.end()
            raise


def _epoch_ns(loop: asyncio.AbstractEventLoop) -> Callable[[float], int]:
    """Event-loop times as the wall-clock nanoseconds spans are stamped with (one offset, so that
    times converted together keep their differences)."""
    offset = time.time_ns() - int(loop.time() * 1e9)
    return lambda loop_time: offset + int(loop_time * 1e9)


def current_trace_id() -> str:
    """The current span's trace id (32 hex digits), or ``-`` outside a sampled span."""
    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else "-"


class TraceIdFilter(logging.Filter):
    """Gives each log record a ``trace_id`` attribute: the trace of the request being handled."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.trace_id = current_trace_id()
        return True


def uvicorn_log_config(settings: Settings) -> dict[str, Any]:
    """uvicorn's logging configuration; with traces on, ``trace_id=...`` ends each access line."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    if settings.otlp_endpoint is None:
        return config
    config.setdefault("filters", {})["trace_id"] = {"()": TraceIdFilter}
    config["loggers"]["uvicorn.access"]["filters"] = ["trace_id"]
    access = config["formatters"]["access"]
    access["fmt"] = access["fmt"] + " trace_id=%(trace_id)s"
    return config
