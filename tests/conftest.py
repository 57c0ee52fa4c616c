"""Shared fixtures: real exported engines, built once and cached on disk.

Exporting the full R50-FPN Mask R-CNN takes about half a minute on 2 cores, so artifacts are cached
under ``$MASKRCNN_TEST_CACHE`` (default ``~/.cache/maskrcnn-serve/tests``), keyed by a hash of the
source files that produce them and the build parameters; any change to those files rebuilds.

What tests share (import plain functions with ``from conftest import ...``):

- fixtures: ``photos`` (a folder of real photographs), ``export_dir`` (the random-init export),
  ``engine_dir`` / ``engine_dir_b2`` / ``engine_dir_mutable`` (ONNX Runtime fp32 artifacts of batch
  1, fixed 2, mutable 1..4), ``reference_model`` (the eager model of ``export_dir``);
- the same as functions, for tests that build their own variant: ``photo_dir``, ``cached_export``,
  ``cached_artifact``, ``cached_mutable_export``, ``cached_mutable_artifact``;
- ``cache_key(**params)`` and ``build_into(folder, build)``: how a test caches an artifact of its
  own under ``CACHE`` (the key changes with ``PRODUCERS``, the build is renamed into place);
- ``minimal_manifest`` (a valid manifest without a real model), ``openvino_has_bf16``, ``ROOT``;
- ``perturb_batch_norms_(model, seed)``: non-identity BN statistics for random mmdet checkpoints;
- ``wait_until(condition)``: poll, fail the test when it stays false.

The cache stays bounded: every entry's name ends in its ``cache_key``, so each change to the producers
adds a new generation beside the old one. At the start of a session ``prune_cache`` keeps the
``KEEP_GENERATIONS`` newest entries of each kind (the name without its key) and removes the rest and
any half-built ``.tmp<pid>`` folder of a process that is gone (a 2-core CI disk filled up with 38 GiB of
stale generations before this).

A live server (in-process or a ``maskrcnn-serve`` subprocess) comes from ``serving`` in
``scripts/tools/service_process.py``, the one module tests and tools start the service with.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("MASKRCNN_TEST_CACHE", Path.home() / ".cache" / "maskrcnn-serve" / "tests"))
# Everything that decides the bytes of the exports and ONNX Runtime artifacts built here.
PRODUCERS = sorted(
    [*ROOT.glob("build_tools/**/*.py"),
     *(ROOT / "service/backends" / n for n in ("__init__.py", "base.py", "onnxruntime.py")),
     ROOT / "service/manifest.py", ROOT / "service/preprocess.py", ROOT / "service/postprocess.py"]
)
KEEP_GENERATIONS = 2
STALE_BUILD_S = 6 * 3600
_KEYED = re.compile(r"^(?P<kind>.+)-[0-9a-f]{16}(?P<ext>\.[a-z]+)?$")
_BUILDING = re.compile(r"^.+\.tmp(?P<pid>[0-9]+)$")
SAMPLE_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "motorcycle_left.png", "rocket.jpg")


def cache_key(**params) -> str:
    """16 hex digits of ``params``, the torch version and every file of ``PRODUCERS``."""
    import torch

    digest = hashlib.sha256(repr(sorted(params.items())).encode() + torch.__version__.encode())
    for path in PRODUCERS:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def prune_cache(folder: Path = CACHE, keep: int = KEEP_GENERATIONS) -> list[Path]:
    """Remove all but the ``keep`` newest (by modification time) keyed entries of each kind in
    ``folder``, and ``.tmp<pid>`` folders untouched for ``STALE_BUILD_S`` whose process is gone (a
    session in another PID namespace sharing the folder may still be building a fresh one);
    return what was removed."""
    if not folder.is_dir():
        return []
    kinds: dict[tuple[str, str], list[Path]] = {}
    removed = []
    for entry in folder.iterdir():
        building = _BUILDING.match(entry.name)
        if building:
            if time.time() - entry.stat().st_mtime < STALE_BUILD_S:
                continue
            try:
                os.kill(int(building["pid"]), 0)
            except ProcessLookupError:
                removed.append(entry)
            except PermissionError:  # alive, another user's
                pass
            continue
        keyed = _KEYED.match(entry.name)
        if keyed:
            kinds.setdefault((keyed["kind"], keyed["ext"] or ""), []).append(entry)
    for entries in kinds.values():
        entries.sort(key=lambda e: e.stat().st_mtime, reverse=True)
        removed.extend(entries[keep:])
    for entry in removed:
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
    return removed


def pytest_sessionstart(session) -> None:
    removed = prune_cache()
    if removed:
        print(f"\ntest cache {CACHE}: removed {len(removed)} stale entries (kept the "
              f"{KEEP_GENERATIONS} newest of each kind)")


def wait_until(condition, timeout_s: float = 30.0) -> None:
    """Poll ``condition()`` every 0.1 s until it is true; AssertionError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.1)


