"""`maskrcnn-loadtest`: closed- and open-loop load on a running service, with its memory over time.

One image (``--image``, default a synthetic 640x480 photo) is posted to ``/predict`` again and
again, in phases run one after the other:

- closed loop, one phase per ``--concurrency`` value (``1,2,4``): that many clients, each sending
  its next request when its last answer arrives;
- open loop, one phase per ``--rate`` value (requests/s): requests start on a schedule (Poisson
  arrivals by default) whether or not earlier ones have been answered, and latency counts from
  the scheduled start, so a server that falls behind shows it.

Every phase is bounded by ``--requests`` (requests started) and ``--duration`` (seconds): at the
deadline no request is started and those in flight are cancelled (counted as cancelled, not as
errors). Each phase prints its p50/p90/p99 latency of 200 answers, throughput (200 answers per
second of phase) and its other answers by status (transport failures by exception name).

The server's resident memory is sampled every ``--rss-interval`` seconds over the whole run, from
its own ``/metrics`` (``process_resident_memory_bytes``), so it works for a server in a container
or on another machine (behind a load balancer each sample is of the replica that answered it);
``--soak`` then compares the mean of the last third of the samples with the first third and exits
1 when it grew by more than ``--max-rss-growth``.

    maskrcnn-loadtest --url http://127.0.0.1:8000 --concurrency 1,2,4 --rate 0.5 --requests 20 \\
        --duration 60 --soak

``--profile hostile`` runs the hostile-load figures instead, in one command:

1. capacity: closed loop at concurrency 1, then 2 (throughput at 2 should be at least at 1);
2. a burst of 32 concurrent uploads of a 24-megapixel JPEG: answers by status and the server's
   peak RSS (sampled every 0.2 s) against its RSS before;
3. 4x overload: an open loop at four times the measured capacity for ``--duration`` seconds:
   goodput (200 answers per second) as a fraction of the capacity, and how many requests were
   accepted and then answered 504 (deadline exceeded) rather than refused at once with 503;
4. a naive client (urllib, which sends the whole body before reading) posting a 64 MiB body:
   whether it reads the 413 or sees the connection reset.

    maskrcnn-loadtest --url http://127.0.0.1:8000 --profile hostile --requests 10 --duration 60
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from build_tools.timing import latency_summary
from scripts.tools.http import UnknownImageType, image_headers
from scripts.tools.photos import synthetic_photo
from scripts.tools.wait_ready import NotReady, require_ready

RSS_METRIC = "process_resident_memory_bytes"  # prometheus_client's process collector

EXIT_SOAK_FAILED = 1


class LoadTestError(Exception):
    """A load test that cannot run as asked; the CLI reports it as a usage error (status 2)."""


@dataclass
class Phase:
    """What one phase sent and got back."""

    mode: str  # "closed" or "open"
    level: float  # clients (closed) or requests per second (open)
    started: int = 0
    latencies_s: list[float] = field(default_factory=list)
    answers: Counter[str] = field(default_factory=Counter)  # HTTP status or transport error name -> count
    cancelled: int = 0
    wall_s: float = 0.0

    @property
    def name(self) -> str:
        return f"closed c={self.level:g}" if self.mode == "closed" else f"open {self.level:g}/s"

    @property
    def errors(self) -> dict[str, int]:
        return {answer: n for answer, n in sorted(self.answers.items()) if answer != "200"}

    def summary(self) -> dict[str, Any]:
        ok = self.answers["200"]
        return {
            "name": self.name, "mode": self.mode, "level": self.level, "started": self.started, "ok": ok,
            "errors": self.errors, "cancelled": self.cancelled, "wall_s": self.wall_s,
            "throughput_rps": ok / self.wall_s if self.wall_s > 0 else 0.0,
            "latency_ms": latency_summary(self.latencies_s),
        }


@dataclass
class Sender:
    """Posts the image and records the answer in a phase."""

    client: httpx.AsyncClient
    url: str
    body: bytes
    headers: dict[str, str]
    params: dict[str, str]

    async def send(self, phase: Phase, since: float | None = None) -> None:
        """One request; its latency counts from ``since`` (``time.perf_counter``), default now."""
        since = time.perf_counter() if since is None else since
        try:
            response = await self.client.post(self.url + "/predict", content=self.body, headers=self.headers,
                                              params=self.params)
        except asyncio.CancelledError:
            phase.cancelled += 1
            raise
        except httpx.TransportError as error:
            phase.answers[type(error).__name__] += 1
            return
        phase.answers[str(response.status_code)] += 1
        if response.status_code == 200:
            phase.latencies_s.append(time.perf_counter() - since)


async def _finish_by(deadline: float, tasks: Iterable[asyncio.Task]) -> None:
    """Wait for ``tasks`` until ``deadline`` (``time.perf_counter``); cancel those still running."""
    tasks = set(tasks)
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline - time.perf_counter()))
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)


async def closed_loop(sender: Sender, concurrency: int, requests: int, duration_s: float) -> Phase:
    """``concurrency`` clients, each sending its next request when its last one is answered."""
    phase = Phase("closed", concurrency)
    started = time.perf_counter()
    deadline = started + duration_s

    async def client() -> None:
        while phase.started < requests and time.perf_counter() < deadline:
            phase.started += 1
            await sender.send(phase)

    await _finish_by(deadline, [asyncio.create_task(client()) for _ in range(concurrency)])
    phase.wall_s = time.perf_counter() - started
    return phase


async def open_loop(sender: Sender, rate: float, requests: int, duration_s: float, arrivals: str,
                    rng: np.random.Generator) -> Phase:
    """Requests started at ``rate`` per second on average (Poisson or evenly spaced arrivals)."""
    phase = Phase("open", rate)
    started = time.perf_counter()
    deadline = started + duration_s
    in_flight: set[asyncio.Task] = set()
    at = started
    while phase.started < requests and at < deadline:
        await asyncio.sleep(max(0.0, at - time.perf_counter()))
        phase.started += 1
        task = asyncio.create_task(sender.send(phase, since=at))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
        at += rng.exponential(1 / rate) if arrivals == "poisson" else 1 / rate
    await _finish_by(deadline, in_flight)
    if phase.started < requests:  # stopped by the clock: the phase spans its whole duration
        await asyncio.sleep(max(0.0, deadline - time.perf_counter()))
    phase.wall_s = time.perf_counter() - started
    return phase


def rss_kib(metrics_text: str) -> int | None:
    """The server's resident memory in KiB from a ``/metrics`` body (``process_resident_memory_bytes``),
    or None when the body has no such sample."""
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == RSS_METRIC:
                return int(sample.value) // 1024
    return None


@dataclass
class RssMonitor:
    """Samples the server's RSS from its ``/metrics`` every ``interval_s`` while :meth:`run` runs."""

    client: httpx.AsyncClient
    url: str  # the service's base URL
    interval_s: float
    samples: list[tuple[float, int]] = field(default_factory=list)  # (seconds since start, KiB)
    lost: str | None = None  # why sampling stopped early
    _started: float = field(default_factory=time.perf_counter)

    @property
    def source(self) -> str:
        return self.url + "/metrics"

    async def sample(self) -> bool:
        """Take one sample; False once the server's memory cannot be read (``lost`` says why)."""
        if self.lost is None:
            try:
                response = await self.client.get(self.source)
                kib = rss_kib(response.text) if response.status_code == 200 else None
            except httpx.TransportError as error:
                self.lost = f"{self.source}: {type(error).__name__}: {error}"
            else:
                if kib is None:
                    self.lost = f"{self.source} answered {response.status_code} without {RSS_METRIC}"
                else:
                    self.samples.append((time.perf_counter() - self._started, kib))
        return self.lost is None

    async def run(self) -> None:
        """Sample every ``interval_s`` (after the first sample, taken by the caller) until cancelled or lost."""
        while self.lost is None:
            await asyncio.sleep(self.interval_s)
            await self.sample()


