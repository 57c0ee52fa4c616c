"""Accuracy and speed of each served precision, judged by the origin framework, in one run.

For one checkpoint (the demo model by default) and one COCO-layout split (its val split):

1. the checkpoint's origin reference (``build_tools.origin``: mmdet's own model where mmdet is
   installed, torchvision's for torchvision checkpoints, else this project's eager model, named
   in the output) runs on every image of the split: its COCO AP against the split's ground truth
   is the baseline;
2. one export, then one engine per ``--variants`` entry (``backend:precision``; int8 calibrated on
   ``--calib-count`` images of ``--calib-images``), each served by ``maskrcnn-serve`` on loopback
   and sent every image of the split over HTTP (``format=coco``): its AP against the ground truth,
   and ``AP lost`` = the reference's AP minus the served AP, in points (box and mask), with its
   95 % paired bootstrap interval over the split's images (``build_tools.coco_eval.ap_difference``,
   ``--bootstrap-samples`` draws): how far the loss could move on another draw of as many images,
   a loss is ``proven`` within its bound only where the interval's top lies under it (box and mask),
   ``met`` where the loss itself does but its interval reaches past the bound (more images needed),
   else ``missed``;
   ``agreement`` is the served detections' AP with the reference's own detections taken as ground
   truth (100 = the reference reproduced; far stricter: every reshuffled low-score detection counts);
3. speed: one 1333x800 scene of many objects (``--timing-objects``; the answer's detection count is
   printed) timed ``--timing-calls`` times after a warm-up, the reference's whole call (decoded
   image in, pasted masks out) against the served round trip (JPEG in, JSON with RLE masks out),
   both with ``--threads`` threads: ``time vs eager`` = served / reference, same run.

    python -m scripts.bench.fidelity --checkpoint .cache/demo/demo_mask_rcnn.pth --data .cache/demo/data \\
        --calib-images .cache/demo/data/train --json fidelity.json

The reference's detections are cached in ``--work`` by reference, checkpoint sha256, split and image
set, so a rerun costs only the engines (``--fresh-reference`` runs it again). An ablation is a list of
variants with build options, e.g. ``openvino:bf16,openvino:bf16:predictor_precision=bf16``.

The goals (AP lost <= 0.1 at fp32, <= 0.3 bf16, <= 1.0 int8; time <= 0.30x eager at bf16, <= 0.18x at
int8) are printed beside the table, never asserted: this machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import httpx
import numpy as np
from pycocotools.coco import COCO

from build_tools.timing import timed

if TYPE_CHECKING:
    from build_tools.origin import OriginReference
    from scripts.tools.eval_replay import Dataset

DEFAULT_VARIANTS = "onnxruntime:fp32,openvino:fp32,openvino:bf16,onnxruntime:int8,openvino:int8"
GOALS = {"fp32": (0.1, None), "bf16": (0.3, 0.30), "int8": (1.0, 0.18)}  # AP lost (points), time vs eager


def _variants(text: str) -> list[tuple[str, str, dict[str, str]]]:
    """``backend:precision[:option=value...]`` items, comma-separated: e.g.
    ``openvino:bf16:roi_align_precision=bf16`` passes that build option to the backend's compile."""
    out = []
    for item in text.split(","):
        backend, precision, *options = item.strip().split(":")
        if not backend or not precision or any("=" not in o for o in options):
            raise argparse.ArgumentTypeError(f"variant {item!r} is not backend:precision[:option=value...]")
        out.append((backend, precision, dict(o.split("=", 1) for o in options)))
    return out


def verdict(row: dict) -> str:
    """``proven`` (both intervals' tops within the precision's bound), ``met`` (both losses within
    it, an interval reaching past it) or ``missed``; ``""`` for a precision without a bound."""
    goal = GOALS.get(row["precision"])
    if goal is None:
        return ""
    bound = goal[0]
    if all(row[f"{kind}_lost_95"][1] <= bound for kind in ("box", "mask")):
        return "proven"
    return "met" if all(row[f"{kind}_lost"] <= bound for kind in ("box", "mask")) else "missed"


