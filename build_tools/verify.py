"""Fidelity check: the reference model and a compiled engine on the same images.

The reference is the checkpoint's origin framework (``build_tools.origin``: torchvision's own
model for torchvision checkpoints, mmdet's where installed, else this project's eager model, the
report's ``reference`` says which), torchvision's and mmdet's running their own preprocessing and
postprocessing on the decoded image; this project's eager model (that reference, or a bare model
given by tests) runs on the engine's own prepared inputs. The engine's detections come through the service's host
code (preprocess, ``infer``, postprocess with the origin's paste rule). They are compared per image:

- ``box_match_rate``: fraction of reference detections whose same-class engine match (greedy by
  score, IoU >= ``match_iou``) has box IoU >= 0.99;
- ``label_agreement``: fraction of reference detections whose highest-IoU engine detection has the
  same class;
- ``score_abs_diff`` mean/max over matched pairs; ``mask_iou`` mean/min over matched pairs (full
  resolution, pasted masks);
- ``box_ap`` / ``mask_ap``: COCO AP (and AP50) of the engine's detections scored against the
  reference's own detections taken as ground truth (1.0 = the engine reproduces the reference);
  ``ap_delta_points``: the same as AP points lost against the eager fp32 reference,
  ``{"box": 100 * (1 - box_ap), "mask": 100 * (1 - mask_ap)}``;
- ``timing``: median seconds per image of the reference and of the engine, the reference running
  with as many torch threads as the engine has (one warm-up batch each when fewer than 3);
  ``ratio_to_eager`` = engine / eager. Against an origin reference both are whole-image times
  (decoded image in, pasted masks out: the reference's own call; the engine's preprocess, ``infer``
  and postprocess, also in ``engine_with_postprocess``); against this project's model both are the
  graph alone on the same prepared inputs. The verify set is a few images of varied sizes, so these are indicative;
  ``scripts/bench/build.py`` times engines at a fixed input.
"""

from __future__ import annotations

import contextlib
import io
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from tqdm import tqdm

from build_tools.coco_eval import evaluate
from build_tools.images import list_images, read_rgb, sample_photographs
from build_tools.model import MaskRCNN
from build_tools.origin import OriginReference, origin_reference
from build_tools.reference import (
    Infer,
    eager_infer,
    fp32_pinned,
    torch_threads,
)
from build_tools.timing import timed
from service.backends import Engine, load_engine
from service.backends.base import cpu_cores
from service.manifest import APDelta, Manifest, ParityExclusions, ParityReport, ParityTiming, ReferenceRecord
from service.postprocess import ImageDetections, PasteRule, postprocess_image
from service.preprocess import InputSpec, PreparedImage, pad_batch, prepare_image


@dataclass(frozen=True)
class Tolerance:
    """Pass criteria of one precision, and how detections are matched.

    fp32 must reproduce the reference up to fp32 noise: ``min_box_match_rate`` of the judged
    reference detections (those not excused, below) have a same-class engine detection whose every
    coordinate is within ``box_rel_error`` of the box's side (width for x, height for y) or
    ``box_px_floor`` pixels, whichever is larger; ``min_label_agreement`` of the reference detections
    that have any engine box that close have one of their class; ``min_mask_iou`` is the mean pasted
    mask IoU over matched pairs; ``min_box_ap``/``min_mask_ap`` bound the AP of the engine against
    the reference's detections. The lower precisions are judged by that AP alone.

    Left out of matching, and counted in the report's ``exclusions`` (never more than
    ``max_excused_fraction`` of the reference's detections of at least ``min_box_side_px``):

    - boxes with a side under ``min_box_side_px`` (on either side of the comparison; IoU and relative
      error of a box 0.02 px tall measure noise): left out of matching and of AP;
    - at the cut: a reference detection scored within ``score_tie`` of the engine's lowest score
      (it may have fallen below the engine's top-k or score threshold cut, or the other way round);
    - tied: a reference detection whose place the engine gave to another candidate of the same
      class scored within ``score_tie`` that overlaps it (box IoU >= ``swap_iou``, the NMS
      threshold): NMS between tied scores keeps either.
    """

    min_box_match_rate: float
    min_label_agreement: float
    min_mask_iou: float
    min_box_ap: float
    min_mask_ap: float
    box_rel_error: float = 0.01
    box_px_floor: float = 0.5
    min_box_side_px: float = 2.0
    score_tie: float = 1e-3
    swap_iou: float = 0.5
    max_excused_fraction: float = 0.1

    @staticmethod
    def for_precision(precision: str) -> Tolerance:
        if precision == "fp32":
            return Tolerance(0.99, 0.99, 0.95, 0.95, 0.95)
        # int8 / fp16 / bf16, scored against the fp32 reference's own detections (every reshuffled
        # low-score detection counts as a miss). ONNX Runtime int8 of the demo model scored box 0.58 /
        # mask 0.61 on 8 demo val images while its ground-truth AP moved by -0.15 points only
        # (scripts/run_all.sh): these floors catch a broken engine, not that reshuffling.
        return Tolerance(0.0, 0.0, 0.0, 0.5, 0.45, max_excused_fraction=1.0)


