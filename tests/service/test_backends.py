"""The runtime contract, once for every registered backend (``service.backends.backend_names()``).

Every backend is registered with a runtime and a build module and reports its availability with a
reason; where available, the cached export compiled at fp32 loads into an engine that returns the
graph's outputs by name, dtype and shape, in parity with eager PyTorch. Unavailable backends are
refused by the pipeline and by ``load_engine`` with their reason. Serving imports no compiler.
What a builder refuses before touching its library is tests/build_tools/test_builders.py's.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT

from build_tools.backends import get_builder
from build_tools.errors import BuildError
from build_tools.images import list_images
from build_tools.pipeline import calibration_feeds, compile_step
from build_tools.verify import Tolerance, check_tolerance, verify
from service.backends import BackendUnavailable, backend_names, get_backend, load_engine
from service.admission import memory_limit_bytes
from service.backends.base import (
    OUTPUT_DTYPES,
    OUTPUT_NAMES,
    PRECISIONS,
    available_memory_bytes,
    cgroup_memory,
    cpu_cores,
)
from service.manifest import Manifest

NAMES = backend_names()
AVAILABILITY = {name: get_backend(name).available() for name in NAMES}


def needs(name: str) -> None:
    ok, reason = AVAILABILITY[name]
    if not ok:
        pytest.skip(reason)


@pytest.mark.parametrize("name", NAMES)
def test_registered_with_a_runtime_and_a_build_module(name):
    module = get_backend(name)
    assert module.NAME == name
    assert module.PRECISIONS and "fp32" in module.PRECISIONS and set(module.PRECISIONS) <= set(PRECISIONS)
    assert callable(module.available) and callable(module.load)
    assert callable(get_builder(name).compile)


@pytest.mark.parametrize("name, precisions, model_file", [
    ("openvino", ("fp32", "bf16", "int8"), "model.xml"),
    ("tensorrt", ("fp32", "fp16", "int8"), "model.plan"),
    ("magicmind", ("fp32", "fp16", "int8"), "model.mm"),
])
def test_registered_with_its_precisions(name, precisions, model_file):
    module = get_backend(name)
    assert module.NAME == name
    assert module.PRECISIONS == precisions
    assert get_builder(name).MODEL_FILE == model_file


def test_unknown_backend_names_are_refused():
    with pytest.raises(BackendUnavailable, match="unknown backend 'nope'"):
        get_builder("nope")
    with pytest.raises(BackendUnavailable, match="unknown backend 'nope'"):
        get_backend("nope")


@pytest.mark.parametrize("files, cap", [
    ({"cpu.max": "150000 100000\n"}, 2),  # v2: 1.5 CPUs round up
    ({"cpu.max": "100000 100000\n"}, 1),
    ({"cpu.max": "max 100000\n"}, None),  # v2 without a quota
    ({"cpu/cpu.cfs_quota_us": "50000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1),  # v1
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({}, None),  # no cgroup files: the affinity mask alone
])
def test_cpu_cores_honours_the_cgroup_quota_and_the_affinity_mask(tmp_path, files, cap):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    affinity = len(os.sched_getaffinity(0))
    assert cpu_cores(tmp_path) == (affinity if cap is None else min(affinity, cap))


@pytest.mark.parametrize("files, expected", [
    ({"memory.max": "3000000000\n", "memory.current": "1000000000\n"}, 2_000_000_000),  # v2 limit
    ({"memory.max": "max\n", "memory.current": "1000000000\n"}, 8 * 2**30),  # v2 without a limit
    ({"memory/memory.limit_in_bytes": "2000000000\n", "memory/memory.usage_in_bytes": "500000000\n"},
     1_500_000_000),  # v1
    ({"memory.max": "1000\n", "memory.current": "5000\n"}, 0),  # over the limit: nothing left
    ({}, 8 * 2**30),  # no cgroup files: the machine's MemAvailable
])
def test_available_memory_is_capped_by_the_cgroup_limit(tmp_path, files, expected):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(f"MemTotal:       24000000 kB\nMemAvailable:    {8 * 2**20} kB\n")
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert available_memory_bytes(tmp_path, meminfo) == expected
    assert available_memory_bytes(tmp_path / "none", tmp_path / "absent") is None
    assert 0 < available_memory_bytes() <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@pytest.mark.parametrize("files, cgroup, limit", [
    ({"memory.max": "3000000000\n", "memory.current": "1000000000\n"}, (3_000_000_000, 1_000_000_000),
     3_000_000_000),  # v2
    ({"memory.max": "max\n", "memory.current": "1000000000\n"}, None, None),  # v2 without a limit
    ({"memory/memory.limit_in_bytes": "2000000000\n"}, (2_000_000_000, None), 2_000_000_000),  # v1, no usage file
    ({"memory/memory.limit_in_bytes": f"{2**63 - 4096}\n"}, (2**63 - 4096, None), None),  # v1 without a limit
    ({}, None, None),  # no cgroup files
])
def test_the_admission_budget_and_the_bucket_check_read_one_cgroup_limit(tmp_path, files, cgroup, limit):
    """The memory limit behind the default request budget (admission) and the memory left behind
    the learned shape buckets (``available_memory_bytes``) come from the same cgroup reading;
    None for the limit means the machine's physical memory."""
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cgroup_memory(tmp_path) == cgroup
    assert memory_limit_bytes(tmp_path) == (physical if limit is None else min(limit, physical))


