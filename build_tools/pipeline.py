"""The build steps as functions: export (checkpoint -> ONNX), compile (ONNX -> artifact), verify.

``export`` writes ``model.onnx`` and ``export.json`` (what produced it) into a folder; ``compile``
reads that folder, builds the backend's model file, writes ``manifest.json`` and, unless told not
to, runs ``verify`` and refuses an engine that misses its precision's tolerance.
"""

from __future__ import annotations

import platform
import shutil
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from build_tools.backend_choice import (
    AUTO_BACKEND,
    MEASURE_ROUNDS,
    REDUCED_PRECISIONS,
    Candidate,
    LabelledImages,
    available_backends,
    choose_measured,
    resolve_backend,
)
from build_tools.backends import get_builder
from build_tools.checkpoint import load_checkpoint, sha256_of
from build_tools.classes import class_table, read_category_ids, read_class_names
from build_tools.errors import BuildError
from build_tools.export import (
    MASK_SIZE,
    OPSET,
    ExportInfo,
    export_onnx,
    read_export_info,
)
from build_tools.images import image_set_hash, list_images, read_rgb
from build_tools.model import Style
from build_tools.verify import Tolerance, verify_artifact
from service.backends import canonical_precision, get_backend, load_engine
from service.backends.base import INPUT_NAMES, BuildFailed, UnsupportedPrecision, input_feed
from service.manifest import (
    BatchProfile,
    Calibration,
    CheckpointInfo,
    InputSection,
    Manifest,
    OutputsSection,
    OutputTensor,
    PostprocessSection,
    ShapeProfile,
    ToolsSection,
)
from service.preprocess import InputSpec, pad_batch, padded_hw, prepare_image


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
    resize_scale: tuple[int, int] | None = None,
    classes_file: str | Path | None = None,
    categories_file: str | Path | None = None,
    style: Style | None = None,
) -> Path:
    """Checkpoint -> ``out_dir/model.onnx`` + ``out_dir/export.json``; returns ``out_dir``.

    ``score_threshold`` and ``resize_scale`` ((long, short) edges, pixels) replace the origin's
    (0.05, 1333x800; a smaller scale makes cheap smoke and test engines). ``classes_file`` names the
    classes (one a line, or a JSON list; else the checkpoint's meta names them, or COCO for a
    COCO-sized head); ``categories_file`` (a COCO annotation file) gives their category ids by name
    (else COCO's when all are COCO names, else 1..N); ``style`` forces the ResNet style (``caffe``
    for caffe-style weights whose meta does not say so). See build_tools/classes.py.

    Raises:
        CheckpointError: the checkpoint cannot be read or does not fit (keys and shapes named).
        ClassesError: a classes or categories file that cannot be read or does not fit.
    """
    out_dir = Path(out_dir)
    overrides = {k: v for k, v in (("score_thresh", score_threshold), ("resize_scale", resize_scale)) if v is not None}
    names = None if classes_file is None else read_class_names(classes_file)
    category_ids = None if categories_file is None else read_category_ids(categories_file)
    loaded = load_checkpoint(checkpoint, checkpoint_format, class_names=names, style=style,
                             random_init_seed=random_init_seed, origin=origin, **overrides)
    classes = class_table(loaded.class_names, category_ids, source=str(categories_file))
    onnx_path = export_onnx(loaded.model, out_dir / "model.onnx", batch_size=batch_size, shape_mutable=shape_mutable)
    ExportInfo(
        checkpoint=CheckpointInfo(source=loaded.source, format=loaded.format, sha256=loaded.sha256,
                                  random_init_seed=random_init_seed),
        inference_config=loaded.model.config,
        classes=classes,
        batch_size=batch_size,
        shape_mutable=shape_mutable,
        opset=OPSET,
        onnx_sha256=sha256_of(onnx_path),
        tools=tool_versions(),
        inputs=INPUT_NAMES,
    ).save(out_dir)
    return out_dir


def calibration_feeds(paths: Sequence[Path], spec: InputSpec, batch_size: int,
                      names: Sequence[str] = INPUT_NAMES) -> Iterator[dict[str, np.ndarray]]:
    """Preprocessed input feeds of ``paths``, ``batch_size`` images each (lazily, one batch in memory):
    ``images`` float32 ``[B, 3, H, W]``, ``image_sizes`` int64 ``[B, 2]`` and, when the graph
    ``names`` them, a mask selection that gives every detection its mask (the mask head calibrates
    on all of them)."""
    for start in range(0, len(paths), batch_size):
        prepared = [prepare_image(read_rgb(p), spec) for p in paths[start:start + batch_size]]
        images, sizes = pad_batch(prepared, spec.pad_divisor, batch_size=batch_size)
        yield input_feed(images, sizes, names=names)


