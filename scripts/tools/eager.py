"""Eager PyTorch results on a COCO dataset: the reference an engine's results are compared with.

The reference is the checkpoint's origin framework where it runs (``build_tools.origin``:
torchvision's own model for torchvision checkpoints, mmdet's own for mmdet checkpoints where mmdet
is installed), each with its own pre- and postprocessing; otherwise this project's eager model
inside the service's host code (``service.preprocess`` before it, ``service.postprocess`` after
it). Thresholds are those of the inference config a manifest built from the same checkpoint
records. Torch is imported only when a model is loaded or run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pycocotools.coco import COCO
from tqdm import tqdm

from service.manifest import MANIFEST_NAME, Manifest
from service.response import coco_body

if TYPE_CHECKING:
    from build_tools.checkpoint import LoadedCheckpoint
    from build_tools.model import MaskRCNN
    from build_tools.origin import OriginReference


class EagerReferenceError(Exception):
    """The eager model asked for cannot be loaded (a missing or changed checkpoint); the CLIs report
    it as a usage error (status 2)."""


def eager_reference(manifest: Manifest, score_threshold: float | None = None) -> MaskRCNN:
    """The eager PyTorch model an artifact was built from, with the inference config its manifest
    records (``score_threshold`` replaces the graph's).

    Raises:
        EagerReferenceError: the checkpoint is gone or changed since the build.
    """
    from build_tools.checkpoint import CheckpointError
    from build_tools.errors import BuildError
    from build_tools.reference import reference_for_manifest

    try:
        return reference_for_manifest(manifest, score_threshold=score_threshold).model
    except (CheckpointError, BuildError, OSError) as error:
        raise EagerReferenceError(f"the engine's eager reference cannot be loaded: {error}") from error


@dataclass(frozen=True)
class EagerModel:
    """A reference model (``build_tools.origin.OriginReference``: the origin framework's own where
    it runs) and the category id of each of its labels (its class table, as the build writes it
    into the manifest)."""

    reference: OriginReference
    category_ids: tuple[int, ...]

    @property
    def name(self) -> str:
        return self.reference.name

    @classmethod
    def of_checkpoint(cls, loaded: LoadedCheckpoint, prefer: str = "origin") -> EagerModel:
        """The reference of a loaded checkpoint file (or random weights), its class table from its names."""
        from build_tools.classes import class_table
        from build_tools.origin import reference_of_loaded
        from service.manifest import CheckpointInfo

        classes = class_table(loaded.class_names)
        random = loaded.format == "random-init"
        checkpoint = CheckpointInfo(source=None if random else loaded.source, format=loaded.format,
                                    sha256=loaded.sha256)
        return cls(reference_of_loaded(loaded, checkpoint, classes, prefer=prefer), tuple(c.id for c in classes))


def eager_model(source: str | Path, score_threshold: float | None = None, prefer: str = "origin") -> EagerModel:
    """The reference model of ``source``: an engine artifact folder (the checkpoint it was built
    from, its inference config and class table) or a checkpoint file or published name (with its
    origin's test settings and the class table its meta gives). ``prefer="origin"`` takes the origin
    framework's own model where it runs (``build_tools.origin``), ``"maskrcnn-serve"`` this
    project's eager model.

    Raises:
        EagerReferenceError: the checkpoint cannot be loaded.
    """
    from build_tools.checkpoint import CheckpointError, load_checkpoint
    from build_tools.errors import BuildError
    from build_tools.origin import origin_reference

    try:
        if (Path(source) / MANIFEST_NAME).is_file():
            manifest = Manifest.load(source)
            ids = tuple(c.id for c in sorted(manifest.classes, key=lambda c: c.index))
            reference = origin_reference(manifest.checkpoint, manifest.inference_config, manifest.classes,
                                         score_threshold=score_threshold, prefer=prefer)
            return EagerModel(reference, ids)
        overrides = {} if score_threshold is None else {"score_thresh": score_threshold}
        return EagerModel.of_checkpoint(load_checkpoint(str(source), **overrides), prefer=prefer)
    except (CheckpointError, BuildError, OSError) as error:
        raise EagerReferenceError(f"the eager reference of {source} cannot be loaded: {error}") from error


def write_eager_results(eager: EagerModel, coco: COCO, image_dir: Path, image_ids: Sequence[int], out_json: Path,
                        progress: bool = True) -> None:
    """Run ``eager``'s reference on the images ``image_ids`` of ``coco`` (files in ``image_dir``),
    one at a time; write their COCO results JSON to ``out_json``.

    Each entry is ``{"image_id", "category_id", "bbox": [x, y, w, h], "score", "segmentation": RLE}``
    in original-image pixels, as the service's ``format=coco`` answers carry them. Score threshold,
    mask threshold and detections per image are the model config's.
    """
    from build_tools.images import read_rgb

    results = []
    bar_name = f"eager ({eager.name})"
    for image_id in tqdm(image_ids, desc=bar_name, unit="img", disable=not progress):
        detections = eager.reference.detect(read_rgb(image_dir / coco.imgs[image_id]["file_name"]))
        results += coco_body(
            detections.boxes.tolist(), detections.scores.tolist(),
            [eager.category_ids[label] for label in detections.labels], detections.rles, image_id,
        )
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(results))
