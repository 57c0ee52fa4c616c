"""`maskrcnn-demo eval`: COCO AP of a checkpoint on a COCO-layout split, the way the service sees it.

The checkpoint is loaded through ``build_tools.checkpoint.load_checkpoint`` (eager PyTorch with the
test settings of its origin) and every image goes through the service's own host code:
``service.preprocess.prepare_image`` / ``pad_batch`` before the model and
``service.postprocess.postprocess_image`` (boxes to original pixels, masks pasted and encoded as
COCO RLE) after it, with the thresholds a manifest built from the same checkpoint would carry.
The detections are written as a COCO results file by :func:`write_reference_results`: these are
the reference results that engine evaluations are compared with.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from tqdm import tqdm

from build_tools.checkpoint import CheckpointError, load_checkpoint
from build_tools.model import MaskRCNN
from build_tools.verify import read_rgb, run_eager
from service.manifest import COCO_CATEGORY_IDS
from service.postprocess import postprocess_image
from service.preprocess import InputSpec, pad_batch, prepare_image
from service.response import coco_body

# The first three of pycocotools' twelve summary numbers.
SUMMARY_NAMES = ("AP", "AP50", "AP75")


class EvalError(Exception):
    """An evaluation request that cannot be carried out (missing split, annotations or checkpoint);
    the CLI reports it as a usage error (exit status 2)."""


def split_paths(data_dir: str | Path, split: str) -> tuple[Path, Path]:
    """``(annotation file, image folder)`` of ``split`` in a COCO layout:
    ``annotations/instances_<split>.json`` and ``<split>/``."""
    data_dir = Path(data_dir)
    annotations, images = data_dir / "annotations" / f"instances_{split}.json", data_dir / split
    if not annotations.is_file() or not images.is_dir():
        raise EvalError(f"{data_dir} has no split {split!r} (expected {annotations} and {images}/)")
    return annotations, images


def _quiet_coco(annotation_file: Path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(annotation_file))


def write_reference_results(
    model: MaskRCNN,
    data_dir: str | Path,
    split: str,
    out_json: str | Path,
    limit: int | None = None,
    progress: bool = True,
) -> list[int]:
    """Run ``model`` on the images of ``split`` (the first ``limit`` by image id, or all) through the
    service's host preprocessing and postprocessing; write a COCO results JSON.

    Each entry is ``{"image_id", "category_id", "bbox": [x, y, w, h], "score", "segmentation": RLE}``
    in original-image pixels, ``bbox`` and ``segmentation`` as the service's ``format=coco`` answers
    carry them. Score threshold, mask threshold and detections per image are the model config's
    (what the manifest's ``postprocess`` section records). Returns the evaluated image ids.
    """
    annotation_file, image_dir = split_paths(data_dir, split)
    coco = _quiet_coco(annotation_file)
    image_ids = sorted(coco.getImgIds())[:limit] if limit else sorted(coco.getImgIds())
    config = model.config
    spec = InputSpec(mean=config.mean, std=config.std, resize_scale=config.resize_scale,
                     pad_divisor=config.pad_divisor)
    model.eval()
    results = []
    for image_id in tqdm(image_ids, desc=f"eval {split}", unit="img", disable=not progress):
        prepared = prepare_image(read_rgb(image_dir / coco.imgs[image_id]["file_name"]), spec)
        images, image_sizes = pad_batch([prepared], spec.pad_divisor)
        outputs = run_eager(model, images, image_sizes)
        detections = postprocess_image(
            outputs["dets"][0], outputs["labels"][0], outputs["masks"][0], prepared.scale_factor,
            prepared.orig_hw, score_threshold=config.score_thresh, mask_threshold=config.mask_threshold,
            max_detections=config.detections_per_img,
        )
        results += coco_body(
            detections.boxes.tolist(), detections.scores.tolist(),
            [COCO_CATEGORY_IDS[label] for label in detections.labels], detections.rles, image_id,
        )
    out_json = Path(out_json)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(results))
    return image_ids


def coco_ap(
    data_dir: str | Path, split: str, results_json: str | Path, image_ids: Sequence[int] | None = None,
    verbose: bool = True,
) -> dict[str, dict[str, float]]:
    """pycocotools bbox and segm evaluation of ``results_json`` on ``image_ids`` of ``split`` (all
    when None). Prints pycocotools' summaries when ``verbose``; returns
    ``{"bbox": {"AP", "AP50", "AP75"}, "segm": {...}}``."""
    annotation_file, _ = split_paths(data_dir, split)
    ground_truth = _quiet_coco(annotation_file)
    results = json.loads(Path(results_json).read_text())
    scores: dict[str, dict[str, float]] = {}
    chatter = io.StringIO()
    for iou_type in ("bbox", "segm"):
        if not results:
            scores[iou_type] = dict.fromkeys(SUMMARY_NAMES, 0.0)
            continue
        with contextlib.redirect_stdout(chatter):
            detections = ground_truth.loadRes(results)
        evaluator = COCOeval(ground_truth, detections, iou_type)
        if image_ids is not None:
            evaluator.params.imgIds = list(image_ids)
        with contextlib.nullcontext() if verbose else contextlib.redirect_stdout(chatter):
            print(f"--- {iou_type} ---")
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        scores[iou_type] = dict(zip(SUMMARY_NAMES, (float(v) for v in evaluator.stats[:3])))
    return scores


def main(argv: Sequence[str] | None = None) -> int:
    """`maskrcnn-demo eval`: reference results and COCO AP of a checkpoint. Returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="maskrcnn-demo eval",
        description="Run a checkpoint (eager PyTorch, the service's host pre/postprocessing) on a "
        "COCO-layout split, write the COCO results JSON and print pycocotools bbox and segm AP.",
    )
    parser.add_argument("--data", type=Path, required=True, help="dataset folder (COCO layout)")
    parser.add_argument("--checkpoint", required=True, help="checkpoint file (mmdet or torchvision)")
    parser.add_argument("--split", default="val", help="split to evaluate (default val)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N images")
    parser.add_argument("--results", type=Path, default=None,
                        help="results JSON to write (default <checkpoint stem>.<split>_results.json beside it)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; 1 is faster on a busy machine)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    checkpoint = Path(args.checkpoint)
    results = args.results or checkpoint.with_name(f"{checkpoint.stem}.{args.split}_results.json")
    started = time.perf_counter()
    try:
        loaded = load_checkpoint(checkpoint)
        image_ids = write_reference_results(loaded.model, args.data, args.split, results, args.limit,
                                            progress=not args.no_progress)
    except (CheckpointError, EvalError) as error:
        parser.error(str(error))
    seconds = time.perf_counter() - started
    scores = coco_ap(args.data, args.split, results, image_ids)
    print(f"{len(image_ids)} images of {args.data}/{args.split} in {seconds:.0f}s "
          f"({loaded.format} checkpoint {checkpoint}); results: {results}")
    for iou_type, values in scores.items():
        print(f"{iou_type}: " + " ".join(f"{name} {value:.3f}" for name, value in values.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
