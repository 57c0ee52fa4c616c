"""COCO evaluation of results files: the one pycocotools COCOeval wrapper of the project.

Torch-free (pycocotools only): ``maskrcnn-eval``, ``maskrcnn-demo eval``, the build benchmark and
the build's verify all score detections here, so their numbers agree.

Segm is scored with each result's ``bbox`` removed, as detectron2 and mmdetection score it:
pycocotools then takes a result's area from its mask (``maskUtils.area``) instead of its box, so
the small/medium/large ranges (APs, APm, APl, ARs, ARm, ARl) split masks by mask area, as the
ground truth's ``area`` does.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

# pycocotools' twelve summary numbers (COCOeval.stats), in its order.
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
IOU_TYPES = ("bbox", "segm")


def load_coco(annotation_file: str | Path) -> COCO:
    """A pycocotools index of a COCO annotation file, without pycocotools' chatter on stdout.

    Raises:
        OSError, ValueError, KeyError: as pycocotools does for a missing or malformed file.
    """
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(annotation_file))


def evaluate(
    coco: COCO,
    results: list[dict[str, Any]],
    image_ids: Sequence[int] | None = None,
    iou_types: Sequence[str] = IOU_TYPES,
    verbose: bool = False,
) -> dict[str, dict[str, float]]:
    """pycocotools' twelve summary numbers per IoU type of COCO results-file entries.

    Args:
        coco: the ground truth.
        results: results-file entries ``{"image_id", "category_id", "score", "bbox": [x, y, w, h]
            in pixels, "segmentation": RLE}``; not modified.
        image_ids: the images scored (all of ``coco``'s when None).
        iou_types: some of ``"bbox"``, ``"segm"``.
        verbose: print ``--- <iou type> ---`` and pycocotools' summary per IoU type; else quiet.

    Returns:
        ``{iou_type: {stat name: value}}`` with the names of :data:`STAT_NAMES`, each value in
        [0, 1], or -1 where pycocotools has no ground truth for it. No results give zeros.
    """
    scores: dict[str, dict[str, float]] = {}
    for iou_type in iou_types:
        if verbose:
            print(f"--- {iou_type} ---")
        if not results:
            if verbose:
                print("no detections: every AP is 0")
            scores[iou_type] = dict.fromkeys(STAT_NAMES, 0.0)
            continue
        # copies: loadRes writes "area" and "id" into its entries
        entries = [dict(r) if iou_type == "bbox" else {k: v for k, v in r.items() if k != "bbox"} for r in results]
        chatter = io.StringIO()
        with contextlib.redirect_stdout(chatter):
            evaluator = COCOeval(coco, coco.loadRes(entries), iou_type)
            if image_ids is not None:
                evaluator.params.imgIds = list(image_ids)
            evaluator.evaluate()
            evaluator.accumulate()
        with contextlib.nullcontext() if verbose else contextlib.redirect_stdout(chatter):
            evaluator.summarize()
        scores[iou_type] = dict(zip(STAT_NAMES, (float(v) for v in evaluator.stats)))
    return scores
