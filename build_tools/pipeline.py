"""The build steps as functions: export (checkpoint -> ONNX), compile (ONNX -> artifact), verify.

``export`` writes ``model.onnx`` and ``export.json`` (what produced it) into a folder; ``compile``
reads that folder, builds the backend's model file, writes ``manifest.json`` and, unless told not
to, runs ``verify`` and refuses an engine that misses its precision's tolerance.
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np

from build_tools.checkpoint import LoadedCheckpoint, load_checkpoint, sha256_of
from build_tools.export import INPUT_NAMES, MASK_SIZE, OPSET, OUTPUT_NAMES, export_onnx
from build_tools.verify import Tolerance, check_tolerance, list_images, read_rgb, verify
from service.backends import BackendUnavailable, backend_names, canonical_precision, get_backend, load_engine
from service.manifest import Manifest, coco_class_table
from service.preprocess import InputSpec, pad_batch, prepare_image

EXPORT_INFO = "export.json"


class BuildError(RuntimeError):
    """A build step failed in a way the user can act on (message says how)."""


def tool_versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import torch
    import torchvision

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def input_spec_of(config: dict) -> InputSpec:
    """The host preprocessing of an ``InferenceConfig`` (as recorded in export.json)."""
    return InputSpec(
        mean=tuple(config["mean"]), std=tuple(config["std"]),
        resize_scale=tuple(config["resize_scale"]), pad_divisor=config["pad_divisor"],
    )


def export_step(
    out_dir: str | Path,
    checkpoint: str | None,
    *,
    checkpoint_format: str = "auto",
    random_init_seed: int | None = None,
    origin: str = "mmdet",
    batch_size: int = 1,
    shape_mutable: bool = False,
    score_threshold: float | None = None,
) -> Path:
    """Checkpoint -> ``out_dir/model.onnx`` + ``out_dir/export.json``; returns ``out_dir``."""
    out_dir = Path(out_dir)
    overrides = {} if score_threshold is None else {"score_thresh": score_threshold}
    loaded = load_checkpoint(checkpoint, checkpoint_format, random_init_seed=random_init_seed, origin=origin, **overrides)
    onnx_path = export_onnx(loaded.model, out_dir / "model.onnx", batch_size=batch_size, shape_mutable=shape_mutable)
    info = {
        "checkpoint": {"source": loaded.source, "format": loaded.format, "sha256": loaded.sha256,
                       "random_init_seed": random_init_seed},
        "inference_config": asdict(loaded.model.config),
        "batch_size": batch_size,
        "shape_mutable": shape_mutable,
        "opset": OPSET,
        "onnx_sha256": sha256_of(onnx_path),
        "tools": tool_versions(),
    }
    (out_dir / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n")
    return out_dir


def read_export_info(export_dir: str | Path) -> dict:
    path = Path(export_dir) / EXPORT_INFO
    if not path.is_file():
        raise BuildError(f"{export_dir} is not an export folder ({EXPORT_INFO} missing); run `maskrcnn-build export` first")
    return json.loads(path.read_text())


def reload_reference(info: dict) -> LoadedCheckpoint:
    """The eager model that produced an export, from the facts in ``export.json``."""
    ck = info["checkpoint"]
    config = info["inference_config"]
    overrides = {"score_thresh": config["score_thresh"]}
    if ck["format"] == "random-init":
        return load_checkpoint(None, random_init_seed=ck["random_init_seed"], origin=config["origin"], **overrides)
    loaded = load_checkpoint(ck["source"], ck["format"], **overrides)
    if loaded.sha256 != ck["sha256"]:
        raise BuildError(f"checkpoint {ck['source']} changed since export (sha256 {loaded.sha256} != {ck['sha256']})")
    return loaded


def calibration_feeds(paths: Sequence[Path], spec: InputSpec, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Preprocessed input feeds of ``paths``, ``batch_size`` images each (lazily, one batch in memory)."""
    for start in range(0, len(paths), batch_size):
        prepared = [prepare_image(read_rgb(p), spec) for p in paths[start:start + batch_size]]
        images, sizes = pad_batch(prepared, spec.pad_divisor, batch_size=batch_size)
        yield {INPUT_NAMES[0]: images, INPUT_NAMES[1]: sizes}


def image_set_hash(paths: Sequence[Path]) -> str:
    digest = hashlib.sha256()
    for p in paths:
        digest.update(p.name.encode() + b"\0" + sha256_of(p).encode() + b"\n")
    return digest.hexdigest()


def sample_photographs(limit: int | None = None) -> list[Path]:
    """Colour photographs among scikit-image's bundled samples: the verify images when none are given."""
    try:
        import skimage
    except ImportError as exc:
        raise BuildError("give --verify-images DIR (scikit-image, the default source, is not installed)") from exc
    names = ["astronaut.png", "chelsea.png", "coffee.png", "motorcycle_left.png", "rocket.jpg", "hubble_deep_field.jpg"]
    folder = Path(skimage.data_dir)
    paths = [folder / n for n in names if (folder / n).is_file()]
    if not paths:
        raise BuildError(f"no sample photographs in {folder}; give --verify-images DIR")
    return paths[:limit] if limit else paths


