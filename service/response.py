"""Response: /predict bodies (native and COCO results-file forms), their schemas, and orjson rendering."""

from __future__ import annotations

from typing import Any, Literal

import orjson
from pydantic import BaseModel, Field, create_model
from starlette.responses import JSONResponse

from service.manifest import ClassTable
from service.postprocess import ImageDetections
from service.stages import STAGES, StageSeconds

ResponseFormat = Literal["native", "coco"]


class OrjsonResponse(JSONResponse):
    """JSON rendered by orjson (numpy scalars and arrays included)."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


class RLE(BaseModel):
    """COCO run-length encoding, as ``pycocotools.mask.decode`` reads it."""

    size: tuple[int, int] = Field(description="[height, width] of the original image, pixels")
    counts: str = Field(description="compressed RLE counts (pycocotools string form)")


class Detection(BaseModel):
    bbox: tuple[float, float, float, float] = Field(
        description="[x1, y1, x2, y2] (corners) in original-image pixels; NOT COCO's [x, y, width, height], which "
        "format=coco answers give")
    score: float
    category_id: int = Field(description="category id (the engine manifest's class table; COCO's for COCO models)")
    category_name: str
    segmentation: RLE | None = Field(None, description="the instance mask; absent when masks=false")


class ImageInfo(BaseModel):
    width: int
    height: int


Timings = create_model(
    "Timings",
    __doc__="Milliseconds spent per stage of this request (inference is the whole batch's engine call).",
    **{stage: (float, ...) for stage in STAGES},
)


class PredictResponse(BaseModel):
    """``format=native``: detections in original-image pixels, sorted by score, descending."""

    detections: list[Detection]
    image: ImageInfo
    timings_ms: Timings


class CocoResult(BaseModel):
    """One entry of a COCO results file (``format=coco``)."""

    image_id: int | None = Field(None, description="present when the request gave image_id")
    category_id: int
    bbox: tuple[float, float, float, float] = Field(description="[x, y, width, height] in original-image pixels")
    score: float
    segmentation: RLE | None = Field(None, description="absent when masks=false")


def native_body(
    boxes: list[list[float]],
    scores: list[float],
    category_ids: list[int],
    category_names: list[str],
    rles: list[dict[str, Any]] | None,
    image_hw: tuple[int, int],
    timings_ms: dict[str, float],
) -> dict[str, Any]:
    """The ``native`` form; ``boxes`` are ``[x1, y1, x2, y2]`` original pixels, ``rles`` None without masks."""
    detections = []
    for i, box in enumerate(boxes):
        detection = {"bbox": box, "score": scores[i], "category_id": category_ids[i], "category_name": category_names[i]}
        if rles is not None:
            detection["segmentation"] = rles[i]
        detections.append(detection)
    return {
        "detections": detections,
        "image": {"width": image_hw[1], "height": image_hw[0]},
        "timings_ms": timings_ms,
    }


def coco_body(
    boxes: list[list[float]],
    scores: list[float],
    category_ids: list[int],
    rles: list[dict[str, Any]] | None,
    image_id: int | None,
) -> list[dict[str, Any]]:
    """The ``coco`` form: results-file entries with ``bbox`` as ``[x, y, w, h]``."""
    results = []
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        result: dict[str, Any] = {"category_id": category_ids[i], "bbox": [x1, y1, x2 - x1, y2 - y1], "score": scores[i]}
        if image_id is not None:
            result["image_id"] = image_id
        if rles is not None:
            result["segmentation"] = rles[i]
        results.append(result)
    return results


def build_response(
    detections: ImageDetections,
    classes: ClassTable,
    image_hw: tuple[int, int],
    seconds: StageSeconds,
    *,
    response_format: ResponseFormat = "native",
    image_id: int | None = None,
) -> OrjsonResponse:
    """The /predict answer: the body in ``response_format`` and a ``Server-Timing`` header.

    Args:
        detections: the image's detections, boxes in original pixels.
        classes: names and category ids of the engine's labels.
        image_hw: ``(h0, w0)`` of the original image.
        seconds: wall time per stage, in seconds.
    """
    boxes, scores = detections.boxes.tolist(), detections.scores.tolist()
    category_ids, names = classes.categories(detections.labels.tolist())
    timings_ms = {stage: round(s * 1000, 3) for stage, s in seconds.items()}
    if response_format == "coco":
        body: Any = coco_body(boxes, scores, category_ids, detections.rles, image_id)
    else:
        body = native_body(boxes, scores, category_ids, names, detections.rles, image_hw, timings_ms)
    server_timing = ", ".join(f"{stage};dur={ms}" for stage, ms in timings_ms.items())
    return OrjsonResponse(body, headers={"Server-Timing": server_timing})
