"""``--backend auto``: the backend measured fastest per precision, as data and the code that reads it.

``backend_choice.json`` (next to this module) is written by ``scripts/bench/build.py --write-choice``
from its measured rows with :func:`choose_backends` and :func:`write_backend_choice`, and read at
build time by :func:`resolve_backend`. The policy: per precision, among the engines whose AP loss
against eager fp32 is within :data:`AP_BOUNDS` (when AP was measured), the fastest backend wins;
the others follow in order as its fallbacks.
"""

from __future__ import annotations

import json
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from build_tools.errors import BuildError
from service.backends import (
    BackendUnavailable,
    backend_names,
    canonical_precision,
    get_backend,
)
from service.backends.base import cpu_cores

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
# CPU features that decide which backend's kernels are fast (VNNI/AMX for int8, BF16/AMX for bf16).
_CPU_FLAGS = ("avx2", "avx_vnni", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")


class Measurement(BaseModel):
    """How a table was measured: ``quality`` (``full``, or ``smoke`` with ``quality_reasons``),
    ``date``, ``cpu`` (:func:`cpu_facts`); a written table adds what the benchmark knows (command,
    threads, input size, bounds applied, notes, rows: extra fields, kept as written)."""

    model_config = ConfigDict(extra="allow")

    quality: str | None = None
    date: str | None = None
    cpu: dict[str, Any] = Field(default_factory=dict)


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


class ChoiceRecord(BaseModel):
    """How ``--backend auto`` chose, as the manifest's ``tools.backend_choice`` keeps it."""

    requested: Literal["auto"] = "auto"
    chosen: str
    why: str
    table: str = Field(description="the table read")
    measured: Measurement = Field(description="the table's quality, date and cpu")
    same_cpu_kind: bool = Field(description="the table was measured on this kind of CPU (:func:`same_cpu_kind`)")


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
            deltas = [d for d in (box, mask) if d is not None]
            if bound is not None and deltas and max(deltas) > bound:
                rejected.append(f"{r['backend']} (AP delta box {box:.2f}/mask {mask:.2f} points > {bound})")
            else:
                within.append(r)
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
                    table_path: str | Path | None = None) -> tuple[str, ChoiceRecord | None]:
    """(backend name, resolution record or None) for ``requested``, which may be ``auto``.

    ``auto`` takes the table's choice for ``precision``; when that backend is not installed (or
    does not offer the precision) it falls back to the next one in the table's ranking, then in
    the registry, that is available and offers it. The record goes into the manifest's
    ``tools.backend_choice``.

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
    passed_over: list[str] = []
    chosen = None
    for name in dict.fromkeys(order):
        try:
            module = get_backend(name)
        except BackendUnavailable:
            passed_over.append(f"{name} is not a known backend")
            continue
        if precision not in module.PRECISIONS:
            passed_over.append(f"{name} does not offer {precision}")
            continue
        ok, reason = module.available()
        if not ok:
            passed_over.append(f"{name} is not available ({reason})")
            continue
        chosen = name
        break
    if chosen is None:
        raise BuildError(f"--backend auto: no available backend offers {precision} ({'; '.join(passed_over)})")
    if entry and chosen == entry.backend:
        why = entry.why
    elif entry:
        why = (f"the table chose {entry.backend} ({entry.why}), but {'; '.join(passed_over)}: "
               f"fell back to {chosen}, the next available backend offering {precision}")
    else:
        why = (f"{path.name} has no measurement for {precision}; {chosen} is the first available backend "
               f"offering it" + (f" ({'; '.join(passed_over)})" if passed_over else ""))
    measured = table.measured
    return chosen, ChoiceRecord(
        chosen=chosen,
        why=why,
        table=str(path),
        measured=Measurement(quality=measured.quality, date=measured.date, cpu=measured.cpu),
        same_cpu_kind=same_cpu_kind(measured.cpu, cpu_facts()),
    )
