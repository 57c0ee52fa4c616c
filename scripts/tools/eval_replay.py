"""`maskrcnn-eval`: COCO AP of a running service, measured by replaying a COCO-layout dataset.

Every image of ``--ann`` (or the first ``--limit`` by image id) is read from ``--images`` and
posted as a raw body to ``/predict?format=coco&image_id=ID`` of the ``--url`` services (several
URLs share the load round-robin), at most ``--concurrency`` requests in flight. The answers are
COCO results-file entries already; ``--out`` gets them all, in image-id order. pycocotools' bbox
and segm summaries and the client-side latency percentiles follow, and with
``--reference-results FILE`` the AP differences against another results file on the same images.
COCO val2017 works as it is: ``--ann annotations/instances_val2017.json --images val2017/``.

Resuming: each finished image is appended to ``<out>.progress.jsonl`` as one JSON line, flushed and
fsync'd, before it counts as done; a rerun with the same ``--out`` sends only the images that file
lacks, so a finished image is never sent again. (An image whose answer had not been recorded when
the process died is sent again: nothing of it was kept.)

Failures: transport errors and 429/500/502/503/504 answers are retried with exponential backoff
(Retry-After honoured); an image that still fails, or gets any other error answer, is listed by
image id, nothing is written to ``--out`` and the exit status is 1. Rerun to retry just those.

Before sending anything, every ``--url`` must answer ``/readyz`` with 200: a wrong URL or a server
still warming up is reported at once (status 2), not after every image's retries.

``--eager SOURCE`` runs eager PyTorch instead of a service (``scripts.tools.eager``): the
checkpoint's origin framework's own model with its own pre- and postprocessing where it runs
(torchvision's for torchvision checkpoints, mmdet's for mmdet ones where mmdet is installed), else
this project's eager model inside the service's host code, as the run prints; ``--eager-reference
maskrcnn-serve`` asks for the latter. SOURCE is a checkpoint (file or published name) or an engine
artifact folder, whose manifest names the checkpoint and inference config it was built from. These
are the reference results a service run is compared with.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import itertools
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from pycocotools.coco import COCO
from tqdm import tqdm

from build_tools.coco_eval import IOU_TYPES, STAT_NAMES, evaluate, load_coco
from build_tools.timing import latency_summary
from scripts.tools.eager import EagerReferenceError, eager_model, write_eager_results
from scripts.tools.http import UnknownImageType, image_headers, replay_retry_policy
from scripts.tools.wait_ready import NotReady, require_ready
from service.client import AnswerError, RetryPolicy

AP_NAMES = STAT_NAMES[:6]
EXIT_FAILURES = 1


class EvalError(Exception):
    """An evaluation that cannot start as asked; the CLI reports it as a usage error (status 2)."""


# --- dataset ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dataset:
    """A COCO annotation file, its image folder, and the image ids under evaluation (ascending)."""

    annotations: Path
    images: Path
    coco: COCO
    image_ids: list[int]

    def image_path(self, image_id: int) -> Path:
        return self.images / self.coco.imgs[image_id]["file_name"]


def load_dataset(annotations: Path, images: Path, limit: int | None = None) -> Dataset:
    """The dataset with its first ``limit`` image ids (all when None), as ``maskrcnn-demo eval`` picks them.

    Raises:
        EvalError: a missing file or folder, or an unreadable annotation file.
    """
    if not annotations.is_file():
        raise EvalError(f"annotation file {annotations} not found")
    if not images.is_dir():
        raise EvalError(f"image folder {images} not found")
    try:
        coco = load_coco(annotations)
    except (OSError, ValueError, KeyError) as error:
        raise EvalError(f"cannot read COCO annotations {annotations}: {error}") from error
    image_ids = sorted(coco.getImgIds())
    return Dataset(annotations, images, coco, image_ids[:limit] if limit else image_ids)


# --- progress file ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Finished:
    """One image's answer: its COCO results entries and the latency of the request that got them."""

    results: list[dict[str, Any]]
    latency_s: float | None


