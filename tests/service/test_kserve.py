"""The KServe v2 (Open Inference Protocol) routes, spoken to by NVIDIA's own ``tritonclient[http]``.

One batch-1 engine (random weights, score threshold 0: 100 detections an image); every inference
costs seconds on a small CPU, so the answers are compared on few calls, ``max_detections`` low.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from scripts.tools.service_process import LiveServer, serving
from service.backends import load_engine
from service.decode import decode_image
from service.kserve_codec import OUTPUTS
from service.settings import Settings
from service_images import encode, gradient

pytestmark = pytest.mark.slow

MODEL = "maskrcnn"
OPTIONS = {"max_detections": 4}


@pytest.fixture(scope="module")
def server(engine_dir: Path) -> Iterator[LiveServer]:
    with serving(Settings(request_timeout_ms=120_000, max_wait_ms=200), load_engine(engine_dir)) as live:
        yield live


@pytest.fixture(scope="module")
def client(server: LiveServer) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(server.url.removeprefix("http://"), network_timeout=300)


@pytest.fixture(scope="module")
def photo(photos: Path) -> bytes:
    return (photos / "astronaut.png").read_bytes()


def predict(server: LiveServer, image: bytes) -> dict:
    response = server.post(image, "image/png", params=OPTIONS)
    assert response.status_code == 200, response.text
    return response.json()


def assert_outputs_equal(result: triton.InferResult, answer: dict, image_index: int = 0) -> None:
    """The v2 outputs of one request image equal its /predict answer."""
    rows = result.as_numpy("image_index") == image_index
    found = answer["detections"]
    np.testing.assert_array_equal(result.as_numpy("boxes")[rows], np.array([d["bbox"] for d in found], np.float32))
    np.testing.assert_array_equal(result.as_numpy("scores")[rows], np.array([d["score"] for d in found], np.float32))
    assert result.as_numpy("labels")[rows].tolist() == [d["category_id"] for d in found]
    assert [_text(c) for c in result.as_numpy("classes")[rows]] == [d["category_name"] for d in found]
    assert [json.loads(_text(m)) for m in result.as_numpy("masks")[rows]] == [d["segmentation"] for d in found]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def test_health_and_metadata(client, server):
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL)
    assert not client.is_model_ready("another")
    server_metadata = client.get_server_metadata()
    assert server_metadata["name"] == "maskrcnn-serve" and "binary_tensor_data" in server_metadata["extensions"]
    metadata = client.get_model_metadata(MODEL)
    (version,) = metadata["versions"]
    assert len(version) == 12 and int(version, 16) >= 0
    assert metadata["platform"] == "onnxruntime"
    assert {(t["name"], t["datatype"], tuple(t["shape"])) for t in metadata["inputs"]} == {
        ("image", "BYTES", (-1,)), ("image_rgb", "UINT8", (-1, -1, 3))}
    assert [(t["name"], t["datatype"], t["shape"]) for t in metadata["outputs"]] == [
        (name, datatype, shape) for name, (datatype, shape) in OUTPUTS.items()]
    assert client.get_model_metadata(MODEL, model_version=version)["name"] == MODEL
    assert client.is_model_ready(MODEL, model_version=version)
    assert not client.is_model_ready(MODEL, model_version="0" * 12)


def test_binary_batch_json_and_raw_pixels_answer_as_predict(client, server, photo):
    other = encode(gradient(96, 128, seed=3), "PNG")
    answers = [predict(server, photo), predict(server, other)]
    infer_200 = {"endpoint": "/v2/models/{name}/infer", "status": "200"}
    stages_before = server.metric("maskrcnn_stage_seconds_count", stage="total")
    answered_before = server.metric("maskrcnn_requests_total", **infer_200)

    # binary data both ways, two images in one request: answered in order
    images = triton.InferInput("image", [2], "BYTES")
    images.set_data_from_numpy(np.array([photo, other], dtype=object), binary_data=True)
    result = client.infer(MODEL, [images], parameters=OPTIONS, request_id="r-1")
    assert result.get_response()["id"] == "r-1"
    assert result.as_numpy("image_index").tolist() == [0] * 4 + [1] * 4
    for i, answer in enumerate(answers):
        assert_outputs_equal(result, answer, image_index=i)
    assert server.metric("maskrcnn_stage_seconds_count", stage="total") == stages_before + 2
    assert server.metric("maskrcnn_requests_total", **infer_200) == answered_before + 1

    # JSON both ways (each image in base64), a subset of the outputs
    image = triton.InferInput("image", [1], "BYTES")
    image.set_data_from_numpy(np.array([base64.b64encode(photo)], dtype=object), binary_data=False)
    wanted = [triton.InferRequestedOutput(name, binary_data=False) for name in ("boxes", "classes", "masks")]
    result = client.infer(MODEL, [image], outputs=wanted, parameters=OPTIONS)
    assert [o["name"] for o in result.get_response()["outputs"]] == ["boxes", "classes", "masks"]
    assert all("data" in o for o in result.get_response()["outputs"])
    found = answers[0]["detections"]
    np.testing.assert_array_equal(result.as_numpy("boxes"), np.array([d["bbox"] for d in found], np.float32))
    assert [json.loads(_text(m)) for m in result.as_numpy("masks")] == [d["segmentation"] for d in found]

    # raw RGB pixels (no decoding): the decoded photo gives the same detections
    rgb = decode_image(photo, max_bytes=len(photo), max_pixels=10**8, min_side=1)
    pixels = triton.InferInput("image_rgb", list(rgb.shape), "UINT8")
    pixels.set_data_from_numpy(rgb, binary_data=True)
    assert_outputs_equal(client.infer(MODEL, [pixels], parameters=OPTIONS), answers[0])


def _infer(server: LiveServer, body: dict | bytes, model: str = MODEL, **headers: str) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{server.url}/v2/models/{model}/infer", content=content, headers=headers, timeout=60)


def _image_input(data: list, datatype: str = "BYTES", shape: list[int] | None = None, name: str = "image") -> dict:
    return {"inputs": [{"name": name, "datatype": datatype, "shape": shape or [len(data)], "data": data}]}


@pytest.mark.parametrize("body, status, says", [
    (_image_input([1.0], "FP32"), 400, "datatype BYTES"),
    (_image_input(["aGk="], shape=[1, 1]), 400, "shape [B]"),
    (_image_input(["aGk="], name="picture"), 400, "exactly one input"),
    (_image_input([0] * 12, "UINT8", [2, 2, 3], name="image_rgb") | {"inputs": [
        {"name": "image_rgb", "datatype": "UINT8", "shape": [2, 2, 3], "data": [0] * 12},
        {"name": "image", "datatype": "BYTES", "shape": [1], "data": ["aGk="]}]}, 400, "exactly one input"),
    (_image_input([0] * 8, "UINT8", [2, 2, 2], name="image_rgb"), 400, "[H, W, 3]"),
    (_image_input([0] * 11, "UINT8", [2, 2, 3], name="image_rgb"), 400, "11 elements"),
    (_image_input([300] * 12, "UINT8", [2, 2, 3], name="image_rgb"), 400, "0 to 255"),
    (_image_input(["not base64!"]), 400, "not base64"),
    (_image_input([base64.b64encode(b"no image").decode()]), 400, "not a JPEG"),
    (_image_input(["aGk="]) | {"outputs": [{"name": "polygons"}]}, 400, "unknown output"),
    (_image_input(["aGk="]) | {"parameters": {"score_treshold": 0.5}}, 400, "unknown request parameters"),
    (_image_input(["aGk="]) | {"parameters": {"score_threshold": 2.0}}, 400, "score_threshold"),
    (_image_input(["aGk="]) | {"parameters": {"classes": "unicorn"}}, 400, "unknown classes"),
    ({"inputs": []}, 400, "malformed inference request"),
    (b"{not json", 400, "not valid JSON"),
])
def test_bad_requests_get_400_in_the_protocol_shape(server, body, status, says):
    response = _infer(server, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert isinstance(error, str) and says in error, error


def test_binary_data_that_does_not_add_up_is_a_400(server):
    header = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                     "parameters": {"binary_data_size": 100}}]}).encode()
    response = _infer(server, header + b"\x05\x00\x00\x00abc", **{"Inference-Header-Content-Length": str(len(header))})
    assert response.status_code == 400 and "binary_data_size" in response.json()["error"]
    response = _infer(server, header, **{"Inference-Header-Content-Length": str(len(header) + 1)})
    assert response.status_code == 400 and "Inference-Header-Content-Length" in response.json()["error"]


def test_unknown_models_routes_and_versions_are_404_in_the_protocol_shape(server, client):
    with pytest.raises(InferenceServerException) as raised:  # tritonclient prints our message
        client.get_model_metadata("resnet")
    assert raised.value.status() == "404" and "unknown model 'resnet'" in raised.value.message()
    response = _infer(server, _image_input(["aGk="]), model="resnet")
    assert response.status_code == 404 and response.json() == {"error": "unknown model 'resnet'; this server serves 'maskrcnn'"}
    response = httpx.get(f"{server.url}/v2/models/{MODEL}/versions/nope")
    assert response.status_code == 404 and "no version 'nope'" in response.json()["error"]
    response = httpx.get(f"{server.url}/v2/repository")
    assert response.status_code == 404 and isinstance(response.json()["error"], str)
    # outside /v2 the service's own shape stays
    assert set(httpx.get(f"{server.url}/nope").json()["error"]) == {"code", "message"}


def test_v2_inference_needs_the_api_key_and_its_health_does_not(engine_dir):
    with serving(Settings(api_key="sesame"), load_engine(engine_dir)) as live:
        assert httpx.get(live.url + "/v2/health/ready").status_code == 200
        response = _infer(live, _image_input(["aGk="]))
        assert response.status_code == 401 and isinstance(response.json()["error"], str)
        assert httpx.get(f"{live.url}/v2/models/{MODEL}").status_code == 401
        authorised = httpx.get(f"{live.url}/v2/models/{MODEL}", headers={"Authorization": "Bearer sesame"})
        assert authorised.status_code == 200
