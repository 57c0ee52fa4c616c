"""The contract every backend implements, once: named numpy arrays in, named arrays out.

The graph's tensors (docs/architecture.md) are named and typed here; a backend's runtime module
holds only what differs (how its library loads a model and runs one call) and its build module
(``build_tools/backends/<name>.py``) only how the library compiles the exported ONNX.

A runtime backend module provides:

- ``NAME``: its registry name; ``PRECISIONS``: the precisions it builds and runs;
- ``available() -> (bool, reason)``: whether its library (and hardware) is usable here;
- ``load(artifact_dir, manifest, threads=None, options=None) -> Engine``: open a built artifact;
  ``options`` are the backend's own service settings (``Settings.backend_options``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from service.manifest import Manifest

# The graph's inputs: the images, and which detections get a mask (docs/architecture.md). Graphs
# exported before masks were selected take only IMAGE_INPUTS; the manifest's input names say which.
INPUT_NAMES = ("images", "image_sizes", "mask_score_threshold", "mask_max_detections")
IMAGE_INPUTS = INPUT_NAMES[:2]
INPUT_DTYPES: Mapping[str, type[np.generic]] = {
    "images": np.float32, "image_sizes": np.int64, "mask_score_threshold": np.float32, "mask_max_detections": np.int64,
}
# mask_max_detections when a caller sets no limit: every detection gets its mask
NO_MASK_LIMIT = 2**31 - 1
OUTPUT_NAMES = ("dets", "labels", "masks")
OUTPUT_DTYPES: Mapping[str, type[np.generic]] = {"dets": np.float32, "labels": np.int64, "masks": np.float32}

PRECISIONS = ("fp32", "fp16", "bf16", "int8")
# The seed's MagicMind precision names are accepted as aliases.
PRECISION_ALIASES = {
    "force_float32": "fp32",
    "float32": "fp32",
    "force_float16": "fp16",
    "float16": "fp16",
    "qint8_mixed_float16": "int8",
}


class BackendUnavailable(RuntimeError):
    """The backend's library or hardware is not present, or the name is unknown."""


class UnsupportedPrecision(ValueError):
    """The backend cannot build the requested precision (or int8 got no calibration)."""


class BuildFailed(RuntimeError):
    """The backend's compiler ran and could not produce an engine (its log says why)."""


CGROUP_ROOT = Path("/sys/fs/cgroup")


