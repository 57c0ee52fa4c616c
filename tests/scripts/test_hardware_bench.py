"""The goals table of issue 27 (``python -m scripts.bench.hardware``) from the real small cached engine.

A benchmark is a leaf that tests do not import, so the benchmark runs as its command, once, on the
ONNX Runtime artifact (no OpenVINO builds: ``--engines`` given), one round, a small photo and a
small peak matmul; its ``--json`` report is checked: every goal row is there, every median is
positive and is the median of its samples, and every ratio is the one of the medians it names.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

import pytest

from conftest import ROOT, cached_export

pytestmark = pytest.mark.slow

ROWS = ("openvino_bf16", "openvino_int8", "best_fp32", "default_engine", "ten_returned", "non_arithmetic",
        "conv_fc_of_peak", "int8_conv_vs_bf16")
RUNNERS = ("eager fp32", "eager bf16 autocast", "onnxruntime fp32, 100 returned", "onnxruntime fp32, 10 returned")


def bench(engine, out, *options):
    """The bench's stdout and ``--json`` report on ``engine``: a small photo and peak matmul."""
    done = subprocess.run(
        [sys.executable, "-m", "scripts.bench.hardware", "--engines", str(engine), *options,
         "--size", "240x320", "--peak-size", "512", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout, json.loads(out.read_text())


@pytest.fixture(scope="module")
def run(engine_dir, tmp_path_factory):
    return bench(engine_dir, tmp_path_factory.mktemp("hardware") / "hardware.json", "--rounds", "1",
                 "--profile-runs", "1")


def test_every_row_is_printed_and_written(run):
    stdout, report = run
    assert [row["key"] for row in report["goals"]] == list(ROWS)
    assert "| engine | goal | measured | met |" in stdout
    for row in report["goals"]:
        assert f"| {row['engine']} | {row['goal']} |" in stdout
    assert report["cpu"] in stdout and report["command"] in stdout
    assert report["command"].startswith("python -m scripts.bench.hardware --engines")
    # no OpenVINO engine in this run: those rows say so; every other row is measured
    absent = {row["key"] for row in report["goals"] if not row["checks"]}
    assert absent == {"openvino_bf16", "openvino_int8", "int8_conv_vs_bf16"}
    assert all(row["met"] is None and row["note"] for row in report["goals"] if row["key"] in absent)


def test_medians_are_positive_and_of_their_samples(run):
    _, report = run
    assert tuple(report["medians_s"]) == RUNNERS
    for name in RUNNERS:
        samples = report["samples_s"][name]
        assert len(samples) == 1 and all(s > 0 for s in samples)
        assert report["medians_s"][name] == statistics.median(samples)
    detections = report["detections"]
    assert detections["onnxruntime fp32, 10 returned"] == 10
    assert detections["onnxruntime fp32, 100 returned"] > 10
    assert detections["eager fp32"] > 10 and detections["eager bf16 autocast"] > 10


def test_ratios_are_those_of_the_medians(run):
    _, report = run
    medians = report["medians_s"]
    checks = [c for row in report["goals"] for c in row["checks"]]
    ratios = [c for c in checks if c["kind"] == "ratio"]
    assert len(ratios) == 4  # best fp32 vs eager and vs floor, default vs peer, 10 vs 100
    for check in ratios:
        assert check["numerator_s"] == medians[check["numerator"]]
        if check["denominator"] is not None:
            assert check["denominator_s"] == medians[check["denominator"]]
        assert check["value"] == pytest.approx(check["numerator_s"] / check["denominator_s"])
        assert check["value"] > 0
    by_row = {row["key"]: row["checks"] for row in report["goals"]}
    (vs_eager, vs_floor), (vs_peer,), (ten,) = by_row["best_fp32"], by_row["default_engine"], by_row["ten_returned"]
    assert (vs_eager["numerator"], vs_eager["denominator"]) == ("onnxruntime fp32, 100 returned", "eager fp32")
    assert vs_peer["denominator"] == "eager bf16 autocast"
    assert (ten["numerator"], ten["denominator"]) == ("onnxruntime fp32, 10 returned", "onnxruntime fp32, 100 returned")
    profiled = report["profile"]
    floor_s = profiled["flops"]["total"] / profiled["peaks"]["fp32"]["tflops"] / 1e12
    assert vs_floor["denominator"] is None and vs_floor["denominator_s"] == pytest.approx(floor_s)


def test_profile_shares_and_verdicts(run):
    _, report = run
    (engine,) = report["profile"]["engines"]
    (share,) = [c for c in report["goals"] if c["key"] == "non_arithmetic"][0]["checks"]
    (of_peak,) = [c for c in report["goals"] if c["key"] == "conv_fc_of_peak"][0]["checks"]
    assert share["value"] == engine["non_arithmetic_share"] and 0 < share["value"] < 1
    assert of_peak["value"] == engine["roofline"]["of_peak"] > 0
    for row in report["goals"]:
        for check in row["checks"]:
            bound, value = check["bound"], check["value"]
            assert check["met"] == {"<=": value <= bound, "<": value < bound, ">=": value >= bound}[check["compare"]]
        if row["checks"]:
            assert row["met"] == all(c["met"] for c in row["checks"])


@pytest.fixture(scope="module")
def bucket_run(tmp_path_factory):
    """The bench on an OpenVINO fp32 engine of the cached export with ``--buckets``, two rounds."""
    from build_tools.pipeline import compile_step
    from service.backends import openvino

    if not openvino.available()[0]:
        pytest.skip("OpenVINO is not installed")
    folder = tmp_path_factory.mktemp("hardware-ov") / "openvino-fp32"
    compile_step(cached_export(), folder, backend="openvino", precision="fp32", run_verify=False)
    return bench(folder, folder.parent / "hardware.json", "--rounds", "2", "--buckets", "--profile-runs", "1")


def test_bucket_twin_is_timed_beside_the_dynamic_engine_and_served_from_its_bucket(bucket_run):
    stdout, report = bucket_run
    twin = "openvino fp32, static bucket"
    assert len(report["samples_s"][twin]) == 2 and report["detections"][twin] > 10
    (name, bucketed), = report["buckets"].items()
    assert name == "openvino fp32" and bucketed["bucket"] == "x".join(map(str, report["graph_hw"]))
    # the warm-up and both timed calls ran in the static bucket, none on the dynamic model
    assert bucketed["bucket_images"] >= 3 and bucketed["dynamic_images"] == 0
    medians = report["medians_s"]
    assert bucketed["vs_dynamic"] == pytest.approx(medians[twin] / medians["openvino fp32, 100 returned"])
    assert f"static shape bucket {bucketed['bucket']}" in stdout
