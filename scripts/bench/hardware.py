"""Close to the hardware (issue 27): the goals table, from one run.

Every engine (``--engines DIR ...``; default: the ONNX Runtime fp32 and OpenVINO fp32, bf16 and int8
engines built from ``--export DIR`` with ``maskrcnn-build compile ... --no-verify`` into
``--cache``, int8 calibrated on ``--calib-images``, reused while the export, the calibration images
and the build sources are unchanged) is served by its own ``maskrcnn-serve`` (all alive at once,
``--threads`` each, one session, no batching wait). One synthetic photo (``synthetic_photo``,
``--size`` HxW, default 800x1333: about 100 detections from a random-init R50) is then timed,
runners taking turns call by call, every second round in reverse order (``time_calls`` with
``alternate``), after one untimed round:

- ``eager fp32``: the engine's eager PyTorch reference (``scripts.tools.eager.eager_model``: the
  origin framework's own model, this project's for a random-init export) on the JPEG as a user runs
  it in-process: decode, preprocess, model, host postprocess (RLE masks), ``--threads`` torch threads;
- ``eager bf16 autocast``: torchvision's own Mask R-CNN holding the same weights
  (``build_tools.origin.torchvision_model``), called as torchvision's users call it, under
  ``torch.autocast("cpu", dtype=torch.bfloat16)``: the one line a CPU user tries first (the peer).
  Not the origin model itself: mmcv's compiled NMS refuses autocast's bf16 boxes ("expected scalar
  type Float but found BFloat16"), and this project's eager model folds BN into multiply-adds whose
  fp32 scales promote every bf16 activation back to fp32 (measured: no faster than fp32);
- each engine through HTTP (``POST /predict`` of the JPEG, ``score_threshold``), asked for 100 and
  for 10 detections (the graph runs the mask head on those only);
- with ``--buckets``, a twin of each OpenVINO engine served with a static shape bucket at the padded
  size the photo is served at (``--openvino-shape-buckets HxW``), asked for 100 detections: both
  ways in one run (the report's ``buckets`` gives each twin's time over its dynamic-shape engine's
  and the images its ``/metrics`` counted in the bucket).

Then each engine is profiled ``--profile-runs`` times (engines taking turns, the median run
reported) after a warm-up by ``scripts.bench.profile`` (its backend's own
profiler, at the padded size the graph sees), with the matmul peak of each precision and the
network's conv/FC FLOPs measured in the same run. The goals table compares medians of this run:
OpenVINO bf16 against eager fp32 and the peer, OpenVINO int8 against eager fp32, the best fp32
engine against eager fp32 and the fp32 matmul floor (FLOPs / fp32 peak), the main job's default
engine (``scripts/serve.sh`` builds ``--backend auto --precision fp32``: the faster fp32 engine,
here as measured in this run) against the peer, each engine at 10 against 100 detections, and
from the profiles each engine's non-arithmetic share and conv/FC rate against its precision's peak,
and OpenVINO int8's conv/FC time against bf16's.

    python -m scripts.bench.hardware --export artifacts/hw/export --json hardware.json
    python -m scripts.bench.hardware --engines artifacts/ort-fp32 artifacts/ov-bf16 --rounds 3
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import operator
import shlex
import statistics
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from build_tools.backend_choice import cpu_facts, describe_cpu
from build_tools.timing import time_calls
from scripts.bench.profile import ProfileError
from scripts.bench.profile import format_report as format_profile
from scripts.bench.profile import profile
from scripts.tools.build_sources import build_source_files
from scripts.tools.http import image_headers
from scripts.tools.photos import synthetic_photo
from scripts.tools.service_process import running_service
from service.manifest import Manifest, ManifestError
from service.preprocess import pad_batch, prepare_image
from service.settings import Settings

BUILD = str(Path(sys.executable).with_name("maskrcnn-build"))
ROOT = Path(__file__).resolve().parents[2]
# What the default run builds from --export, in this order: (backend, precision).
DEFAULT_ENGINES = (("onnxruntime", "fp32"), ("openvino", "fp32"), ("openvino", "bf16"), ("openvino", "int8"))
EAGER, PEER = "eager fp32", "eager bf16 autocast"
RETURNED = (100, 10)
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
COMPARE = {"<=": operator.le, "<": operator.lt, ">=": operator.ge}


class HardwareBenchError(Exception):
    """A run that cannot be carried out as asked (the CLI reports it as a usage error, status 2)."""


@dataclass(frozen=True)
class ServedEngine:
    """An engine artifact folder and what its manifest says it is."""

    folder: Path
    backend: str
    precision: str

    @property
    def name(self) -> str:
        return f"{self.backend} {self.precision}"

    def runner(self, returned: int) -> str:
        """The name of its timed runner asked for ``returned`` detections."""
        return f"{self.name}, {returned} returned"

    @property
    def bucket_runner(self) -> str:
        """The name of the runner of its static-shape-bucket twin (100 detections)."""
        return f"{self.name}, static bucket"


def served_engines(folders: Sequence[Path]) -> list[ServedEngine]:
    """The engines of ``folders``, one per backend and precision.

    Raises:
        HardwareBenchError: none given, or two of one backend and precision.
        service.manifest.ManifestError: a folder that is not an engine artifact.
    """
    engines = []
    for folder in folders:
        manifest = Manifest.load(folder)
        engines.append(ServedEngine(Path(folder), manifest.backend, manifest.precision))
    names = [e.name for e in engines]
    if not engines or len(set(names)) < len(names):
        raise HardwareBenchError(f"give one engine per backend and precision (--engines), got {names or 'none'}")
    return engines


# --- building the default engines ---------------------------------------------------------------

def build_key(export_dir: Path, calib_images: Path) -> str:
    """16 hex digits of the export's files, the calibration images and the build sources."""
    digest = hashlib.sha256()
    files = sorted(p for p in export_dir.iterdir() if p.is_file())
    files += sorted(p for p in calib_images.iterdir() if p.is_file())
    files += build_source_files()
    for path in files:
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def build_engines(export_dir: Path, cache: Path, calib_images: Path) -> tuple[list[Path], dict[str, str]]:
    """The :data:`DEFAULT_ENGINES` of ``export_dir`` in ``cache/<build_key>/<backend>-<precision>``,
    built with ``maskrcnn-build compile --no-verify`` where missing (its own staging makes a folder
    with a manifest a finished build). Returns the folders and, per engine that could not be built
    here (an OpenVINO without bf16 on this CPU, say), the build's last line.

    Raises:
        HardwareBenchError: no export or calibration folder there.
    """
    if not (export_dir / "export.json").is_file():
        raise HardwareBenchError(f"{export_dir} is not an export folder (maskrcnn-build export --out DIR)")
    if not calib_images.is_dir():
        raise HardwareBenchError(f"no calibration images at {calib_images} (--calib-images DIR, for int8)")
    root = cache / build_key(export_dir, calib_images)
    built, skipped = [], {}
    for backend, precision in DEFAULT_ENGINES:
        out = root / f"{backend}-{precision}"
        if not (out / "manifest.json").is_file():
            command = [BUILD, "compile", str(export_dir), "--backend", backend, "--precision", precision,
                       "--out", str(out), "--no-verify"]
            if precision == "int8":
                command += ["--calib-images", str(calib_images)]
            print(f"building {backend} {precision}: {shlex.join(command)}", flush=True)
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                lines = (done.stderr or done.stdout).strip().splitlines()
                skipped[f"{backend} {precision}"] = lines[-1] if lines else f"exit status {done.returncode}"
                continue
        built.append(out)
    return built, skipped


