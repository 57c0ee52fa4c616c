"""The engine artifact's manifest: the only contract between ``build_tools`` and ``service``.

An artifact is a folder holding the backend's model file and ``manifest.json``. Every section is a
pydantic model, validated when the manifest is read, so a reader uses attributes and never guesses
at keys. docs/architecture.md gives the meaning of every field.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from service.exceptions import InvalidParameters
from service.preprocess import InputSpec, InvalidInputSpecError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"

HW = tuple[int, int]


class ManifestError(ValueError):
    """The artifact folder is missing, unreadable, malformed or of an unsupported format."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Resize(_Section):
    scale: tuple[int, int] = Field(description="(long, short) edge limits, pixels")
    keep_ratio: bool = True
    rounding: Literal["half_up", "floor"] = Field("half_up", description="mmdet: half_up; torchvision: floor")
    input: Literal["uint8", "normalized"] = Field(
        "uint8", description="what is resized: the decoded image (mmdet) or the normalised one (torchvision)")


class InputSection(_Section):
    """The graph's input and the host preprocessing that produces it (``service.preprocess``)."""

    mean: tuple[float, float, float] = Field(description="per-channel mean, RGB, uint8 pixel units")
    std: tuple[float, float, float] = Field(description="per-channel standard deviation, RGB, uint8 pixel units")
    resize: Resize
    pad_divisor: int
    layout: Literal["NCHW"] = "NCHW"
    dtype: Literal["float32"] = "float32"
    color: Literal["RGB"] = "RGB"
    normalized_in_graph: Literal[False] = False
    pad_value: Literal[0.0] = 0.0
    names: tuple[str, ...] = Field(
        ("images", "image_sizes"),
        description="the graph's inputs: images and image_sizes, then (graphs that compute masks only for the "
        "detections returned) mask_score_threshold and mask_max_detections")
    image_sizes: str = "int64 [B, 2]: (h, w) of each image's valid region"

    @model_validator(mode="after")
    def _host_can_produce(self) -> InputSection:
        try:
            self.spec
        except InvalidInputSpecError as exc:
            raise ValueError(str(exc)) from None
        return self

    @property
    def spec(self) -> InputSpec:
        """The host preprocessing of this section (the one conversion between the two)."""
        return InputSpec.from_manifest_input(self.model_dump())

    @classmethod
    def from_spec(cls, spec: InputSpec) -> InputSection:
        return cls.model_validate(spec.to_manifest_input())


class BatchProfile(_Section):
    """``mutable=False``: the graph runs exactly ``size`` images; ``mutable=True``: any 1..``max``."""

    mutable: bool
    size: int | None = Field(None, ge=1)
    min: int | None = Field(None, ge=1)
    max: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _complete(self) -> BatchProfile:
        if self.mutable and (self.min is None or self.max is None or self.min > self.max):
            raise ValueError("a mutable batch needs min <= max")
        if not self.mutable and self.size is None:
            raise ValueError("a fixed batch needs size")
        return self


class ShapeProfile(_Section):
    batch: BatchProfile
    min_hw: HW
    opt_hw: HW
    max_hw: HW


class OutputTensor(_Section):
    dtype: str
    shape: list[int | str]
    meaning: str


class OutputsSection(_Section):
    dets: OutputTensor
    labels: OutputTensor
    masks: OutputTensor
    padding: str


class PostprocessSection(_Section):
    score_threshold: float = Field(ge=0, le=1)
    mask_threshold: float = Field(gt=0, lt=1)
    max_detections: int = Field(ge=1)
    paste: Literal["mmdet", "torchvision"] = "mmdet"


class ClassEntry(_Section):
    index: int = Field(ge=0, description="the label value in the engine's outputs")
    id: int = Field(description="category id in answers (COCO's for COCO classes, the user's dataset's, or 1..N)")
    name: str


