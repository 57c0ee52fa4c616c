"""The eager reference: the PyTorch model an engine was built from, and how to run it like one.

An artifact's manifest and an export folder's ``export.json`` both record the checkpoint and the
inference config; :func:`eager_reference` rebuilds the model from those facts (refusing a
checkpoint file that changed since), for verify, the benchmarks and the perf tool.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict
from typing import Any

import numpy as np
import torch

from build_tools.checkpoint import LoadedCheckpoint, load_checkpoint
from build_tools.errors import BuildError
from build_tools.export import ExportInfo
from build_tools.model import InferenceConfig, MaskRCNN
from service.backends.base import OUTPUT_NAMES
from service.manifest import CheckpointInfo, ClassEntry, Manifest

Infer = Callable[[np.ndarray, np.ndarray], dict[str, np.ndarray]]


def eager_reference(
    checkpoint: CheckpointInfo,
    inference_config: Mapping[str, Any],
    classes: Sequence[ClassEntry],
    *,
    score_threshold: float | None = None,
) -> LoadedCheckpoint:
    """The eager model of ``checkpoint`` with exactly the recorded ``inference_config`` (the fields
    of ``build_tools.model.InferenceConfig``: architecture, label layout, test settings;
    ``score_threshold`` replaces its ``score_thresh``), its output classes named by ``classes``.

    Raises:
        BuildError: the checkpoint file changed since it was recorded (another sha256).
        CheckpointError: the checkpoint cannot be read or does not fit the recorded config.
    """
    config = InferenceConfig.from_record(inference_config)
    if score_threshold is not None:
        config = config.with_overrides(score_thresh=score_threshold)
    names = [c.name for c in sorted(classes, key=lambda c: c.index)]
    if checkpoint.format == "random-init":
        return load_checkpoint(None, random_init_seed=checkpoint.random_init_seed, config=config, class_names=names)
    loaded = load_checkpoint(checkpoint.source, checkpoint.format, config=config, class_names=names)
    if loaded.sha256 != checkpoint.sha256:
        raise BuildError(f"checkpoint {checkpoint.source} changed since export (sha256 {loaded.sha256} != {checkpoint.sha256})")
    return loaded


def reference_for_manifest(manifest: Manifest, score_threshold: float | None = None) -> LoadedCheckpoint:
    """The eager model an engine artifact was built from (see :func:`eager_reference`)."""
    return eager_reference(manifest.checkpoint, manifest.inference_config, manifest.classes,
                           score_threshold=score_threshold)


def reference_for_export(info: ExportInfo) -> LoadedCheckpoint:
    """The eager model that produced an export folder (see :func:`eager_reference`)."""
    return eager_reference(info.checkpoint, asdict(info.inference_config), info.classes)


def run_eager(model: MaskRCNN, images: np.ndarray, sizes: np.ndarray) -> dict[str, np.ndarray]:
    """``model`` on float32 ``images [B,3,H,W]`` and int64 ``sizes [B,2]`` -> the graph's outputs by name."""
    with torch.no_grad():
        outputs = model(torch.from_numpy(images), torch.from_numpy(sizes))
    return {name: tensor.numpy() for name, tensor in zip(OUTPUT_NAMES, outputs)}


def eager_infer(model: MaskRCNN) -> Infer:
    """``model`` behind the engine's ``infer`` signature."""
    return lambda images, sizes: run_eager(model, images, sizes)


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run torch with ``threads`` intra-op threads inside the block (unchanged when None)."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# torch's fp32 settings the reference runs under: oneDNN convolutions and matmuls in IEEE fp32
# (torch's default is "none", which leaves oneDNN free to follow ONEDNN_DEFAULT_FPMATH_MODE, e.g. bf16
# on an AMX CPU) and matmuls at "highest" (no TF32/bf16 passes).
FP32_PINS = {"torch.backends.mkldnn.fp32_precision": "ieee", "torch.float32_matmul_precision": "highest"}


@contextlib.contextmanager
def fp32_pinned() -> Iterator[dict[str, str]]:
    """Run torch's fp32 paths at full IEEE fp32 inside the block (:data:`FP32_PINS`), restoring the
    previous settings after; yields what was pinned, with ``ONEDNN_DEFAULT_FPMATH_MODE`` and
    ``ONEDNN_MAX_CPU_ISA`` when set (they change oneDNN's kernels, not the precision asked for)."""
    import os

    mkldnn = torch.backends.mkldnn
    previous = (mkldnn.fp32_precision, mkldnn.conv.fp32_precision, mkldnn.matmul.fp32_precision,
                torch.get_float32_matmul_precision())
    mkldnn.fp32_precision = mkldnn.conv.fp32_precision = mkldnn.matmul.fp32_precision = "ieee"
    torch.set_float32_matmul_precision("highest")
    record = dict(FP32_PINS)
    record.update({name: os.environ[name] for name in ("ONEDNN_DEFAULT_FPMATH_MODE", "ONEDNN_MAX_CPU_ISA")
                   if name in os.environ})
    try:
        yield record
    finally:
        mkldnn.fp32_precision, mkldnn.conv.fp32_precision, mkldnn.matmul.fp32_precision = previous[:3]
        torch.set_float32_matmul_precision(previous[3])
