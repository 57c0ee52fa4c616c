"""The one way tests and tools start the service: on a free loopback port, handed out once /readyz is 200.

In-process (``create_app(settings, engine)`` on uvicorn in a thread: a test can inject a real engine
and read the app's state) or, given ``engine_dir``, as a ``maskrcnn-serve`` subprocess (signals, exit
codes, the CLI's own start-up, and the benchmarks that measure the service over HTTP)::

    with serving(Settings(...), engine) as server: ...
    with serving(engine_dir=path, args=["--max-wait-ms", "0"], log=tmp / "serve.log") as server: ...
    with running_service(engine_dir, settings, concurrency) as url: ...   # the benchmarks' form
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from scripts.tools.wait_ready import NotReady, wait_ready
from service.settings import Settings

SERVE = str(Path(sys.executable).with_name("maskrcnn-serve"))


def free_port() -> int:
    """A loopback TCP port that nothing listened on a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """A running service; ``url`` is its base URL."""

    def __init__(self, url: str, alive, describe) -> None:
        self.url = url
        self._alive = alive
        self._describe = describe

    def wait_ready(self, timeout_s: float = 300) -> None:
        """Return once /readyz answers 200; fail early if the server died."""
        try:
            wait_ready(self.url, alive=self._alive, timeout_s=timeout_s, interval_s=0.1)
        except NotReady as error:
            raise RuntimeError(f"{error}: {self._describe()}") from None

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the /metrics samples called ``name`` whose labels include ``labels`` (0.0 when none)."""
        return sum(
            sample.value
            for family in text_string_to_metric_families(httpx.get(self.url + "/metrics").text)
            for sample in family.samples
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
        )

    def post(self, body: bytes | None = None, content_type: str | None = None, **kwargs) -> httpx.Response:
        """POST /predict with ``body`` (and ``Content-Type``), other keywords as httpx takes them."""
        headers = kwargs.pop("headers", {})
        if content_type is not None:
            headers["Content-Type"] = content_type
        return httpx.post(self.url + "/predict", content=body, headers=headers, timeout=kwargs.pop("timeout", 120),
                          **kwargs)

    def wait_idle(self, timeout_s: float = 120) -> None:
        """Until no /predict request is in flight or queued (an abandoned one still runs to the end)."""
        deadline = time.monotonic() + timeout_s
        while self.metric("maskrcnn_requests_in_flight") or self.metric("maskrcnn_queue_depth"):
            if time.monotonic() > deadline:
                raise RuntimeError("the server stayed busy")
            time.sleep(0.2)
        time.sleep(0.5)  # the request counter is bumped just after the handler returns


class InProcessServer(LiveServer):
    """uvicorn serving ``create_app(settings, engine)`` from a thread."""

    def __init__(self, settings, engine, engine_factory=None, tracer_provider=None) -> None:
        from service.app import create_app

        self.app = create_app(settings, engine, engine_factory, tracer_provider)
        # uvicorn serves on this socket, bound here, so no other process can take the port in between
        self._socket = socket.socket()
        self._socket.bind(("127.0.0.1", 0))
        self._server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning"))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]}, daemon=True)
        super().__init__(f"http://127.0.0.1:{self._socket.getsockname()[1]}", self._thread.is_alive,
                         lambda: "its thread ended")
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=60)


class ServeProcess(LiveServer):
    """``maskrcnn-serve --engine ENGINE_DIR ARGS`` in a subprocess on a free port. Its output goes to
    ``log``; without one, to a pipe (``process.communicate()`` reads it once the process exits), or,
    with ``inherit_output``, to this process's own stdout and stderr."""

    def __init__(self, engine_dir: Path, args: Sequence[str], log: Path | None = None,
                 inherit_output: bool = False) -> None:
        port = free_port()
        self.log = log
        if log is not None:
            out = log.open("wb")
        else:
            out = None if inherit_output else subprocess.PIPE
        self.process = subprocess.Popen(
            [SERVE, "--engine", str(engine_dir), "--port", str(port), *args],
            stdout=out, stderr=subprocess.STDOUT if out is not None else None,
        )
        super().__init__(f"http://127.0.0.1:{port}", lambda: self.process.poll() is None, self._tail)

    def _tail(self) -> str:
        if self.log is None:
            return f"exit status {self.process.poll()}"
        return self.log.read_text(errors="replace")[-2000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@contextlib.contextmanager
def serving(
    settings=None,
    engine=None,
    *,
    engine_factory=None,
    tracer_provider=None,
    engine_dir: Path | None = None,
    args: Sequence[str] = (),
    log: Path | None = None,
    inherit_output: bool = False,
    ready: bool = True,
    timeout_s: float = 300,
) -> Iterator[LiveServer]:
    """The service, in-process with ``settings`` and ``engine`` (or ``engine_factory``; and a
    ``tracer_provider``: see ``create_app``), or as a subprocess on ``engine_dir`` (output as :class:`ServeProcess` says);
    waits for /readyz unless ``ready`` is False; stopped on exit."""
    server: InProcessServer | ServeProcess
    if engine_dir is not None:
        server = ServeProcess(engine_dir, args, log, inherit_output)
    else:
        server = InProcessServer(settings, engine, engine_factory, tracer_provider)
    try:
        if ready:
            server.wait_ready(timeout_s)
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def running_service(engine_dir: Path, settings: Settings, concurrency: int) -> Iterator[str]:
    """``maskrcnn-serve`` on ``engine_dir`` with the engine-pool and batching knobs and the OpenVINO
    shape buckets of ``settings``, a queue deep enough for ``concurrency`` clients and no request
    deadline to speak of; its output on this process's own; yields its base URL once ready."""
    args = [
        "--workers", str(settings.workers), "--threads", str(settings.threads_per_session),
        "--max-batch-size", str(settings.max_batch_size), "--max-wait-ms", str(settings.max_wait_ms),
        "--max-queue-depth", str(max(settings.max_queue_depth, concurrency)), "--request-timeout-ms", "600000",
        "--openvino-shape-buckets", settings.openvino_shape_buckets, "--log-level", "warning",
    ]
    with serving(engine_dir=engine_dir, args=args, inherit_output=True) as server:
        yield server.url
