"""The engine artifact's manifest: the only contract between ``build_tools`` and ``service``.

An artifact is a folder holding the backend's model file and ``manifest.json``. See
docs/architecture.md for the meaning of every field.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"

# The 80 COCO detection classes in COCO order: (category id, name).
COCO_CLASSES: tuple[tuple[int, str], ...] = (
    (1, "person"), (2, "bicycle"), (3, "car"), (4, "motorcycle"), (5, "airplane"), (6, "bus"),
    (7, "train"), (8, "truck"), (9, "boat"), (10, "traffic light"), (11, "fire hydrant"),
    (13, "stop sign"), (14, "parking meter"), (15, "bench"), (16, "bird"), (17, "cat"), (18, "dog"),
    (19, "horse"), (20, "sheep"), (21, "cow"), (22, "elephant"), (23, "bear"), (24, "zebra"),
    (25, "giraffe"), (27, "backpack"), (28, "umbrella"), (31, "handbag"), (32, "tie"),
    (33, "suitcase"), (34, "frisbee"), (35, "skis"), (36, "snowboard"), (37, "sports ball"),
    (38, "kite"), (39, "baseball bat"), (40, "baseball glove"), (41, "skateboard"),
    (42, "surfboard"), (43, "tennis racket"), (44, "bottle"), (46, "wine glass"), (47, "cup"),
    (48, "fork"), (49, "knife"), (50, "spoon"), (51, "bowl"), (52, "banana"), (53, "apple"),
    (54, "sandwich"), (55, "orange"), (56, "broccoli"), (57, "carrot"), (58, "hot dog"),
    (59, "pizza"), (60, "donut"), (61, "cake"), (62, "chair"), (63, "couch"), (64, "potted plant"),
    (65, "bed"), (67, "dining table"), (70, "toilet"), (72, "tv"), (73, "laptop"), (74, "mouse"),
    (75, "remote"), (76, "keyboard"), (77, "cell phone"), (78, "microwave"), (79, "oven"),
    (80, "toaster"), (81, "sink"), (82, "refrigerator"), (84, "book"), (85, "clock"), (86, "vase"),
    (87, "scissors"), (88, "teddy bear"), (89, "hair drier"), (90, "toothbrush"),
)
COCO_CATEGORY_IDS: tuple[int, ...] = tuple(cid for cid, _ in COCO_CLASSES)


class ManifestError(ValueError):
    """The artifact folder is missing, unreadable or of an unsupported format."""


def coco_class_table() -> list[dict[str, Any]]:
    return [{"index": i, "id": cid, "name": name} for i, (cid, name) in enumerate(COCO_CLASSES)]


@dataclass
class Manifest:
    backend: str
    precision: str
    model_file: str
    origin: str
    input: dict[str, Any]
    shape_profile: dict[str, Any]
    outputs: dict[str, Any]
    postprocess: dict[str, Any]
    classes: list[dict[str, Any]] = field(default_factory=coco_class_table)
    checkpoint: dict[str, Any] = field(default_factory=dict)
    inference_config: dict[str, Any] = field(default_factory=dict)
    tools: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] | None = None
    parity: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    format_version: int = FORMAT_VERSION

    @property
    def batch_size(self) -> int | None:
        """Fixed batch size of the graph, or None when the batch dimension is mutable."""
        batch = self.shape_profile["batch"]
        return None if batch.get("mutable") else int(batch["size"])

    @property
    def max_batch_size(self) -> int:
        batch = self.shape_profile["batch"]
        return int(batch.get("max", batch.get("size", 1)))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / MANIFEST_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n")
        return path

    @classmethod
    def load(cls, folder: str | Path) -> "Manifest":
        folder = Path(folder)
        path = folder / MANIFEST_NAME
        if not path.is_file():
            raise ManifestError(f"{folder} is not an engine artifact: {MANIFEST_NAME} not found")
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ManifestError(f"cannot read {path}: {exc}") from exc
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ManifestError(f"{path}: format_version {version!r} is not supported (expected {FORMAT_VERSION})")
        known = set(cls.__dataclass_fields__)
        missing = sorted(
            k for k, f in cls.__dataclass_fields__.items()
            if k not in data and f.default is MISSING and f.default_factory is MISSING
        )
        if missing:
            raise ManifestError(f"{path}: missing fields {missing}")
        manifest = cls(**{k: v for k, v in data.items() if k in known})
        if not (folder / manifest.model_file).is_file():
            raise ManifestError(f"{path}: model file {manifest.model_file!r} not found in {folder}")
        return manifest
