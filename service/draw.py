"""Overlays: an image with its detections drawn on it, as `POST /render` and `maskrcnn-draw` make them.

Each instance's mask is filled half-transparent in its class's colour, then its box is outlined in
that colour and a ``name score`` label is set on a filled band at the box's top-left corner (above
the box when there is room, else inside it). Masks are painted lowest score first, so where masks
overlap the best-scoring one is on top; boxes and labels are painted after all masks, so no mask
covers a label.

Drawn with OpenCV and numpy, which the service already depends on. (supervision's annotators do
the same, but bring matplotlib, scipy and PyAV into the serving image and take ~1.5 s to import.)
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence

import cv2
import numpy as np
from pycocotools import mask as coco_mask

from service.postprocess import ImageDetections
from service.manifest import ClassTable

MASK_ALPHA = 0.5  # weight of the class colour in a masked pixel
_FONT = cv2.FONT_HERSHEY_SIMPLEX
_GOLDEN_RATIO = 0.618033988749895


def class_colour(category_id: int) -> tuple[int, int, int]:
    """A bright RGB colour for a category id: hues spaced by the golden ratio, so neighbouring ids differ."""
    red, green, blue = colorsys.hsv_to_rgb((category_id * _GOLDEN_RATIO) % 1.0, 0.85, 0.95)
    return int(red * 255), int(green * 255), int(blue * 255)


def line_width(height: int, width: int) -> int:
    """Box outline thickness in pixels for an image of ``height`` x ``width``."""
    return max(1, round(min(height, width) / 400))


def draw_overlay(
    rgb: np.ndarray,
    boxes: np.ndarray,
    scores: np.ndarray,
    category_ids: Sequence[int],
    names: Sequence[str],
    rles: Sequence[dict] | None,
) -> np.ndarray:
    """The image with the detections drawn on it (the input is not changed).

    Args:
        rgb: uint8 ``[h, w, 3]`` RGB.
        boxes: float ``[K, 4]``, ``x1, y1, x2, y2`` in the image's pixels.
        scores: float ``[K]``, in [0, 1].
        category_ids: K category ids (they choose the colours); ``names``: K class names.
        rles: K COCO RLEs (``{"size": [h, w], "counts": ...}``) of the masks, or None to draw boxes only.

    Returns:
        uint8 ``[h, w, 3]`` RGB.

    Raises:
        ValueError: the detections' lengths differ, or a mask's size is not the image's.
    """
    height, width = rgb.shape[:2]
    count = len(boxes)
    if not (len(scores) == len(category_ids) == len(names) == count and (rles is None or len(rles) == count)):
        raise ValueError("boxes, scores, category_ids, names and rles must have one entry per detection")
    out = np.array(rgb, dtype=np.uint8, copy=True)
    order = np.argsort(np.asarray(scores, dtype=np.float64), kind="stable")  # lowest first: the best ends on top
    if rles is not None:
        for i in order:
            rle = rles[i]
            if tuple(rle["size"]) != (height, width):
                raise ValueError(f"mask {i} is {rle['size'][0]}x{rle['size'][1]}; the image is {height}x{width}")
            mask = coco_mask.decode({"size": list(rle["size"]), "counts": rle["counts"]}).astype(bool)
            colour = np.array(class_colour(category_ids[i]), dtype=np.float32)
            out[mask] = (out[mask] * (1 - MASK_ALPHA) + colour * MASK_ALPHA + 0.5).astype(np.uint8)
    thickness = line_width(height, width)
    font_scale = max(0.4, min(height, width) / 1000)
    for i in order:
        colour = class_colour(category_ids[i])
        x1, y1, x2, y2 = (int(round(float(v))) for v in boxes[i])
        cv2.rectangle(out, (x1, y1), (x2, y2), colour, thickness)
        _label(out, f"{names[i]} {float(scores[i]):.2f}", (x1, y1), colour, font_scale)
    return out


def _label(out: np.ndarray, text: str, corner: tuple[int, int], colour: tuple[int, int, int], scale: float) -> None:
    """``text`` on a band of ``colour`` whose bottom-left is ``corner`` (moved inside the box if above the image)."""
    (text_w, text_h), baseline = cv2.getTextSize(text, _FONT, scale, 1)
    band_h = text_h + baseline + 2
    x, y = corner
    top = y - band_h if y - band_h >= 0 else y
    cv2.rectangle(out, (x, top), (x + text_w + 2, top + band_h), colour, cv2.FILLED)
    luminance = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
    ink = (0, 0, 0) if luminance > 140 else (255, 255, 255)
    cv2.putText(out, text, (x + 1, top + text_h + 1), _FONT, scale, ink, 1, cv2.LINE_AA)


def encode_png(rgb: np.ndarray) -> bytes:
    """PNG bytes of uint8 ``[h, w, 3]`` RGB."""
    ok, png = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError("OpenCV could not encode the overlay as PNG")
    return png.tobytes()


def overlay_png(rgb: np.ndarray, detections: ImageDetections, classes: ClassTable) -> bytes:
    """The `/render` picture: ``detections`` (the service's, boxes in ``rgb``'s pixels) drawn on ``rgb``, as PNG."""
    category_ids, names = classes.categories(detections.labels.tolist())
    return encode_png(draw_overlay(rgb, detections.boxes, detections.scores, category_ids, names, detections.rles))