def _lost(row: dict, kind: str) -> str:
    """``row``'s AP lost of ``kind`` ("box" or "mask") and its interval: ``0.56 [-2.60, 3.74]``."""
    low, high = row[f"{kind}_lost_95"]
    return f"{row[f'{kind}_lost']:.2f} [{low:.2f}, {high:.2f}]"


def timing_scene(objects: int, seed: int = 7) -> tuple[np.ndarray, bytes]:
    """A 1333x800 RGB scene of the demo data's kind holding up to ``objects`` shapes, and its JPEG."""
    from scripts.demo.data import GenerationSettings, generate_image

    settings = GenerationSettings(min_size=56, max_size=110, max_objects=objects)
    rgb, _ = generate_image(np.random.default_rng([seed, objects]), 1333, 800, settings)
    ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return rgb, jpeg.tobytes()


def ap_against(reference: list[dict], results: list[dict], images: list[dict], image_ids: list[int]) -> dict:
    """COCO AP of ``results`` with ``reference``'s detections as the ground truth."""
    from pycocotools import mask as mask_utils

    from build_tools.coco_eval import evaluate

    annotations = []
    for r in reference:
        rle = dict(r["segmentation"], counts=r["segmentation"]["counts"].encode())
        annotations.append({"id": len(annotations) + 1, "image_id": r["image_id"], "category_id": r["category_id"],
                            "bbox": r["bbox"], "area": float(mask_utils.area(rle)), "segmentation": r["segmentation"],
                            "iscrowd": 0})
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": images, "annotations": annotations,
                      "categories": [{"id": c} for c in sorted({r["category_id"] for r in reference + results})]}
        gt.createIndex()
    return evaluate(gt, results, image_ids)


def served_results(url: str, dataset, progress_path: Path, desc: str) -> list[dict]:
    """Every image of ``dataset`` (a ``scripts.tools.eval_replay.Dataset``) posted to the service by
    ``maskrcnn-eval``'s own client (``replay_dataset``: ``format=coco``, retries of transport
    errors and 503s); its COCO results in image order. A fresh progress file each call: every
    engine is a new run."""
    import asyncio

    from scripts.tools.eval_replay import ProgressLog, replay_dataset
    from scripts.tools.http import replay_retry_policy

    progress_path.unlink(missing_ok=True)
    log = ProgressLog(progress_path, {"annotations": str(dataset.annotations.resolve()), "engine": desc})
    log.load()
    try:
        outcome = asyncio.run(replay_dataset(dataset, [url], log, {}, concurrency=1, score_threshold=None,
                                             policy=replay_retry_policy(2, 1.0), timeout_s=600, progress=True))
    finally:
        log.close()
    if outcome.failures:
        raise SystemExit(f"{desc}: {len(outcome.failures)} images failed: {outcome.failures}")
    return [entry for image_id in dataset.image_ids for entry in outcome.finished[image_id].results]


def time_served(url: str, jpeg: bytes, calls: int) -> tuple[list[float], int]:
    """Seconds of ``calls`` round trips of ``jpeg`` to ``/predict`` after one untimed warm-up (the
    request alone: its answer is checked after the clock stops), and the last answer's detections."""
    times, detections = [], 0
    with httpx.Client(timeout=600) as client:
        post = partial(client.post, url + "/predict", content=jpeg, headers={"Content-Type": "image/jpeg"})
        for i in range(calls + 1):
            answer, elapsed = timed(post)
            answer.raise_for_status()
            detections = len(answer.json()["detections"])
            if i:
                times.append(elapsed)
    return times, detections


