"""Admission: whether a request may start, checked once, before its body is read; and how much
memory the requests being handled may hold.

:class:`AdmissionControl` (one per app) admits a request when the engine is ready, the batcher
has room and its deadline can be met by the batcher's estimate, and the memory budget can take its
body; then it reads the body and takes the request's batcher place. The :class:`Admission` it
yields is the request's from then on: its deadline, its batcher place, and what it holds of the
budget (:meth:`Admission.hold_image` once an image's size is known).

Every /predict request reserves what it will hold from a :class:`MemoryBudget`: its body as the body
arrives (a declared ``Content-Length`` only has to fit what is free when the request is admitted,
and is charged as its bytes come, so a client that declares 50 MB and sends nothing holds nothing),
then, once the image header gives the size, its decoded pixels and its preprocessed tensor. A
reservation that does not fit is refused with 503 and ``Retry-After`` (``Overloaded``), so a burst
of large uploads waits at the client instead of growing the process past its container's limit.
What a request holds is released as soon as it is not needed (decoded pixels after preprocessing,
the body's bytes when the body is refused) and entirely when its answer is built.

The body must keep coming (:class:`BodyReceiver`): no pause longer than the idle timeout, an average
rate above the minimum once the grace period has passed, and all of it before the request's
deadline; a slower client is answered 408 with ``Connection: close`` (:class:`SlowBody`) and counted.
A request's batcher place is taken once its body has arrived, so clients still sending hold no place.

The default budget follows the memory limit of the container (cgroup v2 ``memory.max`` or v1
``memory.limit_in_bytes``, else the machine's RAM): a quarter of it, between 256 MiB and 2 GiB;
the engine, its arena and the Python heap need the rest.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Generic, TypeVar

from prometheus_client import Counter, Gauge
from starlette.requests import Request
from starlette.types import Message

from service.backends.base import CGROUP_ROOT, cgroup_memory
from service.batcher import Batcher, Slot
from service.exceptions import DeadlineExceeded, NotReady, Overloaded, ServiceError, SlowBody
from service.request import body_bytes_to_hold, discard_body

if TYPE_CHECKING:  # settings reads this module's default budget
    from service.settings import Settings

P = TypeVar("P")

MIN_DEFAULT_BUDGET = 256 * 2**20
MAX_DEFAULT_BUDGET = 2 * 2**30
# Decoding holds PIL's buffer (4 bytes a pixel: it stores RGB as RGBX) and the RGB array (3) at
# once; measured: a 24-megapixel JPEG adds 160 MiB of RSS when decoded (6.7 bytes a pixel).
DECODE_BYTES_PER_PIXEL = 4 + 3
# Per pixel of the engine input: the resized uint8 image (3 bytes, briefly), the float32 CHW tensor
# (12) and its copy in the padded batch (12).
TENSOR_BYTES_PER_PIXEL = 3 + 12 + 12


def memory_limit_bytes(cgroup_root: Path = CGROUP_ROOT) -> int:
    """The container's memory limit (cgroup), else the machine's physical memory."""
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    cgroup = cgroup_memory(cgroup_root)
    return physical if cgroup is None else min(cgroup[0], physical)


def default_budget_bytes() -> int:
    """A quarter of the memory limit, clamped to [256 MiB, 2 GiB]."""
    return min(max(memory_limit_bytes() // 4, MIN_DEFAULT_BUDGET), MAX_DEFAULT_BUDGET)


class MemoryBudget:
    """Bytes the requests being handled may hold together.

    Attributes:
        limit_bytes: the budget.
        in_use_bytes: what the open reservations hold now.
    """

    def __init__(self, limit_bytes: int, retry_after_s: int) -> None:
        if limit_bytes < 1:
            raise ValueError(f"limit_bytes must be >= 1, got {limit_bytes}")
        self.limit_bytes = limit_bytes
        self.in_use_bytes = 0
        self._retry_after_s = retry_after_s

    def reservation(self) -> Reservation:
        """An empty reservation; use as ``with budget.reservation() as held: held.hold(...)``."""
        return Reservation(self)

    def check(self, nbytes: int, what: str) -> None:
        """Raise :class:`Overloaded` (503) unless ``nbytes`` more would fit now; nothing is held.

        ``what`` names the need in the message ("the request body")."""
        if self.in_use_bytes + nbytes > self.limit_bytes:
            raise Overloaded(
                f"{what} needs {nbytes / 2**20:.1f} MiB and the requests in flight hold "
                f"{self.in_use_bytes / 2**20:.1f} of {self.limit_bytes / 2**20:.0f} MiB "
                "(MASKRCNN_MEMORY_BUDGET_BYTES); retry later",
                retry_after_s=self._retry_after_s,
            )

    def _take(self, nbytes: int, what: str) -> None:
        self.check(nbytes, what)
        self.in_use_bytes += nbytes

    def _give(self, nbytes: int) -> None:
        self.in_use_bytes -= nbytes


class Reservation:
    """What one request holds of a :class:`MemoryBudget`, by part (``body``, ``pixels``, ...)."""

    def __init__(self, budget: MemoryBudget) -> None:
        self._budget = budget
        self._parts: dict[str, int] = {}

    def hold(self, part: str, nbytes: int, what: str) -> None:
        """Hold ``nbytes`` more under ``part``.

        Raises:
            Overloaded: the budget cannot take it (503); nothing more is held then.
        """
        self._budget._take(nbytes, what)
        self._parts[part] = self._parts.get(part, 0) + nbytes

    def release(self, part: str) -> None:
        """Give back what ``part`` holds."""
        self._budget._give(self._parts.pop(part, 0))

    @property
    def held_bytes(self) -> int:
        return sum(self._parts.values())

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc_info: object) -> None:
        for part in list(self._parts):
            self.release(part)


def image_bytes(width: int, height: int, resized_hw: tuple[int, int]) -> tuple[int, int]:
    """``(decode, tensor)`` bytes an image of ``width`` x ``height`` pixels needs, resized to ``resized_hw``."""
    return width * height * DECODE_BYTES_PER_PIXEL, resized_hw[0] * resized_hw[1] * TENSOR_BYTES_PER_PIXEL


class ImageHold:
    """What one image of a request holds: its decoded pixels and its engine input tensor."""

    def __init__(self, reservation: Reservation) -> None:
        self._reservation = reservation

    def release_pixels(self) -> None:
        """The decoded pixels are freed (after preprocessing, unless they are drawn on)."""
        self._reservation.release("pixels")


class BodyReceiver:
    """The ASGI ``receive`` an admitted request's body is read through (``request`` reads through it).

    Memory: what arrives is held in ``reservation`` (part ``body``) as it arrives, in proportion to
    what the whole body will hold (``expected_bytes`` for a body of ``size`` bytes, see
    :func:`service.request.body_bytes_to_hold`).

    Time (event-loop seconds): each part must arrive within ``body_idle_timeout_s`` of the one
    before, the average rate since the first read must stay at ``body_min_rate_bytes_per_s`` or
    more once ``body_rate_grace_s`` have passed, and the whole body must come before ``deadline``;
    else :class:`SlowBody` (408), counted in ``slow_clients`` by reason.

    ``complete`` says whether the whole body arrived (or was received whole before admission, as
    gRPC's message is), so a refusal can close a connection whose body was left unread (a client
    still trickling it would otherwise keep the connection forever).
    """

    def __init__(self, request: Request, reservation: Reservation, expected_bytes: int, size: int,
                 settings: Settings, deadline: float, slow_clients: Counter | None) -> None:
        self.request = Request(request.scope, self.receive)
        # a body received whole before admission (gRPC's message) is not read through here
        self.complete: bool = getattr(request.state, "body_done", False)
        self.arrived = 0
        self._receive = request.receive
        self._reservation = reservation
        self._expected = expected_bytes
        self._size = size
        self._held = 0
        self._settings = settings
        self._deadline = deadline
        self._slow_clients = slow_clients
        self._metering = True
        self._first_read: float | None = None
        self._last_arrival = 0.0

    async def receive(self) -> Message:
        if not self._metering:
            return self._observe(await self._receive())
        loop = asyncio.get_running_loop()
        if self._first_read is None:
            self._first_read = self._last_arrival = loop.time()
        reason, by = self._next_arrival_by()
        try:
            async with asyncio.timeout_at(by):
                message = await self._receive()
        except TimeoutError:
            if self._slow_clients is not None:
                self._slow_clients.labels(reason).inc()
            raise self._too_slow(reason, loop.time() - self._first_read) from None
        self._last_arrival = loop.time()
        self._observe(message)
        held = self._expected if self.complete else min(self._expected, self._expected * self.arrived // self._size)
        if held > self._held:
            self._reservation.hold("body", held - self._held, "the request body")
            self._held = held
        return message

    def _observe(self, message: Message) -> Message:
        if message["type"] == "http.request":
            self.arrived += len(message.get("body", b""))
            self.complete = not message.get("more_body", False)
        return message

    def _next_arrival_by(self) -> tuple[str, float]:
        """The rule the next part of the body must meet first, and by when (event-loop time)."""
        settings = self._settings
        rules = [("idle", self._last_arrival + settings.body_idle_timeout_s), ("deadline", self._deadline)]
        if settings.body_min_rate_bytes_per_s:
            rules.append(("rate", self._first_read + max(settings.body_rate_grace_s,
                                                         self.arrived / settings.body_min_rate_bytes_per_s)))
        return min(rules, key=lambda rule: rule[1])

    def _too_slow(self, reason: str, elapsed_s: float) -> SlowBody:
        settings = self._settings
        came = f"{self.arrived} bytes came in {elapsed_s:.1f} s"
        message = {
            "idle": f"no part of the request body arrived for {settings.body_idle_timeout_s:g} s "
                    f"(MASKRCNN_BODY_IDLE_TIMEOUT_S); {came}",
            "rate": f"the request body arrived at {self.arrived / max(elapsed_s, 1e-9) / 1000:.1f} kB/s on average, "
                    f"below the minimum of {settings.body_min_rate_bytes_per_s / 1000:g} kB/s "
                    f"(MASKRCNN_BODY_MIN_RATE_BYTES_PER_S); {came}",
            "deadline": f"the request's deadline passed while its body was arriving; {came}",
        }[reason]
        return SlowBody(message, reason)

    async def refused(self, error: ServiceError, max_drain_bytes: int) -> None:
        """The request is refused with ``error``: give back what its body holds (the bytes are dropped),
        read and drop the rest of the body (not from a client too slow to send it), and answer with
        ``Connection: close`` unless the whole body arrived."""
        self._reservation.release("body")
        self._held = 0
        self._metering = False
        if not isinstance(error, SlowBody):
            await discard_body(self.request, max_drain_bytes)
        if not self.complete:
            error.headers["Connection"] = "close"


class Admission(Generic[P]):
    """An admitted request: its read body (``payload``), event-loop ``started`` and ``deadline``,
    its place in the batcher, and its share of the memory budget (the body is held there). Everything
    is given back when the :meth:`AdmissionControl.admit` block ends."""

    def __init__(self, request: Request, budget: MemoryBudget, batcher: Batcher, started: float, deadline: float) -> None:
        self.request = request
        self.started = started
        self.deadline = deadline
        self.payload: P | None = None
        self._budget = budget
        self._batcher = batcher
        self._slots: list[Slot] = []  # the first is taken once the body has arrived
        self._slot_taken = False
        self._reservations = [budget.reservation()]

    @property
    def body(self) -> Reservation:
        return self._reservations[0]

    def hold_image(self, width: int, height: int, resized_hw: tuple[int, int], *, decoded: bool = True) -> ImageHold:
        """Hold what a ``width`` x ``height`` image resized to ``resized_hw`` needs: its decoded pixels
        (unless ``decoded`` is False: pixels that came as an array are in the body already) and its
        engine input.

        Raises:
            Overloaded: the budget cannot take it (503); nothing more is held then.
        """
        reservation = self._budget.reservation()
        self._reservations.append(reservation)
        decode_bytes, tensor_bytes = image_bytes(width, height, resized_hw)
        if decoded:
            reservation.hold("pixels", decode_bytes, f"decoding a {width}x{height} image")
        reservation.hold("tensor", tensor_bytes, f"the engine input of a {width}x{height} image")
        return ImageHold(reservation)

    def slot(self) -> Slot:
        """A batcher place for one image: the one taken once the body arrived for the first image; a request
        with several images (the v2 protocol's batch input) checks and takes one more for each other.

        Raises:
            NotReady, Overloaded, DeadlineUnreachable: no place for another image.
        """
        if not self._slot_taken:
            self._slot_taken = True
            return self._slots[0]
        slot = self._batcher.reserve(self.deadline)
        self._slots.append(slot)
        return slot

    def check_deadline(self, stage: str) -> None:
        """Raise :class:`DeadlineExceeded` (504) if the deadline passed before ``stage``."""
        if asyncio.get_running_loop().time() >= self.deadline:
            raise DeadlineExceeded(f"the request's deadline passed before {stage}")

    async def disconnected(self) -> None:
        """Return once the client disconnects (the body has been read, so only that message remains)."""
        while (await self.request.receive())["type"] != "http.disconnect":
            pass

    def _release(self) -> None:
        for reservation in self._reservations:
            reservation.__exit__()
        for slot in self._slots:
            slot.release()


class AdmissionControl:
    """Admits requests: readiness, room in the batcher, a reachable deadline and memory for the body.

    Attributes:
        not_ready_reason: why the service takes no requests yet (warming up, shutting down), or
            None once it is ready.
    """

    def __init__(self, settings: Settings, budget: MemoryBudget, batcher: Batcher, serving: Callable[[], bool],
                 in_flight: Gauge, slow_clients: Counter | None = None) -> None:
        """``serving()``: whether an engine session can take a batch; ``in_flight``: the gauge of
        requests being handled; ``slow_clients``: the counter of bodies refused as too slow, by
        ``reason`` (idle, rate, deadline); None counts nowhere."""
        self.settings = settings
        self.budget = budget
        self.not_ready_reason: str | None = "the engine is warming up"
        self._batcher = batcher
        self._serving = serving
        self._in_flight = in_flight
        self._slow_clients = slow_clients

    def require_ready(self) -> None:
        """Raise :class:`NotReady` (503) unless warmed up and at least one engine session serves."""
        reason = self.not_ready_reason
        if reason is None and not self._serving():
            reason = "every engine session hung and is being replaced"
        if reason is not None:
            raise NotReady(reason, retry_after_s=self.settings.retry_after_s)

    @asynccontextmanager
    async def admit(
        self, request: Request, timeout_ms: float | None, read_body: Callable[[Request, int], Awaitable[P]]
    ) -> AsyncIterator[Admission[P]]:
        """Admit one request, then read its body with ``read_body(request, max_body_bytes)``.

        Before the body is read: readiness, room in the batcher, whether the deadline (``timeout_ms``,
        default the setting) can be met and whether the whole body would fit the memory budget now.
        The body is then read through a :class:`BodyReceiver` (held as it arrives, 408 when too
        slow) and the request takes its batcher place once the body is in: a client still sending
        holds neither a place nor memory it has not sent. A body already received whole (gRPC's
        message, ``request.state.body_done``) is held at once. A refused request has what its body
        holds given back, the rest of its body drained (not a too slow one's), and its connection
        closed unless the whole body arrived. The request counts as in flight, and holds its place
        and memory, until the block ends.

        Raises:
            NotReady, Overloaded, DeadlineUnreachable (503); SlowBody (408); whatever ``read_body``
            raises.
        """
        settings = self.settings
        started = asyncio.get_running_loop().time()
        deadline = started + (timeout_ms or settings.request_timeout_ms) / 1000
        admission: Admission[P] = Admission(request, self.budget, self._batcher, started, deadline)
        declared = request.headers.get("content-length", "")
        size = min(int(declared), settings.max_body_bytes) if declared.isdigit() else settings.max_body_bytes
        expected = body_bytes_to_hold(request, settings.max_body_bytes)
        body = BodyReceiver(request, admission.body, expected, max(size, 1), settings, deadline, self._slow_clients)
        with self._in_flight.track_inprogress():
            try:
                try:
                    self.require_ready()
                    self._batcher.check_capacity()
                    self._batcher.check_deadline(deadline)
                    if body.complete:
                        admission.body.hold("body", expected, "the request body")
                    else:
                        self.budget.check(expected, "the request body")
                    admission.payload = await read_body(body.request, settings.max_body_bytes)
                    admission._slots.append(self._batcher.reserve(deadline))
                except ServiceError as error:
                    await body.refused(error, settings.max_drain_bytes)
                    raise
                yield admission
            finally:
                admission._release()
