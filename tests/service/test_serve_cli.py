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
    "args, env, message",
    [
        ([], {}, "--engine DIR (or MASKRCNN_ENGINE_DIR) is required"),
        (["--engine", "/nonexistent"], {}, "--engine /nonexistent: Value error, /nonexistent is not an engine artifact"),
        (["--port", "0"], {}, "--port 0: Input should be greater than or equal to 1"),
        (["--max-batch-size", "many"], {}, "--max-batch-size many: Input should be a valid integer"),
        ([], {"MASKRCNN_MAX_BATCH_SIZE": "many"}, "MASKRCNN_MAX_BATCH_SIZE=many: Input should be a valid integer"),
        ([], {"maskrcnn_port": "99999"}, "MASKRCNN_PORT=99999: Input should be less than or equal to 65535"),
        ([], {"MASKRCNN_MAX_BATCH_SZIE": "2"}, "MASKRCNN_MAX_BATCH_SZIE is no setting; did you mean "
                                               "MASKRCNN_MAX_BATCH_SIZE"),
        (["--decode-jpeg-reduced", "--port", "0"], {}, "--port 0"),  # a switch works bare
    ],
)
def test_bad_settings_are_refused_naming_the_flag_or_variable(args, env, message, tmp_path):
    result = subprocess.run([SERVE, *args], capture_output=True, text=True, timeout=60, cwd=tmp_path,
                            env={"PATH": "/usr/bin:/bin", **env})
    assert result.returncode == 2
    assert message in result.stderr
    assert "decode_jpeg_reduced" not in result.stderr


def test_unknown_variables_far_from_every_setting_are_reported_and_ignored(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "MASKRCNN_COLOUR": "blue", "MASKRCNN_ENGINE_NAME": "ort-fp32",
           "MASKRCNN_PORT": "0"}
    result = subprocess.run([SERVE], capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env)
    assert result.returncode == 2 and "MASKRCNN_PORT=0: Input should be greater" in result.stderr  # went on
    assert "warning: MASKRCNN_COLOUR is no setting of maskrcnn-serve; ignored" in result.stderr
    assert "MASKRCNN_ENGINE_NAME" not in result.stderr  # the compose stack's, not a typo


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
