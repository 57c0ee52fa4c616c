"""Hostile clients and a failing engine, against the real app and a real exported engine.

Memory stays within the budget (refused with 503 before the work), an oversized body's 413 reaches
clients that send before they read, a request that cannot meet its deadline is refused at once,
and engine faults (a raising call, a hanging call, a dead batcher worker) cost only the requests
they hit.
"""

from __future__ import annotations

import subprocess
import threading
import time
import urllib.error
import urllib.request

import httpx
import numpy as np
import pytest
import requests
from conftest import wait_until

from scripts.tools.service_process import serving
from service.backends import load_engine
from service.settings import Settings
from service_images import encode, gradient

pytestmark = pytest.mark.slow

PNG = encode(gradient(48, 64, seed=3), "PNG")


@pytest.fixture(scope="module")
def engine(engine_dir):
    return load_engine(engine_dir)


def test_an_oversized_body_gets_a_readable_413_from_every_client(engine, tmp_path):
    body = b"\xff\xd8" + b"\0" * (64 * 2**20)  # 64 MiB, past the default body limit (about 27 MiB)
    path = tmp_path / "big.jpg"
    path.write_bytes(body)
    with serving(Settings(), engine) as server:
        url = server.url + "/predict"
        headers = {"Content-Type": "image/jpeg"}
        answers = {}
        with pytest.raises(urllib.error.HTTPError) as refused:  # sends the whole body before reading
            urllib.request.urlopen(urllib.request.Request(url, data=body, headers=headers), timeout=60)
        answers["urllib"] = (refused.value.code, refused.value.read())
        response = requests.post(url, data=body, headers=headers, timeout=60)
        answers["requests"] = (response.status_code, response.content)
        response = httpx.post(url, content=body, headers=headers, timeout=60)
        answers["httpx"] = (response.status_code, response.content)
        curl = subprocess.run(["curl", "-sS", "--data-binary", f"@{path}", "-H", "Content-Type: image/jpeg",
                               "-w", "\n%{http_code}", url], capture_output=True, timeout=60)
        text, _, code = curl.stdout.rpartition(b"\n")
        answers["curl"] = (int(code), text)
        for client, (status, content) in answers.items():
            assert status == 413 and b'"payload_too_large"' in content, (client, status, content[:200])
        assert server.post(PNG, "image/png").status_code == 200  # and it goes on serving


def test_memory_budget_refuses_before_the_work_and_is_released(engine):
    budget = 32 * 2**20  # room for one small photo: its 1067x800 input tensor takes about 20 MiB
    with serving(Settings(memory_budget_bytes=budget, max_bytes=40 * 2**20), engine) as server:
        assert server.metric("maskrcnn_memory_budget_bytes") == budget
        # a body declared larger than the budget: refused before it is read
        big_body = server.post(b"\xff\xd8" + b"\0" * (36 * 2**20), "image/jpeg")
        assert big_body.status_code == 503 and big_body.headers["Retry-After"] == "1"
        assert big_body.json()["error"]["code"] == "overloaded"
        assert "MASKRCNN_MEMORY_BUDGET_BYTES" in big_body.json()["error"]["message"]
        # a small file whose pixels would not fit: refused from its header, before decoding
        large_image = server.post(encode(np.full((3000, 3000, 3), 128, np.uint8), "PNG"), "image/png")
        assert large_image.status_code == 503, large_image.text
        assert "decoding a 3000x3000 image" in large_image.json()["error"]["message"]
        assert server.metric("maskrcnn_memory_in_flight_bytes") == 0
        assert server.post(PNG, "image/png").status_code == 200
        assert server.metric("maskrcnn_memory_in_flight_bytes") == 0


def test_a_request_that_cannot_meet_its_deadline_is_refused_at_once(engine):
    with serving(Settings(), engine) as server:
        started = time.perf_counter()
        hopeless = server.post(PNG, "image/png", headers={"X-Request-Timeout-Ms": "50"})
        elapsed = time.perf_counter() - started
        assert hopeless.status_code == 503 and hopeless.json()["error"]["code"] == "deadline_unreachable"
        assert elapsed < 1.0  # no decode, no engine call
        assert server.metric("maskrcnn_batch_size_count") == 0
        assert server.post(PNG, "image/png").status_code == 200


class FaultyEngine:
    """A real engine with faults injected by plan: per call ``"ok"``, ``"raise"`` or ``"hang"``
    (blocks until ``release`` is set; the pool abandons the call)."""

    def __init__(self, engine, plan: list[str], release: threading.Event) -> None:
        self._engine, self._plan, self._release = engine, plan, release
        self.manifest, self.threads = engine.manifest, engine.threads

    @property
    def batch_size(self):
        return self._engine.batch_size

    def infer(self, images, image_sizes, *mask_selection):
        fault = self._plan.pop(0) if self._plan else "ok"
        if fault == "raise":
            raise RuntimeError("injected engine failure")
        if fault == "hang":
            self._release.wait()
        return self._engine.infer(images, image_sizes, *mask_selection)


def test_engine_faults_cost_only_the_requests_they_hit(engine):
    release = threading.Event()
    plan = ["ok", "raise", "ok", "hang"]  # warm-up, then one call per request below
    sessions = []

    def open_session():
        sessions.append(FaultyEngine(engine, plan, release))
        return sessions[-1]

    # a real call takes 1-5 s on 2 busy cores: the timeout must only catch the injected hang
    settings = Settings(engine_timeout_s=20, request_timeout_ms=90_000)
    try:
        with serving(settings, engine_factory=open_session) as server:
            failed = server.post(PNG, "image/png")
            assert failed.status_code == 500 and failed.json()["error"]["code"] == "inference_failed"
            assert server.post(PNG, "image/png").status_code == 200  # the same session serves on

            hung = server.post(PNG, "image/png")
            assert hung.status_code == 504 and hung.json()["error"]["code"] == "engine_timeout"
            wait_until(lambda: server.metric("maskrcnn_engine_replacements_total") == 1, timeout_s=60)
            assert len(sessions) == 2
            assert server.post(PNG, "image/png").status_code == 200  # on the replacement

            # a batcher worker that dies is replaced: readiness holds and the next request is served
            worker = server.app.state.runtime.pipeline.batcher._workers[0]
            worker.get_loop().call_soon_threadsafe(worker.cancel)
            wait_until(lambda: server.metric("maskrcnn_worker_restarts_total") == 1)
            assert httpx.get(server.url + "/readyz").status_code == 200
            assert server.post(PNG, "image/png").status_code == 200
    finally:
        release.set()