def shape_profile_of(info: ExportInfo) -> ShapeProfile:
    """The shapes an export serves: its batch (fixed, or 1..max when mutable) and the H, W range
    the host preprocessing produces (pad divisor up to the padded long edge), in pixels."""
    config = info.inference_config
    long_edge, short_edge = config.resize_scale
    div = config.pad_divisor
    # a mutable graph runs any batch; batch_size was given as the largest one to serve
    batch = (BatchProfile(mutable=True, min=1, max=info.batch_size) if info.shape_mutable
             else BatchProfile(mutable=False, size=info.batch_size))
    return ShapeProfile(batch=batch, min_hw=(div, div), opt_hw=padded_hw((short_edge, long_edge), div),
                        max_hw=padded_hw((long_edge, long_edge), div))


def build_manifest(info: ExportInfo, backend: str, precision: str, model_file: str, backend_facts: dict) -> Manifest:
    """The manifest of an artifact built from the export ``info`` (no calibration or parity yet)."""
    config = info.inference_config
    n = config.detections_per_img
    return Manifest(
        backend=backend,
        precision=precision,
        model_file=model_file,
        origin=config.origin if info.checkpoint.format != "random-init" else "random-init",
        input=InputSection.from_spec(config.input_spec()).model_copy(update={"names": tuple(info.inputs)}),
        shape_profile=shape_profile_of(info),
        outputs=OutputsSection(
            dets=OutputTensor(dtype="float32", shape=["B", n, 5], meaning="x1, y1, x2, y2, score in input pixels"),
            labels=OutputTensor(dtype="int64", shape=["B", n], meaning="class index (see classes); -1 = padding"),
            masks=OutputTensor(dtype="float32", shape=["B", n, MASK_SIZE, MASK_SIZE],
                               meaning="mask probability of the predicted class, box frame"),
            padding="rows sorted by score; padding rows have label -1, score 0, zero box and mask",
        ),
        postprocess=PostprocessSection(score_threshold=config.score_thresh, mask_threshold=config.mask_threshold,
                                       max_detections=n, paste=config.paste_rule),
        classes=info.classes,
        checkpoint=info.checkpoint,
        inference_config=asdict(config),
        tools=ToolsSection(**info.tools, opset=info.opset, backend=backend_facts),
        notes=list(config.notes),
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
    backend_options: Mapping[str, Mapping[str, Any]] | None = None,
    measure_rounds: int = MEASURE_ROUNDS,
    labelled: LabelledImages | None = None,
) -> Manifest:
    """ONNX export folder -> verified engine artifact in ``out_dir``; returns its manifest.

    ``backend="auto"`` compiles every available backend offering ``precision``, times each on this
    machine (``measure_rounds`` interleaved calls after a warm-up) and keeps the fastest; with
    ``labelled`` images it also compiles the reduced precisions and keeps one of them when it is
    faster and its AP loss on those images is within its bound (``build_tools.backend_choice``).
    ``measure_rounds=0`` reads the backend measured fastest for ``precision`` elsewhere from
    ``choice_table`` (default ``build_tools/backend_choice.json``) instead. The manifest's
    ``tools.backend_choice`` says which and why (with ``progress``, also a line on stderr).
    ``backend_options`` maps a backend name to the build options its ``compile`` takes (e.g.
    ``{"tensorrt": {"timing_cache": path}}``); only the chosen backend's are used.

    Raises:
        BuildError: the backend is not available here, int8 without calibration images, or (unless
            ``allow_parity_failure``) the engine misses its tolerance (left in ``out_dir.partial``).
    """
    precision = canonical_precision(precision)
    out_dir = Path(out_dir)
    staging = out_dir.with_name(out_dir.name + ".partial")
    build = partial(_compile_into, Path(export_dir), calib_images=calib_images, calib_count=calib_count,
                    backend_options=backend_options or {})
    if backend == AUTO_BACKEND and measure_rounds > 0:
        manifest = _compile_fastest(build, staging, precision, labelled=labelled, rounds=measure_rounds,
                                    threads=threads, int8_calibrated=calib_images is not None)
    else:
        backend, choice = resolve_backend(backend, precision, choice_table)
        manifest = build(staging, backend, precision)
        manifest.tools.backend_choice = choice
        manifest.save(staging)
    backend, precision = manifest.backend, manifest.precision
    if progress and manifest.tools.backend_choice is not None:
        print(f"maskrcnn-build: --backend auto chose {backend} {precision}: {manifest.tools.backend_choice.why}",
              file=sys.stderr)

    if run_verify:
        manifest.parity = verify_artifact(staging, manifest, images=verify_images, count=verify_count,
                                          tolerance=tolerance, threads=threads, progress=progress)
        manifest.save(staging)
        if not manifest.parity.passed and not allow_parity_failure:
            raise BuildError(
                f"{backend} {precision} engine misses its tolerance: {'; '.join(manifest.parity.failures)}. The "
                f"engine was left in {staging} for inspection; pass --allow-parity-failure to emit it anyway."
            )
    if out_dir.exists():
        shutil.rmtree(out_dir)
    staging.rename(out_dir)
    return manifest


