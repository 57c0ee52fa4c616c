"""Batcher: gathers single requests into batches for a batch function, on the event loop.

Rules (after Ray Serve's ``serve.batch``):

- arguments are validated at construction;
- a batch holds at most ``max_batch_size`` items that share a group key (e.g. the padded input
  shape, so one engine call pads little), oldest first; it is dispatched when full or when its
  oldest item has waited ``max_wait_s``, whichever comes first, and only when a worker is free;
- at most ``max_queue_depth`` items hold a place (a :class:`Slot`): a request takes its place once
  its body is in (clients still uploading hold none), before its image is decoded, and gives it
  back when its item leaves the queue; one more is refused with :class:`Overloaded` (503);
- an item that cannot finish before its deadline, by the wait and run time estimated from the
  places taken ahead of it (decoding ones included) and a high percentile of the recent batch
  times (:meth:`Batcher.estimated_finish_s`), is refused at once with :class:`DeadlineUnreachable`
  (503) instead of being accepted and answered 504 later;
- an item whose deadline has passed fails with :class:`DeadlineExceeded` (504) instead of
  running, and an item whose caller cancelled its future (the client went away) leaves the
  queue at once and never runs;
- the batch function must return one result per item, in order; otherwise, or when it raises,
  every caller of that batch receives the exception, and the worker goes on with the next batch;
- a worker that ends while the batcher is open (a bug, or a task cancelled from outside) fails
  its batch's callers, is counted (``worker_restarts``, ``on_worker_restart``) and replaced at once.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from contextlib import AbstractContextManager
from typing import Any, Generic, TypeVar

from service.exceptions import DeadlineExceeded, DeadlineUnreachable, InferenceFailed, NotReady, Overloaded

log = logging.getLogger(__name__)
T = TypeVar("T")
# The deadline estimate takes this percentile of the last RUN_TIME_WINDOW batch times: on a shared
# machine one engine call varies by 2x from the next, and a mean admits requests that then time out.
RUN_TIME_PERCENTILE = 90
RUN_TIME_WINDOW = 20
R = TypeVar("R")


@dataclass(frozen=True)
class Batched(Generic[R]):
    """One item's result with how it got there."""

    value: R
    queue_wait_s: float  # from submit to the start of its batch
    run_s: float  # the batch function's wall time for the whole batch
    batch_size: int
    trace: Any = None  # what the batcher's trace_batch yielded for the batch (its span's context)


class Slot:
    """An item's place among the ``max_queue_depth`` the batcher admits; given back once."""

    def __init__(self, batcher: Batcher) -> None:
        self._batcher: Batcher | None = batcher
        batcher._slots += 1

    def release(self) -> None:
        if self._batcher is not None:
            self._batcher._slots -= 1
            self._batcher = None


@dataclass(eq=False)
class _Pending(Generic[T, R]):
    item: T
    key: Hashable
    deadline: float  # event-loop time
    enqueued: float  # event-loop time
    slot: Slot
    future: asyncio.Future[Batched[R]] = field(repr=False)


