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
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from build_tools.timing import time_calls


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
    from build_tools.coco_eval import evaluate
    from service.response import coco_body

    results = []
    for image_id, det in zip(image_ids, detections):
        results += coco_body(det.boxes.tolist(), det.scores.tolist(), [category_ids[i] for i in det.labels],
                             det.rles, image_id)
    scores = evaluate(coco, results, image_ids)
    return {"box": 100 * scores["bbox"]["AP"], "mask": 100 * scores["segm"]["AP"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    load_at_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None

    from dataclasses import asdict

    import cv2
    import torch

    from build_tools.backend_choice import AP_BOUNDS, cpu_facts, write_backend_choice
    from build_tools.coco_eval import load_coco
    from build_tools.export import read_export_info
    from build_tools.images import list_images, read_rgb
    from build_tools.origin import origin_reference
    from build_tools.reference import reference_for_export, reference_for_manifest
    from build_tools.verify import ap_against_reference, ap_delta_points, run_detections
    from scripts.demo.eval import split_paths
    from scripts.tools.photos import sample_photo
    from service.backends import (
        backend_names,
        canonical_precision,
        get_backend,
        load_engine,
    )
    from service.backends.base import cpu_cores
    from service.manifest import Manifest
    from service.postprocess import postprocess_image
    from service.preprocess import pad_batch, prepare_image

    image_path = Path(args.image) if args.image else sample_photo("coffee.png")
    rgb = read_rgb(image_path)
    if args.size:
        rgb = np.ascontiguousarray(cv2.resize(rgb, (args.size[1], args.size[0]), interpolation=cv2.INTER_LINEAR))
    threads = args.threads or cpu_cores()
    torch.set_num_threads(threads)

    # the eager reference: the export's model, else the first engine's
    if args.export:
        info = read_export_info(args.export)
        ref_checkpoint, loaded, classes = info.checkpoint, reference_for_export(info), info.classes
        record = asdict(info.inference_config)
        # a fixed-batch graph is fed its whole (padded) batch per request; a mutable one, one image
        batch = 1 if info.shape_mutable else info.batch_size
    else:
        first = Manifest.load(args.engine[0])
        ref_checkpoint, loaded, classes = first.checkpoint, reference_for_manifest(first), first.classes
        record = first.inference_config
        batch = first.batch_size or 1
    reference = loaded.model
    origin = origin_reference(ref_checkpoint, record, classes)
    _progress(f"reference: {origin.name} ({origin.detail})")
    category_ids = [c.id for c in sorted(classes, key=lambda c: c.index)]
    config = reference.config
    spec = config.input_spec()
    score_threshold, mask_threshold = config.score_thresh, config.mask_threshold

    # what to time: given engines, then each backend x precision compiled from the export
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
    total = 1 + (not args.no_stock) + len(plan)

    def time_requests(infer, batch_size: int) -> tuple[list[float], list[float]]:
        """Seconds of each timed request (preprocess, infer, host postprocess with RLE masks) and of
        its engine call: ``--iterations`` of each after ``--warmup`` untimed requests."""
        infers: list[float] = []

        def request() -> None:
            prepared = prepare_image(rgb, spec)
            images, sizes = pad_batch([prepared], spec.pad_divisor, batch_size=batch_size)
            started = time.perf_counter()
            out = infer(images, sizes)
            infers.append(time.perf_counter() - started)
            postprocess_image(out["dets"][0], out["labels"][0], out["masks"][0], prepared.scale_factor,
                              prepared.orig_hw, score_threshold=score_threshold, mask_threshold=mask_threshold)

        totals = time_calls({"request": request}, args.iterations, args.warmup)["request"]
        return totals, infers[args.warmup:]

    ap_prepared, refs = None, None
    if args.ap_images:
        ap_paths = list_images(args.ap_images, args.ap_count)
        _progress(f"AP reference: {origin.name} on {len(ap_paths)} image(s) from {args.ap_images} ...")
        ap_prepared = [prepare_image(read_rgb(path), spec) for path in ap_paths]
        refs = [origin.detect(read_rgb(path)) for path in ap_paths]

    gt_prepared, gt_ids, gt_eager = None, None, None
    if args.gt_data:
        ann, gt_dir = split_paths(args.gt_data, args.gt_split)
        coco = load_coco(ann)
        gt_ids = sorted(coco.getImgIds())[: args.gt_limit] if args.gt_limit else sorted(coco.getImgIds())
        _progress(f"ground truth: {origin.name} on {len(gt_ids)} image(s) of {ann} ...")
        gt_rgbs = [read_rgb(gt_dir / coco.imgs[i]["file_name"]) for i in gt_ids]
        gt_prepared = [prepare_image(image, spec) for image in gt_rgbs]
        dets = [origin.detect(image) for image in gt_rgbs]
        gt_eager = _gt_scores(dets, gt_ids, coco, category_ids)

    rows: list[dict] = []
    step = 0

    def add(row: dict, totals: list[float] | None = None, infers: list[float] | None = None) -> None:
        nonlocal step
        step += 1
        row.setdefault("skipped", None)
        if totals:
            row.update(median_s=statistics.median(totals), min_s=min(totals),
                       infer_median_s=statistics.median(infers) if infers else None)
            _progress(f"[{step}/{total}] {row['engine']}: {row['median_s']:.3f} s/img median "
                      f"({len(totals)} iterations)")
        else:
            row.update(median_s=None, min_s=None, infer_median_s=None)
            _progress(f"[{step}/{total}] {row['engine']}: skipped ({row.get('skipped')})")
        rows.append(row)

    _progress(f"[{step + 1}/{total}] eager PyTorch ({origin.name}): timing ...")
    eager_totals = time_calls({"eager": lambda: origin.detect(rgb)}, args.iterations, args.warmup)["eager"]
    eager_infers = eager_totals  # the reference's whole call is its inference
    add({"engine": f"eager PyTorch ({origin.name}, reference)", "reference": origin.record(), "kind": "eager", "backend": "pytorch", "precision": "fp32",
         "artifact": None, "box_ap_delta_points": 0.0 if refs else None,
         "mask_ap_delta_points": 0.0 if refs else None,
         **({"gt_box_ap": gt_eager["box"], "gt_mask_ap": gt_eager["mask"], "gt_box_ap_delta_points": 0.0,
             "gt_mask_ap_delta_points": 0.0} if gt_eager else {})}, eager_totals, eager_infers)

    if not args.no_stock:
        import onnxruntime as ort

        _progress(f"[{step + 1}/{total}] torchvision stock ONNX: export (cached) and timing ...")
        stock_path = _stock_torchvision_onnx(Path(args.cache), spec.resized_hw(rgb.shape[:2]))
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        session = ort.InferenceSession(str(stock_path), options, providers=["CPUExecutionProvider"])
        stock_input = np.ascontiguousarray(rgb.transpose(2, 0, 1), dtype=np.float32) / 255.0

        def stock_once():
            boxes, labels, scores, masks = session.run(None, {"image": stock_input})
            from pycocotools import mask as mask_utils

            binary = np.asfortranarray((masks[:, 0] > 0.5).transpose(1, 2, 0).astype(np.uint8))
            return mask_utils.encode(binary) if len(scores) else []

        add({"engine": "torchvision stock ONNX (ORT, masks pasted in graph)", "kind": "stock",
             "backend": "onnxruntime", "precision": "fp32", "artifact": str(stock_path),
             "box_ap_delta_points": None, "mask_ap_delta_points": None},
            time_calls({"stock": stock_once}, args.iterations, args.warmup)["stock"])

    for item in plan:
        label = f"{item['backend']} {item['precision']}" if "backend" in item else str(item["artifact"])
        row = {"engine": f"{label} (this project)", "kind": "engine", "backend": item.get("backend"),
               "precision": item.get("precision"), "artifact": None,
               "box_ap_delta_points": None, "mask_ap_delta_points": None}
        if item.get("skipped"):
            add({**row, "skipped": item["skipped"]})
            continue
        try:
            if item.get("compile"):
                _progress(f"[{step + 1}/{total}] {label}: compiling into {args.artifacts} (unless cached) ...")
                item["artifact"] = _compiled_artifact(Path(args.export), info, item["backend"], item["precision"],
                                                      args, threads)
            engine = load_engine(item["artifact"], threads=threads)
        except Exception as exc:  # a backend that cannot build or load this precision here: say so, go on
            add({**row, "skipped": f"{type(exc).__name__}: {exc}"})
            continue
        m = engine.manifest
        row.update(engine=f"{m.backend} {m.precision} (this project)", backend=m.backend, precision=m.precision,
                   artifact=str(item["artifact"]))
        _progress(f"[{step + 1}/{total}] {m.backend} {m.precision}: timing ...")
        totals, infers = time_requests(engine.infer, engine.batch_size or 1)
        if refs is not None:
            same_model = all(getattr(m.checkpoint, k) == getattr(ref_checkpoint, k) for k in ("sha256", "random_init_seed"))
            if same_model and (engine.batch_size or 1) == batch:
                _progress(f"[{step + 1}/{total}] {m.backend} {m.precision}: AP on {len(ap_prepared)} image(s) ...")
                engs, _ = run_detections(engine.infer, ap_prepared, batch_size=batch, divisor=spec.pad_divisor,
                                         mask_threshold=mask_threshold, paste=config.paste_rule, warmup=0)
                ap = ap_against_reference(refs, engs)
                delta = ap_delta_points(ap)
                row.update(box_ap=ap["box_ap"], mask_ap=ap["mask_ap"], box_ap_delta_points=delta["box"],
                           mask_ap_delta_points=delta["mask"])
            else:
                row["ap_note"] = "not scored: another checkpoint or batch size than the reference"
        if gt_eager is not None and (engine.batch_size or 1) == batch:
            _progress(f"[{step + 1}/{total}] {m.backend} {m.precision}: ground-truth AP on {len(gt_ids)} image(s) ...")
            dets, _ = run_detections(engine.infer, gt_prepared, batch_size=batch, divisor=spec.pad_divisor,
                                     mask_threshold=mask_threshold, paste=config.paste_rule, warmup=0)
            gt = _gt_scores(dets, gt_ids, coco, category_ids)
            row.update(gt_box_ap=gt["box"], gt_mask_ap=gt["mask"], gt_box_ap_delta_points=gt_eager["box"] - gt["box"],
                       gt_mask_ap_delta_points=gt_eager["mask"] - gt["mask"])
        del engine
        add(row, totals, infers)

    eager_median = statistics.median(eager_totals)
    eager_infer_median = statistics.median(eager_infers)
    for row in rows:
        row["ratio_to_eager"] = row["median_s"] / eager_median if row["median_s"] is not None else None
        row["infer_ratio_to_eager"] = (row["infer_median_s"] / eager_infer_median
                                       if row.get("infer_median_s") is not None else None)
        row["ap_images"] = len(ap_prepared) if ap_prepared is not None else None

    print(f"image {image_path.name} resized to {rgb.shape[0]}x{rgb.shape[1]} (HxW), threads {threads}, "
          f"{args.iterations} iterations after {args.warmup} warm-up; ratios to eager PyTorch in this run; "
          f"s = a whole request (preprocess + infer + postprocess), infer s = the engine call"
          + (f"; dAP = AP points lost against eager fp32 on {len(ap_prepared)} image(s)" if ap_prepared else "")
          + (f"; gt AP / gt dAP = pycocotools AP x100 on {len(gt_ids)} {args.gt_split} image(s) of {args.gt_data} "
             "and eager's minus the engine's" if gt_ids else ""))
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
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")

    if args.write_choice:
        random_init = ref_checkpoint.format == "random-init"
        reasons = []
        if random_init:
            reasons.append("random-init weights: AP deltas mean nothing, so no AP bound was applied")
        if not ap_prepared and not gt_ids:
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
        measured = {
            "quality": "smoke" if reasons else "full",
            "quality_reasons": reasons,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": "python -m scripts.bench.build " + shlex.join(sys.argv[1:] if argv is None else argv),
            "cpu": cpu_facts(),
            "threads": threads,
            "load_average_at_start": load_at_start,
            "input_hw": list(rgb.shape[:2]),
            "image": image_path.name,
            "iterations": args.iterations,
            "warmup": args.warmup,
            "ap_images": len(ap_prepared) if ap_prepared else None,
            "gt_images": len(gt_ids) if gt_ids else None,
            "gt_data": args.gt_data,
            "checkpoint": ref_checkpoint.model_dump(include={"format", "source", "sha256"}),
            "versions": versions,
            "statistic": "median seconds per request (host preprocess + infer + host postprocess) at input_hw; "
                         "ratio_to_eager against eager PyTorch in the same run",
        }
        table = write_backend_choice(args.write_choice, rows, measured, ap_bounds={} if random_init else AP_BOUNDS)
        choice, notes = table["choice"], table["measured"]["notes"]
        print(f"wrote {args.write_choice} ({measured['quality']}): "
              + (", ".join(f"{k} -> {v['backend']}" for k, v in choice.items()) or "no choice")
              + (f"; {'; '.join(notes)}" if notes else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
