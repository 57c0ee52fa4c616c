"""``maskrcnn-build``: checkpoint -> ONNX -> verified engine artifact.

Subcommands: ``export``, ``compile``, ``verify``, ``all`` (export + compile + verify in one call),
``fetch`` (download a published checkpoint by name).
``compile`` and ``all`` build one artifact per ``--precision`` given (``OUT/<backend>-<precision>``
when several) and print a precision report: AP points lost against the eager fp32 reference and
seconds per image of the engine and of eager PyTorch on the verify images.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from build_tools.backend_choice import AUTO_BACKEND, BACKEND_CHOICE, MEASURE_ROUNDS, LabelledImages
from build_tools.backends.onnxruntime import ACTIVATION_RANGES
from build_tools.checkpoint import (
    CHECKPOINT_CACHE,
    KNOWN_CHECKPOINTS,
    CheckpointError,
    fetch_checkpoint,
)
from build_tools.classes import ClassesError
from build_tools.errors import BuildError
from build_tools.export import ExportError, read_export_info
from build_tools.pipeline import compile_step, export_step
from build_tools.verify import Tolerance, verify_artifact
from service.backends import BackendUnavailable, backend_names, canonical_precision
from service.backends.base import PRECISION_ALIASES, BuildFailed, UnsupportedPrecision
from service.manifest import Manifest, ManifestError


def _add_source_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help=f"checkpoint file, or a published name to download: {', '.join(KNOWN_CHECKPOINTS)}")
    src.add_argument("--random-init", action="store_true", help="random weights (no checkpoint): smoke runs and tests")
    p.add_argument("--seed", type=int, default=0, help="seed for --random-init (default 0)")
    p.add_argument("--format", default="auto", choices=["auto", "mmdet", "torchvision"],
                   help="checkpoint format (default: detected from its keys)")
    p.add_argument("--origin", default="mmdet", choices=["mmdet", "torchvision"],
                   help="test settings for --random-init (a checkpoint's own format decides otherwise)")
    p.add_argument("--batch-size", "--batch_size", type=int, default=1, help="fixed batch size of the graph (default 1)")
    p.add_argument("--shape-mutable", "--shape_mutable", action="store_true",
                   help="dynamic batch dimension: one engine runs batches of 1..--batch-size (the largest "
                        "batch, >= 2), each image's result the same as alone")
    p.add_argument("--score-threshold", type=float, default=None,
                   help="detection score threshold baked into the graph (default: the origin's, 0.05)")
    p.add_argument("--classes", metavar="FILE", default=None,
                   help="class names, one a line or a JSON list, in label order: for checkpoints without names "
                        "in their meta (torchvision's), or to override them; their count must fit the head "
                        "(default: the checkpoint's meta, else COCO's 80 for a COCO-sized head)")
    p.add_argument("--categories", metavar="ANN_JSON", default=None,
                   help="a COCO annotation file whose categories give each class's id by name (default: COCO's "
                        "ids when every name is a COCO class, else 1..N)")
    p.add_argument("--style", default=None, choices=["pytorch", "caffe"],
                   help="ResNet style of an mmdet checkpoint whose meta does not record its config (default: "
                        "the meta's config, the published checkpoint's entry, else pytorch); caffe = BGR "
                        "weights, std 1, stride on the 1x1 conv")


def _add_compile_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default="onnxruntime", choices=[*backend_names(), AUTO_BACKEND],
                   help="engine backend (default onnxruntime); auto: compile every available backend, time each "
                        "on this machine (a synthetic photo at the engine's opt size, %d interleaved calls after a "
                        "warm-up, median) and keep the fastest; fp32 unless --verify-ann proves a reduced "
                        "precision's AP" % MEASURE_ROUNDS)
    p.add_argument("--no-measure", action="store_true",
                   help="--backend auto: read the fastest backend per precision from --backend-choice (measured on "
                        "another machine) instead of measuring here")
    p.add_argument("--backend-choice", default=str(BACKEND_CHOICE), metavar="JSON",
                   help="the table --backend auto --no-measure reads (default build_tools/backend_choice.json, "
                        "written by scripts/bench/build.py --write-choice)")
    p.add_argument("--verify-ann", metavar="ANN_JSON", default=None,
                   help="--backend auto without --precision: a COCO annotation file of labelled images (file_name "
                        "relative to --verify-images, else to the file's folder; at most --verify-count); bf16 and "
                        "int8 (with --calib-images) candidates are then built too, and one is kept when faster and "
                        "its box and mask AP there stay within its bound of the fastest fp32 engine's")
    p.add_argument("--precision", action="append", type=_precision_list, default=None, metavar="P[,P...]",
                   help=f"fp32 (default), bf16, int8, ... or the seed's aliases ({', '.join(PRECISION_ALIASES)}); "
                        "repeat or give a comma list to build one artifact per precision, in OUT/<backend>-<precision>")
    p.add_argument("--calib-images", help="folder of real images for int8 calibration")
    p.add_argument("--calib-count", type=int, default=16, help="calibration images to use (default 16)")
    _add_verify_args(p)
    p.add_argument("--no-verify", action="store_true", help="skip the parity check against eager PyTorch")
    p.add_argument("--tensorrt-timing-cache", metavar="PATH", default=None,
                   help="tensorrt: a timing cache shared between builds, read when present and rewritten after "
                        "each build (kernel timing is most of a build's time)")
    p.add_argument("--openvino-bf16-roi-align", choices=("bf16", "fp32"), default="bf16",
                   help="openvino bf16: the precision RoIAlign samples the (bf16) features at; its RoI coordinates "
                        "are fp32 either way. bf16 (default) or fp32 (RoIAlign 1.4-1.6x bf16's time, 800x1344, "
                        "2 AMX cores)")
    p.add_argument("--openvino-bf16-predictors", choices=("fp32", "bf16"), default="fp32",
                   help="openvino bf16: the precision of the layers whose outputs are read as numbers (RPN and box "
                        "predictor logits and deltas, mask logits): fp32 (default) or bf16")
    p.add_argument("--onnxruntime-int8-ranges", choices=ACTIVATION_RANGES, default=ACTIVATION_RANGES[0],
                   help="onnxruntime int8: each activation's range is the mean (default) or the extremes of its "
                        "per-image min/max over the calibration images")
    p.add_argument("--allow-parity-failure", action="store_true", help="emit the engine even if it misses its tolerance")


def _precision_list(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError("empty precision list")
    for name in names:
        try:
            canonical_precision(name)
        except UnsupportedPrecision as exc:
            raise argparse.ArgumentTypeError(str(exc)) from exc
    return names


def _precisions(args: argparse.Namespace) -> list[str]:
    """The canonical precisions asked for, in order, each once (default fp32)."""
    names = [n for group in (args.precision or [["fp32"]]) for n in group]
    return list(dict.fromkeys(canonical_precision(n) for n in names))


def _add_verify_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--verify-images", help="folder of images for the parity check (default: scikit-image's sample photos)")
    p.add_argument("--verify-count", type=int, default=None, help="use at most this many verify images")
    p.add_argument("--min-box-ap", type=float, default=None, help="override the precision's box-AP tolerance")
    p.add_argument("--min-mask-ap", type=float, default=None, help="override the precision's mask-AP tolerance")
    p.add_argument("--threads", type=int, default=None, help="engine threads (default: all cores)")


def _tolerance(args: argparse.Namespace, precision: str) -> Tolerance:
    changes = {k: v for k, v in (("min_box_ap", args.min_box_ap), ("min_mask_ap", args.min_mask_ap)) if v is not None}
    return replace(Tolerance.for_precision(precision), **changes)


def _export(args: argparse.Namespace, out: Path) -> Path:
    return export_step(
        out,
        None if args.random_init else args.checkpoint,
        checkpoint_format=args.format,
        random_init_seed=args.seed if args.random_init else None,
        origin=args.origin,
        batch_size=args.batch_size,
        shape_mutable=args.shape_mutable,
        score_threshold=args.score_threshold,
        classes_file=args.classes,
        categories_file=args.categories,
        style=args.style,
    )


def _compile(args: argparse.Namespace, export_dir: Path, precision: str, out: Path) -> Manifest:
    return compile_step(
        export_dir,
        out,
        backend=args.backend,
        precision=precision,
        calib_images=args.calib_images,
        calib_count=args.calib_count,
        verify_images=args.verify_images,
        verify_count=args.verify_count,
        run_verify=not args.no_verify,
        tolerance=_tolerance(args, precision),
        allow_parity_failure=args.allow_parity_failure,
        threads=args.threads,
        choice_table=args.backend_choice,
        backend_options=_backend_options(args),
        measure_rounds=0 if args.no_measure else MEASURE_ROUNDS,
        labelled=_labelled(args),
    )


def _labelled(args: argparse.Namespace) -> LabelledImages | None:
    """``--verify-ann``'s labelled images, which let ``--backend auto`` lower the precision.

    Raises:
        BuildError: given without ``--backend auto``, with ``--no-measure``, or with ``--precision``.
    """
    if args.verify_ann is None:
        return None
    if args.backend != AUTO_BACKEND or args.no_measure or args.precision is not None:
        raise BuildError("--verify-ann lets --backend auto (measuring) choose a reduced precision: use it with "
                         "--backend auto, without --no-measure or --precision")
    annotations = Path(args.verify_ann)
    if not annotations.is_file():
        raise BuildError(f"--verify-ann {annotations}: no such file (a COCO annotation file of labelled images)")
    return LabelledImages(annotations, Path(args.verify_images or annotations.parent), args.verify_count)


def _backend_options(args: argparse.Namespace) -> dict[str, dict]:
    """The build options of each backend given on the command line, by backend name."""
    options: dict[str, dict] = {}
    if args.tensorrt_timing_cache:
        options["tensorrt"] = {"timing_cache": Path(args.tensorrt_timing_cache)}
    openvino = {}
    if args.openvino_bf16_roi_align != "bf16":
        openvino["roi_align_precision"] = args.openvino_bf16_roi_align
    if args.openvino_bf16_predictors != "fp32":
        openvino["predictor_precision"] = args.openvino_bf16_predictors
    if openvino:
        options["openvino"] = openvino
    if args.onnxruntime_int8_ranges != ACTIVATION_RANGES[0]:
        options["onnxruntime"] = {"activation_ranges": args.onnxruntime_int8_ranges}
    return options


def _summary(manifest: Manifest, out: str | Path) -> str:
    lines = [f"engine artifact: {out}", f"  backend {manifest.backend}, precision {manifest.precision}, "
             f"batch {manifest.shape_profile.batch.model_dump(exclude_none=True)}, origin {manifest.origin}"]
    choice = manifest.tools.backend_choice
    if choice is not None:
        lines.append(f"  backend auto -> {choice.chosen} {manifest.precision}: {choice.why}")
    if manifest.parity:
        p = manifest.parity
        lines.append(
            f"  parity vs eager: box match {p.box_match_rate:.4f}, labels {p.label_agreement:.4f}, "
            f"mask IoU {p.mask_iou_mean:.4f}, box AP {_fraction(p.box_ap)}, mask AP {_fraction(p.mask_ap)} "
            f"({'passed' if p.passed else 'FAILED: ' + '; '.join(p.failures)})"
        )
        if p.exclusions is not None:
            ex = p.exclusions
            lines.append(f"  left out of matching: {ex.small_reference} reference / {ex.small_engine} engine boxes under "
                         f"{ex.min_box_side_px:g} px, {ex.at_cut} at the engine's score cut, {ex.tied} tied NMS swaps; "
                         f"{ex.judged} of {p.reference_detections} reference detections judged")
    return "\n".join(lines)


def _fraction(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _points(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _report_facts(manifest: Manifest | None) -> dict | None:
    """AP deltas and times of a built artifact's verify report (None when it was not verified)."""
    p = manifest.parity if manifest is not None else None
    if p is None:
        return None
    t = p.timing
    return {"box": p.ap_delta_points.box, "mask": p.ap_delta_points.mask, "engine": t.engine_s_per_image,
            "eager": t.eager_s_per_image, "speedup": t.eager_s_per_image / max(t.engine_s_per_image, 1e-12),
            "passed": p.passed}


