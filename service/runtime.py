"""Runtime: what a running app holds between requests (engine pool, batcher, metrics, readiness)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from service.batcher import Batcher
from service.engine_pool import EnginePool, ImageOutputs
from service.errors import InvalidParameters, NotReady
from service.metrics import Metrics
from service.preprocess import PreparedImage
from service.request import PredictOptions
from service.settings import Settings


@dataclass(frozen=True)
class ClassTable:
    """The manifest's classes: label index -> COCO category id and name, and the reverse lookups."""

    ids: tuple[int, ...]
    names: tuple[str, ...]

    @classmethod
    def from_manifest_classes(cls, classes: list[dict]) -> ClassTable:
        ordered = sorted(classes, key=lambda c: c["index"])
        return cls(tuple(int(c["id"]) for c in ordered), tuple(str(c["name"]) for c in ordered))

    def indices(self, wanted: list[str]) -> set[int]:
        """Label indices of ``wanted`` COCO names (case-insensitive) or category ids.

        Raises:
            InvalidParameters: a name or id the engine does not know.
        """
        by_name = {name.lower(): i for i, name in enumerate(self.names)}
        by_id = {str(cid): i for i, cid in enumerate(self.ids)}
        unknown = [w for w in wanted if w.lower() not in by_name and w not in by_id]
        if unknown:
            raise InvalidParameters(
                f"unknown classes {unknown}; use COCO category names or ids (GET /v1/models lists them)"
            )
        return {by_name.get(w.lower(), by_id.get(w)) for w in wanted}


@dataclass
class Runtime:
    settings: Settings
    pool: EnginePool
    batcher: Batcher[PreparedImage, ImageOutputs]
    metrics: Metrics
    classes: ClassTable
    not_ready_reason: str | None = "the engine is warming up"  # None once warmed up

    def postprocess_options(self, options: PredictOptions) -> dict[str, Any]:
        """Keyword arguments of ``postprocess_image`` for ``options``, defaults from the manifest.

        Raises:
            InvalidParameters: more detections than the engine makes, or an unknown class.
        """
        defaults = self.pool.manifest.postprocess
        max_detections = options.max_detections or defaults["max_detections"]
        if max_detections > defaults["max_detections"]:
            raise InvalidParameters(f"max_detections is at most {defaults['max_detections']} for this engine")
        return {
            "score_threshold": defaults["score_threshold"] if options.score_threshold is None else options.score_threshold,
            "mask_threshold": defaults["mask_threshold"],
            "max_detections": max_detections,
            "keep_classes": self.classes.indices(options.classes) if options.classes else None,
            "with_masks": options.masks,
        }

    def require_ready(self) -> None:
        if self.not_ready_reason is not None:
            raise NotReady(self.not_ready_reason, retry_after_s=self.settings.retry_after_s)
