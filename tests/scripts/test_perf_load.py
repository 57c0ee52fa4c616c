"""`maskrcnn-perf` (scripts/tools/perf.py) and `maskrcnn-loadtest` (scripts/tools/loadtest.py).

The load test runs against the real app (``create_app``) served by uvicorn from a thread, with a
stand-in engine that answers each image with one fixed detection after a short sleep: the bounds
of a load test are about requests and seconds, not about the model, and a real engine would make
each request cost seconds here. perf needs the real engine (marked slow), except where it refuses.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from conftest import minimal_manifest

from scripts.tools import loadtest, perf
from scripts.tools.service_process import free_port, serving
from service.manifest import Manifest
from service.settings import Settings

INFER_S = 0.02


class OneBoxEngine:
    """Engine contract stand-in: after ``delay_s``, one detection (class 0, score 0.9) per image."""

    def __init__(self, manifest: Manifest, delay_s: float) -> None:
        self.manifest = manifest
        self.delay_s = delay_s

    @property
    def batch_size(self) -> int | None:
        return self.manifest.batch_size

    def infer(self, images: np.ndarray, image_sizes: np.ndarray, *mask_selection) -> dict[str, np.ndarray]:
        time.sleep(self.delay_s)
        b, n = images.shape[0], self.manifest.postprocess.max_detections
        dets, labels = np.zeros((b, n, 5), np.float32), np.full((b, n), -1, np.int64)
        masks = np.zeros((b, n, 28, 28), np.float32)
        dets[:, 0], labels[:, 0], masks[:, 0] = (8, 8, 64, 64, 0.9), 0, 1.0
        return {"dets": dets, "labels": labels, "masks": masks}


@pytest.fixture(scope="module")
def service_url(tmp_path_factory) -> Iterator[str]:
    """The app with a ``OneBoxEngine`` on uvicorn in a thread; a queue of 2 so overload shows as 503."""
    engine = OneBoxEngine(minimal_manifest(tmp_path_factory.mktemp("engine")), INFER_S)
    with serving(Settings(max_queue_depth=2, max_wait_ms=0), engine) as live:
        yield live.url


def run_loadtest(tmp_path: Path, *args: str) -> tuple[int, dict]:
    report = tmp_path / "load.json"
    status = loadtest.main([*args, "--json", str(report)])
    return status, json.loads(report.read_text())


def test_each_phase_starts_exactly_the_requested_count(service_url, tmp_path, capsys):
    status, report = run_loadtest(tmp_path, "--url", service_url, "--concurrency", "1,4", "--rate", "50",
                                  "--requests", "6", "--duration", "60")
    assert status == 0
    assert [p["name"] for p in report["phases"]] == ["closed c=1", "closed c=4", "open 50/s"]
    for phase in report["phases"]:
        assert phase["started"] == 6 and phase["cancelled"] == 0
        assert phase["ok"] + sum(phase["errors"].values()) == 6  # every answer counted, 503s included
        assert phase["wall_s"] < 30
    single = report["phases"][0]
    assert single["ok"] == 6 and single["errors"] == {}
    assert set(single["latency_ms"]) >= {"p50", "p90", "p99"} and single["throughput_rps"] > 0
    assert "closed c=4" in capsys.readouterr().out


def test_each_phase_stops_at_its_duration(service_url, tmp_path):
    started = time.monotonic()
    status, report = run_loadtest(tmp_path, "--url", service_url, "--concurrency", "2", "--rate", "20",
                                  "--requests", "100000", "--duration", "0.8")
    elapsed = time.monotonic() - started
    assert status == 0
    for phase in report["phases"]:
        assert 0.8 <= phase["wall_s"] < 1.3
        assert 0 < phase["started"] < 100000
    assert report["phases"][1]["started"] <= 0.8 * 20 * 3  # open loop: about rate x duration
    assert elapsed < 8


def test_soak_samples_server_memory_and_checks_its_growth(service_url, tmp_path, capsys):
    status, report = run_loadtest(tmp_path, "--url", service_url, "--concurrency", "2", "--requests", "100000",
                                  "--duration", "1", "--rss-interval", "0.05", "--soak", "--max-rss-growth", "1.0")
    assert status == 0
    rss = report["rss"]
    assert rss["source"] == service_url + "/metrics" and len(rss["samples"]) >= 10 and rss["passed"] is True
    assert all(kib > 0 for _, kib in rss["samples"])
    out = capsys.readouterr().out
    assert "server RSS (MiB) over time" in out and "soak: mean RSS grew" in out


def test_rss_growth_compares_the_last_third_with_the_first():
    assert loadtest.rss_growth([100, 100, 100, 110, 110, 110, 120, 120, 120]) == pytest.approx(0.2)
    with pytest.raises(loadtest.LoadTestError, match="at least 3 RSS samples"):
        loadtest.rss_growth([100, 120])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--rss-interval", "0"], "--rss-interval > 0"),
        (["--requests", "0"], "--requests must be >= 1"),
        (["--concurrency", "0"], "expected positive numbers"),
    ],
)
def test_loadtest_refuses_bad_arguments(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        loadtest.main(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_loadtest_refuses_a_url_without_a_service(capsys):
    with pytest.raises(SystemExit):
        loadtest.main(["--url", f"http://127.0.0.1:{free_port()}", "--requests", "1"])
    assert "no service answers at" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--batch-size", "2"], "fixed batch of 1 (manifest shape_profile.batch.size) and cannot run --batch-size 2"),
        (["--height", "4000"], "outside the engine's shape profile"),
    ],
)
def test_perf_refuses_what_the_engine_cannot_run(args, message, tmp_path, capsys):
    minimal_manifest(tmp_path / "engine")
    with pytest.raises(SystemExit) as exit_info:
        perf.main(["--engine", str(tmp_path / "engine"), *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_perf_json_has_engine_and_eager_figures(engine_dir, tmp_path, capsys):
    report_path = tmp_path / "perf.json"
    assert perf.main(["--engine", str(engine_dir), "--iterations", "1", "--warmup", "0", "--height", "64",
                      "--width", "64", "--baseline", "eager", "--json", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert report["batch_size"] == 1 and report["input_shape"] == [1, 3, 64, 64]
    assert report["precision"] == "fp32" and report["iterations"] == 1
    for runner in ("engine", "eager"):
        result = report["results"][runner]
        assert result["throughput_ips"] > 0
        assert set(result["latency_ms"]) == {"min", "mean", "p50", "p90", "p99", "max"}
    assert report["ratio"] == pytest.approx(report["results"]["engine"]["throughput_ips"]
                                            / report["results"]["eager"]["throughput_ips"])
    assert "engine / eager throughput" in capsys.readouterr().out
