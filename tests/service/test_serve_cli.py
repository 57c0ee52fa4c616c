"""The ``maskrcnn-serve`` console script: settings validation, and draining on SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from conftest import wait_until

from scripts.tools.service_process import SERVE, serving
from service_images import encode, gradient


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
    args = ["--max-wait-ms", "0", "--grace-period-s", "300", "--request-timeout-ms", "300000", "--log-level", "warning"]
    with serving(engine_dir=engine_dir, args=args, timeout_s=180) as server:
        process, url = server.process, server.url
        image = encode(gradient(seed=7), "PNG")
        with ThreadPoolExecutor(3) as pool:
            requests = [pool.submit(server.post, image, "image/png", timeout=180) for _ in range(3)]
            # one image on the engine, two queued
            wait_until(lambda: server.metric("maskrcnn_queue_depth") == 2)
            process.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            with pytest.raises(httpx.ConnectError):  # no longer accepting
                httpx.get(url + "/healthz")
            statuses = [r.result().status_code for r in requests]
        assert statuses == [200, 200, 200]
        assert process.wait(timeout=60) == 0
        output = process.communicate()[0].decode()
    assert "Traceback" not in output, output
