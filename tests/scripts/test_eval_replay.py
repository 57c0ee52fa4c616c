"""`maskrcnn-eval` (scripts/tools/eval_replay.py): replay against a live service, resume, failures, reference.

The live-service tests share one ``maskrcnn-serve`` subprocess on the cached random-init engine
(score threshold 0: 100 detections per image) and a 3-image synthetic dataset; every inference
costs seconds on a small CPU, so the whole module sends 6 images to the service and 1 to eager.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import io
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pycocotools.coco import COCO

from scripts.demo.data import write_dataset
from scripts.tools.eval_replay import (
    EvalError,
    Finished,
    ImageFailed,
    ProgressLog,
    Replay,
    main,
)
from scripts.tools.http import replay_retry_policy
from scripts.tools.service_process import LiveServer, free_port, serving

BIN = Path(sys.executable).parent
IMAGES = 3


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("coco")
    write_dataset(root, train_images=0, val_images=IMAGES, seed=3, progress=False)
    return {"ann": root / "annotations" / "instances_val.json", "images": root / "val"}


def dataset_args(dataset: dict[str, Path]) -> list[str]:
    return ["--ann", str(dataset["ann"]), "--images", str(dataset["images"])]


@pytest.fixture(scope="module")
def server(engine_dir, tmp_path_factory) -> Iterator[LiveServer]:
    """``maskrcnn-serve`` in a subprocess (the eval replay is killed and resumed against it)."""
    log = tmp_path_factory.mktemp("server") / "server.log"
    with serving(engine_dir=engine_dir, args=["--request-timeout-ms", "600000", "--log-level", "warning"],
                 log=log) as live:
        yield live


def predict_requests(server: LiveServer) -> float:
    return server.metric("maskrcnn_requests_total", endpoint="/predict")


@pytest.fixture(scope="module")
def full_run(server, dataset, tmp_path_factory) -> dict:
    """One uninterrupted run over the whole dataset (in-process), with its output."""
    out = tmp_path_factory.mktemp("full") / "results.json"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        status = main([*dataset_args(dataset), "--url", server.url, "--out", str(out), "--concurrency", "2",
                       "--no-progress", "--json", str(out.with_suffix(".summary.json"))])
    return {"status": status, "out": out, "stdout": stdout.getvalue(),
            "summary": json.loads(out.with_suffix(".summary.json").read_text())}


def coco_results(path: Path) -> list[dict]:
    return json.loads(path.read_text())


def same_detection(a: dict, b: dict, pixels: float = 1.0) -> bool:
    return a["category_id"] == b["category_id"] and all(abs(u - v) <= pixels for u, v in zip(a["bbox"], b["bbox"]))


@pytest.mark.slow
def test_results_file_loads_in_pycocotools_and_summaries_print(full_run, dataset):
    assert full_run["status"] == 0
    results = coco_results(full_run["out"])
    ground_truth = COCO(str(dataset["ann"]))
    loaded = ground_truth.loadRes(results)
    assert sorted(loaded.getImgIds()) == sorted(ground_truth.getImgIds())
    assert len(results) == 100 * IMAGES  # the test engine's score threshold is 0
    assert [r["image_id"] for r in results] == sorted(r["image_id"] for r in results)  # written in image-id order
    assert {"bbox", "segmentation", "score", "category_id"} <= set(results[0])
    for text in ("--- bbox ---", "--- segm ---", "Average Precision", "latency per image (ms, 3 requests): p50"):
        assert text in full_run["stdout"]
    summary = full_run["summary"]
    assert summary["images"] == IMAGES and summary["detections"] == 100 * IMAGES
    assert set(summary["latency_ms"]) >= {"p50", "p90", "p99"} and summary["bbox"].keys() == summary["segm"].keys()


@pytest.mark.slow
def test_rerun_sends_nothing_and_reference_deltas_print(full_run, server, dataset, capsys):
    before = predict_requests(server)
    status = main([*dataset_args(dataset), "--url", server.url, "--out", str(full_run["out"]), "--no-progress",
                   "--reference-results", str(full_run["out"])])
    assert status == 0
    assert predict_requests(server) == before  # every image was already answered
    out = capsys.readouterr()
    assert "resuming: 3 of 3 images already answered" in out.err
    assert "AP differences (this run - reference" in out.out
    assert "+0.0000" in out.out and "-0." not in out.out.split("AP differences")[1]


@pytest.mark.slow
def test_killed_run_resumes_without_resending_finished_images(full_run, server, dataset, tmp_path):
    out = tmp_path / "results.json"
    progress = ProgressLog.path_for(out)
    command = [str(BIN / "maskrcnn-eval"), *dataset_args(dataset), "--url", server.url, "--out", str(out),
               "--limit", "2", "--concurrency", "1", "--no-progress"]
    run = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not (progress.is_file() and progress.read_bytes().count(b"\n") >= 2):  # header + the first image
        assert run.poll() is None, run.stderr.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    run.kill()  # SIGKILL: the second image is in flight
    run.wait()
    assert not out.exists()
    server.wait_idle()
    before = predict_requests(server)

    resumed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming: 1 of 2 images already answered" in resumed.stderr
    assert predict_requests(server) - before == 1  # only the unfinished image was sent again
    recorded = [json.loads(line)["image_id"] for line in progress.read_text().splitlines()[1:]]
    assert sorted(recorded) == [1, 2]
    uninterrupted = [r for r in coco_results(full_run["out"]) if r["image_id"] in (1, 2)]
    assert coco_results(out) == uninterrupted


def test_a_dead_url_fails_at_once_before_any_image_is_sent(dataset, tmp_path, capsys):
    out, url = tmp_path / "results.json", f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(SystemExit) as exited:
        main([*dataset_args(dataset), "--url", url, "--out", str(out), "--no-progress"])
    assert exited.value.code == 2
    assert time.monotonic() - started < 3  # not the retries of every image (7.5 s each by default)
    err = capsys.readouterr().err
    assert f"no service answers at {url} (ConnectError" in err and "start it (maskrcnn-serve --engine DIR)" in err
    assert not out.exists() and not ProgressLog.path_for(out).exists()


class _ReadyButFailing(http.server.BaseHTTPRequestHandler):
    """A server that is ready and answers every /predict with 500: the images fail after their retries."""

    def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
        self._answer(200 if self.path == "/readyz" else 404, {"status": "ready"})

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers["Content-Length"]))
        self._answer(500, {"error": {"code": "engine_failed", "message": "the engine failed"}})

    def _answer(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


def test_images_failing_after_their_retries_are_listed_by_id(dataset, tmp_path, capsys):
    out = tmp_path / "results.json"
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ReadyButFailing) as failing:
        threading.Thread(target=failing.serve_forever, daemon=True).start()
        try:
            status = main([*dataset_args(dataset), "--url", f"http://127.0.0.1:{failing.server_port}", "--out",
                           str(out), "--retries", "1", "--backoff", "0.01", "--no-progress"])
        finally:
            failing.shutdown()
    assert status == 1
    err = capsys.readouterr().err
    assert "3 of 3 images failed; no results file written. Failed image ids: 1, 2, 3" in err
    assert "HTTP 500 engine_failed: the engine failed" in err
    assert not out.exists()
    assert ProgressLog.path_for(out).read_text().count("\n") == 1  # the header only


def run_replay(handler, urls=("http://a", "http://b"), policy=replay_retry_policy(retries=2, backoff_s=0.0)) -> Finished:
    async def go() -> Finished:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            return await Replay(client, list(urls), {"format": "coco"}, policy, 10.0).predict(7, b"\xff\xd8\xff\xe0")

    return asyncio.run(go())


def test_overloaded_answers_are_retried_after_retry_after_on_the_next_url():
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.url.host, request.url.params["image_id"], request.headers["content-type"], time.monotonic()))
        if len(seen) == 1:
            return httpx.Response(503, headers={"Retry-After": "1"},
                                  json={"error": {"code": "overloaded", "message": "queue full"}})
        return httpx.Response(200, json=[{"image_id": 7, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 0.5}])

    finished = run_replay(handler)
    assert finished.results[0]["image_id"] == 7
    assert [(host, image_id, kind) for host, image_id, kind, _ in seen] == [("a", "7", "image/jpeg"), ("b", "7", "image/jpeg")]
    assert seen[1][3] - seen[0][3] >= 0.95  # Retry-After: 1


def test_a_bad_request_is_not_retried_and_its_message_is_kept():
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(400, json={"error": {"code": "invalid_image", "message": "cannot decode"}})

    with pytest.raises(ImageFailed, match="HTTP 400 invalid_image: cannot decode"):
        run_replay(handler)
    assert len(calls) == 1


def test_an_answer_for_another_image_is_refused():
    with pytest.raises(ImageFailed, match="not a list of COCO results for image_id 7"):
        run_replay(lambda request: httpx.Response(200, json={"detections": []}))


def test_progress_log_cuts_a_partial_last_line_and_refuses_another_run(tmp_path):
    path = tmp_path / "out.json.progress.jsonl"
    log = ProgressLog(path, {"annotations": "a.json", "score_threshold": None})
    assert log.load() == {}
    log.record(5, Finished([{"image_id": 5}], 0.25))
    log.close()
    with path.open("ab") as f:
        f.write(b'{"image_id": 6, "latency_s": 0.1, "resu')  # killed mid-write
    finished = ProgressLog(path, log.run).load()
    assert finished == {5: Finished([{"image_id": 5}], 0.25)}
    assert path.read_bytes().endswith(b"}\n")
    with pytest.raises(EvalError, match="records another run"):
        ProgressLog(path, {"annotations": "a.json", "score_threshold": 0.5}).load()


@pytest.mark.slow
def test_eager_reference_of_the_engine_agrees_with_the_service(full_run, engine_dir, dataset, tmp_path, capsys):
    out = tmp_path / "eager.json"
    status = main([*dataset_args(dataset), "--eager", str(engine_dir), "--out", str(out), "--limit", "1",
                   "--no-progress", "--reference-results", str(full_run["out"])])
    assert status == 0
    eager = coco_results(out)
    COCO(str(dataset["ann"])).loadRes(eager)
    service = [r for r in coco_results(full_run["out"]) if r["image_id"] == 1]
    assert {r["image_id"] for r in eager} == {1} and len(eager) == len(service) == 100
    # fp32 engine vs its own eager model: each of eager's top detections is among the service's
    for detection in eager[:10]:
        assert any(same_detection(detection, other) for other in service[:20]), detection
    assert "AP differences" in capsys.readouterr().out