def _compile_into(export_dir: Path, staging: Path, backend: str, precision: str, *,
                  calib_images: str | Path | None, calib_count: int,
                  backend_options: Mapping[str, Mapping[str, Any]]) -> Manifest:
    """Compile ``export_dir``'s model for ``backend`` at ``precision`` into a fresh ``staging``
    folder and write its manifest (no choice record or parity yet); a failed compile leaves nothing.

    Raises:
        BuildError: the backend is not available here, or int8 without calibration images.
    """
    ok, reason = get_backend(backend).available()
    if not ok:
        raise BuildError(f"backend {backend} is not available here: {reason}")
    info = read_export_info(export_dir)
    spec = info.inference_config.input_spec()
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)

    calibration = None
    calib_paths: list[Path] = []
    if precision == "int8":
        if calib_images is None:
            raise BuildError("int8 needs --calib-images DIR (real images like the ones you will serve)")
        calib_paths = list_images(calib_images, calib_count)
        # a mutable graph is calibrated one image per batch: no all-zero padding images in the statistics
        calibration = calibration_feeds(calib_paths, spec, 1 if info.shape_mutable else info.batch_size, info.inputs)
    shape_profile = shape_profile_of(info)
    # backends that build for a shape range (TensorRT profiles, MagicMind dim_range) take the manifest's
    try:
        model_file, facts = get_builder(backend).compile(
            export_dir / "model.onnx", staging, precision, calibration, shape_profile=shape_profile,
            **backend_options.get(backend, {}))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # nothing half-built is left behind
        raise
    manifest = build_manifest(info, backend, precision, model_file, facts)
    if calib_paths:
        manifest.calibration = Calibration(images=len(calib_paths), sha256=image_set_hash(calib_paths),
                                           folder=str(calib_images))
    manifest.save(staging)

    return manifest


def _compile_fastest(build: Callable[[Path, str, str], Manifest], staging: Path, precision: str, *,
                     labelled: LabelledImages | None, rounds: int, threads: int | None,
                     int8_calibrated: bool) -> Manifest:
    """``--backend auto`` measured: each available backend at ``precision`` (and, given ``labelled``
    images, at the reduced precisions: int8 only when ``int8_calibrated``) compiled by ``build`` next
    to ``staging``, timed and chosen by :func:`choose_measured`; the chosen one becomes ``staging``
    with its record, the others are removed."""
    precisions = [precision]
    if labelled is not None:
        precisions += [p for p in REDUCED_PRECISIONS if p != precision and (p != "int8" or int8_calibrated)]
    built: dict[Candidate, Manifest] = {}
    folders: dict[Candidate, Path] = {}
    passed_over: dict[str, str] = {}
    try:
        for p in precisions:
            names, skipped = available_backends(p)
            if p == precision:
                passed_over.update(skipped)
            for name in names:
                folders[name, p] = staging.with_name(f"{staging.name}-{name}-{p}")
                try:
                    built[name, p] = build(folders[name, p], name, p)
                except (BuildError, BuildFailed, UnsupportedPrecision) as exc:
                    passed_over[f"{name} {p}"] = f"did not build ({exc})"
        engines = {key: load_engine(folders[key], threads=threads) for key in built}
        chosen, record = choose_measured(engines, precision, labelled=labelled, rounds=rounds,
                                         passed_over=passed_over)
        del engines
        shutil.rmtree(staging, ignore_errors=True)
        folders.pop(chosen).rename(staging)
    finally:
        for folder in folders.values():
            shutil.rmtree(folder, ignore_errors=True)
    manifest = built[chosen]
    manifest.tools.backend_choice = record
    manifest.save(staging)
    return manifest
