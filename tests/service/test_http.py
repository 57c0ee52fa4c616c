"""The service over real HTTP (uvicorn on 127.0.0.1) with real exported engines.

Every image is resized to about 1333x800, so each engine call costs seconds on a small CPU: the
tests send their images in pairs (the batch-2 engine runs a pair for the price of one call) and
keep the count of inferences low.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest
from conftest import wait_until
from pycocotools import mask as coco_mask

from scripts.tools.service_process import LiveServer, serving
from service.backends import Engine, load_engine
from service.decode import decode_image
from service.postprocess import paste_masks, postprocess_image, select_valid
from service.preprocess import pad_batch, prepare_image
from service.settings import Settings
from service_images import cmyk_jpeg, encode, exif_rotated_jpeg, gradient, gray16_png, png_header_only

pytestmark = pytest.mark.slow

LIMITS = {"max_bytes": 2**20, "max_pixels": 10_000_000, "min_side": 8}


@pytest.fixture(scope="module")
def engine_b2(engine_dir_b2: Path) -> Engine:
    return load_engine(engine_dir_b2)


@pytest.fixture(scope="module")
def engine_b1(engine_dir: Path) -> Engine:
    return load_engine(engine_dir)


@pytest.fixture(scope="module")
def server(engine_b2: Engine) -> Iterator[LiveServer]:
    """Batch-2 engine; batches wait up to 500 ms to fill, so a concurrent pair always shares one."""
    with serving(Settings(max_wait_ms=500, request_timeout_ms=120_000, **LIMITS), engine_b2) as live:
        yield live


def reference(engine: Engine, images: list[bytes]) -> list[tuple]:
    """The engine's own answer for ``images`` as one batch, pushed through postprocess.

    Per image: ``(ImageDetections, kept 28x28 masks [K, 28, 28], orig_hw)``.
    """
    spec = engine.manifest.input.spec
    prepared = [prepare_image(decode_image(data, **LIMITS), spec) for data in images]
    batch, sizes = pad_batch(prepared, spec.pad_divisor, batch_size=engine.batch_size)
    out = engine.infer(batch, sizes)
    post = engine.manifest.postprocess
    results = []
    for i, p in enumerate(prepared):
        dets, labels, masks = out["dets"][i], out["labels"][i], out["masks"][i]
        detections = postprocess_image(
            dets, labels, masks, p.scale_factor, p.orig_hw, post.score_threshold, post.mask_threshold,
            post.max_detections,
        )
        kept_masks = select_valid(dets, labels, masks, post.score_threshold, post.max_detections)[2]
        results.append((detections, kept_masks, p.orig_hw))
    return results


def concurrently(*calls):
    with ThreadPoolExecutor(len(calls)) as pool:
        return [f.result() for f in [pool.submit(call) for call in calls]]


def test_concurrent_requests_are_batched_and_match_the_engine(server, engine_b2):
    first, second = encode(gradient(seed=1), "PNG"), encode(gradient(seed=2), "PNG")
    batches_before = server.metric("maskrcnn_batch_size_count")
    pairs_before = server.metric("maskrcnn_batch_size_bucket", le="2.0") - server.metric("maskrcnn_batch_size_bucket", le="1.0")
    native, coco = concurrently(
        lambda: server.post(first, "image/png"),
        lambda: server.post(
            orjson.dumps({"image": base64.b64encode(second).decode(), "format": "coco", "image_id": 42}),
            "application/json",
        ),
    )
    assert native.status_code == 200, native.text
    assert coco.status_code == 200, coco.text
    # one engine call carried both images
    assert server.metric("maskrcnn_batch_size_count") == batches_before + 1
    # prometheus_client's process collector is on the app's registry: the RSS of a process holding an engine
    assert server.metric("process_resident_memory_bytes") > 50 * 2**20
    assert server.metric("python_info") == 1
    pairs_after = server.metric("maskrcnn_batch_size_bucket", le="2.0") - server.metric("maskrcnn_batch_size_bucket", le="1.0")
    assert pairs_after == pairs_before + 1

    (ref_first, first_masks, (h, w)), (ref_second, *_) = reference(engine_b2, [first, second])
    body = native.json()
    assert body["image"] == {"width": 64, "height": 48}
    assert set(body["timings_ms"]) == {"decode", "preprocess", "queue_wait", "inference", "postprocess", "total"}
    assert native.headers["Server-Timing"].startswith("decode;dur=")
    detections = body["detections"]
    assert len(detections) == len(ref_first.boxes) > 0
    np.testing.assert_allclose([d["bbox"] for d in detections], ref_first.boxes, atol=1e-3)
    np.testing.assert_allclose([d["score"] for d in detections], ref_first.scores, atol=1e-4)
    classes = engine_b2.manifest.classes
    assert [d["category_id"] for d in detections] == [classes[label].id for label in ref_first.labels]
    assert [d["category_name"] for d in detections] == [classes[label].name for label in ref_first.labels]

    # The RLEs decode to the pasted masks, and each mask stays inside its box (one-pixel margin).
    pasted = paste_masks(first_masks, ref_first.boxes, (h, w), engine_b2.manifest.postprocess.mask_threshold)
    for k, d in enumerate(detections):
        mask = coco_mask.decode(d["segmentation"])
        assert d["segmentation"]["size"] == [h, w]
        disagree = np.count_nonzero(mask != pasted[k])
        assert disagree <= max(2, 0.01 * pasted[k].sum()), (k, disagree)
        ys, xs = np.nonzero(mask)
        if len(xs):
            x1, y1, x2, y2 = d["bbox"]
            assert xs.min() >= np.floor(x1) - 1 and xs.max() <= np.ceil(x2) + 1
            assert ys.min() >= np.floor(y1) - 1 and ys.max() <= np.ceil(y2) + 1

    entries = coco.json()
    assert isinstance(entries, list) and len(entries) == len(ref_second.boxes)
    assert all(e["image_id"] == 42 for e in entries)
    xywh = [[x1, y1, x2 - x1, y2 - y1] for x1, y1, x2, y2 in ref_second.boxes.tolist()]
    np.testing.assert_allclose([e["bbox"] for e in entries], xywh, atol=1e-3)
    np.testing.assert_allclose([e["score"] for e in entries], ref_second.scores, atol=1e-4)


def test_options_select_and_shape_the_answer(server):
    image = encode(gradient(seed=3), "JPEG", quality=95)
    everything, limited = concurrently(
        lambda: server.post(files={"image": ("photo.jpg", image, "image/jpeg")}),
        lambda: server.post(
            files={"image": ("photo.jpg", image, "image/jpeg")},
            data={"max_detections": "5", "masks": "false", "score_threshold": "0.01"},
        ),
    )
    assert everything.status_code == 200 and limited.status_code == 200
    all_detections = everything.json()["detections"]
    top = limited.json()["detections"]
    expected = [d for d in all_detections if d["score"] >= 0.01][:5]
    assert len(top) == 5
    np.testing.assert_allclose([d["bbox"] for d in top], [d["bbox"] for d in expected], atol=1e-3)
    assert all("segmentation" not in d for d in top)

    wanted = all_detections[0]["category_name"]
    by_name, by_id = concurrently(
        lambda: server.post(image, "image/jpeg", params={"classes": wanted, "masks": "false"}),
        lambda: server.post(image, "image/jpeg", params={"classes": f"{all_detections[0]['category_id']},no-such"}),
    )
    assert by_name.status_code == 200
    assert {d["category_name"] for d in by_name.json()["detections"]} == {wanted}
    assert by_id.status_code == 422 and "no-such" in by_id.json()["error"]["message"]


def json_image(data: bytes, **fields) -> bytes:
    return orjson.dumps({"image": base64.b64encode(data).decode(), **fields})


def multipart(fields: dict[str, tuple[str, bytes, str] | str]) -> tuple[bytes, str]:
    """A multipart/form-data body built by hand (so malformed variants are easy)."""
    boundary = "test-boundary-7d3a"
    parts = []
    for name, value in fields.items():
        if isinstance(value, tuple):
            filename, data, media = value
            head = f'Content-Disposition: form-data; name="{name}"; filename="{filename}"\r\nContent-Type: {media}\r\n\r\n'
            parts.append(f"--{boundary}\r\n{head}".encode() + data + b"\r\n")
        else:
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


JPEG = encode(gradient(seed=4), "JPEG", quality=90)
PNG = encode(gradient(seed=4), "PNG")
PNG_BODY, PNG_MULTIPART = multipart({"image": ("a.png", PNG, "image/png")})

# (name, body, content type, extra request arguments, expected status, expected error code)
BAD_INPUTS = [
    ("zero-bytes", b"", "image/jpeg", {}, 400, "invalid_image"),
    ("text", b"just some text, not an image", "image/png", {}, 400, "invalid_image"),
    ("html", b"<!doctype html><html><body><h1>hello</h1></body></html>", "image/jpeg", {}, 400, "invalid_image"),
    ("truncated-jpeg", JPEG[: len(JPEG) // 2], "image/jpeg", {}, 400, "invalid_image"),
    ("truncated-png", PNG[: len(PNG) // 2], "image/png", {}, 400, "invalid_image"),
    ("png-bomb-100mp", png_header_only(10_000, 10_000), "image/png", {}, 413, "payload_too_large"),
    ("one-pixel", encode(gradient(1, 1), "PNG"), "image/png", {}, 400, "invalid_image"),
    ("sliver-aspect", encode(gradient(8, 30_000), "PNG"), "image/png", {}, 400, "invalid_image"),
    ("gif", encode(gradient(), "GIF"), "image/png", {}, 400, "invalid_image"),
    ("tiff", encode(gradient(), "TIFF"), "image/jpeg", {}, 400, "invalid_image"),
    ("image-over-max-bytes", JPEG + b"\0" * (2**20), "image/jpeg", {}, 413, "payload_too_large"),
    ("no-content-type", JPEG, None, {}, 415, "unsupported_media_type"),
    ("text-plain", JPEG, "text/plain", {}, 415, "unsupported_media_type"),
    ("image-gif-type", JPEG, "image/gif", {}, 415, "unsupported_media_type"),
    ("form-urlencoded", b"image=abc", "application/x-www-form-urlencoded", {}, 415, "unsupported_media_type"),
    ("broken-base64", b'{"image": "not*base64!!"}', "application/json", {}, 400, "invalid_image"),
    ("base64-of-text", json_image(b"hello world"), "application/json", {}, 400, "invalid_image"),
    ("malformed-json", b'{"image": ', "application/json", {}, 400, "bad_request"),
    ("json-without-image", b'{"format": "coco"}', "application/json", {}, 422, "invalid_parameters"),
    ("json-image-not-string", b'{"image": 12}', "application/json", {}, 422, "invalid_parameters"),
    ("json-array", b"[1, 2, 3]", "application/json", {}, 422, "invalid_parameters"),
    ("json-unknown-field", json_image(JPEG, colour="red"), "application/json", {}, 422, "invalid_parameters"),
    ("huge-json", json_image(b"\0" * (2 * 2**20)), "application/json", {}, 413, "payload_too_large"),
    ("negative-threshold", JPEG, "image/jpeg", {"params": {"score_threshold": "-0.5"}}, 422, "invalid_parameters"),
    ("nan-threshold", JPEG, "image/jpeg", {"params": {"score_threshold": "nan"}}, 422, "invalid_parameters"),
    ("threshold-above-one", JPEG, "image/jpeg", {"params": {"score_threshold": "1.5"}}, 422, "invalid_parameters"),
    ("json-nan-threshold", b'{"image": "", "score_threshold": NaN}', "application/json", {}, 400, "bad_request"),
    ("json-negative-threshold", json_image(JPEG, score_threshold=-1), "application/json", {}, 422, "invalid_parameters"),
    ("zero-max-detections", JPEG, "image/jpeg", {"params": {"max_detections": "0"}}, 422, "invalid_parameters"),
    ("too-many-detections", JPEG, "image/jpeg", {"params": {"max_detections": "1000"}}, 422, "invalid_parameters"),
    ("unknown-class", JPEG, "image/jpeg", {"params": {"classes": "unicorn"}}, 422, "invalid_parameters"),
    ("unknown-format", JPEG, "image/jpeg", {"params": {"format": "xml"}}, 422, "invalid_parameters"),
    ("unknown-query-parameter", JPEG, "image/jpeg", {"params": {"score_thresh": "0.5"}}, 422, "invalid_parameters"),
    ("bad-masks-flag", JPEG, "image/jpeg", {"params": {"masks": "maybe"}}, 422, "invalid_parameters"),
    ("bad-image-id", JPEG, "image/jpeg", {"params": {"image_id": "abc"}}, 422, "invalid_parameters"),
    ("negative-timeout", JPEG, "image/jpeg", {"headers": {"X-Request-Timeout-Ms": "-5"}}, 422, "invalid_parameters"),
    ("text-timeout", JPEG, "image/jpeg", {"headers": {"X-Request-Timeout-Ms": "soon"}}, 422, "invalid_parameters"),
    ("multipart-no-boundary", PNG_BODY, "multipart/form-data", {}, 400, "bad_request"),
    ("multipart-without-image", *multipart({"format": "coco"}), {}, 422, "invalid_parameters"),
    ("multipart-wrong-file-field", *multipart({"file": ("a.png", PNG, "image/png")}), {}, 422, "invalid_parameters"),
    ("multipart-bad-option", *multipart({"image": ("a.png", PNG, "image/png"), "max_detections": "many"}), {}, 422,
     "invalid_parameters"),
    ("multipart-text-file", *multipart({"image": ("a.txt", b"plain text", "text/plain")}), {}, 400, "invalid_image"),
]


def test_bad_inputs_get_the_right_status_and_the_server_keeps_serving(server):
    assert len(BAD_INPUTS) >= 25
    failures = []
    for name, body, content_type, extra, status, code in BAD_INPUTS:
        response = server.post(body, content_type, **extra)
        error = response.json().get("error", {}) if response.headers.get("content-type") == "application/json" else {}
        if response.status_code != status or error.get("code") != code or not error.get("message"):
            failures.append((name, response.status_code, response.text[:200]))
    assert not failures

    # Odd but valid images are served, all upright 48 wide and 64 high (so they batch in pairs).
    upright = gradient(64, 48, seed=5)
    gray16, _ = gray16_png(64, 48)
    odd = [
        ("exif-rotated-jpeg", exif_rotated_jpeg(np.rot90(upright, k=1).copy(), orientation=6), "image/jpeg"),
        ("16-bit-png", gray16, "image/png"),
        ("cmyk-jpeg", cmyk_jpeg(64, 48), "image/jpeg"),
        ("webp", encode(upright, "WEBP"), "image/webp"),
    ]
    responses = concurrently(*(lambda data=data, media=media: server.post(data, media) for _, data, media, in odd))
    for (name, *_), response in zip(odd, responses):
        assert response.status_code == 200, (name, response.text)
        assert response.json()["image"] == {"width": 48, "height": 64}, name
    assert server.metric("maskrcnn_requests_total", endpoint="/predict", status="422") >= 10


def test_openapi_documents_every_route(server):
    spec = httpx.get(server.url + "/openapi.json").json()
    paths = spec["paths"]
    assert set(paths) == {
        "/predict", "/render", "/healthz", "/readyz", "/v1/models", "/metrics", "/v2", "/v2/health/live",
        "/v2/health/ready", "/v2/models/{name}", "/v2/models/{name}/versions/{version}", "/v2/models/{name}/ready",
        "/v2/models/{name}/versions/{version}/ready", "/v2/models/{name}/infer",
        "/v2/models/{name}/versions/{version}/infer",
    }
    predict = paths["/predict"]["post"]
    assert set(predict["requestBody"]["content"]) == {
        "multipart/form-data", "application/json", "image/jpeg", "image/png", "image/webp", "image/bmp"
    }
    assert predict["requestBody"]["content"]["application/json"]["schema"]["required"] == ["image"]
    parameters = {p["name"]: p["in"] for p in predict["parameters"]}
    assert parameters == {
        "score_threshold": "query", "max_detections": "query", "classes": "query", "format": "query",
        "masks": "query", "image_id": "query", "X-Request-Timeout-Ms": "header",
    }
    assert {"200", "400", "413", "415", "422", "500", "503", "504"} <= set(predict["responses"])
    # no API key on this server: no 401 and no security scheme declared; the image limits are stated
    assert "401" not in predict["responses"] and "securitySchemes" not in spec.get("components", {})
    assert "at least 8 pixels" in predict["requestBody"]["description"]
    assert predict["responses"]["422"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")
    answer = predict["responses"]["200"]["content"]["application/json"]["schema"]["anyOf"]
    assert answer[0]["$ref"].endswith("/PredictResponse") and answer[1]["items"]["$ref"].endswith("/CocoResult")
    assert "text/plain" in "".join(paths["/metrics"]["get"]["responses"]["200"]["content"])
    assert httpx.get(server.url + "/docs").status_code == 200
    models = httpx.get(server.url + "/v1/models").json()
    assert models["backend"] == "onnxruntime" and len(models["classes"]) == 80


def test_unknown_routes_and_methods_use_the_error_shape(server):
    missing = httpx.get(server.url + "/nope")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    wrong = httpx.get(server.url + "/predict")
    assert wrong.status_code == 405 and wrong.json()["error"]["code"] == "method_not_allowed"


def test_overload_deadline_and_disconnect(engine_b1):
    """One image on the engine, two waiting until their clients leave, a fourth refused with 503
    (queue full) and a fifth refused at once because it cannot meet its deadline; no waiting or
    refused image ever runs, and the server recovers."""
    settings = Settings(max_wait_ms=0, max_queue_depth=2, retry_after_s=2, **LIMITS)
    with serving(settings, engine_b1) as live:
        image = encode(gradient(seed=6), "PNG")
        batches_before = live.metric("maskrcnn_batch_size_count")
        with ThreadPoolExecutor(3) as pool:
            running = pool.submit(live.post, image, "image/png")
            wait_until(lambda: live.metric("maskrcnn_batch_size_count") == batches_before + 1)
            leaving = [pool.submit(live.post, image, "image/png", timeout=t) for t in (0.8, 1.0)]
            wait_until(lambda: live.metric("maskrcnn_queue_depth") == 2)
            refused = live.post(image, "image/png")
            assert refused.status_code == 503
            assert refused.headers["Retry-After"] == "2" and refused.json()["error"]["code"] == "overloaded"
            for request in leaving:
                with pytest.raises(httpx.TimeoutException):
                    request.result()
            hopeless = live.post(image, "image/png", headers={"X-Request-Timeout-Ms": "100"})
            assert hopeless.status_code == 503 and hopeless.json()["error"]["code"] == "deadline_unreachable"
            wait_until(lambda: live.metric("maskrcnn_queue_depth") == 0)
            assert running.result().status_code == 200
        assert live.metric("maskrcnn_batch_size_count") == batches_before + 1  # only the first image ran
        assert live.post(image, "image/png").status_code == 200  # recovered
        wait_until(lambda: live.metric("maskrcnn_requests_total", endpoint="/predict", status="499") == 2)
        assert live.metric("maskrcnn_requests_in_flight") == 0


def test_not_ready_until_warm_then_api_key_guards_all_but_probes(engine_b1):
    settings = Settings(api_key="s3cret", **LIMITS)
    with serving(settings, engine_b1, ready=False) as live:
        assert httpx.get(live.url + "/healthz").status_code == 200
        early = httpx.get(live.url + "/readyz")
        assert early.status_code == 503 and early.headers["Retry-After"] == "1"
        assert early.json()["error"]["code"] == "not_ready"
        not_yet = live.post(PNG, "image/png", headers={"X-API-Key": "s3cret"})
        assert not_yet.status_code == 503 and not_yet.json()["error"]["code"] == "not_ready"
        live.wait_ready()

        assert httpx.get(live.url + "/metrics").status_code == 200
        spec = httpx.get(live.url + "/openapi.json").json()
        assert set(spec["components"]["securitySchemes"]) == {"HTTPBearer", "APIKeyHeader"}
        assert "401" in spec["paths"]["/predict"]["post"]["responses"]
        for headers in ({}, {"X-API-Key": "wrong"}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic czNjcmV0"}):
            denied = live.post(PNG, "image/png", headers=headers)
            assert denied.status_code == 401 and denied.json()["error"]["code"] == "unauthorized", headers
            assert httpx.get(live.url + "/v1/models", headers=headers).status_code == 401
        # With the key the request gets past the guard (and is then refused for its content type).
        for headers in ({"X-API-Key": "s3cret"}, {"Authorization": "Bearer s3cret"}):
            assert live.post(PNG, "text/plain", headers=headers).status_code == 415
            assert httpx.get(live.url + "/v1/models", headers=headers).status_code == 200


def test_start_up_names_the_engine_and_warns_of_random_weights(engine_b1, caplog):
    caplog.set_level("INFO", logger="service.app")
    with serving(Settings(max_batch_size=4, **LIMITS), engine_b1):
        pass
    said = "\n".join(r.getMessage() for r in caplog.records if r.name == "service.app")
    assert "onnxruntime fp32 engine of random weights (seed 0)" in said
    assert "detections mean nothing" in said
    assert "--max-batch-size 4: this engine takes at most 1 image(s) per call (a fixed-batch graph)" in said