def openvino_has_bf16() -> bool:
    """Whether OpenVINO is installed and reports BF16 for this CPU (AVX512_BF16 or AMX): where it
    does not, a bf16 build is refused (``UnsupportedPrecision``) instead of running as fp32."""
    from service.backends import openvino

    return openvino.available()[0] and "BF16" in openvino.cpu_capabilities()


def cached_export(batch_size: int = 1, score_threshold: float = 0.0, seed: int = 0) -> Path:
    """Export folder (model.onnx + export.json) of the random-init mmdet-config model."""
    from build_tools.pipeline import export_step

    folder = CACHE / f"export-b{batch_size}-s{score_threshold}-seed{seed}-{cache_key(b=batch_size, s=score_threshold, seed=seed)}"
    if not (folder / "export.json").is_file():
        build_into(folder, lambda tmp: export_step(tmp, None, random_init_seed=seed, batch_size=batch_size,
                                                   score_threshold=score_threshold))
    return folder


def build_into(folder: Path, build) -> None:
    """Run ``build(tmp)`` in a private folder, then move it into place; concurrent test sessions
    (several pytest processes share the cache) each build privately and the first rename wins."""
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    build(tmp)
    try:
        tmp.rename(folder)
    except OSError:  # another session finished first; its copy is identical
        shutil.rmtree(tmp, ignore_errors=True)


def cached_artifact(batch_size: int = 1, precision: str = "fp32") -> Path:
    """A compiled ONNX Runtime artifact (verified at fp32 on one sample photo) of ``cached_export``."""
    from build_tools.pipeline import compile_step

    export_dir = cached_export(batch_size)
    folder = CACHE / f"artifact-b{batch_size}-{precision}-{export_dir.name.rsplit('-', 1)[1]}"
    if not (folder / "manifest.json").is_file():
        build_into(folder, lambda tmp: compile_step(
            export_dir, tmp, precision=precision, verify_images=photo_dir(), verify_count=1,
            calib_images=photo_dir() if precision == "int8" else None, calib_count=2,
            allow_parity_failure=precision != "fp32", progress=False))
    return folder


def photo_dir() -> Path:
    """A folder of real photographs (scikit-image's samples, copied so listing order is fixed)."""
    import skimage

    folder = CACHE / "photos"
    folder.mkdir(parents=True, exist_ok=True)
    for name in SAMPLE_PHOTOS:
        if not (folder / name).is_file():
            shutil.copyfile(Path(skimage.data_dir) / name, folder / name)
    return folder


@pytest.fixture(scope="session")
def photos() -> Path:
    return photo_dir()


@pytest.fixture(scope="session")
def export_dir() -> Path:
    return cached_export(batch_size=1)


@pytest.fixture(scope="session")
def engine_dir() -> Path:
    """Real ONNX Runtime fp32 artifact, batch 1, random-init weights, score threshold 0."""
    return cached_artifact(batch_size=1)