# --- what is timed ------------------------------------------------------------------------------

def bf16_flags(facts: Mapping[str, Any]) -> list[str]:
    """The bf16 instruction sets among ``facts``' flags (``cpu_facts``)."""
    return [flag for flag in BF16_FLAGS if flag in facts.get("flags", ())]


def eager_runners(engine_dir: Path, jpeg: bytes, threads: int, score_threshold: float,
                  detections: dict[str, int]) -> dict[str, Callable[[], None]]:
    """The eager reference of ``engine_dir`` on ``jpeg`` (decoded with Pillow, as a user would),
    in fp32 and under bf16 autocast, each with ``threads`` torch threads; each call writes its
    detection count into ``detections``."""
    import torch
    from torch.overrides import TorchFunctionMode

    from build_tools.origin import torchvision_detect, torchvision_model
    from build_tools.reference import torch_threads
    from scripts.tools.eager import eager_model

    class Float32Numpy(TorchFunctionMode):
        """Autocast hands back bf16 outputs, which numpy cannot hold: ``.numpy()`` of one is taken
        of its float32 copy, the ``.float()`` a user adds to their own call."""

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is torch.Tensor.numpy and args[0].dtype == torch.bfloat16:
                return args[0].float().numpy()
            return func(*args, **(kwargs or {}))

    reference = eager_model(engine_dir, score_threshold=score_threshold).reference
    loaded = reference.loaded
    peer = torchvision_detect(torchvision_model(loaded.model.config, loaded.model.state_dict()), loaded.model.config)

    def call(name: str, detect: Callable[[np.ndarray], Any], autocast: bool) -> Callable[[], None]:
        def run() -> None:
            rgb = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
            with torch_threads(threads), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), \
                    Float32Numpy():
                detections[name] = len(detect(rgb).labels)
        return run

    return {EAGER: call(EAGER, reference.detect, False), PEER: call(PEER, peer, True)}