class Batcher(Generic[T, R]):
    """Feeds ``handle_batch(list[T]) -> list[R]`` from ``num_workers`` concurrent workers.

    Use as ``async with Batcher(...) as batcher:``; leaving the block stops the workers and fails
    whatever still waits with :class:`NotReady`.
    """

    def __init__(
        self,
        handle_batch: Callable[[list[T]], Awaitable[list[R]]],
        *,
        max_batch_size: int,
        max_wait_s: float,
        max_queue_depth: int,
        num_workers: int = 1,
        group_key: Callable[[T], Hashable] = lambda _: None,
        retry_after_s: int = 1,
        on_worker_restart: Callable[[str], None] | None = None,
        on_batch: Callable[[int], None] | None = None,
        trace_batch: Callable[[int], AbstractContextManager[Any]] | None = None,
    ) -> None:
        """``on_batch(size)`` is called as each batch starts; ``trace_batch(size)`` is entered around
        each batch's run, and what it yields reaches the batch's items as :attr:`Batched.trace`."""
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        if max_queue_depth < 1:
            raise ValueError(f"max_queue_depth must be >= 1, got {max_queue_depth}")
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        self._handle_batch = handle_batch
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue_depth = max_queue_depth
        self._num_workers = num_workers
        self._group_key = group_key
        self._retry_after_s = retry_after_s
        self._queue: list[_Pending[T, R]] = []
        self._arrived = asyncio.Event()
        self._forming = asyncio.Lock()
        self._workers: list[asyncio.Task[None]] = []
        self._closed = True
        self._on_worker_restart = on_worker_restart
        self.worker_restarts = 0
        self._on_batch = on_batch
        self._trace_batch = trace_batch or (lambda size: contextlib.nullcontext())
        self._run_times: collections.deque[float] = collections.deque(maxlen=RUN_TIME_WINDOW)
        self._slots = 0  # places taken: admitted items not yet started (queued ones included)
        self._running_since: dict[int, float] = {}  # worker -> event-loop time its batch started

    async def __aenter__(self) -> Batcher[T, R]:
        self._closed = False
        self._workers = [self._start_worker(i) for i in range(self._num_workers)]
        return self

    def _start_worker(self, worker: int) -> asyncio.Task[None]:
        task = asyncio.create_task(self._work(worker), name=f"batcher-{worker}")
        task.add_done_callback(lambda done: self._worker_ended(worker, done))
        return task

    def _worker_ended(self, worker: int, task: asyncio.Task[None]) -> None:
        if self._closed:
            return
        why = "was cancelled" if task.cancelled() else f"died: {type(task.exception()).__name__}: {task.exception()}"
        log.error("batcher worker %d %s; starting a new one", worker, why)
        self._running_since.pop(worker, None)
        self.worker_restarts += 1
        if self._on_worker_restart is not None:
            self._on_worker_restart(why)
        self._workers[worker] = self._start_worker(worker)

    async def __aexit__(self, *exc_info: object) -> None:
        self._closed = True
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        _fail(self._queue, self._shutting_down())
        for pending in self._queue:
            pending.slot.release()
        self._queue.clear()

    @property
    def depth(self) -> int:
        """Items waiting for a worker."""
        return len(self._queue)

    def _shutting_down(self) -> NotReady:
        return NotReady("the service is shutting down", retry_after_s=self._retry_after_s)

    def check_capacity(self) -> None:
        """Raise :class:`Overloaded` (or :class:`NotReady` once closed) if a place would be refused now."""
        if self._closed:
            raise self._shutting_down()
        if self._slots >= self.max_queue_depth:
            raise Overloaded(
                f"{self._slots} images are admitted and waiting for the engine (the limit is {self.max_queue_depth}); "
                "retry later",
                retry_after_s=self._retry_after_s,
            )

    def observe_run(self, seconds: float) -> None:
        """Feed one batch's run time into the estimate (the batcher's own batches feed it too;
        a warm-up run seeds it)."""
        self._run_times.append(seconds)

    def _run_estimate_s(self) -> float | None:
        if not self._run_times:
            return None
        ordered = sorted(self._run_times)
        return ordered[max(0, math.ceil(len(ordered) * RUN_TIME_PERCENTILE / 100) - 1)]

    def estimated_finish_s(self, now: float) -> float | None:
        """Seconds from ``now`` until an item admitted now would have its result, or None before
        any batch was measured: the places taken ahead of it, in batches shared among the workers,
        after the earliest running batch ends when every worker is busy, then its own batch; each
        batch at the 90th percentile of the recent batch times."""
        run = self._run_estimate_s()
        if run is None:
            return None
        batches_ahead = self._slots // self.max_batch_size
        start = (batches_ahead // self._num_workers) * run
        if len(self._running_since) >= self._num_workers:
            start += max(0.0, min(self._running_since.values()) + run - now)
        return start + run

    def check_deadline(self, deadline: float) -> None:
        """Raise :class:`DeadlineUnreachable` if an item admitted now would finish after ``deadline``
        (event-loop time) by :meth:`estimated_finish_s`."""
        now = asyncio.get_running_loop().time()
        finish = self.estimated_finish_s(now)
        if finish is not None and now + finish > deadline:
            raise DeadlineUnreachable(
                f"the engine would answer in about {finish:.1f} s ({self._slots} images admitted ahead), after this "
                f"request's deadline in {max(0.0, deadline - now):.1f} s; retry later or allow more time "
                "(X-Request-Timeout-Ms)",
                retry_after_s=max(self._retry_after_s, math.ceil(finish - max(0.0, deadline - now))),
            )

    def reserve(self, deadline: float) -> Slot:
        """A place for one item, taken once its capacity and ``deadline`` (event-loop time) are checked:
        the one admission check of a request. Give it to :meth:`submit`, or ``release()`` it.

        Raises:
            NotReady, Overloaded, DeadlineUnreachable: see :meth:`check_capacity`, :meth:`check_deadline`.
        """
        self.check_capacity()
        self.check_deadline(deadline)
        return Slot(self)

    def submit(self, item: T, deadline: float, slot: Slot | None = None) -> asyncio.Future[Batched[R]]:
        """Queue ``item`` in its ``slot`` (None: :meth:`reserve` one now); ``deadline`` is in
        event-loop time (``loop.time()``). The slot is given back when the item leaves the queue.

        The caller awaits the returned future; cancelling it withdraws the item.

        Raises:
            NotReady: the batcher is closed; without a slot, what :meth:`reserve` raises.
        """
        if slot is None:
            slot = self.reserve(deadline)
        elif self._closed:
            slot.release()
            raise self._shutting_down()
        loop = asyncio.get_running_loop()
        pending = _Pending(item, self._group_key(item), deadline, loop.time(), slot, loop.create_future())
        pending.future.add_done_callback(lambda fut: self._withdraw(pending) if fut.cancelled() else None)
        self._queue.append(pending)
        self._arrived.set()
        return pending.future

    def _withdraw(self, pending: _Pending[T, R]) -> None:
        with contextlib.suppress(ValueError):
            self._queue.remove(pending)
        pending.slot.release()

    async def _work(self, worker: int) -> None:
        while True:
            batch = await self._next_batch()
            await self._run(batch, worker)

    async def _next_batch(self) -> list[_Pending[T, R]]:
        loop = asyncio.get_running_loop()
        async with self._forming:
            while True:
                self._prune(loop.time())
                if not self._queue:
                    self._arrived.clear()
                    await self._arrived.wait()
                    continue
                head = self._queue[0]
                group = [p for p in self._queue if p.key == head.key][: self.max_batch_size]
                wait_s = head.enqueued + self.max_wait_s - loop.time()
                if len(group) == self.max_batch_size or wait_s <= 0:
                    for pending in group:
                        self._queue.remove(pending)
                        pending.slot.release()
                    return group
                self._arrived.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._arrived.wait(), wait_s)

    def _prune(self, now: float) -> None:
        """Drop withdrawn items whose done-callback has not run yet, and fail expired ones."""
        for pending in [p for p in self._queue if p.future.done() or p.deadline <= now]:
            self._queue.remove(pending)
            pending.slot.release()
            if not pending.future.done():
                pending.future.set_exception(
                    DeadlineExceeded(f"the deadline passed after {now - pending.enqueued:.3f} s in the queue")
                )

    async def _run(self, batch: list[_Pending[T, R]], worker: int) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        self._running_since[worker] = started
        if self._on_batch is not None:
            self._on_batch(len(batch))
        try:
            with self._trace_batch(len(batch)) as traced:
                results = await self._handle_batch([p.item for p in batch])
            if len(results) != len(batch):
                raise InferenceFailed(f"the batch function returned {len(results)} results for {len(batch)} inputs")
        except asyncio.CancelledError:  # the batcher is closing under this batch, or its worker was stopped
            _fail(batch, self._shutting_down() if self._closed else InferenceFailed(
                "the worker running this batch stopped; a new one serves the next requests"))
            raise
        except Exception as exc:
            _fail(batch, exc)
            return
        finally:
            del self._running_since[worker]
        run_s = loop.time() - started
        self.observe_run(run_s)
        for pending, result in zip(batch, results):
            if not pending.future.done():
                pending.future.set_result(Batched(result, started - pending.enqueued, run_s, len(batch), traced))


def _fail(batch: list[_Pending[T, R]], exc: BaseException) -> None:
    for pending in batch:
        if not pending.future.done():
            pending.future.set_exception(exc)