def batches(prepared: Sequence[PreparedImage], batch_size: int, divisor: int):
    """Yield (slice of prepared images, images [B,3,H,W], image_sizes [B,2]) with B = batch_size."""
    for start in range(0, len(prepared), batch_size):
        chunk = prepared[start:start + batch_size]
        images, sizes = pad_batch(chunk, divisor, batch_size=batch_size)
        yield chunk, images, sizes


def to_detections(outputs: dict[str, np.ndarray], chunk: Sequence[PreparedImage], mask_threshold: float,
                  paste: PasteRule = "mmdet") -> list[ImageDetections]:
    """The host postprocess of each image of a batch: ``outputs`` of the engine on ``chunk`` (its
    prepared images, in order), every detection kept (score threshold 0)."""
    return [
        postprocess_image(outputs["dets"][i], outputs["labels"][i], outputs["masks"][i], item.scale_factor,
                          item.orig_hw, score_threshold=0.0, mask_threshold=mask_threshold, paste=paste)
        for i, item in enumerate(chunk)
    ]


def _box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix [len(a), len(b)] of xyxy boxes."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)), dtype=np.float64)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=2)
    area_a = (a[:, 2:] - a[:, :2]).clip(0).prod(axis=1)
    area_b = (b[:, 2:] - b[:, :2]).clip(0).prod(axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


@dataclass
class ImageComparison:
    """One image's reference detections, by how the gate judged them (counts), and the matched
    pairs' score differences and mask IoUs."""

    reference_count: int
    small_reference: int = 0
    small_engine: int = 0
    at_cut: int = 0
    tied: int = 0
    matched: int = 0
    label_checked: int = 0
    label_agree: int = 0
    score_diffs: list[float] = field(default_factory=list)
    mask_ious: list[float] = field(default_factory=list)

    @property
    def judged(self) -> int:
        """Reference detections the match rate is over: not small, not excused."""
        return self.reference_count - self.small_reference - self.at_cut - self.tied


def small_boxes(boxes: np.ndarray, min_side: float) -> np.ndarray:
    """bool ``[N]``: xyxy ``boxes`` with a side under ``min_side`` pixels."""
    if len(boxes) == 0:
        return np.zeros(0, dtype=bool)
    return ((boxes[:, 2] - boxes[:, 0]) < min_side) | ((boxes[:, 3] - boxes[:, 1]) < min_side)


def _coordinate_error(ref: np.ndarray, eng: np.ndarray, rel: float, floor: float) -> np.ndarray:
    """``[len(ref), len(eng)]``: the largest coordinate error of each pair as a multiple of what is
    allowed (``rel`` of the reference box's side, never under ``floor`` pixels); <= 1 is close."""
    if len(ref) == 0 or len(eng) == 0:
        return np.full((len(ref), len(eng)), np.inf)
    width, height = ref[:, 2] - ref[:, 0], ref[:, 3] - ref[:, 1]
    side = np.stack([width, height, width, height], axis=1)  # x1, y1, x2, y2
    allowed = np.maximum(rel * side, floor)
    return (np.abs(ref[:, None, :] - eng[None, :, :]) / allowed[:, None, :]).max(axis=2)


def compare_image(ref: ImageDetections, eng: ImageDetections, tolerance: Tolerance | None = None) -> ImageComparison:
    """Judge one image's engine detections against the reference's (see :class:`Tolerance`).

    Matching depends on geometry, class and score ties, never on the order of either list, so
    detections reordered by fp32 noise are judged the same. A judged reference detection is
    matched to the same-class engine detection closest in relative coordinate error (one to one,
    closest pairs first), small engine boxes included (a 2.1 px box may come out 1.9 px)."""
    tol = tolerance or Tolerance.for_precision("fp32")
    ref_boxes, eng_boxes = ref.boxes.astype(np.float64).reshape(-1, 4), eng.boxes.astype(np.float64).reshape(-1, 4)
    small_ref, small_eng = small_boxes(ref_boxes, tol.min_box_side_px), small_boxes(eng_boxes, tol.min_box_side_px)
    result = ImageComparison(len(ref.labels), int(small_ref.sum()), int(small_eng.sum()))
    error = _coordinate_error(ref_boxes, eng_boxes, tol.box_rel_error, tol.box_px_floor)
    close = error <= 1.0
    same_class = ref.labels[:, None] == eng.labels[None, :]

    ref_taken, eng_taken = small_ref.copy(), np.zeros(len(eng.labels), dtype=bool)
    candidates = np.argwhere(close & same_class & ~small_ref[:, None])
    order = np.lexsort((candidates[:, 1], candidates[:, 0], error[candidates[:, 0], candidates[:, 1]]))
    for r, e in candidates[order]:
        if ref_taken[r] or eng_taken[e]:
            continue
        ref_taken[r] = eng_taken[e] = True
        result.matched += 1
        result.score_diffs.append(abs(float(ref.scores[r]) - float(eng.scores[e])))
        if ref.rles is not None and eng.rles is not None:
            result.mask_ious.append(_mask_iou(eng.rles[e], ref.rles[r]))

    judged = ~small_ref
    has_close = close[judged].any(axis=1) if len(eng.labels) else np.zeros(int(judged.sum()), dtype=bool)
    result.label_checked = int(has_close.sum())
    result.label_agree = int((close & same_class)[judged][has_close].any(axis=1).sum()) if result.label_checked else 0

    # Unmatched reference detections that fp32 noise may have displaced (see Tolerance).
    cut = float(eng.scores.min()) if len(eng.scores) else None
    iou = _box_iou(ref_boxes, eng_boxes)
    for r in np.where(~ref_taken)[0]:
        score = float(ref.scores[r])
        if cut is not None and score <= cut + tol.score_tie:
            result.at_cut += 1
            continue
        swaps = np.where(~eng_taken & same_class[r] & (np.abs(eng.scores - score) <= tol.score_tie)
                         & (iou[r] >= tol.swap_iou))[0]
        if len(swaps):
            eng_taken[swaps[0]] = True  # one engine detection stands in for one reference detection
            result.tied += 1
    return result


def _mask_iou(a: dict, b: dict) -> float:
    """IoU of two RLE masks; two empty masks are the same mask (1.0, where pycocotools says 0)."""
    if mask_utils.area(a) == 0 and mask_utils.area(b) == 0:
        return 1.0
    return float(mask_utils.iou([a], [b], [0])[0, 0])


def ap_against_reference(refs: list[ImageDetections], engs: list[ImageDetections],
                         min_box_side_px: float = 0.0) -> dict[str, float]:
    """COCO AP / AP50 (``box_ap``, ``box_ap50``, ``mask_ap``, ``mask_ap50``, in [0, 1]) of the engine's
    detections with the reference's detections as ground truth, scored by ``build_tools.coco_eval``;
    NaN when the reference made no detections. Boxes of either side with a side under
    ``min_box_side_px`` are left out (their IoU measures noise)."""
    refs = [_without_small(d, min_box_side_px) for d in refs]
    engs = [_without_small(d, min_box_side_px) for d in engs]
    images, annotations, results = [], [], []
    categories = sorted({int(c) for d in refs for c in d.labels} | {int(c) for d in engs for c in d.labels})
    for image_id, (ref, eng) in enumerate(zip(refs, engs), start=1):
        h, w = ref.rles[0]["size"] if ref.rles else (eng.rles[0]["size"] if eng.rles else (1, 1))
        images.append({"id": image_id, "height": int(h), "width": int(w)})
        for box, label, rle in zip(ref.boxes, ref.labels, ref.rles or []):
            x1, y1, x2, y2 = (float(v) for v in box)
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": int(label),
                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": float(mask_utils.area(rle)),
                "segmentation": rle, "iscrowd": 0,
            })
        for box, score, label, rle in zip(eng.boxes, eng.scores, eng.labels, eng.rles or []):
            x1, y1, x2, y2 = (float(v) for v in box)
            results.append({"image_id": image_id, "category_id": int(label), "bbox": [x1, y1, x2 - x1, y2 - y1],
                            "score": float(score), "segmentation": rle})
    if not annotations:
        return {"box_ap": float("nan"), "box_ap50": float("nan"), "mask_ap": float("nan"), "mask_ap50": float("nan")}

    def ground_truth(entries: list[dict]) -> COCO:
        with contextlib.redirect_stdout(io.StringIO()):
            gt = COCO()
            gt.dataset = {"images": images, "annotations": entries, "categories": [{"id": c} for c in categories]}
            gt.createIndex()
        return gt

    scores = evaluate(ground_truth(annotations), results, iou_types=("bbox",))
    # Empty masks (degenerate boxes) match no mask, not even another empty one (IoU 0): masks are
    # scored on the non-empty ones of both sides. An engine that empties a mask the reference has
    # still loses it.
    non_empty = [a for a in annotations if a["area"] > 0]
    if non_empty:
        filled = [r for r in results if mask_utils.area(r["segmentation"]) > 0]
        scores |= evaluate(ground_truth(non_empty), filled, iou_types=("segm",))
    else:
        scores["segm"] = {"AP": float("nan"), "AP50": float("nan")}
    return {f"{key}_{stat.lower()}": scores[iou_type][stat]
            for iou_type, key in (("bbox", "box"), ("segm", "mask")) for stat in ("AP", "AP50")}