class ProgressLog:
    """Append-only JSONL of finished images, the only state a rerun needs.

    Line 1 is ``{"run": {...}}`` (what the answers depend on: annotation file, score threshold);
    every further line is ``{"image_id", "latency_s", "results"}``. A line counts once it ends with
    a newline: a process killed mid-write leaves a partial last line, which :meth:`load` cuts off.
    """

    def __init__(self, path: Path, run: dict[str, Any]) -> None:
        self.path = path
        self.run = run
        self._file: io.BufferedWriter | None = None

    @staticmethod
    def path_for(out: Path) -> Path:
        return out.with_name(out.name + ".progress.jsonl")

    def load(self) -> dict[int, Finished]:
        """The images finished by earlier runs (creating the file with its header when absent).

        Raises:
            EvalError: the file records a different run, or a line other than the last is broken.
        """
        if not self.path.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._append({"run": self.run})
            return {}
        data = self.path.read_bytes()
        complete = data[: data.rfind(b"\n") + 1]
        if len(complete) < len(data):  # a write cut short by a kill
            with open(self.path, "r+b") as f:
                f.truncate(len(complete))
        lines = complete.splitlines()
        try:
            header = json.loads(lines[0])["run"] if lines else None
        except (ValueError, KeyError, TypeError):
            header = None
        if header != self.run:
            raise EvalError(
                f"{self.path} records another run ({header}); this one is {self.run}: "
                "delete the file to start over, or choose another --out"
            )
        finished: dict[int, Finished] = {}
        for number, line in enumerate(lines[1:], start=2):
            try:
                entry = json.loads(line)
                finished[int(entry["image_id"])] = Finished(entry["results"], entry.get("latency_s"))
            except (ValueError, KeyError, TypeError) as error:
                raise EvalError(f"{self.path} line {number} is broken ({error}); delete the file to start over") from None
        return finished

    def record(self, image_id: int, finished: Finished) -> None:
        """Append one finished image durably (flushed and fsync'd before returning)."""
        self._append({"image_id": image_id, "latency_s": finished.latency_s, "results": finished.results})

    def _append(self, entry: dict[str, Any]) -> None:
        if self._file is None:
            self._file = open(self.path, "ab")
        self._file.write(json.dumps(entry, separators=(",", ":")).encode() + b"\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


# --- requests -----------------------------------------------------------------------------------


class ImageFailed(Exception):
    """An image without an answer after every attempt; the message says why."""


@dataclass
class Replay:
    """Posts images to the services round-robin, retrying by ``policy``."""

    client: httpx.AsyncClient
    urls: Sequence[str]
    params: dict[str, Any]
    policy: RetryPolicy
    timeout_s: float
    _next_url: Iterator[str] = field(init=False)

    def __post_init__(self) -> None:
        self._next_url = itertools.cycle(self.urls)

    async def predict(self, image_id: int, body: bytes) -> Finished:
        """The image's COCO results entries (each with ``image_id``), each attempt posted to the next URL.

        Raises:
            ImageFailed: no valid answer within the retry policy.
        """
        try:
            headers = image_headers(body, self.timeout_s)
        except UnknownImageType as error:
            raise ImageFailed(str(error)) from None
        params = {**self.params, "image_id": image_id}
        try:
            return await self.policy.async_retrying()(self._attempt, image_id, body, headers, params)
        except AnswerError as failure:
            raise ImageFailed(f"{failure.url}: {failure}") from None  # type: ignore[attr-defined]
        except httpx.TransportError as failure:
            raise ImageFailed(f"{failure.url}: {type(failure).__name__}: {failure}") from None  # type: ignore[attr-defined]

    async def _attempt(self, image_id: int, body: bytes, headers: dict[str, str], params: dict[str, Any]) -> Finished:
        """One request; its latency counts from sending to the answer.

        Raises:
            httpx.TransportError, AnswerError: a transport error or an error answer (``url`` says
                where; the policy decides whether it is tried again).
            ImageFailed: a 200 that is not this image's COCO results.
        """
        url = next(self._next_url)
        started = time.perf_counter()
        try:
            response = await self.client.post(url + "/predict", params=params, content=body, headers=headers)
        except httpx.TransportError as error:
            error.url = url  # type: ignore[attr-defined]
            raise
        latency_s = time.perf_counter() - started
        if response.status_code == 200:
            return Finished(self._coco_entries(response, image_id), latency_s)
        failure = AnswerError.from_response(response)
        failure.url = url  # type: ignore[attr-defined]
        raise failure

    @staticmethod
    def _coco_entries(response: httpx.Response, image_id: int) -> list[dict[str, Any]]:
        try:
            entries = response.json()
        except ValueError as error:
            raise ImageFailed(f"the answer is not JSON: {error}") from None
        if not isinstance(entries, list) or any(
            not isinstance(e, dict) or e.get("image_id") != image_id for e in entries
        ):
            raise ImageFailed(f"the answer is not a list of COCO results for image_id {image_id} "
                              f"(is the service's format=coco supported?): {response.text[:200]}")
        return entries


@dataclass
class ReplayOutcome:
    finished: dict[int, Finished]
    failures: dict[int, str]
    sent: int  # images answered in this run
    wall_s: float


async def replay_dataset(
    dataset: Dataset, urls: Sequence[str], log: ProgressLog, finished: dict[int, Finished], *,
    concurrency: int, score_threshold: float | None, policy: RetryPolicy, timeout_s: float, progress: bool,
) -> ReplayOutcome:
    """Post every image of ``dataset`` not in ``finished`` and record each answer in ``log``."""
    todo = [i for i in dataset.image_ids if i not in finished]
    queue: asyncio.Queue[int] = asyncio.Queue()
    for image_id in todo:
        queue.put_nowait(image_id)
    failures: dict[int, str] = {}
    params = {"format": "coco", "masks": "true"}
    if score_threshold is not None:
        params["score_threshold"] = score_threshold
    bar = tqdm(total=len(dataset.image_ids), initial=len(dataset.image_ids) - len(todo), unit="img",
               desc="eval", disable=not progress)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    started = time.perf_counter()
    sent = 0
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
        replay = Replay(client, urls, params, policy, timeout_s)

        async def worker() -> None:
            nonlocal sent
            while not queue.empty():
                image_id = queue.get_nowait()
                try:
                    answer = await replay.predict(image_id, dataset.image_path(image_id).read_bytes())
                except (ImageFailed, OSError) as error:
                    failures[image_id] = str(error)
                else:
                    log.record(image_id, answer)
                    finished[image_id] = answer
                    sent += 1
                bar.update()

        try:
            await asyncio.gather(*(worker() for _ in range(min(concurrency, len(todo)))))
        finally:
            bar.close()
    return ReplayOutcome(finished, failures, sent, time.perf_counter() - started)


# --- eager reference ----------------------------------------------------------------------------


def eager_replay(source: str, dataset: Dataset, out: Path, *, score_threshold: float | None,
                 threads: int | None, progress: bool, prefer: str = "origin") -> tuple[float, dict[str, str]]:
    """Run the eager reference of ``source`` (``prefer``: the origin framework's own model where it
    runs, or ``maskrcnn-serve``) over the dataset's images; write the results JSON. Returns seconds
    taken (the model's loading not counted) and which reference ran (``name``, ``detail``).

    Raises:
        EagerReferenceError: the model cannot be loaded.
    """
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    eager = eager_model(source, score_threshold, prefer)
    print(f"eager reference: {eager.reference.name} ({eager.reference.detail})")
    started = time.perf_counter()
    write_eager_results(eager, dataset.coco, dataset.images, dataset.image_ids, out, progress=progress)
    return time.perf_counter() - started, eager.reference.record()


# --- evaluation ---------------------------------------------------------------------------------


def read_results(path: Path) -> list[dict[str, Any]]:
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise EvalError(f"cannot read results file {path}: {error}") from error
    if not isinstance(results, list):
        raise EvalError(f"{path} is not a COCO results file (a JSON list)")
    return results


def format_deltas(ours: dict[str, dict[str, float]], reference: dict[str, dict[str, float]], name: str) -> str:
    lines = [f"AP differences (this run - reference {name}):",
             f"{'':6}" + "".join(f"{t + ' this':>11}{'ref':>8}{'delta':>9}" for t in IOU_TYPES)]
    for stat in AP_NAMES:
        lines.append(f"{stat:6}" + "".join(
            f"{ours[t][stat]:11.4f}{reference[t][stat]:8.4f}{ours[t][stat] - reference[t][stat]:+9.4f}"
            for t in IOU_TYPES))
    return "\n".join(lines)


def write_json_atomically(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(data))
    partial.replace(path)


# --- CLI ----------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="maskrcnn-eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ann", type=Path, required=True, help="COCO annotation JSON (instances_*.json)")
    parser.add_argument("--images", type=Path, required=True, help="folder of the annotation file's images")
    parser.add_argument("--out", type=Path, required=True,
                        help="COCO results JSON to write; progress goes to <out>.progress.jsonl beside it")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--url", action="append", help="service base URL, e.g. http://127.0.0.1:8000; repeat to "
                        "spread the load round-robin")
    source.add_argument("--eager", metavar="SOURCE", help="run eager PyTorch instead: a checkpoint (file or published "
                        "name) or an engine artifact folder (the model it was built from), in its origin "
                        "framework (torchvision's own model; mmdet's where installed) unless --eager-reference says")
    parser.add_argument("--eager-reference", choices=("origin", "maskrcnn-serve"), default="origin",
                        help="--eager runs the origin framework's own model where it can (default), or this "
                        "project's eager model in the service's host code")
    parser.add_argument("--limit", type=int, default=None, help="only the first N images by image id")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight, over all URLs (default 4)")
    parser.add_argument("--score-threshold", type=float, default=None,
                        help="keep detections scoring at least this (default: the server's, i.e. its manifest's)")
    parser.add_argument("--retries", type=int, default=4, help="retries of a failed request (default 4)")
    parser.add_argument("--backoff", type=float, default=0.5,
                        help="first retry delay in seconds, doubling per retry, at most 30 (default 0.5)")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds per request, also sent as the service's deadline (default 300)")
    parser.add_argument("--reference-results", type=Path, default=None,
                        help="another COCO results file (e.g. --eager's) to print AP differences against")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads for --eager")
    parser.add_argument("--json", type=Path, default=None, help="write the scores and latencies as JSON here")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``maskrcnn-eval``; returns the exit status (1 when images failed)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.concurrency < 1 or args.retries < 0 or args.timeout <= 0 or (args.limit is not None and args.limit < 1):
        parser.error("--concurrency and --limit must be >= 1, --retries >= 0 and --timeout > 0")
    try:
        dataset = load_dataset(args.ann, args.images, args.limit)
        reference = read_results(args.reference_results) if args.reference_results else None
        if args.eager:
            latencies: list[float] = []
            wall_s, eager_reference = eager_replay(args.eager, dataset, args.out, score_threshold=args.score_threshold,
                                                   threads=args.threads, progress=not args.no_progress,
                                                   prefer=args.eager_reference)
            results, sent = read_results(args.out), len(dataset.image_ids)
        else:
            urls = [u.rstrip("/").removesuffix("/predict") for u in args.url]
            for url in urls:
                require_ready(url)
            outcome = replay_service(dataset, urls, args)
            if outcome.failures:
                report_failures(outcome.failures, dataset, ProgressLog.path_for(args.out))
                return EXIT_FAILURES
            finished = outcome.finished
            results = [entry for image_id in dataset.image_ids for entry in finished[image_id].results]
            latencies = [finished[i].latency_s for i in dataset.image_ids if finished[i].latency_s is not None]
            wall_s, sent = outcome.wall_s, outcome.sent
            eager_reference = None
            write_json_atomically(args.out, results)
    except (EvalError, EagerReferenceError, NotReady) as error:
        parser.error(str(error))

    print(f"{len(dataset.image_ids)} images of {args.ann}: {len(results)} detections written to {args.out}")
    scores = evaluate(dataset.coco, results, dataset.image_ids, verbose=True)
    report: dict[str, Any] = {"images": len(dataset.image_ids), "detections": len(results), "results": str(args.out),
                              **scores, "latency_ms": latency_summary(latencies),
                              "throughput_ips": sent / wall_s if sent and wall_s > 0 else None, "reference": None,
                              "eager_reference": eager_reference}
    if latencies:
        ms = report["latency_ms"]
        print(f"latency per image (ms, {len(latencies)} requests): p50 {ms['p50']:.1f}  p90 {ms['p90']:.1f}  "
              f"p99 {ms['p99']:.1f}  mean {ms['mean']:.1f}  max {ms['max']:.1f}")
    if report["throughput_ips"] is not None:
        print(f"throughput: {report['throughput_ips']:.3f} images/s ({sent} images in {wall_s:.1f} s)")
    if reference is not None:
        evaluated = set(dataset.image_ids)
        reference_scores = evaluate(dataset.coco, [r for r in reference if r.get("image_id") in evaluated],
                                    dataset.image_ids)
        print(format_deltas(scores, reference_scores, str(args.reference_results)))
        report["reference"] = {"file": str(args.reference_results), **reference_scores}
    if args.json:
        write_json_atomically(args.json, report)
    return 0


