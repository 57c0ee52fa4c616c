"""Batcher rules, driven by plain Python batch functions (the batcher's contract: list in, list out)."""

from __future__ import annotations

import asyncio

import pytest

from service.batcher import Batcher
from service.exceptions import DeadlineExceeded, DeadlineUnreachable, InferenceFailed, NotReady, Overloaded


def run(coro):
    return asyncio.run(coro)


class Recorder:
    """A batch function that squares its inputs after ``delay_s`` and records every batch it saw."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.batches: list[list[int]] = []

    async def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        await asyncio.sleep(self.delay_s)
        return [x * x for x in items]


def far() -> float:
    return asyncio.get_running_loop().time() + 60.0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_batch_size": 0, "max_wait_s": 0.0, "max_queue_depth": 1},
        {"max_batch_size": 1, "max_wait_s": -1.0, "max_queue_depth": 1},
        {"max_batch_size": 1, "max_wait_s": 0.0, "max_queue_depth": 0},
        {"max_batch_size": 1, "max_wait_s": 0.0, "max_queue_depth": 1, "num_workers": 0},
    ],
)
def test_arguments_are_validated_at_construction(kwargs):
    with pytest.raises(ValueError):
        Batcher(Recorder(), **kwargs)


def test_concurrent_items_are_batched_and_each_caller_gets_its_own_result():
    async def main():
        fn = Recorder()
        async with Batcher(fn, max_batch_size=4, max_wait_s=0.05, max_queue_depth=16) as batcher:
            results = await asyncio.gather(*(batcher.submit(x, far()) for x in range(8)))
        return fn, results

    fn, results = run(main())
    assert [r.value for r in results] == [x * x for x in range(8)]
    assert fn.batches == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert {r.batch_size for r in results} == {4}


def test_a_partial_batch_leaves_after_max_wait():
    async def main():
        fn = Recorder()
        async with Batcher(fn, max_batch_size=4, max_wait_s=0.05, max_queue_depth=16) as batcher:
            loop = asyncio.get_running_loop()
            started = loop.time()
            result = await batcher.submit(3, far())
            return fn, result, loop.time() - started

    fn, result, elapsed = run(main())
    assert result.value == 9 and result.batch_size == 1
    assert 0.04 <= elapsed < 1.0
    assert result.queue_wait_s >= 0.04


def test_items_are_grouped_by_key():
    async def main():
        fn = Recorder()
        async with Batcher(
            fn, max_batch_size=4, max_wait_s=0.05, max_queue_depth=16, group_key=lambda x: x % 2
        ) as batcher:
            await asyncio.gather(*(batcher.submit(x, far()) for x in range(6)))
        return fn

    fn = run(main())
    assert sorted(sorted(b) for b in fn.batches) == [[0, 2, 4], [1, 3, 5]]


def test_full_queue_is_refused_and_the_batcher_recovers():
    async def main():
        fn = Recorder(delay_s=0.1)
        async with Batcher(fn, max_batch_size=1, max_wait_s=0.0, max_queue_depth=2) as batcher:
            first = batcher.submit(1, far())
            await asyncio.sleep(0.02)  # the worker takes it; the queue is empty again
            queued = [batcher.submit(x, far()) for x in (2, 3)]
            with pytest.raises(Overloaded) as refused:
                batcher.submit(4, far())
            values = [r.value for r in await asyncio.gather(first, *queued)]
            after = await batcher.submit(5, far())
        return refused.value, values, after.value

    refused, values, after = run(main())
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
    assert values == [1, 4, 9] and after == 25


def test_expired_items_fail_with_deadline_and_never_run():
    async def main():
        fn = Recorder(delay_s=0.1)
        async with Batcher(fn, max_batch_size=1, max_wait_s=0.0, max_queue_depth=4) as batcher:
            loop = asyncio.get_running_loop()
            busy = batcher.submit(1, far())
            await asyncio.sleep(0.02)
            late = batcher.submit(2, loop.time() + 0.03)
            with pytest.raises(DeadlineExceeded):
                await late
            await busy
        return fn

    assert run(main()).batches == [[1]]


def test_withdrawn_items_leave_the_queue_and_never_run():
    async def main():
        fn = Recorder(delay_s=0.1)
        async with Batcher(fn, max_batch_size=1, max_wait_s=0.0, max_queue_depth=4) as batcher:
            busy = batcher.submit(1, far())
            await asyncio.sleep(0.02)
            gone = batcher.submit(2, far())
            assert batcher.depth == 1
            gone.cancel()
            await asyncio.sleep(0)
            depth_after_cancel = batcher.depth
            await busy
            await batcher.submit(3, far())
        return fn, depth_after_cancel

    fn, depth = run(main())
    assert depth == 0
    assert fn.batches == [[1], [3]]


def test_an_exception_reaches_every_caller_of_the_batch_and_the_worker_lives():
    calls = []

    async def flaky(items: list[int]) -> list[int]:
        calls.append(items)
        if len(calls) == 1:
            raise RuntimeError("engine exploded")
        return items

    async def main():
        async with Batcher(flaky, max_batch_size=2, max_wait_s=0.05, max_queue_depth=4) as batcher:
            failed = await asyncio.gather(*(batcher.submit(x, far()) for x in (1, 2)), return_exceptions=True)
            ok = await batcher.submit(3, far())
        return failed, ok

    failed, ok = run(main())
    assert [type(e) for e in failed] == [RuntimeError, RuntimeError]
    assert all("engine exploded" in str(e) for e in failed)
    assert ok.value == 3


def test_a_result_count_mismatch_fails_the_batch():
    async def short(items: list[int]) -> list[int]:
        return items[:-1]

    async def main():
        async with Batcher(short, max_batch_size=2, max_wait_s=0.05, max_queue_depth=4) as batcher:
            return await asyncio.gather(*(batcher.submit(x, far()) for x in (1, 2)), return_exceptions=True)

    errors = run(main())
    assert all(isinstance(e, InferenceFailed) and "1 results for 2 inputs" in e.message for e in errors)


def test_several_workers_run_batches_concurrently():
    async def main():
        fn = Recorder(delay_s=0.2)
        async with Batcher(fn, max_batch_size=1, max_wait_s=0.0, max_queue_depth=8, num_workers=2) as batcher:
            loop = asyncio.get_running_loop()
            started = loop.time()
            await asyncio.gather(*(batcher.submit(x, far()) for x in range(4)))
            return loop.time() - started

    assert run(main()) < 0.7  # four 0.2 s batches on two workers: ~0.4 s


def test_closing_fails_running_and_waiting_items_and_refuses_new_ones():
    async def main():
        fn = Recorder(delay_s=0.2)
        batcher = Batcher(fn, max_batch_size=1, max_wait_s=0.0, max_queue_depth=4)
        async with batcher:
            running = batcher.submit(1, far())
            await asyncio.sleep(0.02)
            waiting = batcher.submit(2, far())
        for future in (running, waiting):
            with pytest.raises(NotReady):
                await future
        with pytest.raises(NotReady):
            batcher.submit(3, far())

    run(main())


def test_an_item_that_would_finish_after_its_deadline_is_refused_at_once():
    async def main():
        fn = Recorder(delay_s=0.2)
        async with Batcher(fn, max_batch_size=1, max_wait_s=0.0, max_queue_depth=8) as batcher:
            loop = asyncio.get_running_loop()
            assert batcher.estimated_finish_s(loop.time()) is None  # nothing measured: no refusal
            await batcher.submit(0, far())  # one measured batch: about 0.2 s
            running = batcher.submit(1, far())
            queued = [batcher.submit(x, far()) for x in (2, 3)]
            await asyncio.sleep(0.01)
            # one batch running (~0.19 s left), two queued ahead, then its own: about 0.79 s
            estimate = batcher.estimated_finish_s(loop.time())
            with pytest.raises(DeadlineUnreachable) as refused:
                batcher.submit(4, loop.time() + 0.5)
            accepted = batcher.submit(5, loop.time() + 5.0)
            await asyncio.gather(running, *queued, accepted)
        return fn, estimate, refused.value

    fn, estimate, refused = run(main())
    assert 0.7 < estimate < 0.9
    assert refused.status_code == 503 and int(refused.headers["Retry-After"]) >= 1
    assert "deadline" in refused.message
    assert [b[0] for b in fn.batches] == [0, 1, 2, 3, 5]  # the refused item never ran


def test_a_worker_stopped_from_outside_fails_its_batch_and_is_replaced():
    restarts = []

    async def main():
        fn = Recorder(delay_s=0.5)
        async with Batcher(fn, max_batch_size=1, max_wait_s=0.0, max_queue_depth=4,
                           on_worker_restart=restarts.append) as batcher:
            stuck = batcher.submit(1, far())
            await asyncio.sleep(0.05)
            batcher._workers[0].cancel()  # the fault: the worker task dies mid-batch
            with pytest.raises(InferenceFailed, match="worker running this batch stopped"):
                await stuck
            served = await batcher.submit(2, far())
        return batcher.worker_restarts, served.value

    assert run(main()) == (1, 4)
    assert restarts == ["was cancelled"]