@pytest.fixture(scope="session")
def engine_dir_b2() -> Path:
    """As ``engine_dir`` with a fixed batch of 2."""
    return cached_artifact(batch_size=2)


@pytest.fixture(scope="session")
def reference_model(export_dir):
    """The eager PyTorch model the cached export was made from."""
    from build_tools.export import read_export_info
    from build_tools.reference import reference_for_export

    return reference_for_export(read_export_info(export_dir)).model


def cached_mutable_export(max_batch: int = 4) -> Path:
    """Export folder of the random-init mmdet-config model (score threshold 0, seed 0: the weights of
    ``cached_export``) with a mutable batch of 1..``max_batch``."""
    from build_tools.pipeline import export_step

    folder = CACHE / f"export-mut{max_batch}-s0.0-seed0-{cache_key(b=max_batch, s=0.0, seed=0, mutable=True)}"
    if not (folder / "export.json").is_file():
        build_into(folder, lambda tmp: export_step(tmp, None, random_init_seed=0, batch_size=max_batch,
                                                   shape_mutable=True, score_threshold=0.0))
    return folder


def cached_mutable_artifact(max_batch: int = 4) -> Path:
    """An ONNX Runtime fp32 artifact of ``cached_mutable_export``, not verified at build time."""
    from build_tools.pipeline import compile_step

    export_dir = cached_mutable_export(max_batch)
    folder = CACHE / f"artifact-mut{max_batch}-fp32-{export_dir.name.rsplit('-', 1)[1]}"
    if not (folder / "manifest.json").is_file():
        build_into(folder, lambda tmp: compile_step(export_dir, tmp, precision="fp32", run_verify=False,
                                                    progress=False))
    return folder


@pytest.fixture(scope="session")
def engine_dir_mutable() -> Path:
    """ONNX Runtime fp32 artifact with a mutable batch (max 4), random-init weights, score
    threshold 0; tests/test_mutable_batch.py checks its parity."""
    return cached_mutable_artifact(max_batch=4)


def perturb_batch_norms_(model, seed: int) -> None:
    """Non-identity frozen BN statistics near identity, so a swapped or dropped BN buffer shows. The
    scales are perturbed multiplicatively: ``init_random_``'s scaled residual branches of deep stages
    stay scaled (replaced by ~1, R101's features grow 5x and every RPN score saturates at 1)."""
    import torch
    from torchvision.ops import FrozenBatchNorm2d

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, FrozenBatchNorm2d):
                n = module.weight.numel()
                module.weight.mul_(1 + 0.1 * torch.randn(n, generator=gen))
                module.bias.copy_(0.1 * torch.randn(n, generator=gen))
                module.running_mean.copy_(0.1 * torch.randn(n, generator=gen))
                module.running_var.copy_(torch.exp(0.2 * torch.randn(n, generator=gen)))


def minimal_manifest(folder: Path, batch_size: int = 1, **changes):
    """A valid manifest of a fixed-batch graph, saved in ``folder`` beside an empty model file:
    for code that reads a manifest without running the model."""
    from build_tools.classes import coco_class_table
    from service.manifest import Manifest
    from service.preprocess import InputSpec

    n = 100
    tensor = {"dtype": "float32", "shape": ["B", n], "meaning": "-"}
    fields = dict(
        backend="onnxruntime", precision="fp32", model_file="model.onnx", origin="random-init",
        input=InputSpec().to_manifest_input(),
        shape_profile={"batch": {"mutable": False, "size": batch_size}, "min_hw": [32, 32], "opt_hw": [800, 1344],
                       "max_hw": [1344, 1344]},
        outputs={"dets": tensor, "labels": tensor, "masks": tensor, "padding": "-"},
        postprocess={"score_threshold": 0.05, "mask_threshold": 0.5, "max_detections": n, "paste": "mmdet"},
        classes=coco_class_table(),
    )
    manifest = Manifest.model_validate({**fields, **changes})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / manifest.model_file).write_bytes(b"")
    manifest.save(folder)
    return manifest
