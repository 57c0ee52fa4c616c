"""The one timing loop of verify, the CLIs and the benchmarks, and the latency summary they report.

It lives in ``build_tools`` because the build's verify step times with it too, and ``build_tools``
imports nothing from ``scripts``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np

PERCENTILES = (50, 90, 99)

Key = TypeVar("Key", bound=Hashable)
Result = TypeVar("Result")


def timed(call: Callable[..., Result], *args: Any) -> tuple[Result, float]:
    """``call(*args)`` and its wall seconds (``time.perf_counter``)."""
    started = time.perf_counter()
    result = call(*args)
    return result, time.perf_counter() - started


def time_calls(runners: Mapping[Key, Callable[[], Any]], iterations: int, warmup: int = 0, *,
               alternate: bool = False) -> dict[Key, list[float]]:
    """Wall seconds (``time.perf_counter``) of each timed call per runner.

    The runners take turns, call by call, so load from other processes hits them alike: ``warmup``
    untimed rounds, then ``iterations`` timed rounds of one call per runner, in the mapping's
    order, or with ``alternate`` in reverse order every second round (so neither always goes
    first). Returns ``iterations`` samples per runner.
    """
    order = list(runners)
    seconds: dict[Key, list[float]] = {key: [] for key in order}
    for index in range(warmup + iterations):
        for key in reversed(order) if alternate and index % 2 else order:
            _, elapsed = timed(runners[key])
            if index >= warmup:
                seconds[key].append(elapsed)
    return seconds


def latency_summary(seconds: Sequence[float]) -> dict[str, float]:
    """``{"min", "mean", "p50", "p90", "p99", "max"}`` of ``seconds``, in milliseconds
    (percentiles interpolate linearly, numpy's default); empty input gives an empty dict."""
    if not seconds:
        return {}
    ms = np.asarray(seconds, np.float64) * 1000
    summary = {"min": float(ms.min()), "mean": float(ms.mean())}
    summary.update({f"p{q}": float(np.percentile(ms, q)) for q in PERCENTILES})
    summary["max"] = float(ms.max())
    return summary
