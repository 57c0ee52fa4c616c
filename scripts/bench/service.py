"""Benchmark the service against its own engine: throughput at saturation, as a ratio.

Baseline (same run, same sessions and threads): the engine alone, each session looping over
one pre-padded batch of the image (no decode, preprocess, postprocess, batcher or HTTP).
Service: ``maskrcnn-serve`` in a subprocess on loopback, ``--concurrency`` closed-loop HTTP clients
posting the JPEG until ``--images`` answers came back (all must be 200).

The two phases alternate for ``--rounds`` rounds, in turn going first (the server stays up, idle
during the engine phase), so load from other processes on a shared machine hits both alike; each phase counts
images over its own wall time (``build_tools.timing.time_calls``), after one untimed warm-up
call of each. From the server's /metrics come the
share of the service phase its engine was busy (near 100 % means the service keeps the engine
saturated; this share does not move with outside load the way the ratio does) and per-stage
means that show where the service's time goes.

    python -m scripts.bench.service --engine ARTIFACT_DIR [--images 8] [--rounds 3]

The goal is service / engine >= 0.95: everything around the engine costs under 5 %.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from build_tools.timing import time_calls
from scripts.tools.photos import synthetic_photo
from scripts.tools.service_process import running_service
from service.backends import Engine, load_engine
from service.decode import decode_image
from service.preprocess import pad_batch, prepare_image
from service.stages import STAGES
from service.settings import Settings

GOAL = 0.95


class EngineLoop:
    """The baseline: ``settings.workers`` sessions, each looping over one full pre-padded batch."""

    def __init__(self, engine_dir: Path, image: bytes, settings: Settings) -> None:
        self.engines: list[Engine] = [
            load_engine(engine_dir, threads=settings.threads_per_session) for _ in range(settings.workers)
        ]
        spec = self.engines[0].manifest.input.spec
        rgb = decode_image(image, max_bytes=settings.max_bytes, max_pixels=settings.max_pixels, min_side=settings.min_side)
        self.batch_size = self.engines[0].manifest.images_per_call(settings.max_batch_size)
        self.batch, self.sizes = pad_batch(
            [prepare_image(rgb, spec)] * self.batch_size, spec.pad_divisor, batch_size=self.engines[0].batch_size
        )
        self.pool = ThreadPoolExecutor(len(self.engines))
        self._run_each(1)  # warm-up

    def images_per_call_round(self) -> int:
        return self.batch_size * len(self.engines)

    def run(self, images: int) -> None:
        """``images`` images (whole call rounds), every session looping at once."""
        self._run_each(images // self.images_per_call_round())

    def _run_each(self, calls: int) -> None:
        def loop(engine: Engine) -> None:
            for _ in range(calls):
                engine.infer(self.batch, self.sizes)

        list(self.pool.map(loop, self.engines))


class ServiceLoad:
    """``concurrency`` closed-loop HTTP clients posting the image to the service, on one event loop
    and connection pool kept across phases; one untimed warm-up request at the start."""

    def __init__(self, base: str, image: bytes, concurrency: int) -> None:
        self.base, self.image, self.concurrency = base, image, concurrency
        self.loop = asyncio.new_event_loop()
        self.http = httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=concurrency + 1))
        self.busy_s: list[float] = []  # per phase: seconds the engine spent on batches
        self.loop.run_until_complete(self._post())

    def run(self, images: int) -> None:
        """Post ``images`` images; record the engine's busy seconds from /metrics around them."""
        self.loop.run_until_complete(self._phase(images))

    async def _phase(self, images: int) -> None:
        issued = 0

        async def client() -> None:
            nonlocal issued
            while issued < images:
                issued += 1
                await self._post()

        before = engine_counters((await self.http.get(self.base + "/metrics")).text)
        await asyncio.gather(*(client() for _ in range(self.concurrency)))
        after = engine_counters((await self.http.get(self.base + "/metrics")).text)
        self.busy_s.append(engine_busy_s(before, after))

    async def _post(self) -> None:
        response = await self.http.post(self.base + "/predict", content=self.image,
                                        headers={"Content-Type": "image/jpeg"})
        if response.status_code != 200:
            raise RuntimeError(f"the service answered {response.status_code}: {response.text[:300]}")

    def close(self) -> None:
        self.loop.run_until_complete(self.http.aclose())
        self.loop.close()