def shape_profile_of(info: dict) -> dict:
    """The shapes an export serves: its batch (fixed, or 1..max when mutable) and the H, W range
    the host preprocessing produces (pad divisor up to the padded long edge)."""
    config = info["inference_config"]
    long_edge, short_edge = config["resize_scale"]
    div = config["pad_divisor"]
    round_up = lambda v: -(-v // div) * div  # noqa: E731
    return {
        # a mutable graph runs any batch; batch_size was given as the largest one to serve
        "batch": ({"mutable": True, "min": 1, "max": info["batch_size"]} if info.get("shape_mutable")
                  else {"mutable": False, "size": info["batch_size"]}),
        "min_hw": [div, div],
        "opt_hw": [round_up(short_edge), round_up(long_edge)],
        "max_hw": [round_up(long_edge), round_up(long_edge)],
    }


def build_manifest(info: dict, backend: str, precision: str, model_file: str, backend_facts: dict) -> Manifest:
    config = info["inference_config"]
    spec = input_spec_of(config)
    n = config["detections_per_img"]
    return Manifest(
        backend=backend,
        precision=precision,
        model_file=model_file,
        origin=config["origin"] if info["checkpoint"]["format"] != "random-init" else "random-init",
        input={**spec.to_manifest_input(), "names": list(INPUT_NAMES),
               "image_sizes": "int64 [B, 2]: (h, w) of each image's valid region"},
        shape_profile=shape_profile_of(info),
        outputs={
            "dets": {"dtype": "float32", "shape": ["B", n, 5], "meaning": "x1, y1, x2, y2, score in input pixels"},
            "labels": {"dtype": "int64", "shape": ["B", n], "meaning": "class index (see classes); -1 = padding"},
            "masks": {"dtype": "float32", "shape": ["B", n, MASK_SIZE, MASK_SIZE],
                      "meaning": "mask probability of the predicted class, box frame"},
            "padding": "rows sorted by score; padding rows have label -1, score 0, zero box and mask",
        },
        postprocess={"score_threshold": config["score_thresh"], "mask_threshold": config["mask_threshold"],
                     "max_detections": n, "paste": "mmdet"},
        classes=coco_class_table(),
        checkpoint=info["checkpoint"],
        inference_config=config,
        tools={**info["tools"], "opset": info["opset"], "backend": backend_facts},
        notes=list(config.get("notes", [])),
    )


def compile_step(
    export_dir: str | Path,
    out_dir: str | Path,
    *,
    backend: str = "onnxruntime",
    precision: str = "fp32",
    calib_images: str | Path | None = None,
    calib_count: int = 16,
    verify_images: str | Path | None = None,
    verify_count: int | None = None,
    run_verify: bool = True,
    tolerance: Tolerance | None = None,
    allow_parity_failure: bool = False,
    threads: int | None = None,
    progress: bool = True,
    choice_table: str | Path | None = None,
) -> Manifest:
    """ONNX export folder -> verified engine artifact in ``out_dir``; returns its manifest.

    ``backend="auto"`` picks the backend measured fastest for ``precision`` in ``choice_table``
    (default ``build_tools/backend_choice.json``); the manifest's ``tools.backend_choice`` says why."""
    precision = canonical_precision(precision)
    info = read_export_info(export_dir)
    backend, choice = resolve_backend(backend, precision, choice_table)
    engine_backend = get_backend(backend)
    ok, reason = engine_backend.available()
    if not ok:
        raise BuildError(f"backend {backend} is not available here: {reason}")
    config = info["inference_config"]
    spec = input_spec_of(config)
    out_dir = Path(out_dir)
    staging = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)

    calibration = None
    calib_paths: list[Path] = []
    if precision == "int8":
        if calib_images is None:
            raise BuildError("int8 needs --calib-images DIR (real images like the ones you will serve)")
        calib_paths = list_images(calib_images, calib_count)
        # a mutable graph is calibrated one image per batch: no all-zero padding images in the statistics
        calibration = calibration_feeds(calib_paths, spec, 1 if info.get("shape_mutable") else info["batch_size"])
    # backends that build for a shape range (TensorRT profiles, MagicMind dim_range) take the manifest's
    model_file, facts = engine_backend.compile(Path(export_dir) / "model.onnx", staging, precision, calibration,
                                               shape_profile=shape_profile_of(info))
    manifest = build_manifest(info, backend, precision, model_file, facts)
    if choice is not None:
        manifest.tools["backend_choice"] = choice
    if calib_paths:
        manifest.calibration = {"images": len(calib_paths), "sha256": image_set_hash(calib_paths),
                                "folder": str(calib_images)}
    manifest.save(staging)

    if run_verify:
        paths = list_images(verify_images, verify_count) if verify_images else sample_photographs(verify_count)
        reference = reload_reference(info)
        engine = load_engine(staging, threads=threads)
        report = verify(reference.model, engine, paths, spec, mask_threshold=config["mask_threshold"], progress=progress,
                        threads=threads)
        tolerance = tolerance or Tolerance.for_precision(precision)
        failures = check_tolerance(report, tolerance)
        manifest.parity = {**report, "tolerance": asdict(tolerance), "passed": not failures, "failures": failures}
        manifest.save(staging)
        if failures and not allow_parity_failure:
            raise BuildError(
                f"{backend} {precision} engine misses its tolerance: {'; '.join(failures)}. The engine was "
                f"left in {staging} for inspection; pass --allow-parity-failure to emit it anyway."
            )
    if out_dir.exists():
        shutil.rmtree(out_dir)
    staging.rename(out_dir)
    return manifest


