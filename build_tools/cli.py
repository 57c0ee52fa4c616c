"""``maskrcnn-build``: checkpoint -> ONNX -> verified engine artifact.

Subcommands: ``export``, ``compile``, ``verify``, ``all`` (export + compile + verify in one call).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from build_tools.checkpoint import KNOWN_CHECKPOINTS, CheckpointError
from build_tools.export import ExportError
from build_tools.pipeline import (
    BuildError,
    compile_step,
    export_step,
    input_spec_of,
    reload_reference,
    sample_photographs,
)
from build_tools.verify import Tolerance, check_tolerance, list_images, verify
from service.backends import BackendUnavailable, backend_names, load_engine
from service.backends.base import PRECISION_ALIASES, PRECISIONS, UnsupportedPrecision
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
                   help="dynamic batch dimension (refused: the traced graph has a fixed batch)")
    p.add_argument("--score-threshold", type=float, default=None,
                   help="detection score threshold baked into the graph (default: the origin's, 0.05)")


def _add_compile_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default="onnxruntime", choices=backend_names())
    precisions = [*PRECISIONS, *PRECISION_ALIASES]
    p.add_argument("--precision", default="fp32", choices=precisions, help="fp32 (default), int8, ... or the seed's aliases")
    p.add_argument("--calib-images", help="folder of real images for int8 calibration")
    p.add_argument("--calib-count", type=int, default=16, help="calibration images to use (default 16)")
    _add_verify_args(p)
    p.add_argument("--no-verify", action="store_true", help="skip the parity check against eager PyTorch")
    p.add_argument("--allow-parity-failure", action="store_true", help="emit the engine even if it misses its tolerance")


def _add_verify_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--verify-images", help="folder of images for the parity check (default: scikit-image's sample photos)")
    p.add_argument("--verify-count", type=int, default=None, help="use at most this many verify images")
    p.add_argument("--min-box-ap", type=float, default=None, help="override the precision's box-AP tolerance")
    p.add_argument("--min-mask-ap", type=float, default=None, help="override the precision's mask-AP tolerance")
    p.add_argument("--threads", type=int, default=None, help="engine threads (default: all cores)")


def _tolerance(args: argparse.Namespace, precision: str) -> Tolerance:
    base = Tolerance.for_precision(precision)
    changes = {k: v for k, v in (("min_box_ap", args.min_box_ap), ("min_mask_ap", args.min_mask_ap)) if v is not None}
    return Tolerance(**{**base.__dict__, **changes})


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
    )


def _compile(args: argparse.Namespace, export_dir: Path) -> Manifest:
    from service.backends import canonical_precision

    return compile_step(
        export_dir,
        Path(args.out),
        backend=args.backend,
        precision=args.precision,
        calib_images=args.calib_images,
        calib_count=args.calib_count,
        verify_images=args.verify_images,
        verify_count=args.verify_count,
        run_verify=not args.no_verify,
        tolerance=_tolerance(args, canonical_precision(args.precision)),
        allow_parity_failure=args.allow_parity_failure,
        threads=args.threads,
    )


def _summary(manifest: Manifest, out: str) -> str:
    lines = [f"engine artifact: {out}", f"  backend {manifest.backend}, precision {manifest.precision}, "
             f"batch {manifest.shape_profile['batch']}, origin {manifest.origin}"]
    if manifest.parity:
        p = manifest.parity
        lines.append(
            f"  parity vs eager: box match {p['box_match_rate']:.4f}, labels {p['label_agreement']:.4f}, "
            f"mask IoU {p['mask_iou_mean']:.4f}, box AP {p['box_ap']:.4f}, mask AP {p['mask_ap']:.4f} "
            f"({'passed' if p['passed'] else 'FAILED: ' + '; '.join(p['failures'])})"
        )
        lines.append(f"  time per image: eager {p['eager_seconds_per_image']:.3f} s, engine "
                     f"{p['engine_seconds_per_image']:.3f} s "
                     f"({p['engine_seconds_per_image'] / max(p['eager_seconds_per_image'], 1e-9):.2f}x eager)")
    return "\n".join(lines)


def cmd_export(args: argparse.Namespace) -> int:
    out = _export(args, Path(args.out))
    print(f"exported {out / 'model.onnx'} (facts in {out / 'export.json'})")
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    manifest = _compile(args, Path(args.export_dir))
    print(_summary(manifest, args.out))
    return 0


def cmd_all(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="maskrcnn-export-") as tmp:
        print("exporting ONNX ...", file=sys.stderr)
        export_dir = _export(args, Path(tmp))
        print(f"compiling for {args.backend} {args.precision} ...", file=sys.stderr)
        manifest = _compile(args, export_dir)
    print(_summary(manifest, args.out))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    manifest = Manifest.load(args.engine)
    info = {"checkpoint": manifest.checkpoint, "inference_config": manifest.inference_config}
    reference = reload_reference(info)
    engine = load_engine(args.engine, threads=args.threads)
    paths = list_images(args.verify_images, args.verify_count) if args.verify_images else sample_photographs(args.verify_count)
    report = verify(reference.model, engine, paths, input_spec_of(manifest.inference_config),
                    mask_threshold=manifest.postprocess["mask_threshold"])
    tolerance = _tolerance(args, manifest.precision)
    failures = check_tolerance(report, tolerance)
    report.update(tolerance=tolerance.__dict__, passed=not failures, failures=failures)
    if args.update_manifest:
        manifest.parity = report
        manifest.save(args.engine)
    print(json.dumps(report, indent=2))
    return 0 if not failures else 1


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
    c.add_argument("--out", required=True, help="artifact folder to write")
    _add_compile_args(c)
    c.set_defaults(func=cmd_compile)

    v = sub.add_parser("verify", help="parity of an artifact against its eager reference")
    v.add_argument("--engine", required=True, help="artifact folder")
    _add_verify_args(v)
    v.add_argument("--update-manifest", action="store_true", help="store the report in the manifest")
    v.set_defaults(func=cmd_verify)

    a = sub.add_parser("all", help="checkpoint -> verified engine artifact in one call")
    _add_source_args(a)
    a.add_argument("--out", required=True, help="artifact folder to write")
    _add_compile_args(a)
    a.set_defaults(func=cmd_all)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except (BuildError, CheckpointError, ExportError, BackendUnavailable, UnsupportedPrecision,
            ManifestError, FileNotFoundError) as exc:
        print(f"maskrcnn-build: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