def rss_growth(samples_kib: Sequence[float]) -> float:
    """Relative growth of the mean of the last third of the samples over the first third.

    Raises:
        LoadTestError: fewer than 3 samples.
    """
    if len(samples_kib) < 3:
        raise LoadTestError(f"a soak check needs at least 3 RSS samples, got {len(samples_kib)}: "
                            "run longer or lower --rss-interval")
    third = len(samples_kib) // 3
    first, last = np.mean(samples_kib[:third]), np.mean(samples_kib[-third:])
    return float((last - first) / first)


def format_rss(samples: list[tuple[float, int]], points: int = 10) -> str:
    """``server RSS (MiB) over time`` with at most ``points`` evenly spaced samples."""
    picked = [samples[round(i)] for i in np.linspace(0, len(samples) - 1, min(points, len(samples)))]
    mib = [kib / 1024 for _, kib in samples]
    return ("server RSS (MiB) over time: " + ", ".join(f"{t:.0f}s {kib / 1024:.1f}" for t, kib in picked)
            + f"  (min {min(mib):.1f}, max {max(mib):.1f}, {len(samples)} samples)")


def format_phases(phases: list[Phase]) -> str:
    return "\n".join([PHASES_HEADER, *format_phases_summaries([p.summary() for p in phases])])