def time_reference(reference: OriginReference, rgb: np.ndarray, calls: int) -> tuple[list[float], int]:
    """Seconds of ``calls`` whole calls of ``reference`` on ``rgb`` after
    one untimed warm-up, and the last call's detections."""
    reference.detect(rgb)
    times, detections = [], 0
    for _ in range(calls):
        found, elapsed = timed(reference.detect, rgb)
        detections = len(found.labels)
        times.append(elapsed)
    return times, detections


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m scripts.bench.fidelity", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=".cache/demo/demo_mask_rcnn.pth", help="checkpoint (default: the demo model)")
    parser.add_argument("--data", type=Path, default=Path(".cache/demo/data"), help="COCO-layout dataset folder")
    parser.add_argument("--split", default="val")
    parser.add_argument("--limit", type=int, default=None, help="only the first N images of the split")
    parser.add_argument("--variants", type=_variants, default=_variants(DEFAULT_VARIANTS),
                        help=f"backend:precision list (default {DEFAULT_VARIANTS})")
    parser.add_argument("--calib-images", type=Path, default=None, help="int8 calibration images (default: <data>/train)")
    parser.add_argument("--calib-count", type=int, default=16)
    parser.add_argument("--work", type=Path, default=Path(".cache/bench/fidelity"), help="export and engines go here")
    parser.add_argument("--threads", type=int, default=2, help="threads of the reference and of each engine")
    parser.add_argument("--timing-calls", type=int, default=5)
    parser.add_argument("--timing-objects", type=int, default=60)
    parser.add_argument("--bootstrap-samples", type=int, default=1000,
                        help="image draws of the AP-lost interval (default 1000)")
    parser.add_argument("--reference", choices=("origin", "maskrcnn-serve"), default="origin")
    parser.add_argument("--fresh-reference", action="store_true",
                        help="run the reference again instead of reusing its cached detections (in --work; keyed by "
                             "reference, checkpoint sha256, split and image set)")
    parser.add_argument("--json", type=Path, default=None, help="write the table and run facts as JSON here")
    return parser.parse_args(argv)


@dataclass
class Split:
    """The scored split: its COCO ground truth and the images taken (``--limit``)."""

    coco: COCO
    image_ids: list[int]
    images: list[dict]  # the COCO image entries of image_ids
    dataset: Dataset  # what the served engines are sent


def load_split(args: argparse.Namespace) -> Split:
    from build_tools.coco_eval import load_coco
    from scripts.tools.eval_replay import Dataset

    annotations = args.data / "annotations" / f"instances_{args.split}.json"
    coco = load_coco(annotations)
    image_ids = sorted(coco.getImgIds())[:args.limit] if args.limit else sorted(coco.getImgIds())
    return Split(coco, image_ids, [coco.imgs[i] for i in image_ids],
                 Dataset(annotations, args.data / args.split, coco, image_ids))


def exported(args: argparse.Namespace) -> tuple[str, Path]:
    """The checkpoint's sha256 and its export folder in ``--work``, named by the checkpoint and the
    code that builds (``scripts.tools.build_sources``), so engines built beside it are never stale;
    exported unless there."""
    from build_tools.checkpoint import sha256_of
    from build_tools.pipeline import export_step
    from scripts.tools.build_sources import build_sources_digest

    sha = sha256_of(args.checkpoint)
    export_dir = args.work / f"export-{sha[:12]}-{build_sources_digest()}"
    if not (export_dir / "export.json").is_file():
        export_step(export_dir, str(args.checkpoint))
    return sha, export_dir


def reference_results(args: argparse.Namespace, reference: OriginReference, classes, split: Split,
                      sha: str) -> list[dict]:
    """The reference's COCO results on the split: cached in ``--work``, keyed by the reference (name and
    detail), the checkpoint's sha256, the split and its image set; run unless cached or ``--fresh-reference``."""
    import hashlib

    from scripts.tools.eager import EagerModel, write_eager_results

    ids = tuple(c.id for c in sorted(classes, key=lambda c: c.index))
    key = hashlib.sha256(json.dumps([reference.name, reference.detail, sha, args.split, split.image_ids,
                                     [i["file_name"] for i in split.images]]).encode()).hexdigest()[:12]
    path = args.work / f"reference-{reference.name}-{sha[:12]}-{args.split}-{len(split.image_ids)}-{key}.json"
    if path.is_file() and not args.fresh_reference:
        print(f"reference detections reused from {path}")
    else:
        write_eager_results(EagerModel(reference, ids), split.coco, args.data / args.split, split.image_ids, path)
    return json.loads(path.read_text())


