"""request.py, directly: the three body forms, option precedence, options resolved against the
manifest, base64 with a data: URL, and the errors a client can cause; real Starlette requests."""

from __future__ import annotations

import asyncio
import base64

import orjson
import pytest
from starlette.requests import Request

from conftest import minimal_manifest
from service.exceptions import BadRequest, InvalidImage, InvalidParameters, PayloadTooLarge, UnsupportedMediaType
from service.manifest import ClassTable
from service.request import (
    PredictOptions,
    body_bytes_to_hold,
    decode_base64,
    merge_options,
    read_payload,
    resolve_options,
)

IMAGE = b"\x89PNG not really, the request stage does not decode"


def request(body: bytes, content_type: str) -> Request:
    sent = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        return sent.pop(0) if sent else {"type": "http.disconnect"}

    headers = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]
    return Request({"type": "http", "method": "POST", "path": "/predict", "headers": headers}, receive)


def payload(body: bytes, content_type: str, limit: int = 10_000):
    return asyncio.run(read_payload(request(body, content_type), limit))


def multipart(fields: list[tuple[str, bytes, str | None]]) -> tuple[bytes, str]:
    boundary = "b0undary"
    parts = []
    for name, value, filename in fields:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        parts.append(f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + value + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def test_the_three_body_forms_give_the_image_and_the_body_options():
    assert payload(IMAGE, "image/png").image == IMAGE
    encoded = "data:image/png;base64," + base64.b64encode(IMAGE).decode()
    from_json = payload(orjson.dumps({"image": encoded, "score_threshold": 0.4}), "application/json")
    assert from_json.image == IMAGE and from_json.options == {"score_threshold": 0.4}
    body, content_type = multipart([("image", IMAGE, "a.png"), ("classes", b"person", None), ("classes", b"dog", None),
                                    ("max_detections", b"3", None)])
    from_form = payload(body, content_type)
    assert from_form.image == IMAGE and from_form.options == {"classes": ["person", "dog"], "max_detections": "3"}


@pytest.mark.parametrize("body, content_type, error", [
    (IMAGE, "text/plain", UnsupportedMediaType),
    (b"{not json", "application/json", BadRequest),
    (orjson.dumps({"image": "%%%"}), "application/json", InvalidImage),
    (orjson.dumps({"image": "aGk=", "colour": "red"}), "application/json", InvalidParameters),
    (multipart([("other", IMAGE, "a.png")])[0], multipart([])[1], InvalidParameters),
    (b"x" * 20_000, "image/png", PayloadTooLarge),
])
def test_bad_bodies_raise_the_error_the_client_gets(body, content_type, error):
    with pytest.raises(error):
        payload(body, content_type)


def test_body_options_win_over_the_query_and_are_validated_together():
    query = PredictOptions(score_threshold=0.2, max_detections=5, format="coco")
    merged = merge_options(query, {"score_threshold": "0.7", "classes": "cat, dog"})
    assert (merged.score_threshold, merged.max_detections, merged.format, merged.classes) == (0.7, 5, "coco", ["cat", "dog"])
    with pytest.raises(InvalidParameters, match="score_threshold"):
        merge_options(query, {"score_threshold": 2})


def test_options_are_resolved_once_against_the_manifest(tmp_path):
    manifest = minimal_manifest(tmp_path)
    classes = ClassTable.from_entries(manifest.classes)
    defaults = resolve_options(PredictOptions(), manifest.postprocess, classes)
    assert (defaults.score_threshold, defaults.max_detections, defaults.keep_classes) == (0.05, 100, None)
    assert (defaults.mask_threshold, defaults.paste, defaults.with_masks) == (0.5, "mmdet", True)
    chosen = resolve_options(PredictOptions(classes=["Person", "18"], masks=False), manifest.postprocess, classes)
    assert chosen.keep_classes == frozenset({0, 16}) and not chosen.with_masks  # COCO id 18 is dog, label 16
    with pytest.raises(Exception):  # frozen: no stage can change what the request asked
        chosen.score_threshold = 0.9
    with pytest.raises(InvalidParameters, match="at most 100"):
        resolve_options(PredictOptions(max_detections=101), manifest.postprocess, classes)
    with pytest.raises(InvalidParameters, match="unknown classes \\['unicorn'\\]"):
        resolve_options(PredictOptions(classes=["unicorn"]), manifest.postprocess, classes)


def test_base64_and_the_memory_a_body_will_hold():
    assert decode_base64("data:image/png;base64," + base64.b64encode(IMAGE).decode()) == IMAGE
    assert decode_base64(" aGVs\nbG8= ") == b"hello"
    with pytest.raises(ValueError):
        decode_base64("not base64!")
    assert body_bytes_to_hold(request(b"x" * 100, "image/jpeg"), 1000) == 200
    assert body_bytes_to_hold(request(b"x" * 100, "application/json"), 1000) == 300
    assert body_bytes_to_hold(request(b"x" * 5000, "image/jpeg"), 1000) == 2000  # at most the limit