PHASES_HEADER = (f"{'phase':14} {'started':>7} {'ok':>5} {'cancelled':>9} {'wall s':>7} {'ok/s':>7} "
                 f"{'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8}  errors")


def format_phases_summaries(summaries: list[dict[str, Any]]) -> list[str]:
    """One table line per phase summary (``Phase.summary()``)."""
    lines = []
    for s in summaries:
        ms = s["latency_ms"]
        latency = " ".join(f"{ms[k]:8.1f}" if ms else f"{'-':>8}" for k in ("p50", "p90", "p99"))
        errors = " ".join(f"{answer}:{n}" for answer, n in s["errors"].items()) or "-"
        lines.append(f"{s['name']:14} {s['started']:7} {s['ok']:5} {s['cancelled']:9} {s['wall_s']:7.1f} "
                     f"{s['throughput_rps']:7.3f} {latency}  {errors}")
    return lines


@dataclass(frozen=True)
class Plan:
    url: str
    body: bytes
    params: dict[str, str]
    concurrency: list[int]
    rates: list[float]
    requests: int
    duration_s: float
    arrivals: str = "poisson"
    timeout_s: float = 300.0
    rss_interval_s: float = 1.0
    require_rss: bool = False  # refuse a server whose /metrics has no RSS (a soak test needs it)
    seed: int = 0


async def run_plan(plan: Plan) -> tuple[list[Phase], RssMonitor | None]:
    """Run every phase in order (closed loops, then open loops), sampling RSS throughout (None
    when the server's /metrics does not carry it).

    Raises:
        LoadTestError: no ready service at the URL, an image of an unknown type, or no RSS in
            /metrics when ``plan.require_rss``.
    """
    try:
        headers = image_headers(plan.body, plan.timeout_s)
    except UnknownImageType as error:
        raise LoadTestError(f"the image is {error}") from None
    phases = []
    async with httpx.AsyncClient(timeout=plan.timeout_s, limits=httpx.Limits(max_connections=None)) as client:
        _require_ready(plan.url)
        monitor: RssMonitor | None = RssMonitor(client, plan.url, plan.rss_interval_s)
        if not await monitor.sample():
            if plan.require_rss:
                raise LoadTestError(f"cannot watch the server's memory: {monitor.lost}")
            print(f"no server RSS: {monitor.lost}", file=sys.stderr)
            monitor = None
        sender = Sender(client, plan.url, plan.body, headers, plan.params)
        sampling = asyncio.create_task(monitor.run()) if monitor else None
        rng = np.random.default_rng(plan.seed)
        try:
            for concurrency in plan.concurrency:
                phases.append(await closed_loop(sender, concurrency, plan.requests, plan.duration_s))
            for rate in plan.rates:
                phases.append(await open_loop(sender, rate, plan.requests, plan.duration_s, plan.arrivals, rng))
        finally:
            if sampling:
                sampling.cancel()
                await asyncio.gather(sampling, return_exceptions=True)
                await monitor.sample()  # the memory at the end of the last phase
    return phases, monitor


HOSTILE_BURST = 32  # concurrent uploads of the large image
HOSTILE_LARGE_HW = (4000, 6000)  # 24 megapixels
HOSTILE_OVERLOAD = 4.0  # offered load, in multiples of the measured capacity
NAIVE_BODY_BYTES = 64 * 2**20
HOSTILE_CLIENT_MARGIN_S = 15.0  # the client waits this much past the server's deadline