def reference_row(reference: OriginReference, results: list[dict], split: Split, times: list[float],
                  detections: int) -> dict:
    """The reference's row: its ground-truth AP, nothing lost, agreement 1 by definition."""
    from build_tools.coco_eval import evaluate

    ap = evaluate(split.coco, results, split.image_ids)
    return {"backend": reference.name, "precision": "fp32 (eager)", "options": {}, "box_ap": ap["bbox"]["AP"],
            "mask_ap": ap["segm"]["AP"], "box_lost": 0.0, "mask_lost": 0.0,
            "box_lost_95": [0.0, 0.0], "mask_lost_95": [0.0, 0.0], "box_agreement": 1.0,
            "mask_agreement": 1.0, "seconds": statistics.median(times), "vs_eager": 1.0, "detections": detections}


def compiled_variant(args: argparse.Namespace, export_dir: Path, backend: str, precision: str,
                     options: dict[str, str]) -> Path:
    """The engine artifact of one variant next to the export (compiled, unverified, unless there).

    Raises:
        BuildError, UnsupportedPrecision: not buildable here (backend or CPU).
    """
    from build_tools.pipeline import compile_step

    suffix = "".join(f"-{k}-{v}" for k, v in sorted(options.items()))
    artifact = export_dir.with_name(f"{export_dir.name}-{backend}-{precision}{suffix}")
    if not (artifact / "manifest.json").is_file():
        calib = args.calib_images or args.data / "train"
        compile_step(export_dir, artifact, backend=backend, precision=precision, threads=args.threads,
                     calib_images=calib if precision == "int8" else None, calib_count=args.calib_count,
                     run_verify=False, backend_options={backend: options} if options else None)
    return artifact


def served_row(args: argparse.Namespace, artifact: Path, variant: tuple[str, str, dict[str, str]], split: Split,
               reference: list[dict], reference_s: float, jpeg: bytes) -> dict:
    """One engine served on loopback: its AP on the split, AP lost against the reference (with the
    bootstrap interval), agreement with the reference's detections, and its round-trip time."""
    from build_tools.coco_eval import ap_difference, evaluate
    from scripts.tools.service_process import running_service
    from service.manifest import Manifest
    from service.settings import Settings

    backend, precision, options = variant
    manifest = Manifest.load(artifact)
    settings = Settings(engine_dir=artifact, threads=args.threads, max_wait_ms=0)
    with running_service(artifact, settings, concurrency=1) as url:
        results = served_results(url, split.dataset, artifact / "fidelity.progress.jsonl", f"{backend} {precision}")
        served_times, served_detections = time_served(url, jpeg, args.timing_calls)
    ap = evaluate(split.coco, results, split.image_ids)
    lost = ap_difference(split.coco, reference, results, split.image_ids, samples=args.bootstrap_samples)
    agreement = ap_against(reference, results, split.images, split.image_ids)
    served_s = statistics.median(served_times)
    return {"backend": backend, "precision": manifest.precision, "options": options, "box_ap": ap["bbox"]["AP"],
            "mask_ap": ap["segm"]["AP"],
            "box_lost": lost["bbox"]["lost"], "mask_lost": lost["segm"]["lost"],
            "box_lost_95": [lost["bbox"]["low"], lost["bbox"]["high"]],
            "mask_lost_95": [lost["segm"]["low"], lost["segm"]["high"]],
            "box_agreement": agreement["bbox"]["AP"], "mask_agreement": agreement["segm"]["AP"],
            "seconds": served_s, "vs_eager": served_s / reference_s, "detections": served_detections,
            "calibration": manifest.calibration.model_dump() if manifest.calibration else None}


