"""The ``maskrcnn-serve`` console script: settings validation, and draining on SIGTERM."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from service_images import encode, gradient

SERVE = str(Path(sys.executable).with_name("maskrcnn-serve"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "--engine DIR (or MASKRCNN_ENGINE_DIR) is required"),
        (["--engine", "/nonexistent"], "not an engine artifact folder"),
        (["--port", "0"], "port: Input should be greater than or equal to 1"),
        (["--max-batch-size", "many"], "max_batch_size: Input should be a valid integer"),
    ],
)
def test_bad_settings_are_refused_at_start(args, message, tmp_path):
    result = subprocess.run([SERVE, *args], capture_output=True, text=True, timeout=60, cwd=tmp_path,
                            env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 2
    assert message in result.stderr


@pytest.mark.slow
def test_sigterm_drains_in_flight_requests_and_exits_zero(engine_dir):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [SERVE, "--engine", str(engine_dir), "--port", str(port), "--max-wait-ms", "0", "--grace-period-s", "300",
         "--request-timeout-ms", "300000", "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        wait_until(lambda: get(url + "/readyz") == 200, timeout_s=180)
        image = encode(gradient(seed=7), "PNG")
        with ThreadPoolExecutor(3) as pool:
            requests = [
                pool.submit(httpx.post, url + "/predict", content=image, headers={"Content-Type": "image/png"},
                            timeout=180)
                for _ in range(3)
            ]
            # one image on the engine, two queued
            wait_until(lambda: "maskrcnn_queue_depth 2.0" in httpx.get(url + "/metrics").text)
            process.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            with pytest.raises(httpx.ConnectError):  # no longer accepting
                httpx.get(url + "/healthz")
            statuses = [r.result().status_code for r in requests]
        assert statuses == [200, 200, 200]
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
        output = process.communicate()[0]
    assert "Traceback" not in output, output


def get(url: str) -> int | None:
    try:
        return httpx.get(url).status_code
    except httpx.TransportError:
        return None


def wait_until(condition, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.1)
