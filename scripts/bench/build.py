"""Engine speed (and optionally AP) against eager PyTorch, measured in one run on the same image.

Rows: eager PyTorch (the checkpoint's origin reference, ``build_tools.origin``: mmdet's own model
where installed, torchvision's for torchvision checkpoints, else this project's eager model; its
whole call, decoded image in and pasted masks out), torchvision's stock ONNX
export run by ONNX Runtime (full-image masks pasted inside the graph), each given engine artifact,
and, with ``--export DIR``, one engine per backend and precision compiled from that export folder
(``maskrcnn-build export``) into a cache (``--artifacts``; reused when present). Every row includes
its host work (preprocess and the host postprocess: box rescale, mask paste, RLE), so the ratios
compare what a request costs; ``infer s`` is the engine call alone. The image is resized to a fixed
800x1333 input first (``--size``). Ratios are to eager PyTorch in the same run, never to goals.

With ``--ap-images DIR`` every engine also runs on those images and its box/mask AP is scored
against the eager fp32 reference's detections (build_tools/verify.py): ``dAP`` = AP points lost.
With ``--gt-data DIR`` (a COCO-layout dataset such as the demo data; ``--gt-split``, ``--gt-limit``)
eager PyTorch and every engine are also scored against the dataset's ground truth with pycocotools:
``gt dAP`` = eager's AP minus the engine's, in points, the measure the AP bounds below apply to
(the reference-scored ``dAP`` counts every reshuffled low-score detection as a loss and is far
stricter).
``--write-choice PATH`` writes the table ``maskrcnn-build --backend auto`` reads, with the policy
of ``build_tools.backend_choice``: per precision, the fastest backend among those within the
precision's AP bound (when AP was measured).

    python -m scripts.bench.build --engine artifacts/fp32 --engine artifacts/int8 [--image IMG]
    python -m scripts.bench.build --export EXPORT_DIR --backends onnxruntime,openvino \\
        --precisions fp32,bf16,int8 --calib-images DIR --ap-images DIR \\
        --write-choice build_tools/backend_choice.json
    python -m scripts.bench.build --export EXPORT_DIR --backends onnxruntime,openvino \\
        --precisions fp32,bf16,int8 --calib-images .cache/demo/data/train --gt-data .cache/demo/data \\
        --gt-limit 20 --write-choice build_tools/backend_choice.json
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from build_tools.timing import time_calls, timed

if TYPE_CHECKING:  # heavy modules load after the arguments are parsed
    from pycocotools.coco import COCO

    from build_tools.export import ExportInfo
    from build_tools.model import InferenceConfig
    from build_tools.origin import OriginReference
    from service.manifest import CheckpointInfo
    from service.postprocess import ImageDetections
    from service.preprocess import InputSpec, PreparedImage


def _stock_torchvision_onnx(cache: Path, hw: tuple[int, int]) -> Path:
    """torchvision's maskrcnn_resnet50_fpn exported the stock way (random weights: timing only)."""
    import torch
    import torchvision

    path = cache / "torchvision_stock_maskrcnn.onnx"
    if path.is_file():
        return path
    cache.mkdir(parents=True, exist_ok=True)
    model = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None).eval()
    image = torch.rand(3, *hw)
    torch.onnx.export(model, ([image],), str(path), dynamo=False, opset_version=17, input_names=["image"],
                      output_names=["boxes", "labels", "scores", "masks"],
                      dynamic_axes={"image": {1: "h", 2: "w"}})
    return path


def _csv(text: str) -> list[str]:
    return list(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))


def _size(text: str) -> tuple[int, int] | None:
    if text == "native":
        return None
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--size is HxW (e.g. 800x1333) or native, not {text!r}") from exc
    return h, w


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _compiled_artifact(export: Path, info, backend: str, precision: str, args, threads: int) -> Path:
    """The artifact of ``export`` (its ``build_tools.export.ExportInfo`` is ``info``) for
    ``backend``/``precision`` in the cache, compiled (unverified) if missing."""
    from build_tools.images import image_set_hash, list_images
    from build_tools.pipeline import compile_step

    name = f"{backend}-{precision}"
    if precision == "int8":
        calib = list_images(args.calib_images, args.calib_count)
        name += f"-calib{len(calib)}-{image_set_hash(calib)[:8]}"
    shape = f"mut{info.batch_size}" if info.shape_mutable else f"b{info.batch_size}"
    folder = Path(args.artifacts) / f"{info.onnx_sha256[:16]}-{shape}" / name
    if not (folder / "manifest.json").is_file():
        compile_step(export, folder, backend=backend, precision=precision, calib_images=args.calib_images,
                     calib_count=args.calib_count, run_verify=False, threads=threads, progress=False)
    return folder


