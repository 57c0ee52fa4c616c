"""Admission, directly: readiness, a batcher place and the deadline checked once, memory held by
part and given back, a refused body drained; with a real Batcher and real Starlette requests."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry, Gauge
from starlette.requests import Request

from service.admission import AdmissionControl, MemoryBudget, image_bytes
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
    gauge = Gauge("in_flight", "requests in flight", registry=CollectorRegistry())
    admission = AdmissionControl(settings, MemoryBudget(budget_bytes, 1), batcher, lambda: True, gauge)
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