def _samples(metrics_text: str) -> dict[tuple[str, str], float]:
    """``(sample name, stage label or "") -> value`` of a /metrics body."""
    return {
        (sample.name, sample.labels.get("stage", "")): sample.value
        for family in text_string_to_metric_families(metrics_text)
        for sample in family.samples
    }


def stage_means_ms(metrics_text: str) -> dict[str, float]:
    """Mean milliseconds per request of each /predict stage."""
    samples = _samples(metrics_text)
    return {
        stage: 1000 * samples[("maskrcnn_stage_seconds_sum", stage)] / samples[("maskrcnn_stage_seconds_count", stage)]
        for stage in STAGES
        if samples.get(("maskrcnn_stage_seconds_count", stage))
    }


def engine_counters(metrics_text: str) -> tuple[float, float, float]:
    """``(sum over requests of their batch's run seconds, batches, images)`` from /metrics."""
    samples = _samples(metrics_text)
    return (
        samples.get(("maskrcnn_stage_seconds_sum", "inference"), 0.0),
        samples.get(("maskrcnn_batch_size_count", ""), 0.0),
        samples.get(("maskrcnn_batch_size_sum", ""), 0.0),
    )


def engine_busy_s(before: tuple[float, float, float], after: tuple[float, float, float]) -> float:
    """Seconds the engine spent on batches between two :func:`engine_counters` readings.

    Each request records its whole batch's run time, so the sum over requests is divided by the
    mean batch size (exact when batches are equal, as at saturation).
    """
    run_s, batches, images = (b - a for a, b in zip(before, after))
    return run_s * batches / images if images else 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.bench.service", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", type=Path, required=True, help="engine artifact folder")
    parser.add_argument("--image", type=Path, help="a JPEG to send (default: a synthetic 640x480 photo)")
    parser.add_argument("--images", type=int, default=8, help="images per phase and round (rounded to whole batches)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating engine/service rounds")
    parser.add_argument("--concurrency", type=int, help="HTTP clients (default: 2 x batch x workers + 1)")
    parser.add_argument("--workers", type=int, default=1, help="engine sessions")
    parser.add_argument("--threads", type=int, help="intra-op threads per session (default: cores / workers)")
    parser.add_argument("--max-batch-size", type=int, default=4, help="images per call of a mutable-batch engine")
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    args = parser.parse_args(argv)

    settings = Settings(
        engine_dir=args.engine, workers=args.workers, threads=args.threads, max_batch_size=args.max_batch_size,
        max_wait_ms=args.max_wait_ms,
    )
    image = args.image.read_bytes() if args.image else synthetic_photo()
    baseline = EngineLoop(args.engine, image, settings)
    images = max(1, args.images // baseline.images_per_call_round()) * baseline.images_per_call_round()
    concurrency = args.concurrency or 2 * baseline.images_per_call_round() + 1
    print(f"{images} images per phase; batch {baseline.batch_size}, {settings.workers} session(s) x "
          f"{settings.threads_per_session} threads; {concurrency} HTTP clients on loopback")
    with running_service(args.engine, settings, concurrency) as base:
        load = ServiceLoad(base, image, concurrency)
        try:
            # alternate which phase goes first, so a drift in outside load cancels
            seconds = time_calls({"engine": lambda: baseline.run(images), "service": lambda: load.run(images)},
                                 args.rounds, alternate=True)
        finally:
            load.close()
        stages = stage_means_ms(httpx.get(base + "/metrics").text)
    engine_times, service_times = seconds["engine"], seconds["service"]
    for round_index, (engine_s, service_s, busy_s) in enumerate(zip(engine_times, service_times, load.busy_s)):
        print(f"round {round_index + 1}: engine {images / engine_s:.3f} images/s, service {images / service_s:.3f} "
              f"images/s (engine busy {busy_s / (service_s * settings.workers):.1%}), ratio {engine_s / service_s:.3f}")
    ratio = sum(engine_times) / sum(service_times)
    print("service stage means (ms per request): " + ", ".join(f"{k} {v:.1f}" for k, v in stages.items()))
    calls = args.rounds * images // baseline.images_per_call_round()  # per session
    print(f"engine alone: {1000 * sum(engine_times) / calls:.1f} ms per call (compare the service's inference mean)")
    print(f"ratio service/engine over all rounds: {ratio:.3f}  (goal >= {GOAL})")
    return 0 if ratio >= GOAL else 1


if __name__ == "__main__":
    sys.exit(main())