def _gt_scores(detections, image_ids, coco, category_ids) -> dict[str, float]:
    """pycocotools box and mask AP (x100) of per-image detections on ``image_ids`` of ``coco``
    (``category_ids``: the category id of each label, the model's class table)."""
    from build_tools.coco_eval import detections_ap

    return dict(zip(("box", "mask"), detections_ap(coco, image_ids, detections, category_ids)))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m scripts.bench.build", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", action="append", default=[], help="engine artifact folder (repeatable)")
    p.add_argument("--export", help="export folder (maskrcnn-build export): compile and time --backends x --precisions")
    p.add_argument("--backends", type=_csv, default=None,
                   help="with --export: comma list of backends (default: every registered backend)")
    p.add_argument("--precisions", type=_csv, default=["fp32"], help="with --export: comma list (default fp32)")
    p.add_argument("--calib-images", help="with --export: calibration images for int8 (int8 rows are skipped without)")
    p.add_argument("--calib-count", type=int, default=16)
    p.add_argument("--artifacts", default=".cache/bench/artifacts", help="cache of the engines compiled from --export")
    p.add_argument("--ap-images", help="folder of images to score every engine's AP against eager fp32 on")
    p.add_argument("--ap-count", type=int, default=None, help="use at most this many --ap-images")
    p.add_argument("--gt-data", help="COCO-layout dataset folder: also score ground-truth AP (e.g. .cache/demo/data)")
    p.add_argument("--gt-split", default="val", help="split of --gt-data (default val)")
    p.add_argument("--gt-limit", type=int, default=None, help="first N images of the split by id (default all)")
    p.add_argument("--image", help="image file (default: scikit-image's 'coffee' photo)")
    p.add_argument("--size", type=_size, default=(800, 1333),
                   help="HxW the image is resized to before the host preprocess (default 800x1333); native: as is")
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-stock", action="store_true", help="skip torchvision's stock ONNX export row")
    p.add_argument("--cache", default=".cache/bench", help="where the stock export is kept")
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("--write-choice", metavar="PATH",
                   help="write the --backend auto table (fastest backend per precision within its AP bound) here")
    args = p.parse_args(argv)
    if not args.engine and not args.export:
        p.error("give --engine ARTIFACT (repeatable) and/or --export DIR")
    return args


@dataclass
class GroundTruth:
    """``--gt-data``: the split's images (ids, prepared inputs) and eager PyTorch's AP on them."""

    coco: COCO
    image_ids: list[int]
    prepared: list[PreparedImage]
    eager: dict[str, float]


@dataclass
class Bench:
    """What every row is measured against: the timed image, the eager reference and its settings,
    and the images AP is scored on."""

    args: argparse.Namespace
    image_path: Path
    rgb: np.ndarray
    threads: int
    export_info: ExportInfo | None  # of --export
    checkpoint: CheckpointInfo  # the reference's
    origin: OriginReference
    config: InferenceConfig
    spec: InputSpec
    category_ids: list[int]  # by label index
    batch: int  # images per AP batch: a fixed-batch graph is fed its whole (padded) batch, a mutable one one image
    ap_prepared: list[PreparedImage] | None = None
    refs: list[ImageDetections] | None = None  # the reference's detections on ap_prepared
    gt: GroundTruth | None = None


def load_bench(args: argparse.Namespace) -> Bench:
    """The timed image, the eager reference (the export's model, else the first engine's) and the
    AP images of ``args``."""
    import cv2
    import torch

    from build_tools.export import read_export_info
    from build_tools.images import read_rgb
    from build_tools.origin import origin_reference
    from build_tools.reference import reference_for_export, reference_for_manifest
    from scripts.tools.photos import sample_photo
    from service.backends.base import cpu_cores
    from service.manifest import Manifest

    image_path = Path(args.image) if args.image else sample_photo("coffee.png")
    rgb = read_rgb(image_path)
    if args.size:
        rgb = np.ascontiguousarray(cv2.resize(rgb, (args.size[1], args.size[0]), interpolation=cv2.INTER_LINEAR))
    threads = args.threads or cpu_cores()
    torch.set_num_threads(threads)

    info = None
    if args.export:
        info = read_export_info(args.export)
        checkpoint, loaded, classes = info.checkpoint, reference_for_export(info), info.classes
        record = asdict(info.inference_config)
        batch = 1 if info.shape_mutable else info.batch_size
    else:
        first = Manifest.load(args.engine[0])
        checkpoint, loaded, classes = first.checkpoint, reference_for_manifest(first), first.classes
        record = first.inference_config
        batch = first.batch_size or 1
    origin = origin_reference(checkpoint, record, classes)
    _progress(f"reference: {origin.name} ({origin.detail})")
    config = loaded.model.config
    bench = Bench(args=args, image_path=image_path, rgb=rgb, threads=threads, export_info=info,
                  checkpoint=checkpoint, origin=origin, config=config, spec=config.input_spec(),
                  category_ids=[c.id for c in sorted(classes, key=lambda c: c.index)], batch=batch)
    if args.ap_images:
        bench.ap_prepared, bench.refs = _ap_reference(bench)
    if args.gt_data:
        bench.gt = _ground_truth(bench)
    return bench


