"""Throughput of engine artifacts by batch size: does batching pay on this machine?

Every batch size runs the same images (photographs resized by the service's preprocessing to about
800x1200, all padded to one common size so each batch size sees identical inputs): one *pass*
pushes all ``--images`` images through the engine in batches of B. A mutable-batch artifact
(``maskrcnn-build ... --shape-mutable --batch-size MAX``) runs every B in ``--batches`` up to its
max; a fixed-batch artifact runs only its own B. Passes of all (artifact, B) pairs take turns, so
load from other processes hits them alike. Throughput = images per pass / median pass time; the
ratio is to batch 1 of the same artifact (or, when it cannot run batch 1, to the first artifact's).

    python -m scripts.bench.batch --engine artifacts/ort-mut4 [--engine artifacts/ort-b2] \\
        [--batches 1,2,4] [--iterations 5] [--json bench_batch.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from build_tools.timing import time_calls
from scripts.tools.photos import photo_paths


def runnable_batches(manifest, batches: Sequence[int]) -> list[int]:
    """The batch sizes of ``batches`` this artifact can run: its own when fixed, else up to its max."""
    if manifest.batch_size is not None:
        return [manifest.batch_size]
    return [b for b in batches if b <= manifest.max_batch_size]


def make_pass(engine, prepared: list, batch: int, divisor: int, hw: tuple[int, int]):
    """A callable pushing all ``prepared`` images through ``engine`` in batches of ``batch``
    (the last one partial for a mutable engine, filled with padding slots for a fixed one)."""
    from service.preprocess import pad_batch

    feeds = [pad_batch(prepared[s:s + batch], divisor, batch_size=engine.batch_size, min_hw=hw)
             for s in range(0, len(prepared), batch)]

    def run() -> None:
        for images, sizes in feeds:
            engine.infer(images, sizes)
    return run, feeds


def measure(engine_dirs: Sequence[Path], *, batches: Sequence[int] = (1, 2, 4), images: int | None = None,
            image_folder: str | None = None, iterations: int = 5, warmup: int = 1,
            threads: int | None = None) -> dict[str, Any]:
    from build_tools.images import read_rgb
    from service.backends import load_engine
    from service.backends.base import cpu_cores
    from service.preprocess import padded_hw, prepare_image

    threads = threads or cpu_cores()
    engines = [load_engine(d, threads=threads) for d in engine_dirs]
    plan = [(i, b) for i, e in enumerate(engines) for b in runnable_batches(e.manifest, batches)]
    if not plan:
        raise SystemExit(f"no artifact can run any of the batch sizes {list(batches)}")
    count = images or max(b for _, b in plan)
    paths = photo_paths(image_folder, count)
    spec = engines[0].manifest.input.spec
    prepared = [prepare_image(read_rgb(p), spec) for p in paths]
    divisor = spec.pad_divisor
    hw = padded_hw((max(p.resized_hw[0] for p in prepared), max(p.resized_hw[1] for p in prepared)), divisor)

    runners, shapes = {}, {}
    for i, b in plan:
        runners[(i, b)], feeds = make_pass(engines[i], prepared, b, divisor, hw)
        shapes[(i, b)] = [list(f[0].shape) for f in feeds]
    seconds = time_calls(runners, iterations, warmup)

    rows = []
    for (i, b), samples in seconds.items():
        median = statistics.median(samples)
        m = engines[i].manifest
        rows.append({
            "engine_dir": str(engine_dirs[i]), "backend": m.backend, "precision": m.precision,
            "graph_batch": m.shape_profile.batch.model_dump(), "batch": b, "calls_per_pass": len(shapes[(i, b)]),
            "input_shapes": shapes[(i, b)], "pass_seconds": samples, "median_pass_s": median,
            "throughput_ips": len(prepared) / median,
        })
    first_b1 = next((r["throughput_ips"] for r in rows if r["batch"] == 1), None)
    for row in rows:
        own = next((r["throughput_ips"] for r in rows if r["engine_dir"] == row["engine_dir"] and r["batch"] == 1),
                   first_b1)
        row["ratio_vs_batch1"] = row["throughput_ips"] / own if own else None
    return {"images": [p.name for p in paths], "padded_hw": list(hw), "threads": threads,
            "iterations": iterations, "warmup": warmup, "rows": rows}


def format_report(report: dict[str, Any]) -> str:
    h, w = report["padded_hw"]
    lines = [f"{len(report['images'])} images padded to {h}x{w}, {report['threads']} threads, "
             f"{report['iterations']} timed passes after {report['warmup']} warm-up",
             f"{'artifact':40s} {'graph':>9s} {'batch':>5s} {'s/pass':>8s} {'images/s':>9s} {'x batch 1':>9s}"]
    for r in report["rows"]:
        g = r["graph_batch"]
        graph = f"1..{g['max']}" if g.get("mutable") else f"fixed {g['size']}"
        ratio = "-" if r["ratio_vs_batch1"] is None else f"{r['ratio_vs_batch1']:.3f}"
        lines.append(f"{Path(r['engine_dir']).name[-40:]:40s} {graph:>9s} {r['batch']:5d} {r['median_pass_s']:8.3f} "
                     f"{r['throughput_ips']:9.3f} {ratio:>9s}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_batch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", action="append", required=True, type=Path, help="artifact folder (repeatable)")
    p.add_argument("--batches", default="1,2,4", help="batch sizes for mutable artifacts (default 1,2,4)")
    p.add_argument("--images", type=int, default=None,
                   help="images per pass (default: the largest batch run; a multiple of every batch is fairest)")
    p.add_argument("--image-folder", default=None, help="photos to use (default: scikit-image's samples)")
    p.add_argument("--iterations", type=int, default=5, help="timed passes (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed passes first (default 1)")
    p.add_argument("--threads", type=int, default=None, help="engine threads (default: all cores)")
    p.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = p.parse_args(argv)
    try:
        batches = sorted({int(b) for b in args.batches.split(",") if b.strip()})
    except ValueError:
        p.error(f"--batches takes a comma list of integers, got {args.batches!r}")
    if not batches or batches[0] < 1 or args.iterations < 1 or args.warmup < 0:
        p.error("batch sizes must be >= 1, --iterations >= 1 and --warmup >= 0")
    report = measure(args.engine, batches=batches, images=args.images, image_folder=args.image_folder,
                     iterations=args.iterations, warmup=args.warmup, threads=args.threads)
    print(format_report(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