def naive_upload(url: str, size: int, timeout_s: float) -> str:
    """What urllib (body sent in full before the answer is read) gets for a ``size``-byte body:
    ``"<status> <error code>"`` or the exception's name."""
    request = urllib.request.Request(url + "/predict", data=b"\xff\xd8" + bytes(size),
                                     headers={"Content-Type": "image/jpeg"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return f"{response.status}"
    except urllib.error.HTTPError as error:
        try:
            code = json.loads(error.read())["error"]["code"]
        except (ValueError, KeyError, TypeError, OSError):
            code = "(no JSON error body)"
        return f"{error.code} {code}"
    except OSError as error:
        return type(getattr(error, "reason", error)).__name__


async def run_hostile(plan: Plan) -> dict[str, Any]:
    """The hostile-load figures (see the module docstring) against ``plan.url``; ``plan.requests``
    and ``plan.duration_s`` bound the capacity phases, ``plan.duration_s`` the overload phase.

    Raises:
        LoadTestError: no ready service at the URL, or no RSS in its /metrics.
    """
    small = plan.body
    large = synthetic_photo(*HOSTILE_LARGE_HW)
    # the server's deadline is plan.timeout_s (the header): the client waits longer, to see its 504s
    client_timeout_s = plan.timeout_s + HOSTILE_CLIENT_MARGIN_S
    async with httpx.AsyncClient(timeout=client_timeout_s, limits=httpx.Limits(max_connections=None)) as client:
        _require_ready(plan.url)
        monitor = RssMonitor(client, plan.url, 0.2)
        if not await monitor.sample():
            raise LoadTestError(f"cannot watch the server's memory: {monitor.lost}")
        sampling = asyncio.create_task(monitor.run())
        rng = np.random.default_rng(plan.seed)
        try:
            small_sender = Sender(client, plan.url, small, image_headers(small, plan.timeout_s), plan.params)
            one = await closed_loop(small_sender, 1, plan.requests, plan.duration_s)
            two = await closed_loop(small_sender, 2, plan.requests, plan.duration_s)
            capacity = one.summary()["throughput_rps"]
            if capacity <= 0:
                raise LoadTestError(f"no request succeeded at concurrency 1: {one.errors}")

            before_kib = monitor.samples[-1][1]
            first = len(monitor.samples)
            large_sender = Sender(client, plan.url, large, image_headers(large, plan.timeout_s), plan.params)
            burst = await closed_loop(large_sender, HOSTILE_BURST, HOSTILE_BURST, client_timeout_s)
            await monitor.sample()
            peak_kib = max(kib for _, kib in monitor.samples[first - 1:])

            rate = HOSTILE_OVERLOAD * capacity
            overload = await open_loop(small_sender, rate, int(rate * plan.duration_s) + 1, plan.duration_s,
                                       "poisson", rng)
            naive = await asyncio.to_thread(naive_upload, plan.url, NAIVE_BODY_BYTES, client_timeout_s)
        finally:
            sampling.cancel()
            await asyncio.gather(sampling, return_exceptions=True)
    goodput = overload.summary()["throughput_rps"]
    return {
        "phases": [p.summary() for p in (one, two, burst, overload)],
        "capacity_rps": capacity,
        "concurrency_2_over_1": two.summary()["throughput_rps"] / capacity,
        "burst": {"uploads": HOSTILE_BURST, "image_hw": list(HOSTILE_LARGE_HW), "image_bytes": len(large),
                  "answers": dict(burst.answers), "rss_before_mib": before_kib / 1024, "rss_peak_mib": peak_kib / 1024},
        "overload": {"offered_rps": rate, "goodput_rps": goodput, "goodput_over_capacity": goodput / capacity,
                     "answers": dict(overload.answers), "accepted_then_504": overload.answers["504"]},
        "naive_client_64mib": naive,
        "rss_samples": monitor.samples,
    }


def format_hostile(figures: dict[str, Any]) -> str:
    burst, overload = figures["burst"], figures["overload"]
    answers = lambda counts: " ".join(f"{k}:{v}" for k, v in sorted(counts.items())) or "-"  # noqa: E731
    return "\n".join([
        f"capacity (closed loop, concurrency 1): {figures['capacity_rps']:.3f} img/s; concurrency 2 / 1: "
        f"{figures['concurrency_2_over_1']:.3f}",
        f"{burst['uploads']} concurrent {burst['image_hw'][1]}x{burst['image_hw'][0]} JPEG uploads "
        f"({burst['image_bytes'] / 2**20:.1f} MiB each): {answers(burst['answers'])}; server RSS "
        f"{burst['rss_before_mib']:.0f} MiB before, {burst['rss_peak_mib']:.0f} MiB peak",
        f"{HOSTILE_OVERLOAD:g}x overload (open loop, {overload['offered_rps']:.2f} req/s offered): goodput "
        f"{overload['goodput_rps']:.3f} img/s = {overload['goodput_over_capacity']:.2f} of capacity; answers "
        f"{answers(overload['answers'])}; accepted then 504: {overload['accepted_then_504']}",
        f"naive client (urllib) posting {NAIVE_BODY_BYTES // 2**20} MiB: {figures['naive_client_64mib']}",
    ])


def _require_ready(url: str) -> None:
    """The service at ``url`` answers ``/readyz`` (the check every client of ours runs first)."""
    try:
        require_ready(url)
    except NotReady as error:
        raise LoadTestError(str(error)) from None


def _numbers(kind: type, text: str) -> list:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="maskrcnn-loadtest", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="service base URL (default %(default)s)")
    parser.add_argument("--image", type=Path, default=None, help="image to send (default: a synthetic 640x480 JPEG)")
    parser.add_argument("--query", default="", help="extra /predict query, e.g. 'masks=false&score_threshold=0.3'")
    parser.add_argument("--concurrency", type=lambda t: _numbers(int, t), default=None,
                        help="closed-loop phases: clients per phase, comma-separated (default 1 unless --rate)")
    parser.add_argument("--rate", type=lambda t: _numbers(float, t), default=[],
                        help="open-loop phases: requests per second per phase, comma-separated")
    parser.add_argument("--arrivals", choices=("poisson", "uniform"), default="poisson",
                        help="open-loop start times: Poisson process or evenly spaced (default poisson)")
    parser.add_argument("--requests", type=int, default=20, help="most requests started per phase (default 20)")
    parser.add_argument("--duration", type=float, default=60.0, help="most seconds per phase (default 60)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per request (default 300)")
    parser.add_argument("--rss-interval", type=float, default=1.0,
                        help="seconds between samples of the server's RSS from its /metrics (default 1)")
    parser.add_argument("--soak", action="store_true",
                        help="fail (exit 1) when RSS grows more than --max-rss-growth from the first to the last third")
    parser.add_argument("--max-rss-growth", type=float, default=0.10,
                        help="soak threshold, relative growth of mean RSS (default 0.10 = 10%%)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the Poisson arrivals (default 0)")
    parser.add_argument("--profile", choices=("phases", "hostile"), default="phases",
                        help="phases: the --concurrency/--rate phases (default); hostile: the hostile-load figures "
                             "(capacity, a burst of large uploads, 4x overload, a naive client's 413)")
    parser.add_argument("--json", type=Path, default=None, help="write the phases and RSS samples as JSON here")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``maskrcnn-loadtest``; returns the exit status (1 when a soak check fails)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.requests < 1 or args.duration <= 0 or args.timeout <= 0 or args.rss_interval <= 0:
        parser.error("--requests must be >= 1 and --duration, --timeout, --rss-interval > 0")
    try:
        plan = Plan(
            url=args.url.rstrip("/").removesuffix("/predict"),
            body=args.image.read_bytes() if args.image else synthetic_photo(),
            params=dict(parse_qsl(args.query, strict_parsing=bool(args.query))),
            concurrency=args.concurrency if args.concurrency is not None else ([] if args.rate else [1]),
            rates=args.rate, requests=args.requests, duration_s=args.duration, arrivals=args.arrivals,
            timeout_s=args.timeout, rss_interval_s=args.rss_interval, require_rss=args.soak, seed=args.seed,
        )
        if args.profile == "hostile":
            figures = asyncio.run(run_hostile(plan))
        else:
            phases, monitor = asyncio.run(run_plan(plan))
    except (LoadTestError, OSError, ValueError) as error:
        parser.error(str(error))
    if args.profile == "hostile":
        print("\n".join([PHASES_HEADER, *format_phases_summaries(figures["phases"])]))
        print(format_hostile(figures))
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"url": plan.url, **figures}, indent=2) + "\n")
        return 0

    print(format_phases(phases))
    report: dict[str, Any] = {"url": plan.url, "image_bytes": len(plan.body), "requests": plan.requests,
                              "duration_s": plan.duration_s, "phases": [p.summary() for p in phases], "rss": None}
    status = 0
    if monitor is not None:
        rss: dict[str, Any] = {"source": monitor.source, "samples": monitor.samples, "lost": monitor.lost}
        report["rss"] = rss
        if monitor.samples:
            print(format_rss(monitor.samples))
        if monitor.lost:
            print(f"RSS sampling stopped early: {monitor.lost}", file=sys.stderr)
            status = EXIT_SOAK_FAILED if args.soak else status
        if args.soak and not monitor.lost:
            try:
                growth = rss_growth([kib for _, kib in monitor.samples])
            except LoadTestError as error:
                parser.error(str(error))
            passed = growth <= args.max_rss_growth
            rss.update(growth=growth, max_growth=args.max_rss_growth, passed=passed)
            print(f"soak: mean RSS grew {100 * growth:+.1f}% from the first to the last third of the run "
                  f"(limit {100 * args.max_rss_growth:.1f}%): {'ok' if passed else 'FAILED'}")
            status = 0 if passed else EXIT_SOAK_FAILED
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