def _ap_reference(bench: Bench) -> tuple[list[PreparedImage], list[ImageDetections]]:
    """The ``--ap-images`` prepared for the engines, and the eager reference's detections on them."""
    from build_tools.images import list_images, read_rgb
    from service.preprocess import prepare_image

    args = bench.args
    paths = list_images(args.ap_images, args.ap_count)
    _progress(f"AP reference: {bench.origin.name} on {len(paths)} image(s) from {args.ap_images} ...")
    prepared = [prepare_image(read_rgb(path), bench.spec) for path in paths]
    return prepared, [bench.origin.detect(read_rgb(path)) for path in paths]


def _ground_truth(bench: Bench) -> GroundTruth:
    """The ``--gt-data`` split's first ``--gt-limit`` images and eager PyTorch's AP on them."""
    from build_tools.coco_eval import load_coco
    from build_tools.images import read_rgb
    from scripts.demo.eval import split_paths
    from service.preprocess import prepare_image

    args = bench.args
    ann, gt_dir = split_paths(args.gt_data, args.gt_split)
    coco = load_coco(ann)
    ids = sorted(coco.getImgIds())[: args.gt_limit] if args.gt_limit else sorted(coco.getImgIds())
    _progress(f"ground truth: {bench.origin.name} on {len(ids)} image(s) of {ann} ...")
    rgbs = [read_rgb(gt_dir / coco.imgs[i]["file_name"]) for i in ids]
    eager = _gt_scores([bench.origin.detect(image) for image in rgbs], ids, coco, bench.category_ids)
    return GroundTruth(coco, ids, [prepare_image(image, bench.spec) for image in rgbs], eager)


def plan_engines(args: argparse.Namespace) -> list[dict]:
    """The engine rows to measure: the given engines, then each backend x precision compiled from
    the export (``skipped`` says why one cannot be built here)."""
    from service.backends import backend_names, canonical_precision, get_backend

    plan: list[dict] = [{"kind": "engine", "artifact": Path(e)} for e in args.engine]
    if args.export:
        for backend in args.backends or backend_names():
            module = get_backend(backend)
            for precision in (canonical_precision(x) for x in args.precisions):
                row = {"kind": "engine", "backend": backend, "precision": precision, "compile": True}
                ok, reason = module.available()
                if not ok:
                    row["skipped"] = reason
                elif precision not in module.PRECISIONS:
                    row["skipped"] = f"{backend} offers {', '.join(module.PRECISIONS)}"
                elif precision == "int8" and not args.calib_images:
                    row["skipped"] = "int8 needs --calib-images"
                plan.append(row)
    return plan


class Rows:
    """The measured rows, in order, each announced on stderr as ``[step/total]``."""

    def __init__(self, total: int):
        self.total, self.rows = total, []

    def step(self, message: str) -> None:
        _progress(f"[{len(self.rows) + 1}/{self.total}] {message}")

    def add(self, row: dict, totals: list[float] | None = None, infers: list[float] | None = None) -> None:
        row.setdefault("skipped", None)
        if totals:
            row.update(median_s=statistics.median(totals), min_s=min(totals),
                       infer_median_s=statistics.median(infers) if infers else None)
            self.step(f"{row['engine']}: {row['median_s']:.3f} s/img median ({len(totals)} iterations)")
        else:
            row.update(median_s=None, min_s=None, infer_median_s=None)
            self.step(f"{row['engine']}: skipped ({row.get('skipped')})")
        self.rows.append(row)