# ---- --backend auto: the backend measured fastest per precision on this kind of CPU ----------------

AUTO_BACKEND = "auto"
BACKEND_CHOICE = Path(__file__).with_name("backend_choice.json")
# CPU features that decide which backend's kernels are fast (VNNI/AMX for int8, BF16/AMX for bf16).
_CPU_FLAGS = ("avx2", "avx_vnni", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")


def cpu_facts() -> dict:
    """The facts about this CPU that make a backend measurement transferable to another machine."""
    import os

    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())  # the first CPU's lines
    except OSError:
        pass
    model = fields.get("model name") or platform.processor() or platform.machine()
    flags = set(fields.get("flags", "").split())
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return {"model": model, "machine": platform.machine(), "cores": cores,
            "flags": [f for f in _CPU_FLAGS if f in flags]}


def same_cpu_kind(a: dict, b: dict) -> bool:
    """Same CPU model and the same relevant instruction sets (core counts may differ)."""
    return (a.get("model"), a.get("machine"), sorted(a.get("flags", []))) == (
        b.get("model"), b.get("machine"), sorted(b.get("flags", [])))


def load_backend_choice(path: str | Path | None = None) -> dict:
    path = Path(path or BACKEND_CHOICE)
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BuildError(
            f"--backend auto reads {path}, which cannot be read ({exc}); write it with "
            "`python -m scripts.bench.build --export DIR --write-choice PATH` or name a backend"
        ) from exc
    if not isinstance(table.get("choice"), dict):
        raise BuildError(f"{path} has no \"choice\" table; regenerate it with scripts/bench/build.py --write-choice")
    return table


def resolve_backend(requested: str, precision: str, table_path: str | Path | None = None) -> tuple[str, dict | None]:
    """(backend name, resolution record or None) for ``requested``, which may be ``auto``.

    ``auto`` takes the table's choice for ``precision``; when that backend is not installed (or
    does not offer the precision) it falls back to the next one in the table's ranking, then in
    the registry, that is available and offers it."""
    if requested != AUTO_BACKEND:
        return requested, None
    precision = canonical_precision(precision)
    path = Path(table_path or BACKEND_CHOICE)
    table = load_backend_choice(path)
    entry = table["choice"].get(precision)
    order = [*([entry["backend"], *entry.get("ranking", [])] if entry else []), *backend_names()]
    passed_over: list[str] = []
    chosen = None
    for name in dict.fromkeys(order):
        try:
            module = get_backend(name)
        except BackendUnavailable:
            passed_over.append(f"{name} is not a known backend")
            continue
        if precision not in module.PRECISIONS:
            passed_over.append(f"{name} does not offer {precision}")
            continue
        ok, reason = module.available()
        if not ok:
            passed_over.append(f"{name} is not available ({reason})")
            continue
        chosen = name
        break
    if chosen is None:
        raise BuildError(f"--backend auto: no available backend offers {precision} ({'; '.join(passed_over)})")
    if entry and chosen == entry["backend"]:
        why = entry.get("why", "")
    elif entry:
        why = (f"the table chose {entry['backend']} ({entry.get('why', '')}), but {'; '.join(passed_over)}: "
               f"fell back to {chosen}, the next available backend offering {precision}")
    else:
        why = (f"{path.name} has no measurement for {precision}; {chosen} is the first available backend "
               f"offering it" + (f" ({'; '.join(passed_over)})" if passed_over else ""))
    measured = table.get("measured", {})
    here = cpu_facts()
    record = {
        "requested": AUTO_BACKEND,
        "chosen": chosen,
        "why": why,
        "table": str(path),
        "measured": {k: measured.get(k) for k in ("quality", "date", "cpu")},
        "same_cpu_kind": same_cpu_kind(measured.get("cpu", {}), here),
    }
    return chosen, record
