"""The stages of one request and the seconds each took: the one list of stage names.

``/predict``'s ``timings_ms``, its ``Server-Timing`` header, the ``maskrcnn_stage_seconds``
histogram's ``stage`` label and the benchmarks all read the names from :data:`STAGES`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass
class StageSeconds:
    """Wall seconds of one image's stages, filled in as the pipeline runs them.

    ``queue_wait`` runs from the image's submission to the start of its batch; ``inference`` is the
    whole batch's engine call (shared by the images batched together); ``total`` runs from the
    request's arrival (before its body was read) to the end of postprocessing.
    """

    decode: float = 0.0
    preprocess: float = 0.0
    queue_wait: float = 0.0
    inference: float = 0.0
    postprocess: float = 0.0
    total: float = 0.0

    def items(self) -> list[tuple[str, float]]:
        """``(stage, seconds)`` in :data:`STAGES` order."""
        return [(name, getattr(self, name)) for name in STAGES]


STAGES: tuple[str, ...] = tuple(f.name for f in fields(StageSeconds))
