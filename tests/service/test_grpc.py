"""The KServe v2 protocol over gRPC, spoken to by NVIDIA's own ``tritonclient[grpc]``, against the
real app on 127.0.0.1 (gRPC beside HTTP in one process, ``settings.grpc_port=0``).

Answers are compared with the v2 REST route's for the same request (``tritonclient[http]``): one
request path, two transports. One batch-1 engine (random weights, score threshold 0); every
inference costs seconds on a small CPU, so few calls infer.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from tritonclient.utils import InferenceServerException

from scripts.tools.service_process import LiveServer, serving
from service.backends import load_engine
from service.decode import decode_image
from service.kserve_codec import OUTPUTS
from service.settings import Settings
from service_images import encode, gradient, images_input

pytestmark = pytest.mark.slow

MODEL = "maskrcnn"
OPTIONS = {"max_detections": 4}
INFER = "/inference.GRPCInferenceService/ModelInfer"


@pytest.fixture(scope="module")
def server(engine_dir: Path) -> Iterator[LiveServer]:
    with serving(Settings(request_timeout_ms=120_000, max_wait_ms=200, grpc_port=0), load_engine(engine_dir)) as live:
        yield live


def grpc_client(server: LiveServer) -> triton_grpc.InferenceServerClient:
    return triton_grpc.InferenceServerClient(f"127.0.0.1:{server.app.state.grpc_port}")


@pytest.fixture(scope="module")
def client(server: LiveServer) -> triton_grpc.InferenceServerClient:
    return grpc_client(server)


@pytest.fixture(scope="module")
def photo(photos: Path) -> bytes:
    return (photos / "astronaut.png").read_bytes()


def status_of(raised: pytest.ExceptionInfo[InferenceServerException]) -> str:
    return raised.value.status()


def test_health_and_metadata_as_over_rest(client, server):
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL)
    assert not client.is_model_ready("another")
    metadata = client.get_model_metadata(MODEL)
    rest = httpx.get(f"{server.url}/v2/models/{MODEL}").json()
    assert (metadata.name, list(metadata.versions), metadata.platform) == (rest["name"], rest["versions"], rest["platform"])
    for side in ("inputs", "outputs"):
        tensors = [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in getattr(metadata, side)]
        assert tensors == rest[side]
    assert [t.name for t in metadata.outputs] == list(OUTPUTS)
    (version,) = metadata.versions
    assert client.is_model_ready(MODEL, model_version=version)
    assert not client.is_model_ready(MODEL, model_version="0" * 12)
    assert client.get_server_metadata(as_json=True) == httpx.get(f"{server.url}/v2").json()


def test_images_batch_and_pixels_answer_as_over_rest(client, server, photo):
    other = encode(gradient(96, 128, seed=3), "PNG")
    rest = triton_http.InferenceServerClient(server.url.removeprefix("http://"), network_timeout=300)
    expected = rest.infer(MODEL, [images_input(triton_http, [photo, other])], parameters=OPTIONS)
    stages_before = server.metric("maskrcnn_stage_seconds_count", stage="total")
    answered_before = server.metric("maskrcnn_requests_total", endpoint=INFER, status="200", protocol="grpc")

    # a batch of two encoded images, in raw_input_contents as tritonclient sends them
    result = client.infer(MODEL, [images_input(triton_grpc, [photo, other])], parameters=OPTIONS, request_id="g-1")
    assert result.get_response().id == "g-1"
    assert [o.name for o in result.get_response().outputs] == list(OUTPUTS)
    assert result.as_numpy("image_index").tolist() == [0] * 4 + [1] * 4
    for name in OUTPUTS:
        np.testing.assert_array_equal(result.as_numpy(name), expected.as_numpy(name), err_msg=name)
    assert server.metric("maskrcnn_stage_seconds_count", stage="total") == stages_before + 2
    assert server.metric("maskrcnn_requests_total", endpoint=INFER, status="200", protocol="grpc") == answered_before + 1

    # the first photo's RGB pixels (no decoding), a subset of the outputs: the same detections
    rgb = decode_image(photo, max_bytes=len(photo), max_pixels=10**8, min_side=1)
    pixels = triton_grpc.InferInput("image_rgb", list(rgb.shape), "UINT8")
    pixels.set_data_from_numpy(rgb)
    wanted = [triton_grpc.InferRequestedOutput(name) for name in ("boxes", "masks")]
    result = client.infer(MODEL, [pixels], outputs=wanted, parameters=OPTIONS)
    assert [o.name for o in result.get_response().outputs] == ["boxes", "masks"]
    first = expected.as_numpy("image_index") == 0
    np.testing.assert_array_equal(result.as_numpy("boxes"), expected.as_numpy("boxes")[first])
    np.testing.assert_array_equal(result.as_numpy("masks"), expected.as_numpy("masks")[first])


@pytest.mark.parametrize("make_inputs, outputs, parameters, model, code, says", [
    (lambda: [images_input(triton_grpc, [b"no image"])], None, {}, MODEL, "INVALID_ARGUMENT", "not a JPEG"),
    (lambda: [images_input(triton_grpc, [b"x"])], None, {}, "resnet", "NOT_FOUND", "unknown model 'resnet'"),
    (lambda: [images_input(triton_grpc, [b"x"])], ["polygons"], {}, MODEL, "INVALID_ARGUMENT", "unknown output"),
    (lambda: [images_input(triton_grpc, [b"x"])], None, {"score_threshold": 2.0}, MODEL, "INVALID_ARGUMENT",
     "score_threshold"),
    (lambda: [triton_grpc.InferInput("image", [1], "FP32")], None, {}, MODEL, "INVALID_ARGUMENT", "datatype BYTES"),
])
def test_bad_requests_get_the_error_tables_code(client, server, make_inputs, outputs, parameters, model, code, says):
    inputs = make_inputs()
    if inputs[0].datatype() == "FP32":
        inputs[0].set_data_from_numpy(np.zeros(1, np.float32))
    wanted = None if outputs is None else [triton_grpc.InferRequestedOutput(name) for name in outputs]
    before = server.metric("maskrcnn_requests_total", endpoint=INFER, protocol="grpc")
    with pytest.raises(InferenceServerException) as raised:
        client.infer(model, inputs, outputs=wanted, parameters=parameters)
    assert status_of(raised) == f"StatusCode.{code}" and says in raised.value.message(), raised.value
    assert server.metric("maskrcnn_requests_total", endpoint=INFER, protocol="grpc") == before + 1


def test_the_calls_grpc_deadline_is_the_requests_deadline(client, server, photo):
    # The engine takes seconds an image here: a 300 ms deadline is refused by admission at once,
    # by the server (its own message), before the client's deadline passes.
    started = time.monotonic()
    with pytest.raises(InferenceServerException) as raised:
        client.infer(MODEL, [images_input(triton_grpc, [photo])], client_timeout=0.3)
    assert time.monotonic() - started < 0.3
    assert status_of(raised) == "StatusCode.DEADLINE_EXCEEDED" and "engine would answer in about" in raised.value.message()
    assert server.metric("maskrcnn_requests_total", endpoint=INFER, status="503", protocol="grpc") >= 1
    # without a deadline the setting's applies, and the same image is answered
    assert client.infer(MODEL, [images_input(triton_grpc, [photo])], parameters=OPTIONS).as_numpy("scores").shape == (4,)


def test_api_key_in_metadata_and_the_memory_budget(engine_dir):
    with serving(Settings(api_key="sesame", memory_budget_bytes=2**20, grpc_port=0, request_timeout_ms=120_000),
                 load_engine(engine_dir)) as live:
        client = grpc_client(live)
        assert client.is_server_ready() and client.is_model_ready(MODEL)  # health needs no key
        large = encode(np.full((1000, 1000, 3), 90, np.uint8), "PNG")
        for headers in (None, {"authorization": "Bearer nope"}, {"x-api-key": "nope"}):
            with pytest.raises(InferenceServerException) as raised:
                client.infer(MODEL, [images_input(triton_grpc, [large])], headers=headers)
            assert status_of(raised) == "StatusCode.UNAUTHENTICATED" and "API key" in raised.value.message()
        assert client.get_model_metadata(MODEL, headers={"x-api-key": "sesame"}).name == MODEL
        assert live.metric("maskrcnn_requests_total", endpoint=INFER, status="401", protocol="grpc") == 3

        # a 1000x1000 image needs 7 MB to decode: over the 1 MiB budget, refused with a retry delay
        with pytest.raises(InferenceServerException) as raised:
            client.infer(MODEL, [images_input(triton_grpc, [large])], headers={"authorization": "Bearer sesame"})
        assert status_of(raised) == "StatusCode.RESOURCE_EXHAUSTED" and "MASKRCNN_MEMORY_BUDGET_BYTES" in raised.value.message()
        status = rpc_status.from_call(raised.value.__context__)  # tritonclient's own RpcError
        retry = error_details_pb2.RetryInfo()
        assert status.details[0].Unpack(retry) and retry.retry_delay.seconds == 1
        assert live.metric("maskrcnn_requests_total", endpoint=INFER, status="503", protocol="grpc") == 1
        assert live.metric("maskrcnn_memory_in_flight_bytes") == 0
