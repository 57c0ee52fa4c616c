"""Slow senders against the real server (a real exported engine, real sockets on 127.0.0.1), with
the default body rules: 10 s idle timeout, 50 kB/s minimum average rate after a 5 s grace.

Clients that declare a body and send it slowly or not at all hold only the bytes they sent, no
batcher place, and are answered 408 and disconnected once below the minimum rate; a normal request
is served meanwhile, a client sending at the minimum rate is served, a request refused before its
body is read is disconnected once its body has been drained for a while, connections beyond
``--max-connections`` are answered 503 and closed, and nothing stays held afterwards.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from conftest import wait_until

from scripts.tools.service_process import LiveServer, serving
from service.backends import load_engine
from service.settings import Settings
from service_images import encode, gradient

pytestmark = pytest.mark.slow

# As issue 24's report: 50 MB bodies within the body limit (40 MiB images: a body of up to 56 MB),
# a 2 GiB budget. The long request deadline keeps a loaded CI machine's slow engine calls from
# being refused as deadline_unreachable: these tests are about the body, not the queue.
SETTINGS = Settings(max_bytes=40 * 2**20, memory_budget_bytes=2 * 2**30, request_timeout_ms=300_000)
GRACE_S = SETTINGS.body_rate_grace_s
DRAIN_S = 10.0  # how long a request refused before its body is read has its body drained (service.request)
PHOTO = encode(gradient(400, 600, seed=1), "JPEG")  # a normal 600x400 JPEG


@pytest.fixture(scope="module")
def server(engine_dir) -> Iterator[LiveServer]:
    with serving(SETTINGS, load_engine(engine_dir)) as live:
        yield live


class Upload:
    """``POST /predict`` on a socket of its own: the headers declare ``declared`` body bytes."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.opened = time.monotonic()

    @classmethod
    async def open(cls, url: str, declared: int, first: bytes = b"", extra_headers: str = "") -> Upload:
        """Connect, send the headers and ``first`` (the start of the body)."""
        host, port = url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        upload = cls(reader, writer)
        head = (f"POST /predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: image/jpeg\r\n"
                f"Content-Length: {declared}\r\n{extra_headers}\r\n")
        writer.write(head.encode() + first)
        await writer.drain()
        return upload

    def trickle(self, data: bytes) -> None:
        if not self.writer.is_closing():
            self.writer.write(data)

    async def answer(self, timeout_s: float = 60) -> tuple[str, float]:
        """The status line the server answers and the seconds from opening until the server closed
        the connection ("(open)" and ``timeout_s`` if it never did)."""
        received = b""
        try:
            async with asyncio.timeout(timeout_s):
                while chunk := await self.reader.read(65536):
                    received += chunk
        except TimeoutError:
            return "(open)", timeout_s
        except ConnectionError:  # closed with unread data: a reset after the answer
            pass
        finally:
            self.writer.close()
        return received.split(b"\r\n", 1)[0].decode(), time.monotonic() - self.opened


def timed_post(server: LiveServer, body: bytes = PHOTO) -> tuple[int, float]:
    started = time.perf_counter()
    status = server.post(body, "image/jpeg", timeout=300).status_code
    return status, time.perf_counter() - started


def assert_nothing_held(server: LiveServer) -> None:
    wait_until(lambda: server.metric("maskrcnn_requests_in_flight") == 0, timeout_s=60)
    assert server.metric("maskrcnn_memory_in_flight_bytes") == 0


def slow_clients(server: LiveServer, reason: str) -> float:
    return server.metric("maskrcnn_slow_clients_total", reason=reason)


def test_silent_uploads_hold_nothing_and_a_normal_request_is_served_in_its_usual_time(server):
    usual_status, usual_s = timed_post(server)
    assert usual_status == 200
    counted = slow_clients(server, "rate")

    async def attack():
        # 60 clients declare 50 MB, send 10 bytes, then nothing
        uploads = [await Upload.open(server.url, 50_000_000, b"\xff\xd8" + bytes(8)) for _ in range(60)]
        answers = asyncio.gather(*(upload.answer() for upload in uploads))
        # each holds what it sent, twice (a raw body's chunks and their join): 20 bytes, not 100 MB
        await asyncio.to_thread(wait_until, lambda: server.metric("maskrcnn_memory_in_flight_bytes") == 60 * 20, 5)
        during = await asyncio.to_thread(timed_post, server)
        return during, await answers

    (status, seconds), answers = asyncio.run(attack())
    assert status == 200 and seconds < 2 * usual_s + 5, (status, seconds, usual_s)
    assert {line for line, _ in answers} == {"HTTP/1.1 408 Request Timeout"}
    lifetimes = [s for _, s in answers]
    assert GRACE_S - 0.5 < min(lifetimes) and max(lifetimes) < GRACE_S + 5, (min(lifetimes), max(lifetimes))
    assert slow_clients(server, "rate") == counted + 60
    assert_nothing_held(server)