@dataclass(frozen=True)
class ClassTable:
    """The manifest's classes as lookups: label index -> category id and name, and back."""

    ids: tuple[int, ...]
    names: tuple[str, ...]

    @classmethod
    def from_entries(cls, classes: Iterable[ClassEntry]) -> ClassTable:
        ordered = sorted(classes, key=lambda c: c.index)
        return cls(tuple(c.id for c in ordered), tuple(c.name for c in ordered))

    def categories(self, labels: Iterable[int]) -> tuple[list[int], list[str]]:
        """The category ids and names of engine labels (the one label lookup of answers and drawings)."""
        labels = list(labels)
        return [self.ids[i] for i in labels], [self.names[i] for i in labels]

    def indices(self, wanted: Iterable[str]) -> frozenset[int]:
        """Label indices of ``wanted`` class names (case-insensitive) or category ids.

        Raises:
            InvalidParameters: a name or id the engine does not know (422).
        """
        wanted = list(wanted)
        by_name = {name.lower(): i for i, name in enumerate(self.names)}
        by_id = {str(cid): i for i, cid in enumerate(self.ids)}
        unknown = [w for w in wanted if w.lower() not in by_name and w not in by_id]
        if unknown:
            raise InvalidParameters(
                f"unknown classes {unknown}; use the engine's class names or category ids (GET /v1/models lists them)"
            )
        return frozenset(by_name.get(w.lower(), by_id.get(w)) for w in wanted)


class CheckpointInfo(_Section):
    """What the weights were: a file (with its sha256) or random weights from a seed."""

    source: str | None = None
    format: str
    sha256: str | None = None
    random_init_seed: int | None = None


class ChoiceMeasurement(_Section):
    """How a backend-choice table was measured: ``quality`` (``full`` or ``smoke``), ``date``,
    ``cpu`` (model, machine, cores, instruction-set flags)."""

    quality: str | None = None
    date: str | None = None
    cpu: dict[str, Any] = Field(default_factory=dict)


class CandidateTiming(_Section):
    """One candidate engine ``--backend auto`` compiled and timed on the build machine."""

    backend: str
    precision: str
    median_s: float = Field(description="median wall seconds of one engine call at the choice's input_hw")
    seconds: list[float] = Field(description="every timed call, seconds, in round order")
    box_ap_delta_points: float | None = Field(None, description="box AP points lost against the fastest fp32 "
                                              "engine on the labelled images (None: not judged)")
    mask_ap_delta_points: float | None = None


class BackendChoice(_Section):
    """How ``--backend auto`` chose the engine: ``how="measured"`` compiled and timed every available
    candidate on the build machine (``cpu``, ``input_hw``, ``rounds`` after ``warmup``, the
    ``candidates`` and, where a reduced precision was judged, ``ap_images`` labelled images);
    ``how="table"`` read a table measured elsewhere (``table``, its ``measured``, ``same_cpu_kind``)."""

    requested: Literal["auto"] = "auto"
    chosen: str = Field(description="the backend built")
    precision: str | None = None
    why: str
    how: Literal["measured", "table"] = "table"
    cpu: dict[str, Any] = Field(default_factory=dict, description="the build machine's CPU")
    input_hw: HW | None = None
    rounds: int | None = None
    warmup: int | None = None
    candidates: list[CandidateTiming] = Field(default_factory=list)
    ap_images: int | None = None
    table: str | None = None
    measured: ChoiceMeasurement | None = None
    same_cpu_kind: bool | None = None


class ToolsSection(BaseModel):
    """Tool versions (extra fields: ``python``, ``torch``, ``onnxruntime``, ...), the ONNX opset,
    the backend's build facts (backend-specific keys) and, with ``--backend auto``, how it was chosen."""

    model_config = ConfigDict(extra="allow")

    opset: int | None = None
    backend: dict[str, Any] = Field(default_factory=dict)
    backend_choice: BackendChoice | None = None


class Calibration(_Section):
    images: int
    sha256: str
    folder: str


class APDelta(_Section):
    """AP points lost against the reference, ``100 * (1 - AP)``; None when AP is undefined."""

    box: float | None
    mask: float | None


class ParityTiming(_Section):
    eager_s_per_image: float | None
    engine_s_per_image: float | None
    engine_postprocess_s_per_image: float | None
    engine_with_postprocess_s_per_image: float | None
    ratio_to_eager: float | None
    images: int
    batch_size: int
    threads: int
    warmup_batches: int
    statistic: str


class ReferenceRecord(_Section):
    """Which model judged the engine: ``torchvision`` or ``mmdet`` (the origin framework's own
    model), or ``maskrcnn-serve`` (this project's eager model; ``detail`` says why)."""

    name: str
    detail: str = ""


class ParityExclusions(_Section):
    """Reference detections the gate did not hold the engine to, by reason (build_tools.verify.Tolerance):
    ``small_reference``/``small_engine`` boxes with a side under ``min_box_side_px`` (left out of
    matching and AP), ``at_cut`` (scored at the engine's lowest score: a top-k or threshold cut may
    have dropped either), ``tied`` (the engine kept an overlapping same-class candidate of a score
    within the tie tolerance instead: NMS between tied scores keeps either); ``judged``: the
    reference detections the match rate is over."""

    min_box_side_px: float
    small_reference: int
    small_engine: int
    at_cut: int
    tied: int
    judged: int