def _report_header(manifests: list[Manifest | None]) -> str:
    timed = [m.parity.timing for m in manifests if m is not None and m.parity is not None]
    if not timed:
        return "precision report: not verified (--no-verify), so no AP delta and no timing"
    t = timed[0]
    reference = next((m.parity.reference for m in manifests if m is not None and m.parity is not None
                      and m.parity.reference is not None), None)
    judged = f"{reference.name} ({reference.detail})" if reference is not None else "eager PyTorch"
    return (f"precision report (timing from verify: median s/image over only {t.images} verify image(s), so "
            f"indicative; {t.statistic}; eager with {t.threads} threads = engine threads; "
            f"scripts/bench/fidelity.py measures a whole split over HTTP)\n"
            f"  reference: {judged}\n"
            f"  AP delta = AP points lost against the reference (fp32): 100 x (1 - AP) of the engine's detections "
            f"scored against the reference's own (not ground truth: every reshuffled low-score detection counts, "
            f"so reduced precisions show tens of points here while their ground-truth AP moves well under 1 "
            f"point on the demo model; scripts/bench/build.py --gt-data measures that)")


def _report_line(backend: str, precision: str, manifest: Manifest | None, error: str | None = None) -> str:
    name = f"{backend} {precision}"
    if error is not None:
        return f"report: {name}: FAILED: {error}"
    facts = _report_facts(manifest)
    if facts is None:
        return f"report: {name}: not verified, no AP delta or timing"
    return (f"report: {name}: AP delta vs fp32 reference's detections box {_points(facts['box'])}, mask {_points(facts['mask'])} "
            f"points; engine {facts['engine']:.3f} s/img, eager {facts['eager']:.3f} s/img, "
            f"speedup {facts['speedup']:.2f}x" + ("" if facts["passed"] else " (parity FAILED)"))