def test_trickling_connections_are_closed_after_the_deadline(server):
    counted = slow_clients(server, "rate")

    async def trickle():
        # 450 admitted clients send a byte a second: 408 once the grace is over
        admitted = [await Upload.open(server.url, 1_000_000, b"\xff") for _ in range(450)]
        # 50 refused before their body is read (a 1 ms deadline cannot be met): 503 once their
        # body has been drained for DRAIN_S, then the connection is closed though they go on sending
        refused = [await Upload.open(server.url, 1_000_000, b"\xff", "X-Request-Timeout-Ms: 1\r\n") for _ in range(50)]
        answers = asyncio.gather(*(upload.answer() for upload in admitted + refused))
        healthz = None
        while not answers.done():
            for upload in admitted + refused:
                upload.trickle(b"\0")
            if healthz is None:
                healthz = (await asyncio.to_thread(httpx.get, server.url + "/healthz")).status_code
            await asyncio.wait([answers], timeout=1)
        return healthz, answers.result()

    healthz, answers = asyncio.run(trickle())
    assert healthz == 200
    admitted, refused = answers[:450], answers[450:]
    assert {line for line, _ in admitted} == {"HTTP/1.1 408 Request Timeout"}
    lifetimes = [s for _, s in admitted]
    assert GRACE_S - 0.5 < min(lifetimes) and max(lifetimes) < GRACE_S + 5, (min(lifetimes), max(lifetimes))
    assert {line for line, _ in refused} == {"HTTP/1.1 503 Service Unavailable"}
    lifetimes = [s for _, s in refused]
    assert DRAIN_S - 0.5 < min(lifetimes) and max(lifetimes) < DRAIN_S + 5, (min(lifetimes), max(lifetimes))
    assert slow_clients(server, "rate") == counted + 450
    assert_nothing_held(server)


def test_an_upload_at_the_minimum_rate_is_served(server):
    rate = SETTINGS.body_min_rate_bytes_per_s
    body = encode(np.random.default_rng(0).integers(0, 256, (300, 500, 3), dtype=np.uint8), "PNG")  # 450 kB of noise
    lead = rate  # one second's worth first, then paced at the minimum rate: about 8 s in all

    def at_minimum_rate() -> Iterator[bytes]:
        yield body[:lead]
        started = time.monotonic()
        for sent in range(lead, len(body), rate // 10):
            time.sleep(max(0.0, started + (sent - lead) / rate - time.monotonic()))
            yield body[sent:sent + rate // 10]

    counted = slow_clients(server, "rate") + slow_clients(server, "idle")
    started = time.monotonic()
    answer = httpx.post(server.url + "/predict", content=at_minimum_rate(), timeout=300,
                        headers={"Content-Type": "image/png", "Content-Length": str(len(body))})
    upload_s = (len(body) - lead) / rate
    assert answer.status_code == 200, answer.text
    assert answer.json()["image"]["width"] == 500 and time.monotonic() - started > upload_s
    assert slow_clients(server, "rate") + slow_clients(server, "idle") == counted
    assert_nothing_held(server)


def test_connections_beyond_the_cap_are_answered_503_and_closed(engine_dir, tmp_path):
    def healthz() -> int | None:
        try:
            return httpx.get(url + "/healthz", timeout=5).status_code
        except httpx.HTTPError:
            return None

    with serving(engine_dir=engine_dir, args=["--max-connections", "8"], log=tmp_path / "serve.log",
                 ready=False) as server:
        url = server.url
        wait_until(lambda: healthz() == 200, timeout_s=120)
        host, port = url.removeprefix("http://").split(":")
        idle = [socket.create_connection((host, int(port))) for _ in range(8)]  # not even a request line
        try:
            beyond = httpx.get(url + "/healthz", timeout=5)
            assert beyond.status_code == 503 and beyond.headers["connection"] == "close", beyond.headers
            # the same JSON shape and Retry-After as every other refusal, though uvicorn answers it
            assert beyond.json()["error"]["code"] == "too_many_connections", beyond.text
            assert beyond.headers["retry-after"] == "1"
            protocol = httpx.get(url + "/v2/health/ready", timeout=5)  # the Open Inference Protocol's shape
            assert protocol.status_code == 503 and isinstance(protocol.json()["error"], str), protocol.text
        finally:
            for connection in idle:
                connection.close()
        wait_until(lambda: healthz() == 200, timeout_s=10)
