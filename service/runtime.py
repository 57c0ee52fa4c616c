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
from service.response import ClassTable
from service.settings import Settings


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
            InvalidParameters: more detections than the engine makes.
            UnknownClasses: an unknown class (errors.py maps it to 422).
        """
        defaults = self.pool.manifest.postprocess
        max_detections = options.max_detections or defaults.max_detections
        if max_detections > defaults.max_detections:
            raise InvalidParameters(f"max_detections is at most {defaults.max_detections} for this engine")
        return {
            "score_threshold": defaults.score_threshold if options.score_threshold is None else options.score_threshold,
            "mask_threshold": defaults.mask_threshold,
            "max_detections": max_detections,
            "keep_classes": self.classes.indices(options.classes) if options.classes else None,
            "with_masks": options.masks,
        }

    def require_ready(self) -> None:
        if self.not_ready_reason is not None:
            raise NotReady(self.not_ready_reason, retry_after_s=self.settings.retry_after_s)
