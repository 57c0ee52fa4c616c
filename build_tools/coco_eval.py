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
import copy
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
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


def _entries(results: list[dict[str, Any]], iou_type: str) -> list[dict[str, Any]]:
    """Copies of ``results`` for ``loadRes`` (it writes "area" and "id" into its entries); segm's
    without ``bbox``, so areas come from the masks (module docstring)."""
    return [dict(r) if iou_type == "bbox" else {k: v for k, v in r.items() if k != "bbox"} for r in results]


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
        chatter = io.StringIO()
        with contextlib.redirect_stdout(chatter):
            evaluator = COCOeval(coco, coco.loadRes(_entries(results, iou_type)), iou_type)
            if image_ids is not None:
                evaluator.params.imgIds = list(image_ids)
            evaluator.evaluate()
            evaluator.accumulate()
        with contextlib.nullcontext() if verbose else contextlib.redirect_stdout(chatter):
            evaluator.summarize()
        scores[iou_type] = dict(zip(STAT_NAMES, (float(v) for v in evaluator.stats)))
    return scores


def detections_ap(coco: COCO, image_ids: Sequence[int], detections: Sequence[Any],
                  category_ids: Sequence[int]) -> tuple[float, float]:
    """pycocotools box and mask AP (x100) of per-image detections (``service.postprocess.
    ImageDetections``, one per id of ``image_ids``) on those images of ``coco``; ``category_ids``:
    the category id of each label (the model's class table)."""
    from service.response import coco_body

    results = []
    for image_id, det in zip(image_ids, detections):
        results += coco_body(det.boxes.tolist(), det.scores.tolist(), [category_ids[i] for i in det.labels],
                             det.rles, image_id)
    scores = evaluate(coco, results, image_ids)
    return 100 * scores["bbox"]["AP"], 100 * scores["segm"]["AP"]


def _per_image_evaluator(coco: COCO, results: list[dict[str, Any]], image_ids: Sequence[int], iou_type: str) -> COCOeval:
    """COCOeval after ``evaluate()`` on ``image_ids``: its per-image matches (``evalImgs``) are what a
    resample of the images re-accumulates."""
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(coco, coco.loadRes(_entries(results, iou_type)) if results else COCO(), iou_type)
        evaluator.params.imgIds = list(image_ids)
        evaluator.evaluate()
    return evaluator


def _resampled_ap(evaluator: COCOeval, positions: np.ndarray) -> float:
    """AP (IoU 0.50:0.95, all areas, 100 detections) of the images at ``positions`` (indices into
    the evaluated image list, repeats allowed), from the matches ``evaluate()`` already made."""
    evaluated = evaluator._paramsEval
    images = len(evaluated.imgIds)
    areas = len(evaluated.areaRng)
    all_area = 0  # pycocotools' first area range is "all"
    params = copy.deepcopy(evaluated)
    params.imgIds = [evaluated.imgIds[p] for p in positions]
    params.areaRng, params.areaRngLbl, params.maxDets = [evaluated.areaRng[all_area]], ["all"], [evaluated.maxDets[-1]]
    resampled = copy.copy(evaluator)
    resampled._paramsEval = params
    resampled.evalImgs = [evaluator.evalImgs[k * areas * images + all_area * images + p]
                          for k in range(len(evaluated.catIds)) for p in positions]
    with contextlib.redirect_stdout(io.StringIO()):
        resampled.accumulate(params)
    precision = resampled.eval["precision"]
    valid = precision[precision > -1]
    return float(valid.mean()) if valid.size else -1.0


def ap_difference(
    coco: COCO,
    reference: list[dict[str, Any]],
    results: list[dict[str, Any]],
    image_ids: Sequence[int],
    samples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    iou_types: Sequence[str] = IOU_TYPES,
) -> dict[str, dict[str, float]]:
    """AP points ``results`` lose against ``reference`` on the same images, with a paired bootstrap
    interval: how far the loss could move on another draw of as many images.

    Both result sets are matched to the ground truth once; each of ``samples`` draws of
    ``len(image_ids)`` images with replacement re-accumulates both on the same draw. AP here is
    pycocotools' headline AP (IoU 0.50:0.95, all areas, 100 detections), in points (0-100).

    Returns:
        ``{iou_type: {"lost": AP(reference) - AP(results) on image_ids, "low", "high": the
        central ``confidence`` interval of the loss over the draws, "samples"}}``.

    Raises:
        ValueError: no images, fewer than 2 samples, or a confidence outside (0, 1).
    """
    if not image_ids:
        raise ValueError("ap_difference needs at least one image")
    if samples < 2 or not 0.0 < confidence < 1.0:
        raise ValueError(f"samples must be >= 2 and confidence in (0, 1), got {samples} and {confidence}")
    rng = np.random.default_rng(seed)
    draws = [rng.integers(0, len(image_ids), len(image_ids)) for _ in range(samples)]
    everything = np.arange(len(image_ids))
    tail = 100 * (1 - confidence) / 2
    out: dict[str, dict[str, float]] = {}
    for iou_type in iou_types:
        ref = _per_image_evaluator(coco, reference, image_ids, iou_type)
        res = _per_image_evaluator(coco, results, image_ids, iou_type)
        lost = [100 * (_resampled_ap(ref, d) - _resampled_ap(res, d)) for d in draws]
        low, high = np.percentile(lost, [tail, 100 - tail])
        out[iou_type] = {"lost": 100 * (_resampled_ap(ref, everything) - _resampled_ap(res, everything)),
                         "low": float(low), "high": float(high), "samples": samples}
    return out