def _report_table(rows: list[tuple[str, str, Path, Manifest | None, str | None]]) -> str:
    lines = [f"{'backend':12s} {'precision':9s} {'box dAP':>7s} {'mask dAP':>8s} {'engine s/img':>12s} "
             f"{'eager s/img':>11s} {'speedup':>7s}  {'status':12s} artifact"]
    for backend, precision, out, manifest, error in rows:
        facts = _report_facts(manifest)
        if error is not None or facts is None:
            status = "FAILED" if error is not None else "built"
            cells = f"{'-':>7s} {'-':>8s} {'-':>12s} {'-':>11s} {'-':>7s}"
        else:
            status = "ok" if facts["passed"] else "parity-failed"
            cells = (f"{_points(facts['box']):>7s} {_points(facts['mask']):>8s} {facts['engine']:12.3f} "
                     f"{facts['eager']:11.3f} {facts['speedup']:6.2f}x")
        lines.append(f"{backend:12s} {precision:9s} {cells}  {status:12s} {out if error is None else '-'}")
    return "\n".join(lines)


def _build(args: argparse.Namespace, export_dir: Path) -> int:
    """Compile one artifact per precision asked for and print the precision report."""
    precisions = _precisions(args)
    several = len(precisions) > 1
    rows = []
    for precision in precisions:
        backend = args.backend
        try:
            out = Path(args.out) / f"{backend}-{precision}" if several else Path(args.out)
            print(f"compiling for {backend} {precision} -> {out} ...", file=sys.stderr)
            manifest = _compile(args, export_dir, precision, out)
            if several and backend == AUTO_BACKEND:  # named by what was chosen, as a named backend's are
                chosen = out.with_name(f"{manifest.backend}-{manifest.precision}")
                shutil.rmtree(chosen, ignore_errors=True)
                out = out.rename(chosen)
        except (BuildError, BackendUnavailable, BuildFailed, UnsupportedPrecision, FileNotFoundError) as exc:
            if not several:
                raise
            print(f"maskrcnn-build: error: {backend} {precision}: {exc}", file=sys.stderr)
            rows.append((backend, precision, Path(args.out), None, str(exc)))
            print(_report_line(backend, precision, None, str(exc)))
            continue
        rows.append((manifest.backend, precision, out, manifest, None))
        print(_summary(manifest, out))
        if not several:
            print(_report_header([manifest]))
        print(_report_line(manifest.backend, precision, manifest))
    if several:
        print()
        print(_report_header([r[3] for r in rows]))
        print(_report_table(rows))
    return 2 if any(r[4] is not None for r in rows) else 0


