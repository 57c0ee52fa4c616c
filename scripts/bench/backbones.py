"""Engine speed by backbone (R-50, R-101, ResNeXt-101 32x4d / 64x4d) against each one's eager model.

For every architecture asked for, an ONNX Runtime fp32 artifact is built once into ``--artifacts``
(reused when present) from a random-init checkpoint in mmdet's key layout (random weights: timing
only, at the score threshold 0 so every image carries the full 100 detections through the mask
head), or taken from ``--engine NAME=DIR``. Each engine and its eager PyTorch reference (the model
the manifest records, rebuilt by ``build_tools.reference``) run the same photograph, prepared by
the service's preprocessing (``--scale``: resize limits, default mmdet's 1333x800), calls
alternating through ``build_tools.timing.time_calls``. Reported: median seconds per image, the
eager/engine ratio of each architecture, and each engine's time relative to the R-50 engine when
R-50 is in the run; all measured in the same run.

    python -m scripts.bench.backbones [--archs r50,r101,x101_32x4d,x101_64x4d] [--iterations 3] \\
        [--engine r101=artifacts/r101-fp32] [--json bench_backbones.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from build_tools.timing import time_calls
from scripts.tools.photos import photo_paths

ARCHS: dict[str, dict[str, int]] = {
    "r50": {"depth": 50},
    "r101": {"depth": 101},
    "x101_32x4d": {"depth": 101, "groups": 32, "width_per_group": 4},
    "x101_64x4d": {"depth": 101, "groups": 64, "width_per_group": 4},
}


def build_artifact(arch: str, folder: Path, scale: tuple[int, int]) -> Path:
    """ONNX Runtime fp32 artifact of a random-init mmdet checkpoint of ``arch`` in ``folder``
    (the checkpoint stays beside it: the eager reference reads it); reused when present."""
    from build_tools.checkpoint import save_mmdet_checkpoint
    from build_tools.model import build_model, init_random_
    from build_tools.pipeline import compile_step, export_step

    artifact = folder / f"{arch}-{scale[0]}x{scale[1]}"
    if (artifact / "manifest.json").is_file():
        return artifact
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint = save_mmdet_checkpoint(init_random_(build_model("mmdet", **ARCHS[arch]), seed=0),
                                       folder / f"{arch}-random.pth")
    with tempfile.TemporaryDirectory(prefix="bench-backbones-") as tmp:
        export_dir = export_step(Path(tmp), str(checkpoint), score_threshold=0.0, resize_scale=scale)
        compile_step(export_dir, artifact, run_verify=False, progress=False)
    return artifact


def measure(artifacts: Mapping[str, Path], *, image: str | None = None, iterations: int = 3, warmup: int = 1,
            threads: int | None = None) -> dict[str, Any]:
    from build_tools.images import read_rgb
    from build_tools.reference import eager_infer, reference_for_manifest, torch_threads
    from service.backends import load_engine
    from service.backends.base import cpu_cores
    from service.preprocess import pad_batch, prepare_image

    threads = threads or cpu_cores()
    path = photo_paths(image, 1)[0]
    runners, shapes, facts = {}, {}, {}
    for arch, folder in artifacts.items():
        engine = load_engine(folder, threads=threads)
        manifest = engine.manifest
        spec = manifest.input.spec
        images, sizes = pad_batch([prepare_image(read_rgb(path), spec)], spec.pad_divisor, batch_size=engine.batch_size)
        eager = eager_infer(reference_for_manifest(manifest).model)
        runners[(arch, "engine")] = lambda e=engine, i=images, s=sizes: e.infer(i, s)
        runners[(arch, "eager")] = lambda f=eager, i=images, s=sizes: f(i, s)
        shapes[arch] = list(images.shape)
        config = manifest.inference_config
        facts[arch] = {"artifact": str(folder), "depth": config["depth"], "groups": config["groups"],
                       "width_per_group": config["width_per_group"], "classes": len(manifest.classes)}
    with torch_threads(threads):
        seconds = time_calls(runners, iterations, warmup, alternate=True)
    rows = []
    for arch in artifacts:
        engine_s = statistics.median(seconds[(arch, "engine")])
        eager_s = statistics.median(seconds[(arch, "eager")])
        rows.append({"arch": arch, **facts[arch], "input_shape": shapes[arch], "engine_s": engine_s, "eager_s": eager_s,
                     "eager_over_engine": eager_s / engine_s, "engine_samples": seconds[(arch, "engine")],
                     "eager_samples": seconds[(arch, "eager")]})
    base = next((r["engine_s"] for r in rows if r["arch"] == "r50"), None)
    for row in rows:
        row["engine_vs_r50"] = None if base is None else row["engine_s"] / base
    return {"image": path.name, "threads": threads, "iterations": iterations, "warmup": warmup, "rows": rows}


def format_report(report: Mapping[str, Any]) -> str:
    lines = [f"{report['image']}, {report['threads']} threads, median of {report['iterations']} alternating calls "
             f"after {report['warmup']} warm-up (random weights, 100 detections per image)",
             f"{'arch':12s} {'input':>14s} {'engine s':>9s} {'eager s':>8s} {'eager/engine':>12s} {'engine/R-50':>11s}"]
    for r in report["rows"]:
        relative = "-" if r["engine_vs_r50"] is None else f"{r['engine_vs_r50']:.2f}"
        lines.append(f"{r['arch']:12s} {'x'.join(map(str, r['input_shape'][2:])):>14s} {r['engine_s']:9.3f} "
                     f"{r['eager_s']:8.3f} {r['eager_over_engine']:11.2f}x {relative:>11s}")
    return "\n".join(lines)


def _engine_arg(text: str) -> tuple[str, Path]:
    name, sep, folder = text.partition("=")
    if not sep or not folder:
        raise argparse.ArgumentTypeError(f"--engine is NAME=ARTIFACT_DIR, not {text!r}")
    return name, Path(folder)


def _scale(text: str) -> tuple[int, int]:
    try:
        long_edge, short_edge = (int(v) for v in text.lower().split("x"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--scale is LONGxSHORT (e.g. 1333x800), not {text!r}") from exc
    return long_edge, short_edge


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_backbones", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", default="r101,x101_32x4d,x101_64x4d",
                   help=f"architectures to build and time, comma-separated, of {', '.join(ARCHS)} "
                        "(default r101,x101_32x4d,x101_64x4d)")
    p.add_argument("--engine", action="append", type=_engine_arg, default=[], metavar="NAME=DIR",
                   help="time this artifact too (built from a checkpoint its eager reference can reload); repeatable")
    p.add_argument("--artifacts", type=Path, default=Path(".cache/bench/backbones"),
                   help="where built artifacts are cached (default .cache/bench/backbones)")
    p.add_argument("--scale", type=_scale, default=(1333, 800), help="resize limits LONGxSHORT (default 1333x800)")
    p.add_argument("--image", default=None, help="folder of photos, the first is used (default: scikit-image's samples)")
    p.add_argument("--iterations", type=int, default=3, help="timed calls per runner (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per runner first (default 1)")
    p.add_argument("--threads", type=int, default=None, help="engine and torch threads (default: all cores)")
    p.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = p.parse_args(argv)
    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    unknown = [a for a in archs if a not in ARCHS]
    if unknown:
        p.error(f"unknown architectures {unknown}; known: {', '.join(ARCHS)}")
    artifacts = {}
    for arch in archs:
        print(f"artifact for {arch} ...", file=sys.stderr, flush=True)
        artifacts[arch] = build_artifact(arch, args.artifacts, args.scale)
    artifacts.update(dict(args.engine))
    report = measure(artifacts, image=args.image, iterations=args.iterations, warmup=args.warmup, threads=args.threads)
    print(format_report(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