def _without_small(detections: ImageDetections, min_side: float) -> ImageDetections:
    """``detections`` without the boxes that have a side under ``min_side`` pixels."""
    keep = ~small_boxes(detections.boxes.reshape(-1, 4), min_side)
    if keep.all():
        return detections
    rles = None if detections.rles is None else [rle for rle, k in zip(detections.rles, keep) if k]
    return ImageDetections(detections.boxes[keep], detections.scores[keep], detections.labels[keep], rles)


def compare_detections(refs: Sequence[ImageDetections], engs: Sequence[ImageDetections],
                       tolerance: Tolerance) -> dict:
    """The agreement fields of a :class:`ParityReport` (counts, rates, score and mask agreement,
    AP, exclusions) of engine detections ``engs`` against reference detections ``refs``, image by
    image in the same order, judged as ``tolerance`` says."""
    comparisons = [compare_image(r, e, tolerance) for r, e in zip(refs, engs)]
    total = sum(c.reference_count for c in comparisons)
    judged = sum(c.judged for c in comparisons)
    label_checked = sum(c.label_checked for c in comparisons)
    scores = [d for c in comparisons for d in c.score_diffs]
    ious = [v for c in comparisons for v in c.mask_ious]
    ap = ap_against_reference(list(refs), list(engs), tolerance.min_box_side_px)
    return dict(
        reference_detections=total,
        engine_detections=int(sum(len(e.labels) for e in engs)),
        box_match_rate=(sum(c.matched for c in comparisons) / judged) if judged else 1.0,
        label_agreement=(sum(c.label_agree for c in comparisons) / label_checked) if label_checked else 1.0,
        score_abs_diff_mean=float(np.mean(scores)) if scores else 0.0,
        score_abs_diff_max=float(np.max(scores)) if scores else 0.0,
        mask_iou_mean=float(np.mean(ious)) if ious else 1.0,
        mask_iou_min=float(np.min(ious)) if ious else 1.0,
        **ap,
        ap_delta_points=APDelta(**ap_delta_points(ap)),
        exclusions=ParityExclusions(
            min_box_side_px=tolerance.min_box_side_px, judged=judged,
            **{k: sum(getattr(c, k) for c in comparisons) for k in ("small_reference", "small_engine", "at_cut", "tied")}),
    )


