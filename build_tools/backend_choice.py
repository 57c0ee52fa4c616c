"""``--backend auto``: the fastest engine for this machine, measured at build time, and the
fallback table for builds that do not measure.

Measured (the default): every available backend offering the precision is compiled, each engine is
timed on the same synthetic photo at the manifest's opt size (:func:`timing_input`; a warm-up, then
interleaved rounds, median of each), and the fastest kept (:func:`choose_measured`). A reduced
precision (bf16, int8) is a candidate only when labelled images (:class:`LabelledImages`, the
build's ``--verify-ann``) can prove its AP loss against the fastest fp32 engine within
:data:`AP_BOUNDS`; without them the choice stays fp32.

Not measured (``--no-measure``): ``backend_choice.json`` (next to this module), written by
``scripts/bench/build.py --write-choice`` from its measured rows with :func:`choose_backends` and
:func:`write_backend_choice`, is read by :func:`resolve_backend`. Its policy: per precision, among
the engines whose AP loss against eager fp32 is within :data:`AP_BOUNDS` (when AP was measured),
the fastest backend wins; the others follow in order as its fallbacks.
"""

from __future__ import annotations

import json
import platform
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from build_tools.errors import BuildError
from build_tools.timing import time_calls
from service.backends import (
    BackendUnavailable,
    Engine,
    backend_names,
    canonical_precision,
    get_backend,
)
from service.backends.base import cpu_cores
from service.manifest import BackendChoice, CandidateTiming, ChoiceMeasurement, ClassTable, Manifest
from service.preprocess import pad_batch, prepare_image

AUTO_BACKEND = "auto"
BACKEND_CHOICE = Path(__file__).with_name("backend_choice.json")
# Largest AP loss (points, box and mask) against the fp32 reference that a reduced precision may
# cost for its backend to be chosen, when AP was measured on trained weights (ground-truth AP when
# measured, else AP against the reference's detections). fp32 engines have none here: compile's
# verify holds them to eager PyTorch already.
AP_BOUNDS = {"fp16": 0.3, "bf16": 0.3, "int8": 1.0}
# The row fields a written table keeps (the measurement behind each choice).
ROW_FIELDS = ("backend", "precision", "median_s", "infer_median_s", "ratio_to_eager", "box_ap_delta_points",
              "mask_ap_delta_points", "gt_box_ap", "gt_mask_ap", "gt_box_ap_delta_points", "gt_mask_ap_delta_points",
              "skipped")
