"""Admission: how much memory the requests being handled may hold, checked before the work.

Every /predict request reserves what it will hold from a :class:`MemoryBudget`: its body before the
body is read (the declared ``Content-Length``, or the body limit when the length is not declared),
then, once the image header gives the size, its decoded pixels and its preprocessed tensor. A
reservation that does not fit is refused with 503 and ``Retry-After`` (``Overloaded``), so a burst
of large uploads waits at the client instead of growing the process past its container's limit.
What a request holds is released as soon as it is not needed (decoded pixels after preprocessing)
and entirely when its answer is built.

The default budget follows the memory limit of the container (cgroup v2 ``memory.max`` or v1
``memory.limit_in_bytes``, else the machine's RAM): a quarter of it, between 256 MiB and 2 GiB;
the engine, its arena and the Python heap need the rest.
"""

from __future__ import annotations

import os
from pathlib import Path

from service.errors import Overloaded

MIN_DEFAULT_BUDGET = 256 * 2**20
MAX_DEFAULT_BUDGET = 2 * 2**30
_CGROUP_LIMITS = (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"))
# Decoding holds PIL's buffer (4 bytes a pixel: it stores RGB as RGBX) and the RGB array (3) at
# once; measured: a 24-megapixel JPEG adds 160 MiB of RSS when decoded (6.7 bytes a pixel).
DECODE_BYTES_PER_PIXEL = 4 + 3
# Per pixel of the engine input: the resized uint8 image (3 bytes, briefly), the float32 CHW tensor
# (12) and its copy in the padded batch (12).
TENSOR_BYTES_PER_PIXEL = 3 + 12 + 12


def memory_limit_bytes() -> int:
    """The container's memory limit (cgroup), else the machine's physical memory."""
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in _CGROUP_LIMITS:
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            return min(int(text), physical)  # v1 reports "no limit" as a huge number
    return physical


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

    def _take(self, nbytes: int, what: str) -> None:
        if self.in_use_bytes + nbytes > self.limit_bytes:
            raise Overloaded(
                f"{what} needs {nbytes / 2**20:.1f} MiB and the requests in flight hold "
                f"{self.in_use_bytes / 2**20:.1f} of {self.limit_bytes / 2**20:.0f} MiB "
                "(MASKRCNN_MEMORY_BUDGET_BYTES); retry later",
                retry_after_s=self._retry_after_s,
            )
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