def engine_threads(engine: Engine, threads: int | None = None) -> int:
    """The threads an engine computes with: the requested number, the engine's own, or all cores."""
    return int(threads or engine.threads or cpu_cores())


def run_detections(
    infer: Infer,
    prepared: Sequence[PreparedImage],
    *,
    batch_size: int,
    divisor: int,
    mask_threshold: float = 0.5,
    paste: PasteRule = "mmdet",
    warmup: int = 1,
    progress=None,
) -> tuple[list[ImageDetections], dict[str, list[float]]]:
    """Detections of ``infer`` on ``prepared`` after the host postprocess (``paste``: the origin's
    box rescale and mask paste, as the service applies it), and per-image seconds
    (``infer``, ``postprocess``: one value per batch, divided by the images in it). ``warmup``
    untimed runs of the first batch come first."""
    chunks = list(batches(prepared, batch_size, divisor))
    for _ in range(warmup if chunks else 0):
        infer(chunks[0][1], chunks[0][2])
    detections: list[ImageDetections] = []
    times: dict[str, list[float]] = {"infer": [], "postprocess": []}
    for chunk, images, sizes in chunks:
        out, infer_s = timed(infer, images, sizes)
        batch_detections, postprocess_s = timed(to_detections, out, chunk, mask_threshold, paste)
        detections.extend(batch_detections)
        times["infer"].append(infer_s / len(chunk))
        times["postprocess"].append(postprocess_s / len(chunk))
        if progress is not None:
            progress.update(len(chunk))
    return detections, times


