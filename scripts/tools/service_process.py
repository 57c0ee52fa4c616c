"""``maskrcnn-serve`` as a subprocess on a free loopback port, for the benchmarks that measure it over HTTP."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from scripts.tools.wait_ready import wait_ready
from service.settings import Settings


@contextmanager
def running_service(engine_dir: Path, settings: Settings, concurrency: int) -> Iterator[str]:
    """``maskrcnn-serve`` on a free loopback port, ready; yields its base URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [
        str(Path(sys.executable).with_name("maskrcnn-serve")), "--engine", str(engine_dir), "--port", str(port),
        "--workers", str(settings.workers), "--threads", str(settings.threads_per_session),
        "--max-batch-size", str(settings.max_batch_size), "--max-wait-ms", str(settings.max_wait_ms),
        "--max-queue-depth", str(max(settings.max_queue_depth, concurrency)), "--request-timeout-ms", "600000",
        "--log-level", "warning",
    ]
    server = subprocess.Popen(command)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, alive=lambda: server.poll() is None, timeout_s=300, interval_s=0.2)
        yield base
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=120)
