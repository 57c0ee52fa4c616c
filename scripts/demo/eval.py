"""`maskrcnn-demo eval`: COCO AP of a checkpoint on a COCO-layout split, the way the service sees it.

The checkpoint runs in its origin framework where it can (``build_tools.origin``: mmdet's own
model for mmdet checkpoints where mmdet is installed, torchvision's for torchvision ones), else as
this project's eager model inside the service's host code (``scripts.tools.eager``), with the
thresholds a manifest built from the same checkpoint would carry. The detections are written as a COCO results file by
:func:`write_reference_results`: these are the reference results that engine evaluations are
compared with. Scores come from ``build_tools.coco_eval``, as ``maskrcnn-eval``'s do.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from build_tools.checkpoint import CheckpointError, LoadedCheckpoint, load_checkpoint
from build_tools.coco_eval import evaluate, load_coco
from scripts.tools.eager import EagerModel, write_eager_results

# The first three of pycocotools' twelve summary numbers, printed per IoU type.
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


def write_reference_results(
    loaded: LoadedCheckpoint,
    data_dir: str | Path,
    split: str,
    out_json: str | Path,
    limit: int | None = None,
    progress: bool = True,
    prefer: str = "origin",
) -> list[int]:
    """Run the checkpoint's reference model (``prefer``: its origin framework's own where it runs, or
    ``maskrcnn-serve``, this project's eager model in the service's host code) on the images of
    ``split`` (the first ``limit`` by image id, or all); write a COCO results JSON
    (``scripts.tools.eager.write_eager_results``). Returns the evaluated image ids."""
    annotation_file, image_dir = split_paths(data_dir, split)
    coco = load_coco(annotation_file)
    image_ids = sorted(coco.getImgIds())[:limit] if limit else sorted(coco.getImgIds())
    eager = EagerModel.of_checkpoint(loaded, prefer=prefer)
    if progress:
        print(f"reference: {eager.reference.name} ({eager.reference.detail})")
    write_eager_results(eager, coco, image_dir, image_ids, Path(out_json), progress=progress)
    return image_ids


def main(argv: Sequence[str] | None = None) -> int:
    """`maskrcnn-demo eval`: reference results and COCO AP of a checkpoint. Returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="maskrcnn-demo eval",
        description="Run a checkpoint (eager PyTorch: its origin framework's own model where it runs, see "
        "--reference) on a "
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
    parser.add_argument("--reference", choices=("origin", "maskrcnn-serve"), default="origin",
                        help="the origin framework's own model where it runs (default: mmdet's for mmdet "
                        "checkpoints when installed, torchvision's for torchvision ones), or this project's")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    checkpoint = Path(args.checkpoint)
    results = args.results or checkpoint.with_name(f"{checkpoint.stem}.{args.split}_results.json")
    started = time.perf_counter()
    try:
        loaded = load_checkpoint(checkpoint)
        image_ids = write_reference_results(loaded, args.data, args.split, results, args.limit,
                                            progress=not args.no_progress, prefer=args.reference)
    except (CheckpointError, EvalError) as error:
        parser.error(str(error))
    seconds = time.perf_counter() - started
    annotation_file, _ = split_paths(args.data, args.split)
    scores = evaluate(load_coco(annotation_file), json.loads(results.read_text()), image_ids, verbose=True)
    print(f"{len(image_ids)} images of {args.data}/{args.split} in {seconds:.0f}s "
          f"({loaded.format} checkpoint {checkpoint}); results: {results}")
    for iou_type, values in scores.items():
        print(f"{iou_type}: " + " ".join(f"{name} {values[name]:.3f}" for name in SUMMARY_NAMES))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
