"""`maskrcnn-perf`: throughput and latency of an engine artifact (the `mm_run` analogue).

One synthetic batch of ``--batch-size`` images of ``--height`` x ``--width`` pixels (default: the
manifest's ``opt_hw``, 800x1344) is normalised with the engine's mean and std and padded to the
pad divisor, without resizing: the size given is the size the graph sees. The batch is run
``--warmup`` untimed and ``--iterations`` timed times; each call's wall time is one latency sample
and ``batch x iterations / total time`` is the throughput.

``--returned 10,100`` also times the engine when a request gets back only that many detections
(the graph then runs the mask head on those alone; ``engine`` computes every detection's mask),
in the same interleaved rounds.

``--baseline eager`` also times the eager PyTorch model the engine was built from (the manifest's
checkpoint and inference config) on the same batch, alternating engine and eager calls so that
load from other processes hits both alike, and reports engine/eager throughput as a ratio.

    maskrcnn-perf --engine artifacts/ort-fp32 --iterations 20 --baseline eager --json perf.json
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from build_tools.timing import latency_summary, time_calls
from scripts.tools.eager import EagerReferenceError, eager_reference
from scripts.tools.photos import synthetic_photo
from service.backends import load_engine
from service.manifest import Manifest, ManifestError
from service.preprocess import InputSpec, pad_batch, prepare_image


class PerfError(Exception):
    """A run that cannot be carried out as asked (the CLI reports it as a usage error, status 2)."""


def synthetic_batch(spec: InputSpec, batch_size: int, hw: tuple[int, int],
                    min_hw: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Graph inputs for ``batch_size`` copies of a photo-like ``hw`` image (``synthetic_photo``:
    smooth colour structure and noise, many proposals as real photos give), normalised, NOT resized, padded to
    ``spec.pad_divisor``. Returns ``images`` float32 ``[B, 3, H, W]`` and ``image_sizes`` int64 ``[B, 2]``."""
    h, w = hw
    rgb = cv2.cvtColor(cv2.imdecode(np.frombuffer(synthetic_photo(h, w), np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    # A resize scale equal to the image's own (long, short) edges keeps it at its size.
    prepared = prepare_image(rgb, replace(spec, resize_scale=(max(h, w), min(h, w)), keep_ratio=True))
    return pad_batch([prepared] * batch_size, spec.pad_divisor, batch_size=batch_size, min_hw=min_hw)


def batch_size_for(manifest: Manifest, requested: int | None) -> int:
    """The batch to run: the graph's fixed batch, which ``requested`` must equal when given."""
    fixed = manifest.batch_size
    if fixed is None:
        return requested or 1
    if requested is not None and requested != fixed:
        raise PerfError(
            f"the engine has a fixed batch of {fixed} (manifest shape_profile.batch.size) and cannot run "
            f"--batch-size {requested}; build one for it (maskrcnn-build all ... --batch-size {requested}) "
            f"or leave --batch-size out"
        )
    return fixed


def input_hw_for(manifest: Manifest, height: int | None, width: int | None) -> tuple[int, int]:
    """``(height, width)`` of the synthetic image: the given sides, else the profile's ``opt_hw``;
    refused outside the profile's ``min_hw``..``max_hw``."""
    profile = manifest.shape_profile
    hw = (height or profile.opt_hw[0], width or profile.opt_hw[1])
    low, high = profile.min_hw, profile.max_hw
    if not all(lo <= v <= hi for v, lo, hi in zip(hw, low, high)):
        raise PerfError(f"input {hw[0]}x{hw[1]} (HxW) is outside the engine's shape profile "
                        f"{low[0]}x{low[1]} .. {high[0]}x{high[1]}")
    return hw


def measure(engine_dir: Path, *, batch_size: int | None = None, iterations: int = 20, warmup: int = 2,
            threads: int | None = None, height: int | None = None, width: int | None = None,
            baseline: str = "none", returned: Sequence[int] = ()) -> dict[str, Any]:
    """Time the engine (and with ``baseline="eager"`` its eager model) on one synthetic batch.

    Returns the report ``--json`` writes: ``engine_dir``, ``backend``, ``precision``,
    ``batch_size``, ``input_shape`` ``[B, 3, H, W]``, ``threads`` per runner, ``iterations``,
    ``warmup``, ``results`` (per runner: ``throughput_ips`` in images/s and ``latency_ms`` per
    call: min, mean, p50, p90, p99, max) and ``ratio`` (engine/eager throughput, or None); with
    ``returned``, one more runner per count, ``engine, N returned`` (masks for the best N
    detections of each image only).

    Raises:
        PerfError: a batch size or input size the engine cannot run, or ``returned`` for an engine
            built before the graph took the mask selection.
        service.manifest.ManifestError: not an engine artifact.
    """
    if iterations < 1 or warmup < 0:
        raise PerfError(f"--iterations must be >= 1 and --warmup >= 0, got {iterations} and {warmup}")
    manifest = Manifest.load(engine_dir)
    batch = batch_size_for(manifest, batch_size)
    hw = input_hw_for(manifest, height, width)
    engine = load_engine(engine_dir, threads=threads)
    images, sizes = synthetic_batch(manifest.input.spec, batch, hw, manifest.shape_profile.min_hw)
    runners: dict[str, Callable[[], Any]] = {"engine": lambda: engine.infer(images, sizes)}
    thread_counts: dict[str, int | None] = {"engine": getattr(engine, "threads", threads)}
    if returned and "mask_max_detections" not in manifest.input.names:
        raise PerfError(f"{engine_dir} was built before the graph took the mask selection; export and build it again")
    for count in returned:
        name = f"engine, {count} returned"
        thresholds, limits = np.zeros(batch, np.float32), np.full(batch, count, np.int64)
        runners[name] = lambda t=thresholds, k=limits: engine.infer(images, sizes, t, k)
        thread_counts[name] = thread_counts["engine"]
    if baseline == "eager":
        import torch

        from build_tools.reference import run_eager

        if threads is not None:
            torch.set_num_threads(threads)
        model = eager_reference(manifest)
        runners["eager"] = lambda: run_eager(model, images, sizes)
        thread_counts["eager"] = torch.get_num_threads()
    seconds = time_calls(runners, iterations, warmup)
    results = {
        name: {"throughput_ips": batch * len(samples) / sum(samples), "latency_ms": latency_summary(samples)}
        for name, samples in seconds.items()
    }
    ratio = results["engine"]["throughput_ips"] / results["eager"]["throughput_ips"] if "eager" in results else None
    return {
        "engine_dir": str(engine_dir), "backend": manifest.backend, "precision": manifest.precision,
        "batch_size": batch, "input_shape": list(images.shape), "threads": thread_counts,
        "iterations": iterations, "warmup": warmup, "results": results, "ratio": ratio,
    }


def format_report(report: dict[str, Any]) -> str:
    b, _, h, w = report["input_shape"]
    lines = [
        f"{report['engine_dir']}: {report['backend']} {report['precision']}, batch {b}, input {b}x3x{h}x{w}, "
        f"{report['iterations']} timed calls after {report['warmup']} warm-up",
        f"{'':20} {'threads':>7} {'images/s':>9}   ms per call: {'min':>8} {'mean':>8} {'p50':>8} {'p90':>8} {'p99':>8}",
    ]
    for name, result in report["results"].items():
        ms = result["latency_ms"]
        lines.append(f"{name:20} {report['threads'][name] or '-':>7} {result['throughput_ips']:9.3f}   {'':12} "
                     + " ".join(f"{ms[k]:8.1f}" for k in ("min", "mean", "p50", "p90", "p99")))
    if report["ratio"] is not None:
        lines.append(f"engine / eager throughput: {report['ratio']:.3f}x")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="maskrcnn-perf", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", type=Path, required=True, help="engine artifact folder")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="images per call (default and only choice for a fixed-batch engine: its own)")
    parser.add_argument("--iterations", type=int, default=20, help="timed calls (default 20)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls first (default 2)")
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op threads of the engine and of eager torch (default: each library's own)")
    parser.add_argument("--height", type=int, default=None, help="input height in pixels (default: manifest opt_hw)")
    parser.add_argument("--width", type=int, default=None, help="input width in pixels (default: manifest opt_hw)")
    parser.add_argument("--baseline", choices=("none", "eager"), default="none",
                        help="also time the eager PyTorch model the engine was built from (default none)")
    parser.add_argument("--returned", default="",
                        help="also time the engine when requests get back only this many detections each "
                        "(comma-separated counts, e.g. 10,100): masks for those only")
    parser.add_argument("--json", type=Path, default=None, help="write the report as JSON here")
    args = parser.parse_args(argv)
    try:
        returned = [int(v) for v in args.returned.split(",") if v.strip()]
    except ValueError:
        parser.error(f"--returned takes comma-separated counts, got {args.returned!r}")
    try:
        report = measure(args.engine, batch_size=args.batch_size, iterations=args.iterations, warmup=args.warmup,
                         threads=args.threads, height=args.height, width=args.width, baseline=args.baseline,
                         returned=returned)
    except (PerfError, EagerReferenceError, ManifestError) as error:
        parser.error(str(error))
    print(format_report(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
