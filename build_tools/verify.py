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
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

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
    torch_threads,
)
from build_tools.timing import timed
from service.backends import Engine, load_engine
from service.backends.base import cpu_cores
from service.manifest import APDelta, Manifest, ParityReport, ParityTiming, ReferenceRecord
from service.postprocess import ImageDetections, PasteRule, postprocess_image
from service.preprocess import InputSpec, PreparedImage, pad_batch, prepare_image


@dataclass(frozen=True)
class Tolerance:
    """Pass criteria of one precision. fp32 must reproduce eager PyTorch almost exactly; the
    lower precisions are judged by AP against the reference's detections."""

    min_box_match_rate: float
    min_label_agreement: float
    min_mask_iou: float
    min_box_ap: float
    min_mask_ap: float

    @staticmethod
    def for_precision(precision: str) -> Tolerance:
        if precision == "fp32":
            return Tolerance(0.99, 0.99, 0.95, 0.95, 0.95)
        # int8 / fp16 / bf16, scored against the fp32 reference's own detections (every reshuffled
        # low-score detection counts as a miss). ONNX Runtime int8 of the demo model scored box 0.58 /
        # mask 0.61 on 8 demo val images while its ground-truth AP moved by -0.15 points only
        # (scripts/run_all.sh): these floors catch a broken engine, not that reshuffling.
        return Tolerance(0.0, 0.0, 0.0, 0.5, 0.45)


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
    reference_count: int
    matched_high_iou: int
    label_agree: int
    score_diffs: list[float]
    mask_ious: list[float]


def compare_image(ref: ImageDetections, eng: ImageDetections, match_iou: float = 0.5) -> ImageComparison:
    iou = _box_iou(ref.boxes.astype(np.float64), eng.boxes.astype(np.float64))
    label_agree = int(sum(1 for r in range(len(ref.labels)) if iou.shape[1] and ref.labels[r] == eng.labels[iou[r].argmax()]))
    taken = np.zeros(len(eng.labels), dtype=bool)
    matched_high, score_diffs, mask_ious = 0, [], []
    for r in np.argsort(-ref.scores, kind="stable"):
        candidates = np.where((eng.labels == ref.labels[r]) & ~taken)[0]
        if len(candidates) == 0:
            continue
        best = candidates[iou[r, candidates].argmax()]
        if iou[r, best] < match_iou:
            continue
        taken[best] = True
        matched_high += iou[r, best] >= 0.99
        score_diffs.append(abs(float(ref.scores[r]) - float(eng.scores[best])))
        if ref.rles is not None and eng.rles is not None:
            mask_ious.append(_mask_iou(eng.rles[best], ref.rles[r]))
    return ImageComparison(len(ref.labels), int(matched_high), label_agree, score_diffs, mask_ious)


def _mask_iou(a: dict, b: dict) -> float:
    """IoU of two RLE masks; two empty masks are the same mask (1.0, where pycocotools says 0)."""
    if mask_utils.area(a) == 0 and mask_utils.area(b) == 0:
        return 1.0
    return float(mask_utils.iou([a], [b], [0])[0, 0])


def ap_against_reference(refs: list[ImageDetections], engs: list[ImageDetections]) -> dict[str, float]:
    """COCO AP / AP50 (``box_ap``, ``box_ap50``, ``mask_ap``, ``mask_ap50``, in [0, 1]) of the engine's
    detections with the reference's detections as ground truth, scored by ``build_tools.coco_eval``;
    NaN when the reference made no detections."""
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
) -> ParityReport:
    """Run reference and engine on ``image_paths``; return the parity report (its tolerance
    fields left at their defaults: :func:`verify_artifact` judges it).

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
    with torch_threads(threads):
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

    comparisons = [compare_image(r, e) for r, e in zip(refs, engs)]
    total = sum(c.reference_count for c in comparisons)
    scores = [d for c in comparisons for d in c.score_diffs]
    ious = [v for c in comparisons for v in c.mask_ious]
    ap = ap_against_reference(refs, engs)
    eager_s = _median(eager_t["infer"])
    engine_s = _median(engine_whole if whole_image else engine_t["infer"])
    return ParityReport(
        reference=record,
        images=[str(Path(p).name) for p in image_paths],
        reference_detections=total,
        engine_detections=int(sum(len(e.labels) for e in engs)),
        box_match_rate=(sum(c.matched_high_iou for c in comparisons) / total) if total else 1.0,
        label_agreement=(sum(c.label_agree for c in comparisons) / total) if total else 1.0,
        score_abs_diff_mean=float(np.mean(scores)) if scores else 0.0,
        score_abs_diff_max=float(np.max(scores)) if scores else 0.0,
        mask_iou_mean=float(np.mean(ious)) if ious else 1.0,
        mask_iou_min=float(np.min(ious)) if ious else 1.0,
        **ap,
        ap_delta_points=APDelta(**ap_delta_points(ap)),
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


def check_tolerance(report: ParityReport, tolerance: Tolerance) -> list[str]:
    """Human-readable failures of ``report`` against ``tolerance`` (empty when it passes; an AP the
    reference left undefined, None in the report, fails as ``nan``)."""
    checks = [
        ("box_match_rate", tolerance.min_box_match_rate),
        ("label_agreement", tolerance.min_label_agreement),
        ("mask_iou_mean", tolerance.min_mask_iou),
        ("box_ap", tolerance.min_box_ap),
        ("mask_ap", tolerance.min_mask_ap),
    ]
    values = {name: _nan_for_none(getattr(report, name)) for name, _ in checks}
    return [f"{name} {values[name]:.4f} < {minimum}" for name, minimum in checks if not values[name] >= minimum]


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
    report = verify(reference, engine, paths, manifest.input.spec,
                    mask_threshold=manifest.postprocess.mask_threshold, progress=progress, threads=threads)
    tolerance = tolerance or Tolerance.for_precision(manifest.precision)
    failures = check_tolerance(report, tolerance)
    return report.model_copy(update={"tolerance": asdict(tolerance), "passed": not failures, "failures": failures})