def run_reference(reference: OriginReference, rgbs: Sequence[np.ndarray], *, warmup: int = 1,
                  progress=None) -> tuple[list[ImageDetections], dict[str, list[float]]]:
    """``reference.detect`` on each decoded image, and its per-image seconds (``infer``: the whole
    call); ``warmup`` untimed runs of the first image come first."""
    for _ in range(warmup if rgbs else 0):
        reference.detect(rgbs[0])
    detections, times = [], []
    for rgb in rgbs:
        detection, seconds = timed(reference.detect, rgb)
        detections.append(detection)
        times.append(seconds)
        if progress is not None:
            progress.update(1)
    return detections, {"infer": times}


def _nan_for_none(value: float | None) -> float:
    return float("nan") if value is None else value


def _finite_or_none(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def ap_delta_points(ap: dict) -> dict[str, float | None]:
    """AP points lost against the reference: ``100 * (1 - AP)`` for box and mask (None when the
    reference made no detections, so AP is undefined)."""
    return {key: _finite_or_none(100.0 * (1.0 - ap[f"{key}_ap"])) for key in ("box", "mask")}


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def verify(
    reference: OriginReference | MaskRCNN,
    engine: Engine,
    image_paths: Sequence[str | Path],
    spec: InputSpec,
    *,
    mask_threshold: float = 0.5,
    progress: bool = True,
    threads: int | None = None,
    warmup: int | None = None,
    tolerance: Tolerance | None = None,
) -> ParityReport:
    """Run reference and engine on ``image_paths``; return the parity report, matched as
    ``tolerance`` says (default: the engine's precision's), its pass fields left at their defaults
    (:func:`verify_artifact` judges it). The reference runs with torch's fp32 paths pinned to IEEE
    fp32 (``build_tools.reference.fp32_pinned``); the report's ``fp32_pins`` says so, and what the
    engine's fp32 ran at.

    ``reference``: an origin reference (``build_tools.origin``), run on each decoded image, or a
    bare model, run on the engine's prepared inputs. It runs with ``threads`` torch threads
    (default: the engine's threads), so the timing compares like with like; ``warmup`` untimed
    batches precede each side's timed pass (default: one when there are fewer than 3 batches,
    none otherwise, as the median of 3 or more already discounts a slow first call)."""
    rgbs = [read_rgb(p) for p in image_paths]
    prepared, prepare_t = [], []
    for rgb in rgbs:
        item, seconds = timed(prepare_image, rgb, spec)
        prepared.append(item)
        prepare_t.append(seconds)
    batch_size = engine.batch_size or 1
    if warmup is None:
        warmup = 1 if -(-len(prepared) // batch_size) < 3 else 0
    threads = engine_threads(engine, threads)
    common = {"batch_size": batch_size, "divisor": spec.pad_divisor, "mask_threshold": mask_threshold,
              "paste": engine.manifest.postprocess.paste,
              "warmup": warmup}
    bar = tqdm(total=2 * len(prepared), desc="verify (reference, engine)", unit="img", disable=not progress)
    record = ReferenceRecord(name="maskrcnn-serve",
                             detail="this project's eager model on the engine's prepared inputs")
    if isinstance(reference, OriginReference) and not reference.is_origin:
        # this project's own eager model: run on the engine's prepared inputs, graph against graph
        record, reference = ReferenceRecord(**reference.record()), reference.loaded.model
    whole_image = isinstance(reference, OriginReference)
    with torch_threads(threads), fp32_pinned() as pins:
        if whole_image:
            refs, eager_t = run_reference(reference, rgbs, warmup=warmup, progress=bar)
        else:
            refs, eager_t = run_detections(eager_infer(reference), prepared, progress=bar, **common)
    engs, engine_t = run_detections(engine.infer, prepared, progress=bar, **common)
    bar.close()
    if whole_image:  # the engine's whole-image time: its share of the batch's preprocess added
        per_batch_prepare = [sum(prepare_t[i:i + batch_size]) / len(prepare_t[i:i + batch_size])
                             for i in range(0, len(prepare_t), batch_size)]
        engine_whole = [a + b + c for a, b, c in zip(per_batch_prepare, engine_t["infer"], engine_t["postprocess"])]
        record = ReferenceRecord(**reference.record())

    tolerance = tolerance or Tolerance.for_precision(engine.manifest.precision)
    eager_s = _median(eager_t["infer"])
    engine_s = _median(engine_whole if whole_image else engine_t["infer"])
    return ParityReport(
        reference=record,
        images=[str(Path(p).name) for p in image_paths],
        **compare_detections(refs, engs, tolerance),
        fp32_pins={**{f"reference {k}": v for k, v in pins.items()}, "engine": engine_fp32(engine.manifest)},
        timing=ParityTiming(
            eager_s_per_image=eager_s,
            engine_s_per_image=engine_s,
            engine_postprocess_s_per_image=_median(engine_t["postprocess"]),
            engine_with_postprocess_s_per_image=_median(engine_whole) if whole_image else _median(
                [a + b for a, b in zip(engine_t["infer"], engine_t["postprocess"])]),
            ratio_to_eager=engine_s / eager_s if eager_s > 0 else float("nan"),
            images=len(prepared),
            batch_size=batch_size,
            threads=threads,
            warmup_batches=warmup,
            statistic=("median per image over the verify images (few, of varied sizes); whole-image times: "
                       "the reference's own call, the engine's preprocess + infer + postprocess") if whole_image
                      else ("median per image over the verify images (few, of varied sizes); eager PyTorch and "
                            "engine on the same prepared inputs, engine = infer only unless named otherwise"),
        ),
    )


def engine_fp32(manifest: Manifest) -> str:
    """What the engine's fp32 computes in, from its build facts: OpenVINO's inference precision hint
    (its CPU default is bf16 where the CPU has it, so the build sets it), else the backend's fp32
    kernels (ONNX Runtime's CPU provider has no reduced-precision mode for fp32 on x86)."""
    hint = manifest.tools.backend.get("inference_precision_hint")
    if hint is not None:
        return f"{manifest.backend} INFERENCE_PRECISION_HINT {hint}"
    return f"{manifest.backend} {manifest.precision} kernels"


def check_tolerance(report: ParityReport | Mapping[str, Any], tolerance: Tolerance) -> list[str]:
    """Human-readable failures of ``report`` (a parity report, or the fields
    :func:`compare_detections` returns) against ``tolerance`` (empty when it passes; an AP the
    reference left undefined, None in the report, fails as ``nan``). Besides the minimums, the
    detections excused from matching (at the cut or tied) may be at most ``max_excused_fraction`` of
    the reference's detections of at least ``min_box_side_px``, so no defect hides among them."""
    checks = [
        ("box_match_rate", tolerance.min_box_match_rate),
        ("label_agreement", tolerance.min_label_agreement),
        ("mask_iou_mean", tolerance.min_mask_iou),
        ("box_ap", tolerance.min_box_ap),
        ("mask_ap", tolerance.min_mask_ap),
    ]
    fields = report if isinstance(report, Mapping) else dict(report)
    values = {name: _nan_for_none(fields[name]) for name, _ in checks}
    failures = [f"{name} {values[name]:.4f} < {minimum}" for name, minimum in checks if not values[name] >= minimum]
    ex = fields.get("exclusions")
    if ex is not None:
        sized = ex.judged + ex.at_cut + ex.tied
        excused = (ex.at_cut + ex.tied) / sized if sized else 0.0
        if excused > tolerance.max_excused_fraction:
            failures.append(f"excused detections {excused:.4f} > {tolerance.max_excused_fraction} "
                            f"({ex.at_cut} at the cut, {ex.tied} tied, of {sized})")
    return failures


def verify_artifact(
    artifact_dir: str | Path,
    manifest: Manifest,
    *,
    images: str | Path | None = None,
    count: int | None = None,
    tolerance: Tolerance | None = None,
    threads: int | None = None,
    progress: bool = True,
    prefer: str = "origin",
) -> ParityReport:
    """The parity report of the artifact in ``artifact_dir`` against its origin reference
    (``build_tools.origin.origin_reference``: the origin framework's own model where it runs).

    Args:
        artifact_dir: the artifact folder (its engine is loaded from there).
        manifest: its manifest (checkpoint, inference config, input spec, mask threshold).
        images: folder of verify images; None for scikit-image's sample photographs.
        count: use at most this many images.
        tolerance: pass criteria; None for the precision's (:meth:`Tolerance.for_precision`).
        threads: engine threads (and eager PyTorch's); None for the engine's default.
        progress: show a progress bar.
        prefer: ``origin`` (the origin framework's model where it runs) or ``maskrcnn-serve``
            (this project's eager model).

    Raises:
        BuildError: the reference cannot be rebuilt (checkpoint changed) or no sample photos.
        FileNotFoundError: ``images`` is not a folder of images.
    """
    paths = list_images(images, count) if images else sample_photographs(count)
    reference = origin_reference(manifest.checkpoint, manifest.inference_config, manifest.classes, prefer=prefer)
    engine = load_engine(artifact_dir, threads=threads)
    tolerance = tolerance or Tolerance.for_precision(manifest.precision)
    report = verify(reference, engine, paths, manifest.input.spec, mask_threshold=manifest.postprocess.mask_threshold,
                    progress=progress, threads=threads, tolerance=tolerance)
    failures = check_tolerance(report, tolerance)
    return report.model_copy(update={"tolerance": asdict(tolerance), "passed": not failures, "failures": failures})