def time_requests(bench: Bench, infer, batch_size: int) -> tuple[list[float], list[float]]:
    """Seconds of each timed request (preprocess, infer, host postprocess with RLE masks) and of
    its engine call: ``--iterations`` of each after ``--warmup`` untimed requests."""
    from service.postprocess import postprocess_image
    from service.preprocess import pad_batch, prepare_image

    spec, config = bench.spec, bench.config
    infers: list[float] = []

    def request() -> None:
        prepared = prepare_image(bench.rgb, spec)
        images, sizes = pad_batch([prepared], spec.pad_divisor, batch_size=batch_size)
        out, seconds = timed(infer, images, sizes)
        infers.append(seconds)
        postprocess_image(out["dets"][0], out["labels"][0], out["masks"][0], prepared.scale_factor,
                          prepared.orig_hw, score_threshold=config.score_thresh,
                          mask_threshold=config.mask_threshold)

    totals = time_calls({"request": request}, bench.args.iterations, bench.args.warmup)["request"]
    return totals, infers[bench.args.warmup:]


def measure_eager(bench: Bench, rows: Rows) -> list[float]:
    """Time eager PyTorch's whole call (its inference: decoded image in, pasted masks out); its
    row is the reference of every AP delta. Returns its seconds per request."""
    origin = bench.origin
    rows.step(f"eager PyTorch ({origin.name}): timing ...")
    totals = time_calls({"eager": lambda: origin.detect(bench.rgb)}, bench.args.iterations,
                        bench.args.warmup)["eager"]
    gt = bench.gt
    rows.add({"engine": f"eager PyTorch ({origin.name}, reference)", "reference": origin.record(), "kind": "eager",
              "backend": "pytorch", "precision": "fp32", "artifact": None,
              "box_ap_delta_points": 0.0 if bench.refs else None,
              "mask_ap_delta_points": 0.0 if bench.refs else None,
              **({"gt_box_ap": gt.eager["box"], "gt_mask_ap": gt.eager["mask"], "gt_box_ap_delta_points": 0.0,
                  "gt_mask_ap_delta_points": 0.0} if gt else {})}, totals, totals)
    return totals


def measure_stock(bench: Bench, rows: Rows) -> None:
    """Time torchvision's stock ONNX export under ONNX Runtime (full-image masks pasted in the
    graph, RLE-encoded after)."""
    import onnxruntime as ort
    from pycocotools import mask as mask_utils

    rows.step("torchvision stock ONNX: export (cached) and timing ...")
    rgb = bench.rgb
    stock_path = _stock_torchvision_onnx(Path(bench.args.cache), bench.spec.resized_hw(rgb.shape[:2]))
    options = ort.SessionOptions()
    options.intra_op_num_threads = bench.threads
    session = ort.InferenceSession(str(stock_path), options, providers=["CPUExecutionProvider"])
    stock_input = np.ascontiguousarray(rgb.transpose(2, 0, 1), dtype=np.float32) / 255.0

    def stock_once():
        boxes, labels, scores, masks = session.run(None, {"image": stock_input})
        binary = np.asfortranarray((masks[:, 0] > 0.5).transpose(1, 2, 0).astype(np.uint8))
        return mask_utils.encode(binary) if len(scores) else []

    rows.add({"engine": "torchvision stock ONNX (ORT, masks pasted in graph)", "kind": "stock",
              "backend": "onnxruntime", "precision": "fp32", "artifact": str(stock_path),
              "box_ap_delta_points": None, "mask_ap_delta_points": None},
             time_calls({"stock": stock_once}, bench.args.iterations, bench.args.warmup)["stock"])