def print_table(args: argparse.Namespace, rows: list[dict], reference_name: str, images: int, cpu: str) -> None:
    print(f"\n{images} images of {args.data}/{args.split}; reference {reference_name}; "
          f"timing: 1333x800 scene, median of {args.timing_calls}, {args.threads} threads; "
          f"CPU {cpu}")
    header = (f"{'backend':<14}{'precision':<14}{'box AP':>8}{'mask AP':>9}{'box lost [95%]':>22}{'mask lost [95%]':>22}"
              f"{'agree box':>10}{'agree mask':>11}{'time s':>8}{'vs eager':>9}{'dets':>6}{'bound':>8}"
              "  goal (lost, time)")
    print(header)
    for r in rows:
        goal = GOALS.get(r["precision"])
        goal_text = "" if goal is None else f"<= {goal[0]}" + (f", <= {goal[1]}x" if goal[1] else "")
        if r.get("skipped"):
            print(f"{r['backend']:<14}{r['precision']:<14}  skipped: {r['skipped']}")
            continue
        print(f"{r['backend']:<14}{r['precision']:<14}{100 * r['box_ap']:8.2f}{100 * r['mask_ap']:9.2f}"
              f"{_lost(r, 'box'):>22}{_lost(r, 'mask'):>22}{100 * r['box_agreement']:10.2f}"
              f"{100 * r['mask_agreement']:11.2f}{r['seconds']:8.3f}{r['vs_eager']:9.3f}{r['detections']:6d}"
              f"{verdict(r):>8}  {goal_text}"
              + "".join(f"  {k}={v}" for k, v in r["options"].items()))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    import torch

    from build_tools.backend_choice import cpu_facts, describe_cpu
    from build_tools.errors import BuildError
    from build_tools.export import read_export_info
    from build_tools.origin import origin_reference
    from service.backends.base import UnsupportedPrecision

    torch.set_num_threads(args.threads)
    split = load_split(args)
    started = time.perf_counter()
    sha, export_dir = exported(args)
    info = read_export_info(export_dir)
    reference = origin_reference(info.checkpoint, asdict(info.inference_config), info.classes, prefer=args.reference)
    print(f"reference: {reference.name} ({reference.detail})")
    reference_detections = reference_results(args, reference, info.classes, split, sha)

    rgb, jpeg = timing_scene(args.timing_objects)
    reference_times, detections = time_reference(reference, rgb, args.timing_calls)
    rows = [reference_row(reference, reference_detections, split, reference_times, detections)]
    for variant in args.variants:
        backend, precision, options = variant
        try:
            artifact = compiled_variant(args, export_dir, backend, precision, options)
        except (BuildError, UnsupportedPrecision) as exc:  # not buildable here (backend or CPU): say so, go on
            print(f"{backend} {precision}: skipped: {exc}", flush=True)
            rows.append({"backend": backend, "precision": precision, "options": options, "skipped": str(exc)})
            continue
        rows.append(served_row(args, artifact, variant, split, reference_detections, rows[0]["seconds"], jpeg))

    for row in rows:
        if not row.get("skipped"):
            row["bound"] = verdict(row)
    cpu = cpu_facts()
    print_table(args, rows, reference.name, len(split.image_ids), describe_cpu(cpu))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "command": " ".join(sys.argv), "reference": reference.record(), "checkpoint": str(args.checkpoint),
            "checkpoint_sha256": sha, "cpu": cpu, "reference_fresh": bool(args.fresh_reference),
            "images": len(split.image_ids), "bootstrap_samples": args.bootstrap_samples,
            "split": args.split, "threads": args.threads,
            "timing_calls": args.timing_calls, "wall_s": time.perf_counter() - started, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