def cmd_export(args: argparse.Namespace) -> int:
    out = _export(args, Path(args.out))
    print(f"exported {out / 'model.onnx'} (facts in {out / 'export.json'})")
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    read_export_info(args.export_dir)  # a wrong folder is refused before anything is compiled or said
    _labelled(args)  # and so are wrong labelled-image arguments
    return _build(args, Path(args.export_dir))


def cmd_all(args: argparse.Namespace) -> int:
    _labelled(args)  # wrong labelled-image arguments are refused before the export's minutes
    with tempfile.TemporaryDirectory(prefix="maskrcnn-export-") as tmp:
        print("exporting ONNX ...", file=sys.stderr)
        export_dir = _export(args, Path(tmp))
        return _build(args, export_dir)


def cmd_fetch(args: argparse.Namespace) -> int:
    print(fetch_checkpoint(args.name, args.cache_dir))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    manifest = Manifest.load(args.engine)
    report = verify_artifact(args.engine, manifest, images=args.verify_images, count=args.verify_count,
                             tolerance=_tolerance(args, manifest.precision), threads=args.threads)
    if args.update_manifest:
        manifest.parity = report
        manifest.save(args.engine)
    print(json.dumps(report.model_dump(mode="json"), indent=2))
    return 0 if report.passed else 1


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="maskrcnn-build", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("export", help="checkpoint -> ONNX folder (model.onnx + export.json)")
    _add_source_args(e)
    e.add_argument("--out", required=True, help="output folder")
    e.set_defaults(func=cmd_export)

    c = sub.add_parser("compile", help="ONNX folder -> verified engine artifact")
    c.add_argument("export_dir", help="folder written by `maskrcnn-build export`")
    c.add_argument("--out", required=True, help="artifact folder to write (the parent of one per precision when several)")
    _add_compile_args(c)
    c.set_defaults(func=cmd_compile)

    v = sub.add_parser("verify", help="parity of an artifact against its eager reference")
    v.add_argument("--engine", required=True, help="artifact folder")
    _add_verify_args(v)
    v.add_argument("--update-manifest", action="store_true", help="store the report in the manifest")
    v.set_defaults(func=cmd_verify)

    f = sub.add_parser("fetch", help="download a published checkpoint by name (sha256 prefix checked), print its path")
    # no argparse choices: fetch_checkpoint names the near ones of a typo
    f.add_argument("name", metavar="NAME", help=f"one of: {', '.join(KNOWN_CHECKPOINTS)}")
    f.add_argument("--cache-dir", default=str(CHECKPOINT_CACHE), help=f"download folder (default {CHECKPOINT_CACHE})")
    f.set_defaults(func=cmd_fetch)

    a = sub.add_parser("all", help="checkpoint -> verified engine artifact in one call")
    _add_source_args(a)
    a.add_argument("--out", required=True, help="artifact folder to write (the parent of one per precision when several)")
    _add_compile_args(a)
    a.set_defaults(func=cmd_all)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except (BuildError, CheckpointError, ClassesError, ExportError, BackendUnavailable, BuildFailed,
            UnsupportedPrecision, ManifestError, FileNotFoundError) as exc:
        print(f"maskrcnn-build: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