def replay_service(dataset: Dataset, urls: list[str], args: argparse.Namespace) -> ReplayOutcome:
    """Resume from the progress file and post the rest; a Ctrl-C keeps everything recorded so far."""
    log = ProgressLog(ProgressLog.path_for(args.out),
                      {"annotations": str(dataset.annotations.resolve()), "score_threshold": args.score_threshold})
    finished = log.load()
    done = sum(1 for i in dataset.image_ids if i in finished)
    if done:
        print(f"resuming: {done} of {len(dataset.image_ids)} images already answered ({log.path})", file=sys.stderr)
    try:
        return asyncio.run(replay_dataset(
            dataset, urls, log, finished, concurrency=args.concurrency, score_threshold=args.score_threshold,
            policy=replay_retry_policy(args.retries, args.backoff), timeout_s=args.timeout, progress=not args.no_progress,
        ))
    except KeyboardInterrupt:
        print(f"interrupted; the answers so far are kept in {log.path}: rerun the same command to resume", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        log.close()


def report_failures(failures: dict[int, str], dataset: Dataset, progress_path: Path) -> None:
    ids = sorted(failures)
    print(f"{len(ids)} of {len(dataset.image_ids)} images failed; no results file written. "
          f"Failed image ids: {', '.join(map(str, ids))}", file=sys.stderr)
    for image_id in ids:
        print(f"  image {image_id} ({dataset.coco.imgs[image_id]['file_name']}): {failures[image_id]}", file=sys.stderr)
    print(f"the answered images are kept in {progress_path}; rerun the same command to retry the failed ones",
          file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
