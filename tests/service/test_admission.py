"""Admission, directly: readiness, a batcher place and the deadline checked once, memory held by
part and given back, a refused body drained; with a real Batcher and real Starlette requests."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge
from starlette.requests import Request

from service.admission import AdmissionControl, MemoryBudget, image_bytes
from service.exceptions import SlowBody
from service.batcher import Batcher
from service.exceptions import DeadlineExceeded, DeadlineUnreachable, NotReady, Overloaded, PayloadTooLarge
from service.request import read_body
from service.settings import Settings


def request_with_body(body: bytes, content_type: str = "image/png", chunks: int = 2) -> tuple[Request, list[bytes]]:
    """A Starlette request whose body arrives in ``chunks`` messages; the list records what was read."""
    size = -(-len(body) // chunks) if body else 1
    parts = [body[i:i + size] for i in range(0, len(body), size)] or [b""]
    messages = [{"type": "http.request", "body": p, "more_body": i < len(parts) - 1} for i, p in enumerate(parts)]
    read: list[bytes] = []

    async def receive():
        if messages:
            message = messages.pop(0)
            read.append(message["body"])
            return message
        await asyncio.sleep(3600)  # nothing more until the client leaves

    headers = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]
    return Request({"type": "http", "method": "POST", "path": "/predict", "headers": headers}, receive), read


async def echo(batch):
    await asyncio.sleep(0.05)
    return batch


def control(settings: Settings, batcher: Batcher, budget_bytes: int = 64 * 2**20) -> AdmissionControl:
    registry = CollectorRegistry()
    gauge = Gauge("in_flight", "requests in flight", registry=registry)
    slow = Counter("slow_clients", "bodies too slow", ["reason"], registry=registry)
    admission = AdmissionControl(settings, MemoryBudget(budget_bytes, 1), batcher, lambda: True, gauge, slow)
    admission.not_ready_reason = None
    return admission


def test_admission_holds_the_body_a_place_and_each_image_then_gives_all_back():
    async def main():
        async with Batcher(echo, max_batch_size=1, max_wait_s=0, max_queue_depth=2) as batcher:
            gate = control(Settings(), batcher)
            request, _ = request_with_body(b"x" * 1000)
            async with gate.admit(request, None, read_body) as admission:
                assert admission.payload == b"x" * 1000
                body_held = gate.budget.in_use_bytes
                assert body_held == 2 * 1000  # a raw body: its chunks and their join
                held = admission.hold_image(640, 480, (800, 1067))
                assert gate.budget.in_use_bytes == body_held + sum(image_bytes(640, 480, (800, 1067)))
                held.release_pixels()
                assert gate.budget.in_use_bytes == body_held + image_bytes(640, 480, (800, 1067))[1]
                assert batcher._slots == 1
                value = await batcher.submit(7, admission.deadline, admission.slot())
                assert value.value == 7 and batcher._slots == 0  # the place went back as its item ran
                second = admission.slot()  # a second image takes (and checks) a place of its own
                assert batcher._slots == 1
            assert gate.budget.in_use_bytes == 0 and batcher._slots == 0
            second.release()  # idempotent
            assert batcher._slots == 0

    asyncio.run(main())


def test_refusals_come_before_the_body_is_read_and_the_body_is_drained():
    async def main():
        outcomes = []
        async with Batcher(echo, max_batch_size=1, max_wait_s=0, max_queue_depth=1) as batcher:
            gate = control(Settings(), batcher)
            gate.not_ready_reason = "warming up"
            request, read = request_with_body(b"y" * 100)
            with pytest.raises(NotReady):
                async with gate.admit(request, None, read_body):
                    pass
            outcomes.append(b"".join(read))  # drained: the client sees the answer, not a reset
            gate.not_ready_reason = None

            first, _ = request_with_body(b"z" * 10)
            async with gate.admit(first, None, read_body):
                full, read = request_with_body(b"w" * 10)
                with pytest.raises(Overloaded):  # the one place is taken
                    async with gate.admit(full, None, read_body):
                        pass
                outcomes.append(b"".join(read))
            assert gate.budget.in_use_bytes == 0 and batcher._slots == 0

            batcher.observe_run(5.0)
            hopeless, _ = request_with_body(b"v" * 10)
            with pytest.raises(DeadlineUnreachable):
                async with gate.admit(hopeless, 100, read_body):
                    pass
        return outcomes

    assert asyncio.run(main()) == [b"y" * 100, b"w" * 10]


def test_memory_refusal_and_deadline_checks():
    async def main():
        async with Batcher(echo, max_batch_size=1, max_wait_s=0, max_queue_depth=4) as batcher:
            gate = control(Settings(), batcher, budget_bytes=10_000)
            big, _ = request_with_body(b"b" * 6000)  # holds 12000 bytes once read
            with pytest.raises(Overloaded, match="the request body needs"):
                async with gate.admit(big, None, read_body):
                    pass
            small, _ = request_with_body(b"s" * 100)
            async with gate.admit(small, 1, read_body) as admission:
                with pytest.raises(Overloaded, match="decoding a 4000x3000 image"):
                    admission.hold_image(4000, 3000, (800, 1067))
                assert gate.budget.in_use_bytes == 200  # the refused image holds nothing
                await asyncio.sleep(0.01)
                with pytest.raises(DeadlineExceeded, match="before preprocess"):
                    admission.check_deadline("preprocess")
            too_long, _ = request_with_body(b"t" * 100)
            with pytest.raises(PayloadTooLarge):
                async with gate.admit(too_long, None, lambda request, limit: read_body(request, 50)):
                    pass
            assert gate.budget.in_use_bytes == 0 and batcher._slots == 0

    asyncio.run(main())


def request_arriving(parts: list[tuple[float, bytes]], declared: int) -> Request:
    """A Starlette request whose body parts arrive after the given pauses (seconds), the last
    with ``more_body`` false unless the sum of parts is short of ``declared``; then nothing more."""
    pending = list(parts)
    sent = 0

    async def receive():
        nonlocal sent
        if not pending:
            await asyncio.sleep(3600)
        pause, part = pending.pop(0)
        await asyncio.sleep(pause)
        sent += len(part)
        return {"type": "http.request", "body": part, "more_body": sent < declared}

    headers = [(b"content-type", b"image/png"), (b"content-length", str(declared).encode())]
    return Request({"type": "http", "method": "POST", "path": "/predict", "headers": headers}, receive)


def slow_clients(gate: AdmissionControl) -> dict[str, float]:
    return {s.labels["reason"]: s.value for m in gate._slow_clients.collect() for s in m.samples
            if s.name.endswith("_total")}


def test_the_body_is_held_as_it_arrives_not_as_declared():
    async def main():
        async with Batcher(echo, max_batch_size=1, max_wait_s=0, max_queue_depth=2) as batcher:
            gate = control(Settings(), batcher, budget_bytes=10_000)
            held = []

            async def read_watching(request, limit):
                while True:
                    message = await request.receive()
                    held.append((gate.budget.in_use_bytes, batcher._slots))
                    if not message["more_body"]:
                        return b""

            # 4000 bytes declared: 8000 would be held once read, so a second one does not fit now
            request = request_arriving([(0, b"a" * 1000), (0.01, b"b" * 1000), (0.01, b"c" * 2000)], 4000)
            async with gate.admit(request, None, read_watching):
                assert held == [(2000, 0), (4000, 0), (8000, 0)]  # two bytes a byte (chunks and join); no place yet
                assert batcher._slots == 1  # taken once the body is in
                with pytest.raises(Overloaded, match="the request body needs"):
                    async with gate.admit(request_arriving([(0, b"d" * 4000)], 4000), None, read_body):
                        pass
            assert gate.budget.in_use_bytes == 0 and batcher._slots == 0

    asyncio.run(main())


@pytest.mark.parametrize("reason, settings, parts, timeout_ms", [
    # one part, then a pause longer than the idle timeout (the rate rule is off)
    ("idle", dict(body_idle_timeout_s=0.2, body_min_rate_bytes_per_s=0), [(0, b"x" * 100)], None),
    # 100 bytes every 50 ms is 2 kB/s, under the 10 kB/s minimum once the 0.2 s grace is over
    ("rate", dict(body_min_rate_bytes_per_s=10_000, body_rate_grace_s=0.2), [(0.05, b"x" * 100)] * 100, None),
    # fast enough, but the request's deadline (300 ms) passes first
    ("deadline", dict(body_min_rate_bytes_per_s=100, body_rate_grace_s=1), [(0.05, b"x" * 100)] * 100, 300),
])
def test_a_body_too_slow_is_refused_with_408_its_hold_released_and_counted(reason, settings, parts, timeout_ms):
    async def main():
        async with Batcher(echo, max_batch_size=1, max_wait_s=0, max_queue_depth=2) as batcher:
            gate = control(Settings(**settings), batcher)
            started = asyncio.get_running_loop().time()
            with pytest.raises(SlowBody) as refused:
                async with gate.admit(request_arriving(parts, 1_000_000), timeout_ms, read_body):
                    pass
            elapsed = asyncio.get_running_loop().time() - started
            assert refused.value.status_code == 408 and refused.value.reason == reason
            assert refused.value.headers["Connection"] == "close"
            assert gate.budget.in_use_bytes == 0 and batcher._slots == 0
            assert slow_clients(gate) == {reason: 1.0}
            return elapsed

    assert 0.15 < asyncio.run(main()) < 1.0


def test_a_body_above_the_minimum_rate_is_read_whole():
    # 100 bytes every 40 ms is 2.5 kB/s (a little less on a busy machine), above the 1 kB/s minimum
    # once the grace (0.3 s) has passed; 1.2 s in all. tests/service/test_slow_senders.py sends one
    # over a socket at the default minimum rate.
    parts = [(0.04, b"x" * 100)] * 30
    settings = Settings(body_min_rate_bytes_per_s=1000, body_rate_grace_s=0.3, body_idle_timeout_s=0.5)

    async def main():
        async with Batcher(echo, max_batch_size=1, max_wait_s=0, max_queue_depth=2) as batcher:
            gate = control(settings, batcher)
            async with gate.admit(request_arriving(parts, 3000), None, read_body) as admission:
                assert admission.payload == b"x" * 3000
            assert gate.budget.in_use_bytes == 0 and slow_clients(gate) == {}

    asyncio.run(main())