@pytest.mark.parametrize("name", NAMES)
def test_availability_is_a_reason_not_an_exception(name):
    ok, reason = AVAILABILITY[name]
    assert isinstance(ok, bool) and isinstance(reason, str)
    assert ok or reason


@pytest.mark.parametrize("name", NAMES)
def test_unavailable_backend_is_refused_with_its_reason(name, engine_dir, tmp_path):
    ok, reason = AVAILABILITY[name]
    if ok:
        pytest.skip(f"{name} is available here")
    (tmp_path / "export.json").write_text("{}")
    with pytest.raises(BuildError, match=f"backend {name} is not available here") as info:
        compile_step(tmp_path, tmp_path / "artifact", backend=name, precision="fp32")
    assert reason in str(info.value)
    artifact = tmp_path / "engine"
    artifact.mkdir()
    Manifest.load(engine_dir).model_copy(update={"backend": name, "model_file": "model.bin"}).save(artifact)
    (artifact / "model.bin").write_bytes(b"")
    with pytest.raises(BackendUnavailable, match=f"backend '{name}' is not available here") as info:
        load_engine(artifact)
    assert reason in str(info.value)


@pytest.mark.parametrize("name", NAMES)
def test_fp32_compiles_loads_and_matches_eager(name, export_dir, reference_model, photos, tmp_path):
    needs(name)
    manifest = compile_step(export_dir, tmp_path / name, backend=name, precision="fp32",
                            verify_images=photos, verify_count=1, progress=False)
    assert (manifest.backend, manifest.precision) == (name, "fp32")
    assert manifest.model_file == get_builder(name).MODEL_FILE and manifest.parity.passed, manifest.parity
    engine = load_engine(tmp_path / name)
    assert engine.batch_size == 1 and engine.manifest.backend == name

    feed = next(calibration_feeds(list_images(photos)[:1], manifest.input.spec, 1))
    out = engine.infer(feed["images"], feed["image_sizes"])
    n = manifest.postprocess.max_detections
    assert tuple(out) == OUTPUT_NAMES
    assert {k: v.dtype for k, v in out.items()} == {k: np.dtype(OUTPUT_DTYPES[k]) for k in OUTPUT_NAMES}
    assert out["dets"].shape == (1, n, 5) and out["labels"].shape == (1, n) and out["masks"].shape == (1, n, 28, 28)

    paths = list_images(photos)[1:3]
    report = verify(reference_model, engine, paths, manifest.input.spec, progress=False)
    assert report.reference_detections == 100 * len(paths)
    assert not check_tolerance(report, Tolerance.for_precision("fp32")), report


def test_serving_imports_no_compiler(engine_dir):
    """The service and every runtime backend module, with a real engine loaded and run, import
    neither a compiler (NNCF, ONNX Runtime's quantisation, ``onnx``) nor torch."""
    script = f"""
import sys
import numpy as np
import service.app
from service.backends import backend_names, get_backend, load_engine
for name in backend_names():
    get_backend(name)
engine = load_engine({str(engine_dir)!r})
engine.infer(np.zeros((1, 3, 64, 64), np.float32), np.array([[64, 64]]))
print(",".join(m for m in ("nncf", "onnx", "onnxruntime.quantization", "torch") if m in sys.modules))
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"serving imported {done.stdout.strip()}"
