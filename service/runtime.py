"""Runtime: what a running app holds between requests (engine pool, batcher, metrics, readiness)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from service.admission import MemoryBudget
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
    budget: MemoryBudget
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
            "paste": defaults.paste,
        }

    def require_ready(self) -> None:
        """Raise :class:`NotReady` (503) unless warmed up and at least one engine session serves."""
        reason = self.not_ready_reason
        if reason is None and not self.pool.serving:
            reason = "every engine session hung and is being replaced"
        if reason is not None:
            raise NotReady(reason, retry_after_s=self.settings.retry_after_s)
