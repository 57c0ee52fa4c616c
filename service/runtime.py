"""Runtime: what a running app holds between requests, for the routes to reach."""

from __future__ import annotations

from dataclasses import dataclass

from service.admission import AdmissionControl
from service.engine_pool import EnginePool
from service.metrics import Metrics
from service.pipeline import Pipeline
from service.settings import Settings


@dataclass
class Runtime:
    """``admission`` admits requests (and knows readiness); ``pipeline`` runs their images;
    ``model_version``: the v2 protocol's version of the served model (``kserve_codec.model_version``),
    computed once."""

    settings: Settings
    pipeline: Pipeline
    admission: AdmissionControl
    metrics: Metrics
    model_version: str

    @property
    def pool(self) -> EnginePool:
        return self.pipeline.pool
