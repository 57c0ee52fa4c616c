"""Request traces (OpenTelemetry) through the real app on 127.0.0.1: the SDK's in-memory exporter
receives the spans of requests that real clients send with a W3C ``traceparent`` (tritonclient's
HTTP and gRPC clients, httpx); the CLI's access log names the trace.

One batch-1 engine (random weights): every image is one engine call, so each request image links
to a batch span of its own.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from tritonclient.utils import InferenceServerException

from scripts.tools.service_process import LiveServer, serving
from service.app import create_app
from service.backends import load_engine
from service.settings import Settings
from service.tracing import tracer_provider
from service_images import encode, gradient, images_input

pytestmark = pytest.mark.slow

MODEL = "maskrcnn"
OPTIONS = {"max_detections": 2}
PER_IMAGE = ("decode", "preprocess", "queue wait", "inference", "postprocess")
CLOCK_SLACK_NS = 5_000_000  # the engine spans are stamped from event-loop times


def traceparent(trace_id: int, parent: int, sampled: bool = True) -> str:
    return f"00-{trace_id:032x}-{parent:016x}-{'01' if sampled else '00'}"


@pytest.fixture(scope="module")
def traced(engine_dir: Path) -> Iterator[tuple[LiveServer, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    settings = Settings(grpc_port=0, request_timeout_ms=120_000)
    with serving(settings, load_engine(engine_dir), tracer_provider=provider) as live:
        yield live, exporter


@pytest.fixture(scope="module")
def photo(photos: Path) -> bytes:
    return (photos / "astronaut.png").read_bytes()


def spans_of(exporter: InMemorySpanExporter, trace_id: int) -> dict[str, list[ReadableSpan]]:
    spans: dict[str, list[ReadableSpan]] = {}
    for span in exporter.get_finished_spans():
        if span.context.trace_id == trace_id:
            spans.setdefault(span.name, []).append(span)
    return spans


def assert_request_trace(exporter: InMemorySpanExporter, trace_id: int, parent: int, server_name: str, images: int,
                         protocol_spans: bool = True) -> None:
    """The request's server span continues ``parent``; the stages are its children, once per image;
    each image's inference links to the engine batch span that ran it."""
    spans = spans_of(exporter, trace_id)
    (server,) = spans.pop(server_name)
    assert server.kind == SpanKind.SERVER and server.parent.span_id == parent and server.parent.is_remote
    expected = {name: images for name in PER_IMAGE} | ({"admission": 1, "encode": 1} if protocol_spans else {})
    assert {name: len(found) for name, found in spans.items()} == expected
    for found in spans.values():
        for span in found:
            assert span.parent.span_id == server.context.span_id, span.name
            assert server.start_time <= span.start_time and span.end_time <= server.end_time + CLOCK_SLACK_NS
    every_span = {s.context.span_id: s for s in exporter.get_finished_spans()}
    batches = set()
    for image in range(images):
        decode, preprocess, queued, inference, postprocess = (spans[name][image] for name in PER_IMAGE)
        (link,) = inference.links
        batch = every_span[link.context.span_id]
        batches.add(batch.context.span_id)
        assert batch.name == "engine batch" and batch.context.trace_id != trace_id  # a trace of its own
        assert batch.attributes["batch.size"] == inference.attributes["batch.size"] == 1
        # the request's view of the engine call is the batch's own span
        assert abs(inference.start_time - batch.start_time) < 50 * CLOCK_SLACK_NS
        assert abs(inference.end_time - batch.end_time) < 50 * CLOCK_SLACK_NS
    assert len(batches) == images
    for decode, preprocess, queued, inference, postprocess in zip(*(spans[name] for name in PER_IMAGE)):
        if images == 1:  # images of one request run concurrently: only one image's stages are in order
            assert decode.end_time <= preprocess.start_time and preprocess.end_time <= queued.start_time
            assert queued.end_time == inference.start_time
            assert inference.end_time <= postprocess.start_time + CLOCK_SLACK_NS
    if protocol_spans:
        (admission,), (encoded,) = spans["admission"], spans["encode"]
        assert admission.end_time <= min(s.start_time for s in spans["decode"])
        assert encoded.start_time >= max(s.end_time for s in spans["postprocess"])


def test_v2_rest_request_continues_the_callers_trace(traced, photo):
    live, exporter = traced
    trace_id, parent = 0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7
    client = triton_http.InferenceServerClient(live.url.removeprefix("http://"), network_timeout=300)
    images = [photo, encode(gradient(96, 128, seed=3), "PNG")]
    result = client.infer(MODEL, [images_input(triton_http, images)], parameters=OPTIONS,
                          headers={"traceparent": traceparent(trace_id, parent)})
    assert result.as_numpy("image_index").tolist() == [0, 0, 1, 1]
    assert_request_trace(exporter, trace_id, parent, "POST /v2/models/{name}/infer", images=2)