def cpu_cores(cgroup_root: Path = CGROUP_ROOT) -> int:
    """CPU cores this process may use: its affinity mask (else the machine's count), capped by a
    cgroup CPU quota rounded up (a container given 1.5 CPUs gets 2 threads, not the host's 64).

    The one place cores are counted, for default thread counts and the CPU facts of a measurement.
    The quota is read from ``cgroup_root``: cgroup v2 ``cpu.max`` (``"quota period"`` in
    microseconds, ``"max ..."`` for none), else v1 ``cpu/cpu.cfs_quota_us`` over
    ``cpu/cpu.cfs_period_us`` (quota ``-1`` for none).
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = _cgroup_cpu_quota(cgroup_root)
    if quota is not None:
        cores = min(cores, math.ceil(quota))
    return max(1, cores)


def _cgroup_cpu_quota(root: Path) -> float | None:
    """CPUs the cgroup quota at ``root`` allows (quota / period), or None without a quota."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        try:
            quota = (root / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (root / "cpu" / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            return None
    try:
        quota_us, period_us = int(quota), int(period)
    except ValueError:  # v2 "max": no quota
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


# cgroup v2, then v1: the memory limit file and the usage file.
_CGROUP_MEMORY_FILES = (("memory.max", "memory.current"),
                        ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes"))


def cgroup_memory(cgroup_root: Path = CGROUP_ROOT) -> tuple[int, int | None] | None:
    """``(limit, usage)`` in bytes from the cgroup memory controller at ``cgroup_root`` (v2, else
    v1; usage None where unreadable); None where no limit is readable (v2 writes ``max`` for none).
    A v1 controller without a limit reports a huge number: callers cap it by what the machine has."""
    for limit_file, usage_file in _CGROUP_MEMORY_FILES:
        try:
            limit = int((cgroup_root / limit_file).read_text())
        except (OSError, ValueError):
            continue
        try:
            usage = int((cgroup_root / usage_file).read_text())
        except (OSError, ValueError):
            usage = None
        return limit, usage
    return None


def available_memory_bytes(cgroup_root: Path = CGROUP_ROOT, meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """Bytes this process could still allocate: the machine's ``MemAvailable``, capped by what its
    cgroup's memory limit leaves (``cgroup_memory``: limit - usage); None when neither is readable."""
    free = None
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    cgroup = cgroup_memory(cgroup_root)
    if cgroup is not None and cgroup[1] is not None:
        left = cgroup[0] - cgroup[1]
        free = left if free is None else min(free, left)
    return None if free is None else max(free, 0)


def canonical_precision(name: str) -> str:
    """``fp32``/``fp16``/``bf16``/``int8`` for a precision name or one of the seed's aliases.

    Raises:
        UnsupportedPrecision: a name that is neither.
    """
    precision = PRECISION_ALIASES.get(name, name)
    if precision not in PRECISIONS:
        known = ", ".join([*PRECISIONS, *PRECISION_ALIASES])
        raise UnsupportedPrecision(f"unknown precision {name!r}; expected one of {known}")
    return precision


def check_precision(backend: str, offered: Sequence[str], precision: str) -> str:
    """The canonical name of ``precision`` when ``backend`` offers it.

    Raises:
        UnsupportedPrecision: an unknown name, or one the backend does not build.
    """
    precision = canonical_precision(precision)
    if precision not in offered:
        raise UnsupportedPrecision(f"{backend} builds {', '.join(offered)}; {precision} is not offered")
    return precision


def require_calibration(calibration: Iterable[dict[str, np.ndarray]] | None) -> list[dict[str, np.ndarray]]:
    """The int8 calibration feeds as a list (``images``, ``image_sizes`` per feed).

    Raises:
        UnsupportedPrecision: no calibration given, or it yields no feed.
    """
    if calibration is None:
        raise UnsupportedPrecision("int8 needs calibration images (--calib-images DIR)")
    feeds = list(calibration)
    if not feeds:
        raise UnsupportedPrecision("int8 calibration got no images")
    return feeds


def input_feed(
    images: np.ndarray,
    image_sizes: np.ndarray,
    mask_score_threshold: np.ndarray | None = None,
    mask_max_detections: np.ndarray | None = None,
    names: Sequence[str] = INPUT_NAMES,
) -> dict[str, np.ndarray]:
    """The graph's inputs ``names`` (the manifest's ``input.names``), C-contiguous in their contract
    dtypes. Without a mask selection every image's detections all get masks (threshold 0, no limit)."""
    batch = len(images)
    arrays = {
        "images": images,
        "image_sizes": image_sizes,
        "mask_score_threshold": np.zeros(batch) if mask_score_threshold is None else mask_score_threshold,
        "mask_max_detections": np.full(batch, NO_MASK_LIMIT) if mask_max_detections is None else mask_max_detections,
    }
    return {name: np.ascontiguousarray(arrays[name], dtype=INPUT_DTYPES[name]) for name in names}


class Engine(Protocol):
    """A loaded engine. Not thread-safe unless the backend says so: one worker drives one engine."""

    manifest: Manifest
    threads: int | None

    @property
    def batch_size(self) -> int | None:
        """Fixed batch size of the graph, or None when the batch is mutable."""

    def infer(self, images: np.ndarray, image_sizes: np.ndarray, mask_score_threshold: np.ndarray | None = None,
              mask_max_detections: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """``images`` float32 [B,3,H,W], ``image_sizes`` int64 [B,2] -> ``dets``, ``labels``, ``masks``.

        ``mask_score_threshold`` float32 [B] and ``mask_max_detections`` int64 [B]: masks only for
        the detections a request with those options gets back (None: for all); graphs built
        before the selection existed ignore them."""


class EngineBase:
    """What every engine shares: its manifest, its batch size, and the named, typed outputs.

    A subclass implements ``_run(feed) -> [dets, labels, masks]`` (in ``OUTPUT_NAMES`` order) for
    the feed of :func:`input_feed`; outputs are converted to the contract's dtypes (some runtimes
    return int32 labels).

    Attributes:
        manifest: the artifact's manifest.
        threads: intra-op threads the engine computes with, or None where the device does the work.
    """

    def __init__(self, manifest: Manifest, threads: int | None = None) -> None:
        self.manifest = manifest
        self.threads = threads

    # the compiled shape that ran the last call: "HxW" of a static shape bucket, or "dynamic"
    last_shape: str = "dynamic"

    @property
    def batch_size(self) -> int | None:
        return self.manifest.batch_size

    def _run(self, feed: dict[str, np.ndarray]) -> Sequence[np.ndarray]:
        raise NotImplementedError

    def infer(self, images: np.ndarray, image_sizes: np.ndarray, mask_score_threshold: np.ndarray | None = None,
              mask_max_detections: np.ndarray | None = None) -> dict[str, np.ndarray]:
        outputs = self._run(input_feed(images, image_sizes, mask_score_threshold, mask_max_detections,
                                       names=self.manifest.input.names))
        if len(outputs) != len(OUTPUT_NAMES):
            raise BackendUnavailable(f"the engine returned {len(outputs)} outputs, expected {len(OUTPUT_NAMES)}")
        return {name: np.asarray(array).astype(OUTPUT_DTYPES[name], copy=False)
                for name, array in zip(OUTPUT_NAMES, outputs)}


class Backend(Protocol):
    """A runtime backend module (see the module docstring)."""

    NAME: str
    PRECISIONS: tuple[str, ...]

    def available(self) -> tuple[bool, str]:
        """(True, "") when usable here, else (False, why)."""

    def load(self, artifact_dir: Path, manifest: Manifest, threads: int | None = None,
             options: Mapping[str, Any] | None = None) -> Engine:
        """Open a built artifact for inference."""