def measure_engine(bench: Bench, item: dict, rows: Rows) -> None:
    """Compile (unless cached) or load one planned engine, time it, and score its AP where the
    reference's detections apply; a backend that cannot build or load it here is a skipped row."""
    from service.backends import load_engine

    args = bench.args
    label = f"{item['backend']} {item['precision']}" if "backend" in item else str(item["artifact"])
    row = {"engine": f"{label} (this project)", "kind": "engine", "backend": item.get("backend"),
           "precision": item.get("precision"), "artifact": None,
           "box_ap_delta_points": None, "mask_ap_delta_points": None}
    if item.get("skipped"):
        rows.add({**row, "skipped": item["skipped"]})
        return
    try:
        if item.get("compile"):
            rows.step(f"{label}: compiling into {args.artifacts} (unless cached) ...")
            item["artifact"] = _compiled_artifact(Path(args.export), bench.export_info, item["backend"],
                                                  item["precision"], args, bench.threads)
        engine = load_engine(item["artifact"], threads=bench.threads)
    except Exception as exc:  # a backend that cannot build or load this precision here: say so, go on
        rows.add({**row, "skipped": f"{type(exc).__name__}: {exc}"})
        return
    m = engine.manifest
    row.update(engine=f"{m.backend} {m.precision} (this project)", backend=m.backend, precision=m.precision,
               artifact=str(item["artifact"]))
    rows.step(f"{m.backend} {m.precision}: timing ...")
    totals, infers = time_requests(bench, engine.infer, engine.batch_size or 1)
    same_batch = (engine.batch_size or 1) == bench.batch
    if bench.refs is not None:
        same_model = all(getattr(m.checkpoint, k) == getattr(bench.checkpoint, k)
                         for k in ("sha256", "random_init_seed"))
        if same_model and same_batch:
            rows.step(f"{m.backend} {m.precision}: AP on {len(bench.ap_prepared)} image(s) ...")
            row.update(_reference_ap(bench, engine))
        else:
            row["ap_note"] = "not scored: another checkpoint or batch size than the reference"
    if bench.gt is not None and same_batch:
        rows.step(f"{m.backend} {m.precision}: ground-truth AP on {len(bench.gt.image_ids)} image(s) ...")
        row.update(_ground_truth_ap(bench, engine))
    del engine
    rows.add(row, totals, infers)


def _detections(bench: Bench, engine, prepared: list[PreparedImage]) -> list[ImageDetections]:
    from build_tools.verify import run_detections

    detections, _ = run_detections(engine.infer, prepared, batch_size=bench.batch, divisor=bench.spec.pad_divisor,
                                   mask_threshold=bench.config.mask_threshold, paste=bench.config.paste_rule,
                                   warmup=0)
    return detections


def _reference_ap(bench: Bench, engine) -> dict:
    """The engine's box/mask AP against the eager reference's detections, and the points lost."""
    from build_tools.verify import ap_against_reference, ap_delta_points

    ap = ap_against_reference(bench.refs, _detections(bench, engine, bench.ap_prepared))
    delta = ap_delta_points(ap)
    return {"box_ap": ap["box_ap"], "mask_ap": ap["mask_ap"], "box_ap_delta_points": delta["box"],
            "mask_ap_delta_points": delta["mask"]}


def _ground_truth_ap(bench: Bench, engine) -> dict:
    """The engine's ground-truth AP (x100) and eager's minus it, in points."""
    gt = bench.gt
    scores = _gt_scores(_detections(bench, engine, gt.prepared), gt.image_ids, gt.coco, bench.category_ids)
    return {"gt_box_ap": scores["box"], "gt_mask_ap": scores["mask"],
            "gt_box_ap_delta_points": gt.eager["box"] - scores["box"],
            "gt_mask_ap_delta_points": gt.eager["mask"] - scores["mask"]}


def add_ratios(bench: Bench, rows: list[dict], eager_totals: list[float]) -> None:
    """Each row's median time (whole request, and engine call) as a ratio to eager PyTorch's."""
    eager_median = statistics.median(eager_totals)  # eager's whole call is its inference too
    for row in rows:
        row["ratio_to_eager"] = row["median_s"] / eager_median if row["median_s"] is not None else None
        row["infer_ratio_to_eager"] = (row["infer_median_s"] / eager_median
                                       if row.get("infer_median_s") is not None else None)
        row["ap_images"] = len(bench.ap_prepared) if bench.ap_prepared is not None else None