def served_runner(client: httpx.Client, url: str, jpeg: bytes, params: Mapping[str, Any], name: str,
                  detections: dict[str, int]) -> Callable[[], None]:
    """One ``POST /predict`` of ``jpeg`` with ``params``; its detection count goes into ``detections``."""
    headers = image_headers(jpeg, timeout_s=600)

    def run() -> None:
        answer = client.post(url + "/predict", content=jpeg, headers=headers, params=params)
        answer.raise_for_status()
        detections[name] = len(answer.json()["detections"])
    return run


def bucket_counts(url: str) -> dict[str, float]:
    """Images the service at ``url`` ran per shape bucket (``HxW`` or ``dynamic``), from one read of
    its ``/metrics``."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", timeout=30).text
    return {sample.labels["bucket"]: sample.value for family in text_string_to_metric_families(text)
            for sample in family.samples if sample.name == "maskrcnn_shape_bucket_images_total"}


def graph_hw(engine_dir: Path, jpeg: bytes) -> tuple[int, int]:
    """``(H, W)`` the graph sees for ``jpeg``: the service's resize and padding of the engine."""
    manifest = Manifest.load(engine_dir)
    spec = manifest.input.spec
    prepared = prepare_image(np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")), spec)
    images, _ = pad_batch([prepared], spec.pad_divisor, min_hw=manifest.shape_profile.min_hw)
    return int(images.shape[-2]), int(images.shape[-1])


def measure(engine_dirs: Sequence[Path], *, rounds: int = 5, size: tuple[int, int] = (800, 1333),
            threads: int = 2, score_threshold: float = 0.05, peak_size: int = 4096,
            onnx: Path | None = None, buckets: bool = False, profile_runs: int = 5) -> dict[str, Any]:
    """Time eager fp32, the autocast peer and every engine at 100 and 10 returned detections (and,
    with ``buckets``, each OpenVINO engine's static-bucket twin) in interleaved rounds, then profile
    each engine ``profile_runs`` times, engines taking turns (``scripts.bench.profile.profile``: the
    run with the median total is reported).

    Returns the report ``--json`` writes: ``cpu``, ``cpu_bf16`` (its bf16 instruction sets), ``photo``
    (``hw``, ``bytes``), ``graph_hw``, ``rounds``, ``threads``, ``score_threshold``, ``engines`` (``name``, ``folder``,
    ``backend``, ``precision``), ``samples_s`` and ``medians_s`` per runner (seconds),
    ``detections`` per runner (the last call's count), ``buckets`` (per bucketed engine: ``bucket``,
    ``vs_dynamic``, the median ratio, and ``bucket_images`` and ``dynamic_images``, the images its
    ``/metrics`` counted in the bucket and on the dynamic-shape model),
    ``profile`` (the profile report) and ``goals`` (:func:`goal_rows`).

    Raises:
        HardwareBenchError: no engine, or two of one backend and precision, or ``rounds`` < 1.
        ProfileError: an engine without a profiler here.
        service.manifest.ManifestError: a folder that is not an engine artifact.
    """
    if rounds < 1:
        raise HardwareBenchError(f"--rounds must be >= 1, got {rounds}")
    engines = served_engines(engine_dirs)
    facts = cpu_facts()
    jpeg = synthetic_photo(*size)
    hw = graph_hw(engines[0].folder, jpeg)
    bucket = f"{hw[0]}x{hw[1]}"
    detections: dict[str, int] = {}
    settings = {e.name: Settings(engine_dir=e.folder, threads=threads, workers=1, max_batch_size=1, max_wait_ms=0)
                for e in engines}
    bucketed = [e for e in engines if e.backend == "openvino"] if buckets else []
    twin_urls: dict[str, str] = {}
    with contextlib.ExitStack() as stack:
        runners = eager_runners(engines[0].folder, jpeg, threads, score_threshold, detections)
        for engine in engines:
            url = stack.enter_context(running_service(engine.folder, settings[engine.name], concurrency=1))
            client = stack.enter_context(httpx.Client(timeout=600))
            for returned in RETURNED:
                params = {"score_threshold": score_threshold, "max_detections": returned}
                name = engine.runner(returned)
                runners[name] = served_runner(client, url, jpeg, params, name, detections)
        for engine in bucketed:
            twin = settings[engine.name].model_copy(update={"openvino_shape_buckets": bucket})
            twin_urls[engine.name] = url = stack.enter_context(running_service(engine.folder, twin, concurrency=1))
            client = stack.enter_context(httpx.Client(timeout=600))
            runners[engine.bucket_runner] = served_runner(
                client, url, jpeg, {"score_threshold": score_threshold, "max_detections": 100},
                engine.bucket_runner, detections)
        print(f"timing {len(runners)} runners: 1 untimed round, then {rounds} interleaved", flush=True)
        samples = time_calls(runners, rounds, warmup=1, alternate=True)
        twin_counts = {name: bucket_counts(url) for name, url in twin_urls.items()}
    profiled = profile([e.folder for e in engines], height=hw[0], width=hw[1], runs=profile_runs, threads=threads,
                       onnx=onnx, peak_size=peak_size)
    report = {
        "cpu": describe_cpu(facts), "cpu_bf16": bf16_flags(facts),
        "photo": {"hw": list(size), "bytes": len(jpeg)}, "graph_hw": list(hw),
        "rounds": rounds, "threads": threads, "score_threshold": score_threshold,
        "engines": [{"name": e.name, "folder": str(e.folder), "backend": e.backend, "precision": e.precision}
                    for e in engines],
        "samples_s": samples, "medians_s": {n: statistics.median(s) for n, s in samples.items()},
        "detections": detections, "profile": profiled,
        "buckets": {e.name: {"bucket": bucket, "bucket_images": twin_counts[e.name].get(bucket, 0.0),
                             "dynamic_images": twin_counts[e.name].get("dynamic", 0.0),
                             "vs_dynamic": statistics.median(samples[e.bucket_runner])
                             / statistics.median(samples[e.runner(100)])} for e in bucketed},
    }
    report["goals"] = goal_rows(report)
    return report


# --- the goals table ----------------------------------------------------------------------------

def ratio_check(label: str, medians: Mapping[str, float], numerator: str, denominator: str | None, bound: float,
                compare: str = "<=", denominator_s: float | None = None) -> dict[str, Any]:
    """A goal's ratio of two medians of the run (``denominator`` a runner, or a time
    ``denominator_s`` that is no runner, like the matmul floor)."""
    top = medians[numerator]
    bottom = medians[denominator] if denominator is not None else denominator_s
    value = top / bottom
    return {"label": label, "kind": "ratio", "value": value, "bound": bound, "compare": compare,
            "met": COMPARE[compare](value, bound), "detail": f"{top:.2f} s / {bottom:.2f} s",
            "numerator": numerator, "numerator_s": top, "denominator": denominator, "denominator_s": bottom}


def share_check(label: str, value: float, bound: float, compare: str, detail: str = "") -> dict[str, Any]:
    """A goal's share (of engine time, or of a matmul peak) from the profiles."""
    return {"label": label, "kind": "share", "value": value, "bound": bound, "compare": compare,
            "met": COMPARE[compare](value, bound), "detail": detail}


def of_peak_check(engine: ServedEngine, roofline: Mapping[str, Any]) -> dict[str, Any]:
    """Conv/FC rate against the same-run matmul peak of the engine's precision. Above 100 % the
    peak is no ceiling: on a shared CPU the peak's few seconds can fall in a loaded moment (bf16
    measured 0.67 and 1.70 TFLOP/s in consecutive processes on the AMX Xeon)."""
    detail = f"{roofline['tflops']:.3f} of {roofline['peak_tflops']:.3f} TFLOP/s"
    if roofline["of_peak"] > 1:
        detail += ": above the measured peak, which is then no ceiling"
    return share_check(engine.name, roofline["of_peak"], 0.5, ">=", detail)


def goal_row(key: str, engine: str, goal: str, checks: list[dict[str, Any]], missing: str) -> dict[str, Any]:
    """One row of the goals table: met when every check is; ``missing`` says why a row without
    checks was not measured."""
    return {"key": key, "engine": engine, "goal": goal, "checks": checks,
            "met": all(c["met"] for c in checks) if checks else None, "note": "" if checks else missing}


def goal_rows(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The issue's goals table from a :func:`measure` report (before ``goals`` is added)."""
    medians = report["medians_s"]
    engines = [ServedEngine(Path(e["folder"]), e["backend"], e["precision"]) for e in report["engines"]]
    by_kind = {(e.backend, e.precision): e for e in engines}
    fp32 = sorted((e for e in engines if e.precision == "fp32"), key=lambda e: medians[e.runner(100)])
    rows = []

    bf16 = by_kind.get(("openvino", "bf16"))
    rows.append(goal_row("openvino_bf16", "OpenVINO bf16", "<= 0.12x eager fp32 (<= 0.2x the bf16-autocast peer)", [
        ratio_check("vs eager fp32", medians, bf16.runner(100), EAGER, 0.12),
        ratio_check("vs the peer", medians, bf16.runner(100), PEER, 0.2),
    ] if bf16 else [], "no OpenVINO bf16 engine in the run"))

    int8 = by_kind.get(("openvino", "int8"))
    rows.append(goal_row("openvino_int8", "OpenVINO int8", "<= 0.08x eager fp32", [
        ratio_check("vs eager fp32", medians, int8.runner(100), EAGER, 0.08),
    ] if int8 else [], "no OpenVINO int8 engine in the run"))

    profiled = report["profile"]
    flops, fp32_peak = profiled["flops"]["total"], profiled["peaks"].get("fp32", {}).get("tflops")
    best_checks = []
    if fp32:
        best = fp32[0]
        best_checks.append(ratio_check(f"{best.name} vs eager fp32", medians, best.runner(100), EAGER, 0.42))
        if flops and fp32_peak:
            best_checks.append(ratio_check(f"{best.name} vs the fp32 matmul floor", medians, best.runner(100), None,
                                           1.1, denominator_s=flops / fp32_peak / 1e12))
    rows.append(goal_row("best_fp32", "best fp32", "<= 0.42x eager fp32, within 1.1x of the fp32 matmul floor",
                         best_checks, "no fp32 engine in the run"))

    rows.append(goal_row("default_engine", "the main job's default engine (the faster fp32 one)",
                         "faster than the bf16-autocast peer", [
                             ratio_check(f"{fp32[0].name} vs the peer", medians, fp32[0].runner(100), PEER, 1.0, "<"),
                         ] if fp32 else [], "no fp32 engine in the run"))

    rows.append(goal_row("ten_returned", "any engine, 10 detections returned", "<= 0.85x its own time at 100", [
        ratio_check(e.name, medians, e.runner(10), e.runner(100), 0.85) for e in engines
    ], "no engine in the run"))

    profiles = profiled["engines"]  # in the order of report["engines"]
    rows.append(goal_row("non_arithmetic", "non-arithmetic share of engine time", "<= 15%", [
        share_check(e.name, p["non_arithmetic_share"], 0.15, "<=") for e, p in zip(engines, profiles)
    ], "no engine profiled"))
    rows.append(goal_row("conv_fc_of_peak", "convolutions/FCs vs the same-run matmul peak", ">= 50%", [
        of_peak_check(e, p["roofline"])
        for e, p in zip(engines, profiles) if p["roofline"] and "of_peak" in p["roofline"]
    ], "no conv/FC FLOPs counted (no ONNX Runtime engine in the run and no export)"))
    int8_profile, bf16_profile = (next((p for e, p in zip(engines, profiles) if (e.backend, e.precision) == kind), None)
                                  for kind in (("openvino", "int8"), ("openvino", "bf16")))
    rows.append(goal_row("int8_conv_vs_bf16", "int8 convolutions/FCs vs bf16's (CPUs with AMX-int8 or VNNI)",
                         "measurably faster: <= 90% of bf16's time", [
                             share_check("OpenVINO int8 conv/FC time of bf16's",
                                         int8_profile["arithmetic_s"] / bf16_profile["arithmetic_s"], 0.9, "<=",
                                         f"{int8_profile['arithmetic_s']:.3f} s / {bf16_profile['arithmetic_s']:.3f} s"),
                         ] if int8_profile and bf16_profile else [], "no OpenVINO int8 and bf16 engines profiled"))
    return rows


def format_check(check: Mapping[str, Any]) -> str:
    value = f"{check['value']:.2f}x" if check["kind"] == "ratio" else f"{check['value']:.0%}"
    return f"{check['label']} {value}" + (f" ({check['detail']})" if check["detail"] else "")


def format_report(report: Mapping[str, Any], command: str) -> str:
    medians, samples, detections = report["medians_s"], report["samples_s"], report["detections"]
    h, w = report["photo"]["hw"]
    bf16_line = ("bf16: this CPU has " + ", ".join(report["cpu_bf16"]) if report["cpu_bf16"] else
                 "bf16: this CPU has no bf16 instructions (no avx512_bf16, no amx_bf16): the autocast peer runs "
                 "bf16 emulated, and OpenVINO does not build bf16")
    lines = [f"command: {command}", f"CPU: {report['cpu']}", bf16_line,
             f"photo: synthetic {h}x{w} JPEG ({report['photo']['bytes']} bytes), graph input "
             f"{report['graph_hw'][0]}x{report['graph_hw'][1]}, score_threshold {report['score_threshold']}; "
             f"{report['threads']} threads per engine and for eager; 1 untimed round, then {report['rounds']} "
             "interleaved (medians)", "",
             f"{'runner':40} {'median s':>9} {'min-max s':>14} {'vs eager':>9} {'vs peer':>8} {'dets':>5}"]
    for name, seconds in samples.items():
        lines.append(f"{name:40} {medians[name]:9.3f} {min(seconds):6.2f}-{max(seconds):<7.2f} "
                     f"{medians[name] / medians[EAGER]:8.2f}x {medians[name] / medians[PEER]:7.2f}x "
                     f"{detections.get(name, 0):5d}")
    for name, twin in report.get("buckets", {}).items():
        lines.append(f"{name}: static shape bucket {twin['bucket']} {twin['vs_dynamic']:.2f}x the dynamic-shape "
                     f"engine's median (100 returned; {twin['bucket_images']:.0f} images ran in the bucket, "
                     f"{twin['dynamic_images']:.0f} on the dynamic model)")
    lines += ["", f"== profile (scripts.bench.profile: {report['profile']['runs']} profiled calls per engine after a warm-up)",
              format_profile(report["profile"]), "",
              f"== goals (issue 27), CPU: {report['cpu']}",
              "| engine | goal | measured | met |", "|---|---|---|---|"]
    for row in report["goals"]:
        measured = "; ".join(format_check(c) for c in row["checks"]) or row["note"]
        met = {True: "yes", False: "no", None: "-"}[row["met"]]
        if row["checks"] and row["met"] is False and any(c["met"] for c in row["checks"]):
            met = "no (" + ", ".join(c["label"] for c in row["checks"] if c["met"]) + ": yes)"
        lines.append(f"| {row['engine']} | {row['goal']} | {measured} | {met} |")
    return "\n".join(lines)


def parse_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size is HxW, e.g. 800x1333, got {text!r}") from None
    return h, w


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.bench.hardware", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--engines", type=Path, nargs="+", help="engine artifact folders, one per backend/precision")
    source.add_argument("--export", type=Path, help="export folder to build the default engines from")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "maskrcnn-serve" / "hardware",
                        help="engines built from --export are kept here (default ~/.cache/maskrcnn-serve/hardware)")
    parser.add_argument("--calib-images", type=Path,
                        default=Path.home() / ".cache" / "maskrcnn-serve" / "tests" / "photos",
                        help="int8 calibration images (default ~/.cache/maskrcnn-serve/tests/photos)")
    parser.add_argument("--rounds", type=int, default=5, help="timed interleaved rounds after one untimed (default 5)")
    parser.add_argument("--size", type=parse_size, default=(800, 1333), help="photo HxW (default 800x1333)")
    parser.add_argument("--threads", type=int, default=2, help="threads per engine and for eager (default 2)")
    parser.add_argument("--score-threshold", type=float, default=0.05, help="requests' and eager's (default 0.05)")
    parser.add_argument("--peak-size", type=int, default=4096, help="side of the peak matmul (default 4096)")
    parser.add_argument("--profile-runs", type=int, default=5,
                        help="profiled calls per engine after a warm-up, engines taking turns (default 5)")
    parser.add_argument("--buckets", action="store_true",
                        help="also time each OpenVINO engine served with a static shape bucket at the photo's padded "
                             "size (--openvino-shape-buckets), 100 returned")
    parser.add_argument("--json", type=Path, default=None, help="write the report here")
    args = parser.parse_args(argv)
    command = shlex.join(["python", "-m", "scripts.bench.hardware", *(sys.argv[1:] if argv is None else argv)])
    try:
        skipped: dict[str, str] = {}
        engine_dirs, onnx = args.engines, None
        if args.export:
            engine_dirs, skipped = build_engines(args.export, args.cache, args.calib_images)
            onnx = args.export / "model.onnx"
        report = measure(engine_dirs, rounds=args.rounds, size=args.size, threads=args.threads,
                         score_threshold=args.score_threshold, peak_size=args.peak_size, onnx=onnx,
                         buckets=args.buckets, profile_runs=args.profile_runs)
    except (HardwareBenchError, ProfileError, ManifestError) as error:
        parser.error(str(error))
    report.update(command=command, not_built=skipped)
    text = format_report(report, command)
    if skipped:
        text += "\n" + "\n".join(f"not built: {name}: {why}" for name, why in skipped.items())
    print(text)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