class ParityReport(_Section):
    """The build's verify report: the engine against its reference (the origin framework's model
    where it runs) on the same images."""

    reference: ReferenceRecord | None = Field(
        default=None, description="the model that judged the engine (absent in manifests of older builds)")
    images: list[str]
    reference_detections: int
    engine_detections: int
    box_match_rate: float
    label_agreement: float
    score_abs_diff_mean: float
    score_abs_diff_max: float
    mask_iou_mean: float
    mask_iou_min: float
    box_ap: float | None
    box_ap50: float | None
    mask_ap: float | None
    mask_ap50: float | None
    ap_delta_points: APDelta
    timing: ParityTiming
    exclusions: ParityExclusions | None = Field(
        default=None, description="what matching left out, by reason (absent in manifests of older builds)")
    fp32_pins: dict[str, str] = Field(
        default_factory=dict, description="the precision each fp32 path was pinned to: the reference's torch "
        "settings and the engine's (absent in manifests of older builds)")
    tolerance: dict[str, float] = Field(default_factory=dict)
    passed: bool = True
    failures: list[str] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _drop_mean_seconds(cls, data: Any) -> Any:
        # Artifacts built by version 0.1.0 also hold the mean seconds per image next to
        # ``timing``'s medians; one statistic is reported, so those keys are read and dropped.
        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if k not in ("eager_seconds_per_image", "engine_seconds_per_image")}
        return data

    @field_validator("box_ap", "box_ap50", "mask_ap", "mask_ap50", mode="before")
    @classmethod
    def _nan_is_none(cls, value: Any) -> Any:
        return None if isinstance(value, float) and value != value else value


class Manifest(_Section):
    backend: str
    precision: str
    model_file: str
    origin: str
    input: InputSection
    shape_profile: ShapeProfile
    outputs: OutputsSection
    postprocess: PostprocessSection
    classes: list[ClassEntry] = Field(
        min_length=1, description="the engine's classes by label index: names and category ids (build_tools.classes)")
    checkpoint: CheckpointInfo = Field(default_factory=lambda: CheckpointInfo(format="unknown"))
    inference_config: dict[str, Any] = Field(
        default_factory=dict, description="build_tools.model.InferenceConfig fields the graph was built with")
    tools: ToolsSection = Field(default_factory=ToolsSection)
    calibration: Calibration | None = None
    parity: ParityReport | None = None
    notes: list[str] = Field(default_factory=list)
    format_version: Literal[1] = FORMAT_VERSION

    @property
    def batch_size(self) -> int | None:
        """Fixed batch size of the graph, or None when the batch dimension is mutable."""
        batch = self.shape_profile.batch
        return None if batch.mutable else batch.size

    @property
    def max_batch_size(self) -> int:
        """The most images one call may hold: the fixed size, or a mutable graph's ``max``."""
        batch = self.shape_profile.batch
        return batch.max if batch.mutable else batch.size

    def images_per_call(self, requested: int) -> int:
        """Images per engine call when serving with ``--max-batch-size requested``: the graph's
        fixed batch size, else ``requested`` capped at the largest batch a mutable graph takes."""
        return self.batch_size or min(requested, self.max_batch_size)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / MANIFEST_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, folder: str | Path) -> Manifest:
        """Read and validate ``folder/manifest.json``.

        Raises:
            ManifestError: no manifest, unreadable JSON, an unsupported format version, a missing
                or malformed field, or a model file that is not there.
        """
        folder = Path(folder)
        path = folder / MANIFEST_NAME
        if not path.is_file():
            raise ManifestError(f"{folder} is not an engine artifact: {MANIFEST_NAME} not found")
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ManifestError(f"cannot read {path}: {exc}") from exc
        version = data.get("format_version") if isinstance(data, dict) else None
        if version != FORMAT_VERSION:
            raise ManifestError(f"{path}: format_version {version!r} is not supported (expected {FORMAT_VERSION})")
        try:
            manifest = cls.model_validate(data)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or '(top)'}: {err['msg']}" for err in exc.errors()
            )
            raise ManifestError(f"{path}: {problems}") from None
        if not (folder / manifest.model_file).is_file():
            raise ManifestError(f"{path}: model file {manifest.model_file!r} not found in {folder}")
        return manifest
