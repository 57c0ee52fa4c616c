"""Response: /predict bodies (native and COCO results-file forms), their schemas, the class table
that names the engine's labels, and orjson rendering."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import orjson
from pydantic import BaseModel, Field
from starlette.responses import JSONResponse

from service.manifest import ClassEntry
from service.postprocess import ImageDetections

ResponseFormat = Literal["native", "coco"]
STAGES = ("decode", "preprocess", "queue_wait", "inference", "postprocess", "total")


class OrjsonResponse(JSONResponse):
    """JSON rendered by orjson (numpy scalars and arrays included)."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


class UnknownClasses(ValueError):
    """A ``classes`` option naming a class the engine does not know (a client's 4xx)."""


@dataclass(frozen=True)
class ClassTable:
    """The manifest's classes: label index -> category id and name, and the reverse lookups."""

    ids: tuple[int, ...]
    names: tuple[str, ...]

    @classmethod
    def from_manifest(cls, classes: Iterable[ClassEntry]) -> ClassTable:
        ordered = sorted(classes, key=lambda c: c.index)
        return cls(tuple(c.id for c in ordered), tuple(c.name for c in ordered))

    def indices(self, wanted: list[str]) -> set[int]:
        """Label indices of ``wanted`` class names (case-insensitive) or category ids.

        Raises:
            UnknownClasses: a name or id the engine does not know.
        """
        by_name = {name.lower(): i for i, name in enumerate(self.names)}
        by_id = {str(cid): i for i, cid in enumerate(self.ids)}
        unknown = [w for w in wanted if w.lower() not in by_name and w not in by_id]
        if unknown:
            raise UnknownClasses(
                f"unknown classes {unknown}; use the engine's class names or category ids (GET /v1/models lists them)"
            )
        return {by_name.get(w.lower(), by_id.get(w)) for w in wanted}


class RLE(BaseModel):
    """COCO run-length encoding, as ``pycocotools.mask.decode`` reads it."""

    size: tuple[int, int] = Field(description="[height, width] of the original image, pixels")
    counts: str = Field(description="compressed RLE counts (pycocotools string form)")


class Detection(BaseModel):
    bbox: tuple[float, float, float, float] = Field(description="[x1, y1, x2, y2] in original-image pixels")
    score: float
    category_id: int = Field(description="category id (the engine manifest's class table; COCO's for COCO models)")
    category_name: str
    segmentation: RLE | None = Field(None, description="the instance mask; absent when masks=false")


class ImageInfo(BaseModel):
    width: int
    height: int


class Timings(BaseModel):
    """Milliseconds spent per stage of this request (inference is the whole batch's engine call)."""

    decode: float
    preprocess: float
    queue_wait: float
    inference: float
    postprocess: float
    total: float


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
    seconds: Mapping[str, float],
    *,
    response_format: ResponseFormat = "native",
    image_id: int | None = None,
) -> OrjsonResponse:
    """The /predict answer: the body in ``response_format`` and a ``Server-Timing`` header.

    Args:
        detections: the image's detections, boxes in original pixels.
        classes: names and category ids of the engine's labels.
        image_hw: ``(h0, w0)`` of the original image.
        seconds: wall time per stage (``STAGES``), in seconds.
    """
    boxes, scores = detections.boxes.tolist(), detections.scores.tolist()
    labels = detections.labels.tolist()
    category_ids = [classes.ids[i] for i in labels]
    timings_ms = {stage: round(s * 1000, 3) for stage, s in seconds.items()}
    if response_format == "coco":
        body: Any = coco_body(boxes, scores, category_ids, detections.rles, image_id)
    else:
        names = [classes.names[i] for i in labels]
        body = native_body(boxes, scores, category_ids, names, detections.rles, image_hw, timings_ms)
    server_timing = ", ".join(f"{stage};dur={ms}" for stage, ms in timings_ms.items())
    return OrjsonResponse(body, headers={"Server-Timing": server_timing})
