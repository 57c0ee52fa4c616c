"""Reduced precisions on the demo model: ground-truth AP within the project's bounds of fp32's.

The bounds (issue "accelerated engines"): int8 may lose at most 1.0 AP point and bf16 at most 0.3
against the eager fp32 reference, box and mask, scored by pycocotools on the first 100 demo val images
(the whole split of the default data), as the goals are measured (on its first 20 images alone, OpenVINO int8 lost 3.06 box points on the
shapes-only demo model of 2026-12-02, and 0.74 on all 50: a 50-image loss is itself uncertain by points,
see ``scripts/bench/fidelity.py``'s interval). Random
weights cannot show this (their detections mean nothing), so the test needs the trained demo model
(README, "Demo data and the demo model") and skips with that reason where it is absent, as in CI.
``MASKRCNN_DEMO_CHECKPOINT`` and ``MASKRCNN_DEMO_DATA`` point elsewhere.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CACHE, ROOT, build_into, cache_key, openvino_has_bf16

from build_tools.backend_choice import AP_BOUNDS
from service.backends import get_backend

DEMO = Path(os.environ.get("MASKRCNN_DEMO_CHECKPOINT", ROOT / ".cache/demo/demo_mask_rcnn.pth"))
DATA = Path(os.environ.get("MASKRCNN_DEMO_DATA", ROOT / ".cache/demo/data"))
CASES = [("openvino", "bf16"), ("openvino", "int8"), ("onnxruntime", "int8")]
# The first 100 val images (all 50 of the default data; `maskrcnn-demo data --val 500` makes more for
# scripts/bench/fidelity.py's intervals, which a whole-split run here would spend an hour on).
IMAGES = 100

missing = [str(p) for p in (DEMO, DATA / "annotations/instances_val.json", DATA / "train") if not p.exists()]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(bool(missing), reason=f"demo model or data absent ({', '.join(missing)}): "
                                              "train it with `maskrcnn-demo train` (README, demo model)"),
]


def _usable(backend: str, precision: str) -> str | None:
    module = get_backend(backend)
    ok, reason = module.available()
    if not ok:
        return reason
    if precision == "bf16" and not openvino_has_bf16():
        return "OpenVINO reports no bf16 on this CPU (neither AVX512_BF16 nor AMX)"
    return None


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    """One ``scripts.bench.build`` run (a subprocess: benchmarks are leaves): eager fp32 and every
    case on every demo val image."""
    from build_tools.checkpoint import sha256_of
    from build_tools.pipeline import export_step

    export = CACHE / f"demo-export-b1-{sha256_of(DEMO)[:12]}-{cache_key(demo=True)}"
    if not (export / "export.json").is_file():
        build_into(export, lambda tmp: export_step(tmp, str(DEMO)))
    cases = [c for c in CASES if _usable(*c) is None]
    out = tmp_path_factory.mktemp("fidelity") / "rows.json"
    bench = subprocess.run([
        sys.executable, "-m", "scripts.bench.build",
        "--export", str(export), "--backends", ",".join(dict.fromkeys(b for b, _ in cases)),
        "--precisions", ",".join(dict.fromkeys(p for _, p in cases)), "--calib-images", str(DATA / "train"),
        "--artifacts", str(CACHE / "demo-artifacts"), "--gt-data", str(DATA), "--gt-limit", str(IMAGES),
        "--iterations", "1", "--warmup", "0", "--no-stock", "--json", str(out),
    ], cwd=ROOT, capture_output=True, text=True)
    assert bench.returncode == 0, bench.stderr[-3000:]
    return {(r["backend"], r["precision"]): r for r in json.loads(out.read_text())}


@pytest.mark.parametrize(("backend", "precision"), CASES, ids=[f"{b}-{p}" for b, p in CASES])
def test_reduced_precision_keeps_ground_truth_ap(rows, backend, precision):
    why = _usable(backend, precision)
    if why:
        pytest.skip(why)
    eager, row = rows["pytorch", "fp32"], rows[backend, precision]
    assert row["skipped"] is None, row["skipped"]
    assert eager["gt_box_ap"] > 1.0, "the demo model detects nothing: AP deltas would mean nothing"
    bound = AP_BOUNDS[precision]
    assert row["gt_box_ap_delta_points"] <= bound and row["gt_mask_ap_delta_points"] <= bound, (
        f"{backend} {precision}: box AP {row['gt_box_ap']:.2f} / mask AP {row['gt_mask_ap']:.2f} vs eager fp32 "
        f"{eager['gt_box_ap']:.2f} / {eager['gt_mask_ap']:.2f}: more than {bound} points lost")
