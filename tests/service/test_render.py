"""Overlays: ``service.draw`` on known detections, ``POST /render`` and ``maskrcnn-draw`` on a real engine.

The picture must keep the image's size, change every masked pixel, and leave every pixel that is
neither masked nor under a box outline or label band as it was.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as coco_mask

from scripts.tools.service_process import LiveServer, serving
from service.backends import load_engine
from service.client import Detections
from service.decode import decode_image
from service.draw import MASK_ALPHA, class_colour, draw_overlay, line_width
from service.settings import Settings
from service_images import encode, gradient

DRAW = str(Path(sys.executable).with_name("maskrcnn-draw"))
LABEL_BAND_PX = 30  # taller than any label band these image sizes get
LABEL_WIDTH_PX = 200  # wider than any "name score" label at these sizes


def rle(mask: np.ndarray) -> dict:
    encoded = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(encoded["size"]), "counts": encoded["counts"].decode()}


def decorations(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """bool ``[h, w]``: where outlines and label bands may fall (a box's rim and the band above it)."""
    near = np.zeros((height, width), dtype=bool)
    margin = line_width(height, width) + 1
    for x1, y1, x2, y2 in np.round(boxes).astype(int):
        near[max(0, y1 - margin):y2 + margin + 1, max(0, x1 - margin):x2 + margin + 1] = True
        near[y1 + margin:y2 - margin, x1 + margin:x2 - margin] = False  # the inside is not drawn on...
        # ...but the label band, above the box's corner or just below it when there is no room above
        near[max(0, y1 - LABEL_BAND_PX):y1 + LABEL_BAND_PX, max(0, x1 - margin):x1 + LABEL_WIDTH_PX] = True
    return near


def check_picture(picture: np.ndarray, rgb: np.ndarray, boxes: np.ndarray, rles: list[dict]) -> None:
    assert picture.shape == rgb.shape and picture.dtype == np.uint8
    masked = np.zeros(rgb.shape[:2], dtype=bool)
    for r in rles:
        masked |= coco_mask.decode(r).astype(bool)
    changed = (picture != rgb).any(axis=2)
    assert masked.any()
    assert changed[masked].mean() > 0.99  # a pixel already of its class's colour stays
    untouched = ~masked & ~decorations(boxes, *rgb.shape[:2])
    assert untouched.mean() > 0.3
    assert not changed[untouched].any()


def test_draw_overlay_blends_masks_and_leaves_the_rest():
    rgb = gradient(120, 160, seed=4)
    mask = np.zeros((120, 160), dtype=bool)
    mask[50:90, 60:110] = True
    boxes = np.array([[55.0, 45.0, 115.0, 95.0]])
    picture = draw_overlay(rgb, boxes, np.array([0.9]), [18], ["dog"], [rle(mask)])
    check_picture(picture, rgb, boxes, [rle(mask)])
    inner = (slice(60, 80), slice(70, 100))  # inside the mask, away from the outline and the label
    expected = (rgb[inner] * (1 - MASK_ALPHA) + np.array(class_colour(18)) * MASK_ALPHA + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(picture[inner], expected)
    assert (picture[45, 70:100] == class_colour(18)).all()  # the outline
    np.testing.assert_array_equal(draw_overlay(rgb, boxes, np.array([0.9]), [18], ["dog"], None)[inner], rgb[inner])
    with pytest.raises(ValueError, match="120x160"):
        draw_overlay(rgb[:100], boxes, np.array([0.9]), [18], ["dog"], [rle(mask)])


@pytest.fixture(scope="module")
def server(engine_dir: Path) -> Iterator[LiveServer]:
    with serving(Settings(request_timeout_ms=120_000, max_bytes=2**20), load_engine(engine_dir)) as live:
        yield live


@pytest.mark.slow
def test_render_and_maskrcnn_draw_make_the_same_checked_picture(server, photos, tmp_path):
    photo = (photos / "astronaut.png").read_bytes()
    options = {"max_detections": 3}
    answer = server.post(photo, "image/png", params=options).json()
    rendered = httpx.post(server.url + "/render", content=photo, headers={"Content-Type": "image/png"},
                          params=options, timeout=120)
    assert rendered.status_code == 200 and rendered.headers["content-type"] == "image/png"
    picture = np.asarray(Image.open(io.BytesIO(rendered.content)).convert("RGB"))
    rgb = decode_image(photo, max_bytes=len(photo), max_pixels=10**8, min_side=1)
    found = Detections.from_predict(answer)
    assert len(found) == 3
    check_picture(picture, rgb, found.boxes, list(found.rles))
    expected = draw_overlay(rgb, found.boxes, found.scores, found.class_ids.tolist(), found.class_names, found.rles)
    np.testing.assert_array_equal(picture, expected)  # /render draws what /predict answers

    # maskrcnn-draw, from the /predict answer and from the same detections as a COCO results file
    (tmp_path / "answer.json").write_text(json.dumps(answer))
    (tmp_path / "coco.json").write_text(json.dumps(found.to_coco(image_id=7) + [
        {**entry, "image_id": 8} for entry in found.to_coco(image_id=7)]))
    image_path = photos / "astronaut.png"
    for results, extra in (("answer.json", []), ("coco.json", ["--image-id", "7"])):
        out = tmp_path / f"{results}.png"
        run = subprocess.run([DRAW, str(image_path), "--results", str(tmp_path / results), "--out", str(out), *extra],
                             capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        np.testing.assert_array_equal(np.asarray(Image.open(out).convert("RGB")), picture)
    run = subprocess.run([DRAW, str(image_path), "--results", str(tmp_path / "coco.json"), "--out",
                          str(tmp_path / "x.png")], capture_output=True, text=True)
    assert run.returncode == 2 and "--image-id" in run.stderr


@pytest.mark.slow
@pytest.mark.parametrize("content_type, body, params, status, code", [
    ("text/plain", b"hello", {}, 415, "unsupported_media_type"),
    ("image/png", b"\x89PNG\r\n\x1a\n" + b"0" * (2**20 + 10), {}, 413, "payload_too_large"),
    ("image/png", b"not an image", {}, 400, "invalid_image"),
    ("image/png", encode(gradient(), "PNG"), {"score_threshold": 2}, 422, "invalid_parameters"),
])
def test_render_has_every_predict_limit_and_error(server, content_type, body, params, status, code):
    response = httpx.post(server.url + "/render", content=body, headers={"Content-Type": content_type},
                          params=params, timeout=60)
    assert response.status_code == status and response.json()["error"]["code"] == code, response.text