# Timed calls of each candidate engine when measuring: after one untimed warm-up call each, three
# interleaved rounds (the median of three survives one disturbed call on a shared machine). At
# 800x1344 on 2 cores an fp32 call takes 1-3 s, so two candidates add about 10-25 s to a build.
MEASURE_ROUNDS = 3
MEASURE_WARMUP = 1
# The precisions auto may lower to, fastest first in intent, when labelled images prove their AP.
REDUCED_PRECISIONS = ("bf16", "int8")
# CPU features that decide which backend's kernels are fast (VNNI/AMX for int8, BF16/AMX for bf16).
_CPU_FLAGS = ("avx2", "avx_vnni", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")


class Measurement(ChoiceMeasurement):
    """How a table was measured (:class:`~service.manifest.ChoiceMeasurement`); a written table adds
    what the benchmark knows (command, threads, input size, bounds applied, notes, rows: extra
    fields, kept as written)."""

    model_config = ConfigDict(extra="allow")


class ChoiceEntry(BaseModel):
    """The backend chosen for one precision: the fastest within its AP bound, and the others
    within it, fastest first (``ranking``), as fallbacks."""

    backend: str
    why: str = ""
    ranking: list[str] = Field(default_factory=list)
    ratio_to_eager: float | None = None
    median_s: float | None = Field(None, description="seconds per request of the chosen backend")
    ap_delta_points: dict[str, float | None] = Field(
        default_factory=dict, description="box and mask AP points lost against eager fp32 (None: not measured)")
    ap_measure: Literal["ground truth", "reference"] | None = None


class Choices(BaseModel):
    """:func:`choose_backends`' answer: the choice per precision and what was left out, and why."""

    choice: dict[str, ChoiceEntry]
    notes: list[str] = Field(default_factory=list)


class ChoiceTable(BaseModel):
    """``backend_choice.json``: the measurement and the choice per precision."""

    measured: Measurement = Field(default_factory=Measurement)
    choice: dict[str, ChoiceEntry]


def cpu_facts() -> dict[str, Any]:
    """The facts about this CPU that make a backend measurement transferable to another machine:
    ``model``, ``machine``, ``cores`` and the relevant instruction-set ``flags``."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())  # the first CPU's lines
    except OSError:
        pass
    model = fields.get("model name") or platform.processor() or platform.machine()
    flags = set(fields.get("flags", "").split())
    return {"model": model, "machine": platform.machine(), "cores": cpu_cores(),
            "flags": [f for f in _CPU_FLAGS if f in flags]}


def describe_cpu(facts: Mapping[str, Any] | None) -> str:
    """One line of :func:`cpu_facts`: ``AMD EPYC (2 cores; avx2, avx512f)``; ``unknown CPU`` for none."""
    if not facts:
        return "unknown CPU"
    flags = ", ".join(facts.get("flags", [])) or "no AVX2"
    return f"{facts.get('model', 'unknown model')} ({facts.get('cores', '?')} cores; {flags})"


def same_cpu_kind(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Same CPU model and the same relevant instruction sets (core counts may differ)."""
    return (a.get("model"), a.get("machine"), sorted(a.get("flags", []))) == (
        b.get("model"), b.get("machine"), sorted(b.get("flags", [])))


def ap_deltas(row: Mapping[str, Any]) -> tuple[float | None, float | None]:
    """(box, mask) AP points a measured row loses against eager fp32: ground-truth AP when
    measured, else AP against the reference's detections; None where not measured."""
    if row.get("gt_box_ap_delta_points") is not None:
        return row["gt_box_ap_delta_points"], row["gt_mask_ap_delta_points"]
    return row.get("box_ap_delta_points"), row.get("mask_ap_delta_points")


def ap_within_bound(precision: str, box: float | None, mask: float | None,
                    ap_bounds: Mapping[str, float] = AP_BOUNDS) -> bool:
    """Whether box and mask AP losses (points; None: not measured) are within ``precision``'s bound;
    a precision without a bound, or no measured loss, is within it."""
    bound = ap_bounds.get(precision)
    deltas = [d for d in (box, mask) if d is not None]
    return bound is None or not deltas or max(deltas) <= bound


def choose_backends(rows: Sequence[Mapping[str, Any]], ap_bounds: Mapping[str, float] = AP_BOUNDS) -> Choices:
    """The backend choice per precision from measured rows.

    Args:
        rows: benchmark rows, each with ``kind`` (only ``"engine"`` rows count), ``backend``,
            ``precision``, ``median_s`` (seconds per request; None when not measured),
            ``ratio_to_eager`` and the AP deltas of :func:`ap_deltas`.
        ap_bounds: largest AP loss (points) per precision; a precision without a bound (or rows
            without AP) is chosen on speed alone. ``{}`` applies none (e.g. random weights).

    Returns:
        the choice per precision (a precision whose every backend misses its bound has no entry)
        and notes on what was left out and why.
    """
    precisions = list(dict.fromkeys(r["precision"] for r in rows if r.get("kind") == "engine" and r.get("precision")))
    choice: dict[str, ChoiceEntry] = {}
    notes: list[str] = []
    for precision in precisions:
        measured = [r for r in rows if r["precision"] == precision and r.get("median_s") is not None
                    and r.get("kind") == "engine"]
        best: dict[str, Mapping[str, Any]] = {}
        for r in sorted(measured, key=lambda r: r["median_s"]):
            best.setdefault(r["backend"], r)
        bound = ap_bounds.get(precision)
        within, rejected = [], []
        for r in best.values():
            box, mask = ap_deltas(r)
            if ap_within_bound(precision, box, mask, ap_bounds):
                within.append(r)
            else:
                rejected.append(f"{r['backend']} (AP delta box {box:.2f}/mask {mask:.2f} points > {bound})")
        if rejected:
            notes.append(f"{precision}: left out {', '.join(rejected)}")
        if not within:
            if best:
                notes.append(f"{precision}: no backend within {bound} AP points; no choice written")
            continue
        choice[precision] = _entry(within, rejected)
    return Choices(choice=choice, notes=notes)


def _entry(within: Sequence[Mapping[str, Any]], rejected: Sequence[str]) -> ChoiceEntry:
    """The choice of one precision: the fastest of ``within`` (sorted fastest first), and why."""
    def described(r: Mapping[str, Any]) -> str:
        box, mask = ap_deltas(r)
        ap = (f", {'ground-truth ' if r.get('gt_box_ap_delta_points') is not None else ''}AP delta box "
              f"{box:.2f}/mask {mask:.2f} pt") if box is not None else ""
        return f"{r['backend']} {r['ratio_to_eager']:.2f}x eager ({r['median_s']:.3f} s/img{ap})"

    top = within[0]
    return ChoiceEntry(
        backend=top["backend"],
        why=f"fastest: {'; '.join(described(r) for r in within)}"
            + (f"; left out {', '.join(rejected)}" if rejected else ""),
        ranking=[r["backend"] for r in within],
        ratio_to_eager=top["ratio_to_eager"],
        median_s=top["median_s"],
        ap_delta_points=dict(zip(("box", "mask"), ap_deltas(top))),
        ap_measure="ground truth" if top.get("gt_box_ap_delta_points") is not None else "reference",
    )


def write_backend_choice(
    path: str | Path,
    rows: Sequence[Mapping[str, Any]],
    measured: Mapping[str, Any],
    ap_bounds: Mapping[str, float] = AP_BOUNDS,
) -> ChoiceTable:
    """Choose from ``rows`` (:func:`choose_backends`) and write the table ``--backend auto`` reads.

    ``measured`` describes the measurement (``quality``, ``date``, ``command``, ``cpu`` from
    :func:`cpu_facts`, ...); the table adds the bounds applied, the notes and the rows' fields of
    :data:`ROW_FIELDS`. Returns the table written.
    """
    chosen = choose_backends(rows, ap_bounds)
    precisions = dict.fromkeys(r["precision"] for r in rows if r.get("kind") == "engine" and r.get("precision"))
    table = ChoiceTable(
        measured=Measurement(
            **measured,
            ap_bounds_points={k: ap_bounds[k] for k in precisions if k in ap_bounds},
            notes=chosen.notes,
            rows=[{k: r.get(k) for k in ROW_FIELDS} for r in rows],
        ),
        choice=chosen.choice,
    )
    Path(path).write_text(json.dumps(table.model_dump(mode="json"), indent=2) + "\n")
    return table


def load_backend_choice(path: str | Path | None = None) -> ChoiceTable:
    """The table at ``path`` (default :data:`BACKEND_CHOICE`).

    Raises:
        BuildError: it cannot be read or has no valid ``choice`` table.
    """
    path = Path(path or BACKEND_CHOICE)
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BuildError(
            f"--backend auto reads {path}, which cannot be read ({exc}); write it with "
            "`python -m scripts.bench.build --export DIR --write-choice PATH` or name a backend"
        ) from exc
    try:
        return ChoiceTable.model_validate(table)
    except ValidationError as exc:
        raise BuildError(f"{path} has no valid \"choice\" table ({exc.error_count()} error(s): "
                         f"{exc.errors()[0]['loc']} {exc.errors()[0]['msg']}); regenerate it with "
                         "scripts/bench/build.py --write-choice") from exc


def resolve_backend(requested: str, precision: str,
                    table_path: str | Path | None = None) -> tuple[str, BackendChoice | None]:
    """(backend name, resolution record or None) for ``requested``, which may be ``auto``: the
    table's answer, for builds that do not measure (:func:`choose_measured` is the default).

    ``auto`` takes the table's choice for ``precision``; when that backend is not installed (or
    does not offer the precision) it falls back to the next one in the table's ranking, then in
    the registry, that is available and offers it. The record goes into the manifest's
    ``tools.backend_choice``; its ``why`` says so when the table was measured on another kind of CPU.

    Raises:
        BuildError: the table cannot be read, or no available backend offers ``precision``.
    """
    if requested != AUTO_BACKEND:
        return requested, None
    precision = canonical_precision(precision)
    path = Path(table_path or BACKEND_CHOICE)
    table = load_backend_choice(path)
    entry = table.choice.get(precision)
    order = [*([entry.backend, *entry.ranking] if entry else []), *backend_names()]
    available, passed = available_backends(precision, order)
    passed_over = [f"{name} {reason}" for name, reason in passed.items()]
    if not available:
        raise BuildError(f"--backend auto: no available backend offers {precision} ({'; '.join(passed_over)})")
    chosen = available[0]
    if entry and chosen == entry.backend:
        why = entry.why
    elif entry:
        why = (f"the table chose {entry.backend} ({entry.why}), but {'; '.join(passed_over)}: "
               f"fell back to {chosen}, the next available backend offering {precision}")
    else:
        why = (f"{path.name} has no measurement for {precision}; {chosen} is the first available backend "
               f"offering it" + (f" ({'; '.join(passed_over)})" if passed_over else ""))
    here = cpu_facts()
    same = same_cpu_kind(table.measured.cpu, here)
    if not same:
        why += (f"; note: {path} was measured on another kind of CPU ({describe_cpu(table.measured.cpu)}; this "
                f"one: {describe_cpu(here)}), so {chosen} may not be the fastest here: build without --no-measure "
                f"to measure on this machine")
    measured = table.measured
    return chosen, BackendChoice(
        chosen=chosen, precision=precision, why=why, how="table", cpu=here, table=str(path),
        measured=ChoiceMeasurement(quality=measured.quality, date=measured.date, cpu=measured.cpu),
        same_cpu_kind=same,
    )


def available_backends(precision: str, order: Sequence[str] | None = None) -> tuple[list[str], dict[str, str]]:
    """(the backends of ``order`` (default: the registry's) that are available here and offer
    ``precision``, in order; why each other one was passed over, by name: ``"is not available (...)"``)."""
    available, passed_over = [], {}
    for name in dict.fromkeys(order or backend_names()):
        try:
            module = get_backend(name)
        except BackendUnavailable:
            passed_over[name] = "is not a known backend"
            continue
        if precision not in module.PRECISIONS:
            passed_over[name] = f"does not offer {precision}"
            continue
        ok, reason = module.available()
        if not ok:
            passed_over[name] = f"is not available ({reason})"
            continue
        available.append(name)
    return available, passed_over


Candidate = tuple[str, str]
"""A candidate engine of a measured choice: (backend, precision)."""


def synthetic_photo(hw: tuple[int, int], seed: int = 0) -> np.ndarray:
    """A photo-like RGB uint8 ``[h, w, 3]`` picture (seeded coarse colour noise, bicubically
    enlarged: smooth regions and soft edges), the same for every candidate engine timed."""
    import cv2

    h, w = hw
    coarse = np.random.default_rng(seed).integers(0, 256, (h // 32 + 2, w // 32 + 2, 3), dtype=np.uint8)
    return cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)


def timing_input(manifest: Manifest) -> tuple[np.ndarray, np.ndarray]:
    """The input every candidate is timed on: :func:`synthetic_photo` at the manifest's opt (H, W),
    prepared as the service prepares it, ``images`` float32 ``[B, 3, H, W]`` and ``image_sizes``
    int64 ``[B, 2]`` with B the graph's batch (1 when mutable)."""
    spec = manifest.input.spec
    prepared = prepare_image(synthetic_photo(manifest.shape_profile.opt_hw), spec)
    batch = manifest.batch_size or 1
    return pad_batch([prepared] * batch, spec.pad_divisor, batch_size=batch)


@dataclass
class LabelledImages:
    """``--verify-ann``: a COCO annotation file and the folder of its images (``file_name``
    relative to it), on which a reduced precision must keep its AP within :data:`AP_BOUNDS` of the
    fastest fp32 engine to be chosen. At most ``limit`` images (by id) are used."""

    annotations: Path
    images_dir: Path
    limit: int | None = None
    _loaded: tuple[Any, list[int], list[np.ndarray]] | None = field(default=None, init=False, repr=False)

    def _load(self) -> tuple[Any, list[int], list[np.ndarray]]:
        if self._loaded is None:
            from build_tools.coco_eval import load_coco
            from build_tools.images import read_rgb

            try:
                coco = load_coco(self.annotations)
            except (OSError, ValueError, KeyError) as exc:
                raise BuildError(f"--verify-ann {self.annotations} cannot be read as a COCO annotation file "
                                 f"({exc!r})") from exc
            ids = sorted(coco.getImgIds())[: self.limit or None]
            if not ids:
                raise BuildError(f"--verify-ann {self.annotations} lists no images")
            self._loaded = coco, ids, [read_rgb(self.images_dir / coco.imgs[i]["file_name"]) for i in ids]
        return self._loaded

    @property
    def count(self) -> int:
        return len(self._load()[1])

    def ap_points(self, engine: Engine) -> tuple[float, float]:
        """pycocotools box and mask AP (x100) of ``engine``'s detections (its manifest's host
        preprocess and paste rule) on these images."""
        from build_tools.coco_eval import detections_ap
        from build_tools.verify import run_detections

        coco, ids, rgbs = self._load()
        manifest = engine.manifest
        spec = manifest.input.spec
        prepared = [prepare_image(rgb, spec) for rgb in rgbs]
        detections, _ = run_detections(engine.infer, prepared, batch_size=manifest.batch_size or 1,
                                       divisor=spec.pad_divisor, mask_threshold=manifest.postprocess.mask_threshold,
                                       paste=manifest.postprocess.paste, warmup=0)
        return detections_ap(coco, ids, detections, ClassTable.from_entries(manifest.classes).ids)


def time_engines(engines: Mapping[Candidate, Engine], rounds: int = MEASURE_ROUNDS,
                 warmup: int = MEASURE_WARMUP) -> dict[Candidate, list[float]]:
    """Wall seconds of each engine's calls on :func:`timing_input` of its manifest: ``warmup``
    untimed rounds, then ``rounds`` timed ones, the engines taking turns (``alternate``)."""
    feeds = {key: timing_input(engine.manifest) for key, engine in engines.items()}
    return time_calls({key: partial(engine.infer, *feeds[key]) for key, engine in engines.items()},
                      rounds, warmup, alternate=True)


def choose_measured(
    engines: Mapping[Candidate, Engine],
    precision: str,
    *,
    labelled: LabelledImages | None = None,
    rounds: int = MEASURE_ROUNDS,
    warmup: int = MEASURE_WARMUP,
    passed_over: Mapping[str, str] | None = None,
    ap_bounds: Mapping[str, float] = AP_BOUNDS,
) -> tuple[Candidate, BackendChoice]:
    """Time ``engines`` (:func:`time_engines`) and choose: the fastest at ``precision``, unless a
    faster candidate at another (reduced) precision keeps its box and mask AP on ``labelled`` within
    its :data:`AP_BOUNDS` of that engine's (the fastest such, judged fastest first). Without
    ``labelled`` only ``precision`` candidates are chosen from.

    ``passed_over`` says why other candidates were not built (by name, :func:`available_backends`).

    Returns:
        the chosen candidate and the record of the choice (``tools.backend_choice``): every
        candidate's times, the CPU, the input size, and why, with the median seconds.

    Raises:
        BuildError: no engine at ``precision``.
    """
    baseline = [key for key in engines if key[1] == precision]
    if not baseline:
        why_not = "; ".join(f"{name} {reason}" for name, reason in (passed_over or {}).items())
        raise BuildError(f"--backend auto: no available backend offers {precision} ({why_not})")
    seconds = time_engines(engines, rounds, warmup) if len(engines) > 1 else {}
    medians = {key: statistics.median(s) for key, s in seconds.items()}
    by_speed = sorted(engines, key=lambda key: medians.get(key, 0.0))
    fastest = next(key for key in by_speed if key[1] == precision)
    chosen = fastest
    deltas: dict[Candidate, tuple[float, float]] = {}
    verdicts: list[str] = []
    faster_reduced = [key for key in by_speed if key[1] != precision and medians[key] < medians[fastest]]
    if faster_reduced and labelled is None:
        verdicts.append(f"{_name(faster_reduced[0])} is faster but reduced precision needs labelled images "
                        "(--verify-ann) to prove its AP")
    elif faster_reduced:
        reference = labelled.ap_points(engines[fastest])
        for key in faster_reduced:
            ap = labelled.ap_points(engines[key])
            box, mask = deltas[key] = (reference[0] - ap[0], reference[1] - ap[1])
            bound = ap_bounds.get(key[1])
            judged = (f"{_name(key)} loses box {box:.2f}/mask {mask:.2f} AP points against {_name(fastest)} on "
                      f"{labelled.count} labelled image(s), bound {bound}")
            if ap_within_bound(key[1], box, mask, ap_bounds):
                chosen = key
                verdicts.append(f"{judged}: within it")
                break
            verdicts.append(f"{judged}: left out")
    here = cpu_facts()
    times = ", ".join(f"{_name(key)} {medians[key]:.3f} s" for key in by_speed)
    opt_hw = engines[fastest].manifest.shape_profile.opt_hw
    if seconds:
        why = (f"fastest measured on this CPU ({describe_cpu(here)}), median of {rounds} interleaved call(s) after "
               f"{warmup} warm-up at {opt_hw[0]}x{opt_hw[1]}: {times}")
    else:
        why = f"the only available backend offering {precision}, not timed"
    why += "".join(f"; {v}" for v in verdicts)
    if passed_over:  # names only: the reasons of an absent GPU stack are long, and the same on every CPU build
        why += f"; not candidates here: {', '.join(passed_over)}"
    candidates = [
        CandidateTiming(backend=key[0], precision=key[1], median_s=medians[key], seconds=seconds[key],
                        box_ap_delta_points=deltas.get(key, (None, None))[0],
                        mask_ap_delta_points=deltas.get(key, (None, None))[1])
        for key in by_speed if key in seconds
    ]
    return chosen, BackendChoice(
        chosen=chosen[0], precision=chosen[1], why=why, how="measured", cpu=here, input_hw=opt_hw,
        rounds=rounds, warmup=warmup, candidates=candidates,
        ap_images=labelled.count if deltas else None,
    )


def _name(key: Candidate) -> str:
    return f"{key[0]} {key[1]}"
