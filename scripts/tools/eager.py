"""Eager PyTorch results on a COCO dataset: the reference an engine's results are compared with.

The model runs inside the service's own host code: ``service.preprocess.prepare_image`` /
``pad_batch`` before it and ``service.postprocess.postprocess_image`` (boxes to original pixels,
masks pasted and encoded as COCO RLE) after it, with the thresholds of its inference config, which
a manifest built from the same model records. Torch is imported only when a model is loaded or run.
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
from service.postprocess import postprocess_image
from service.preprocess import pad_batch, prepare_image
from service.response import coco_body

if TYPE_CHECKING:
    from build_tools.checkpoint import LoadedCheckpoint
    from build_tools.model import MaskRCNN


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
    """An eager model and the category id of each of its labels (its class table, as the build
    writes it into the manifest)."""

    model: MaskRCNN
    category_ids: tuple[int, ...]

    @classmethod
    def of_checkpoint(cls, loaded: LoadedCheckpoint) -> EagerModel:
        from build_tools.classes import class_table

        return cls(loaded.model, tuple(c.id for c in class_table(loaded.class_names)))


def eager_model(source: str | Path, score_threshold: float | None = None) -> EagerModel:
    """The eager model of ``source``: an engine artifact folder (the model it was built from, and
    its manifest's class table) or a checkpoint file or published name (with its origin's test
    settings and the class table its meta gives).

    Raises:
        EagerReferenceError: the checkpoint cannot be loaded.
    """
    if (Path(source) / MANIFEST_NAME).is_file():
        manifest = Manifest.load(source)
        ids = tuple(c.id for c in sorted(manifest.classes, key=lambda c: c.index))
        return EagerModel(eager_reference(manifest, score_threshold), ids)
    from build_tools.checkpoint import CheckpointError, load_checkpoint

    overrides = {} if score_threshold is None else {"score_thresh": score_threshold}
    try:
        return EagerModel.of_checkpoint(load_checkpoint(str(source), **overrides))
    except (CheckpointError, OSError) as error:
        raise EagerReferenceError(f"cannot load checkpoint {source}: {error}") from error


def write_eager_results(eager: EagerModel, coco: COCO, image_dir: Path, image_ids: Sequence[int], out_json: Path,
                        progress: bool = True) -> None:
    """Run ``eager.model`` on the images ``image_ids`` of ``coco`` (files in ``image_dir``), one at a
    time; write their COCO results JSON to ``out_json``.

    Each entry is ``{"image_id", "category_id", "bbox": [x, y, w, h], "score", "segmentation": RLE}``
    in original-image pixels, as the service's ``format=coco`` answers carry them. Score threshold,
    mask threshold and detections per image are the model config's.
    """
    from build_tools.images import read_rgb
    from build_tools.reference import run_eager

    model = eager.model
    config = model.config
    spec = config.input_spec()
    model.eval()
    results = []
    for image_id in tqdm(image_ids, desc="eager", unit="img", disable=not progress):
        prepared = prepare_image(read_rgb(image_dir / coco.imgs[image_id]["file_name"]), spec)
        images, image_sizes = pad_batch([prepared], spec.pad_divisor)
        outputs = run_eager(model, images, image_sizes)
        detections = postprocess_image(
            outputs["dets"][0], outputs["labels"][0], outputs["masks"][0], prepared.scale_factor,
            prepared.orig_hw, score_threshold=config.score_thresh, mask_threshold=config.mask_threshold,
            max_detections=config.detections_per_img, paste=config.paste_rule,
        )
        results += coco_body(
            detections.boxes.tolist(), detections.scores.tolist(),
            [eager.category_ids[label] for label in detections.labels], detections.rles, image_id,
        )
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(results))