def print_table(bench: Bench, rows: list[dict]) -> None:
    args, rgb, gt = bench.args, bench.rgb, bench.gt
    print(f"image {bench.image_path.name} resized to {rgb.shape[0]}x{rgb.shape[1]} (HxW), threads {bench.threads}, "
          f"{args.iterations} iterations after {args.warmup} warm-up; ratios to eager PyTorch in this run; "
          f"s = a whole request (preprocess + infer + postprocess), infer s = the engine call"
          + (f"; dAP = AP points lost against eager fp32 on {len(bench.ap_prepared)} image(s)"
             if bench.ap_prepared else "")
          + (f"; gt AP / gt dAP = pycocotools AP x100 on {len(gt.image_ids)} {args.gt_split} image(s) of "
             f"{args.gt_data} and eager's minus the engine's" if gt and gt.image_ids else ""))
    print(f"{'backend':12s} {'precision':9s} {'median s':>9s} {'infer s':>8s} {'min s':>7s} {'x eager':>8s} "
          f"{'box dAP':>8s} {'mask dAP':>8s} {'gt box AP':>9s} {'gt mask AP':>10s} {'gt box dAP':>10s} "
          f"{'gt mask dAP':>11s}  row")
    fmt = lambda v, f: f"{v:{f}}" if v is not None else "-"  # noqa: E731
    for row in rows:
        print(f"{row['backend'] or '-':12s} {row['precision'] or '-':9s} {fmt(row['median_s'], '9.3f'):>9s} "
              f"{fmt(row['infer_median_s'], '8.3f'):>8s} {fmt(row['min_s'], '7.3f'):>7s} "
              f"{fmt(row['ratio_to_eager'], '8.2f'):>8s} {fmt(row['box_ap_delta_points'], '8.2f'):>8s} "
              f"{fmt(row['mask_ap_delta_points'], '8.2f'):>8s} {fmt(row.get('gt_box_ap'), '9.2f'):>9s} "
              f"{fmt(row.get('gt_mask_ap'), '10.2f'):>10s} {fmt(row.get('gt_box_ap_delta_points'), '10.2f'):>10s} "
              f"{fmt(row.get('gt_mask_ap_delta_points'), '11.2f'):>11s}  "
              + (row["engine"] if not row.get("skipped") else f"{row['engine']}: skipped, {row['skipped']}"))


def measurement(bench: Bench, argv: list[str] | None, load_at_start: float | None) -> dict:
    """How the rows were measured, for the choice table: ``quality`` is ``smoke`` (with the
    reasons) unless AP was measured on trained weights, over 3 or more iterations, on a quiet machine."""
    import torch

    from build_tools.backend_choice import cpu_facts

    args, gt = bench.args, bench.gt
    reasons = []
    if bench.checkpoint.format == "random-init":
        reasons.append("random-init weights: AP deltas mean nothing, so no AP bound was applied")
    if not bench.ap_prepared and not (gt and gt.image_ids):
        reasons.append("AP not measured (no --ap-images or --gt-data): chosen on speed alone")
    if args.iterations < 3:
        reasons.append(f"{args.iterations} iteration(s)")
    if load_at_start is not None and load_at_start > 0.5:
        reasons.append(f"machine not quiet: 1-minute load average {load_at_start:.2f} at the start")
    versions = {"torch": torch.__version__}
    for name in ("onnxruntime", "openvino"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            pass
    return {
        "quality": "smoke" if reasons else "full",
        "quality_reasons": reasons,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m scripts.bench.build " + shlex.join(sys.argv[1:] if argv is None else argv),
        "cpu": cpu_facts(),
        "threads": bench.threads,
        "load_average_at_start": load_at_start,
        "input_hw": list(bench.rgb.shape[:2]),
        "image": bench.image_path.name,
        "iterations": args.iterations,
        "warmup": args.warmup,
        "ap_images": len(bench.ap_prepared) if bench.ap_prepared else None,
        "gt_images": len(gt.image_ids) if gt and gt.image_ids else None,
        "gt_data": args.gt_data,
        "checkpoint": bench.checkpoint.model_dump(include={"format", "source", "sha256"}),
        "versions": versions,
        "statistic": "median seconds per request (host preprocess + infer + host postprocess) at input_hw; "
                     "ratio_to_eager against eager PyTorch in the same run",
    }


def write_choice(bench: Bench, rows: list[dict], measured: dict) -> None:
    """Write the ``--backend auto`` table (no AP bound on random-init weights) and say what it chose."""
    from build_tools.backend_choice import AP_BOUNDS, write_backend_choice

    path = bench.args.write_choice
    random_init = bench.checkpoint.format == "random-init"
    table = write_backend_choice(path, rows, measured, ap_bounds={} if random_init else AP_BOUNDS)
    notes = table.measured.notes
    print(f"wrote {path} ({measured['quality']}): "
          + (", ".join(f"{k} -> {v.backend}" for k, v in table.choice.items()) or "no choice")
          + (f"; {'; '.join(notes)}" if notes else ""))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load_at_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    plan = plan_engines(args)
    bench = load_bench(args)
    rows = Rows(1 + (not args.no_stock) + len(plan))
    eager_totals = measure_eager(bench, rows)
    if not args.no_stock:
        measure_stock(bench, rows)
    for item in plan:
        measure_engine(bench, item, rows)
    add_ratios(bench, rows.rows, eager_totals)
    print_table(bench, rows.rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows.rows, indent=2) + "\n")
    if args.write_choice:
        write_choice(bench, rows.rows, measurement(bench, argv, load_at_start))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