def test_grpc_request_continues_the_callers_trace(traced, photo):
    live, exporter = traced
    trace_id, parent = 0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331
    client = triton_grpc.InferenceServerClient(f"127.0.0.1:{live.app.state.grpc_port}")
    result = client.infer(MODEL, [images_input(triton_grpc, [photo])], parameters=OPTIONS,
                          headers={"traceparent": traceparent(trace_id, parent)})
    assert result.as_numpy("scores").shape == (2,)
    assert_request_trace(exporter, trace_id, parent, "/inference.GRPCInferenceService/ModelInfer", images=1)

    # an error keeps its status code through the instrumentation, and its stage's span says why
    trace_id = 0x0AF7651916CD43DD8448EB211C8031AA
    with pytest.raises(InferenceServerException) as raised:
        client.infer(MODEL, [images_input(triton_grpc, [b"no image"])], headers={"traceparent": traceparent(trace_id, parent)})
    assert raised.value.status() == "StatusCode.INVALID_ARGUMENT"
    # the client can see the error before the server's span of the call has ended
    deadline = time.monotonic() + 10
    while "/inference.GRPCInferenceService/ModelInfer" not in spans_of(exporter, trace_id) and time.monotonic() < deadline:
        time.sleep(0.05)
    spans = spans_of(exporter, trace_id)
    assert set(spans) == {"/inference.GRPCInferenceService/ModelInfer", "admission", "decode"}
    assert spans["decode"][0].status.status_code == StatusCode.ERROR


def test_predict_request_spans_and_a_failing_stage(traced, photo):
    live, exporter = traced
    trace_id, parent = 0x1234567890ABCDEF1234567890ABCDEF, 0x1122334455667788
    response = live.post(photo, "image/png", params=OPTIONS, headers={"traceparent": traceparent(trace_id, parent)})
    assert response.status_code == 200, response.text
    assert_request_trace(exporter, trace_id, parent, "POST /predict", images=1)

    # a bad image: the decode span carries the error; the trace ends there
    trace_id = 0xABCDEF0123456789ABCDEF0123456789
    response = live.post(b"no image", "image/png", headers={"traceparent": traceparent(trace_id, parent)})
    assert response.status_code == 400
    spans = spans_of(exporter, trace_id)
    assert set(spans) == {"POST /predict", "admission", "decode"}
    (decode,) = spans["decode"]
    assert decode.status.status_code == StatusCode.ERROR and decode.events[0].name == "exception"

    # a caller that does not sample its trace gets none recorded; probes are never traced
    trace_id = 0x99999999999999999999999999999999
    response = live.post(b"no image", "image/png", headers={"traceparent": traceparent(trace_id, parent, sampled=False)})
    assert response.status_code == 400 and not spans_of(exporter, trace_id)
    before = len(exporter.get_finished_spans())
    assert httpx.get(live.url + "/readyz").status_code == 200 and httpx.get(live.url + "/metrics").status_code == 200
    assert len(exporter.get_finished_spans()) == before


def test_traces_are_off_by_default_and_settings_switch_them_on():
    assert Settings().otlp_endpoint is None and tracer_provider(Settings()) is None

    def never_called():
        raise AssertionError("no engine is opened")

    def instrumented(app) -> bool:  # the FastAPI instrumentation's own mark on an app it wrapped
        return getattr(app, "_is_instrumented_by_opentelemetry", False)

    assert not instrumented(create_app(Settings(), engine_factory=never_called))
    settings = Settings(otlp_endpoint="http://127.0.0.1:4317", trace_sampling_ratio=0.25)
    provider = tracer_provider(settings)
    try:
        assert "TraceIdRatioBased{0.25}" in provider.sampler.get_description()
        assert provider.resource.attributes["service.name"] == "maskrcnn-serve"
        assert instrumented(create_app(settings, engine_factory=never_called))
    finally:
        provider.shutdown()
    with pytest.raises(ValueError):
        Settings(trace_sampling_ratio=1.5)


def test_the_access_log_names_the_trace(engine_dir, tmp_path):
    # nothing listens on the collector's port: spans are dropped, the service serves on
    log = tmp_path / "serve.log"
    trace_id = 0x5E5E5E5E5E5E5E5E5E5E5E5E5E5E5E5E
    with serving(engine_dir=engine_dir, args=["--otlp-endpoint", "http://127.0.0.1:9", "--log-level", "info"],
                 log=log) as live:
        response = httpx.get(live.url + "/v1/models", headers={"traceparent": traceparent(trace_id, 0x42)})
        assert response.status_code == 200
    lines = [line for line in log.read_text().splitlines() if "GET /v1/models" in line]
    assert lines and all(line.endswith(f"trace_id={trace_id:032x}") for line in lines), lines
