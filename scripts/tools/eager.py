"""Eager PyTorch results on a COCO dataset: the reference an engine's results are compared with.

The model runs inside the service's own host code: ``service.preprocess.prepare_image`` /
``pad_batch`` before it and ``service.postprocess.postprocess_image`` (boxes to original pixels,
masks pasted and encoded as COCO RLE) after it, with the thresholds of its inference config, which
a manifest built from the same model records. Torch is imported only when a model is loaded or run.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pycocotools.coco import COCO
from tqdm import tqdm

from build_tools.classes import COCO_CATEGORY_IDS
from service.manifest import MANIFEST_NAME, Manifest
from service.postprocess import postprocess_image
from service.preprocess import pad_batch, prepare_image
from service.response import coco_body

if TYPE_CHECKING:
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


def eager_model(source: str | Path, score_threshold: float | None = None) -> MaskRCNN:
    """The eager model of ``source``: an engine artifact folder (the model it was built from) or a
    checkpoint file or published name (with its origin's test settings).

    Raises:
        EagerReferenceError: the checkpoint cannot be loaded.
    """
    if (Path(source) / MANIFEST_NAME).is_file():
        return eager_reference(Manifest.load(source), score_threshold)
    from build_tools.checkpoint import CheckpointError, load_checkpoint

    overrides = {} if score_threshold is None else {"score_thresh": score_threshold}
    try:
        return load_checkpoint(str(source), **overrides).model
    except (CheckpointError, OSError) as error:
        raise EagerReferenceError(f"cannot load checkpoint {source}: {error}") from error


def write_eager_results(model: MaskRCNN, coco: COCO, image_dir: Path, image_ids: Sequence[int], out_json: Path,
                        progress: bool = True) -> None:
    """Run ``model`` on the images ``image_ids`` of ``coco`` (files in ``image_dir``), one at a time;
    write their COCO results JSON to ``out_json``.

    Each entry is ``{"image_id", "category_id", "bbox": [x, y, w, h], "score", "segmentation": RLE}``
    in original-image pixels, as the service's ``format=coco`` answers carry them. Score threshold,
    mask threshold and detections per image are the model config's.
    """
    from build_tools.images import read_rgb
    from build_tools.reference import run_eager

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
            max_detections=config.detections_per_img,
        )
        results += coco_body(
            detections.boxes.tolist(), detections.scores.tolist(),
            [COCO_CATEGORY_IDS[label] for label in detections.labels], detections.rles, image_id,
        )
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(results))
