"""The per-part engine profile (``python -m scripts.bench.profile``) of the real small cached engine.

A benchmark is a leaf that tests do not import, so the profile runs as its command, once, on the
ONNX Runtime artifact at a small input, and its ``--json`` report is checked: every part has time,
the parts add up to the profiler's total, each op the graph has one of lands in its part, and the
FLOP count holds the stem convolution counted by hand.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow

HEIGHT, WIDTH = 224, 320
PARTS = ("backbone", "fpn", "rpn_head", "proposals", "roi_align", "box_head", "detections", "mask_head", "other")


@pytest.fixture(scope="module")
def report(engine_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("profile") / "profile.json"
    run = subprocess.run(
        [sys.executable, "-m", "scripts.bench.profile", "--engines", str(engine_dir), "--height", str(HEIGHT),
         "--width", str(WIDTH), "--runs", "1", "--peak-size", "512", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "everything else" in run.stdout and "top non-conv/matmul ops" in run.stdout
    return json.loads(out.read_text())


def test_every_part_has_time_and_the_parts_add_up(report):
    (engine,) = report["engines"]
    assert engine["kind"] == "onnxruntime" and report["input_shape"] == [1, 3, HEIGHT, WIDTH]
    assert tuple(engine["parts_s"]) == PARTS
    assert all(engine["parts_s"][p] > 0 for p in PARTS if p != "other")
    assert sum(engine["parts_s"].values()) == pytest.approx(engine["total_s"], rel=1e-9)
    assert engine["total_s"] <= engine["wall_s"] * 1.001
    # what no part claims stays small: the time between nodes and nodes no name or neighbour maps
    assert engine["parts_share"]["other"] < 0.15
    assert len(engine["top_non_arithmetic"]) == 5
    assert engine["arithmetic_s"] > 0 and report["peaks"]["fp32"]["tflops"] > 0


def test_ops_land_in_their_parts(report):
    ops = report["engines"][0]["ops_by_part_s"]
    where = {op: {part for part in PARTS if op in ops[part]}
             for op in ("RoiAlign", "ConvTranspose", "NonMaxSuppression")}
    assert where == {"RoiAlign": {"roi_align"}, "ConvTranspose": {"mask_head"},
                     "NonMaxSuppression": {"proposals", "detections"}}
    fully_connected = {part for part in PARTS for op in ops[part] if "Gemm" in op or "MatMul" in op}
    assert fully_connected == {"box_head"}


def test_flops_hold_the_hand_counted_stem_convolution(report):
    # 7x7 stride-2 conv, 3 -> 64 channels, output H/2 x W/2: 2 FLOPs per multiply-add
    stem = 2 * 64 * (HEIGHT // 2) * (WIDTH // 2) * 3 * 7 * 7
    flops = report["flops"]
    assert stem in flops["nodes"].values()
    assert flops["total"] == sum(flops["nodes"].values()) > stem
    roofline = report["engines"][0]["roofline"]
    assert roofline["gflop"] == pytest.approx(flops["total"] / 1e9)
    assert roofline["tflops"] > 0 and roofline["of_peak"] > 0


def test_int8_peak_runs_int8_layers_and_is_their_marginal_rate():
    from scripts.bench.profile import INT8_CHAINS, _openvino_int8_chain, matmul_peaks

    request, feed = _openvino_int8_chain(256, INT8_CHAINS[0])
    runtime = request.get_compiled_model().get_runtime_model()
    layers = [op for op in runtime.get_ordered_ops()
              if str(op.get_rt_info()["layerType"].astype(str)) == "FullyConnected"]
    assert len(layers) == INT8_CHAINS[0]
    # the plugin ran every layer on int8 inputs (FakeQuantize folded), not widened to f32
    assert all(str(op.get_rt_info()["runtimePrecision"].astype(str)).lower() in ("i8", "u8") for op in layers)
    result = next(iter(request.infer(feed).values()))
    # scaled so that each layer's output stays inside the next FakeQuantize's range: not saturated
    assert np.isfinite(result).all() and 0 < np.abs(result).max() < 4
    peak = matmul_peaks(256, ["int8"], iterations=2)["int8"]
    assert peak["tflops"] > 0 and f"chain of {INT8_CHAINS[1]} over {INT8_CHAINS[0]}" in peak["how"]
