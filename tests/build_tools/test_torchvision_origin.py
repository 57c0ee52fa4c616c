"""A torchvision-format checkpoint, built and served, judged by torchvision's own model.

The checkpoint is random weights in torchvision's layout (its ``maskrcnn_resnet50_fpn`` keys,
91 classes), calibrated so it returns masks: the mask logits are scaled so every pixel is
decided far from the 0.5 threshold (random weights otherwise leave every probability near 0.5,
where a pasted mask measures rounding noise, not the paste) and its box deltas scaled down so
boxes stay near their anchors. It goes through the real path:
``export_step`` -> ONNX Runtime ``compile_step`` (its verify gate judged by torchvision's model)
-> the HTTP service; the answers at score threshold 0 are compared with torchvision's own
``maskrcnn_resnet50_fpn`` built here from torchvision's public API on the same state dict.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CACHE, build_into, cache_key, photo_dir
from pycocotools import mask as mask_utils

from build_tools.checkpoint import load_checkpoint
from build_tools.images import read_rgb
from build_tools.pipeline import compile_step, export_step
from scripts.tools.service_process import serving
from service.backends import load_engine
from service.manifest import Manifest
from service.settings import Settings

SCALE = (512, 320)  # (long, short) edges: a few times cheaper than 1333x800, same code paths
PHOTOS = ("astronaut.png", "coffee.png")  # square (uniform scale) and 600x400 (scales differ per axis)


def _calibrated_torchvision_state() -> dict[str, torch.Tensor]:
    model = load_checkpoint(None, random_init_seed=5, origin="torchvision").model
    with torch.no_grad():
        logits = model.roi_heads.mask_predictor.mask_fcn_logits
        logits.weight.mul_(40.0)
        logits.bias.fill_(0.5)
        # small box deltas: proposals and detections stay near their anchors (random deltas make
        # slivers a fraction of a pixel tall, whose pasted masks are empty on both sides)
        for deltas in (model.rpn.head.bbox_pred, model.roi_heads.box_predictor.bbox_pred):
            deltas.weight.mul_(0.1)
            deltas.bias.zero_()
    return model.state_dict()


def _torchvisions_own_model(state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """torchvision's ``maskrcnn_resnet50_fpn`` as its users build it, at score threshold 0; BN
    epsilon 0 as torchvision sets it for its published weights (``overwrite_eps(model, 0.0)``)."""
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91, min_size=SCALE[1],
                                  max_size=SCALE[0], box_score_thresh=0.0)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.eps = 0.0
    model.load_state_dict(state, strict=False)  # a fresh model's BN counts num_batches_tracked
    return model.eval()


@pytest.fixture(scope="module")
def torchvision_build() -> tuple[Path, Path]:
    """(checkpoint file, artifact folder), cached while the producers are unchanged."""
    key = cache_key(case="torchvision-origin", scale=SCALE, seed=5)
    checkpoint = CACHE / f"checkpoint-torchvision-origin-{key}.pth"
    artifact = CACHE / f"artifact-torchvision-origin-{key}"
    if not checkpoint.is_file():
        CACHE.mkdir(parents=True, exist_ok=True)
        torch.save(_calibrated_torchvision_state(), checkpoint.with_suffix(".tmp"))
        checkpoint.with_suffix(".tmp").rename(checkpoint)
    if not (artifact / "manifest.json").is_file():
        def build(out: Path) -> None:
            with tempfile.TemporaryDirectory(prefix="maskrcnn-test-export-") as tmp:
                export_dir = export_step(Path(tmp) / "export", str(checkpoint), score_threshold=0.0,
                                         resize_scale=SCALE)
                photos = Path(tmp) / "verify"
                photos.mkdir()
                (photos / PHOTOS[1]).write_bytes((photo_dir() / PHOTOS[1]).read_bytes())
                compile_step(export_dir, out, verify_images=photos, progress=False)
        build_into(artifact, build)
    return checkpoint, artifact


@pytest.mark.slow
def test_the_build_was_judged_by_torchvisions_own_model(torchvision_build):
    _, artifact = torchvision_build
    manifest = Manifest.load(artifact)
    assert manifest.origin == "torchvision" and manifest.checkpoint.format == "torchvision"
    assert manifest.postprocess.paste == "torchvision"
    report = manifest.parity
    assert report is not None and report.reference is not None
    assert report.reference.name == "torchvision" and "torchvision" in report.reference.detail
    assert report.passed, report.failures
    assert report.reference_detections == 100 and report.box_match_rate == 1.0 and report.mask_iou_min >= 0.99


@pytest.mark.slow
def test_served_answers_match_torchvisions_own_model_detection_for_detection(torchvision_build):
    checkpoint, artifact = torchvision_build
    theirs_model = _torchvisions_own_model(torch.load(checkpoint, weights_only=True))
    engine = load_engine(artifact)
    with serving(Settings(max_wait_ms=0, request_timeout_ms=120_000), engine) as server:
        for name in PHOTOS:
            rgb = read_rgb(photo_dir() / name)
            with torch.no_grad():
                theirs = theirs_model([torch.from_numpy(rgb).permute(2, 0, 1).float() / 255.0])[0]
            answer = server.post((photo_dir() / name).read_bytes(), "image/png", params={"score_threshold": "0"})
            assert answer.status_code == 200, answer.text
            ours = answer.json()["detections"]
            assert len(ours) == len(theirs["boxes"]) == 100, name

            our_boxes = np.array([d["bbox"] for d in ours], np.float64)
            our_ids = np.array([d["category_id"] for d in ours])
            our_rles = [d["segmentation"] for d in ours]
            their_masks = (theirs["masks"][:, 0] > 0.5).numpy()
            taken = np.zeros(len(ours), bool)
            for k, (box, label) in enumerate(zip(theirs["boxes"].numpy(), theirs["labels"].numpy())):
                # torchvision's labels are COCO category ids (its 91-slot layout); ours name them too
                iou = _iou(box, our_boxes)
                iou[(our_ids != label) | taken] = -1.0
                best = int(iou.argmax())
                assert iou[best] >= 0.99, f"{name}: torchvision detection {k} (label {label}) has no match"
                taken[best] = True
                their_rle = mask_utils.encode(np.asfortranarray(their_masks[k].astype(np.uint8)))
                mask_iou = mask_utils.iou([{**our_rles[best], "counts": our_rles[best]["counts"].encode()}],
                                          [their_rle], [0])[0, 0]
                assert their_masks[k].any(), "calibration failed: torchvision returned an empty mask"
                assert mask_iou >= 0.99, f"{name}: detection {k} mask IoU {mask_iou:.4f}"


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    lt = np.maximum(box[:2], boxes[:, :2])
    rb = np.minimum(box[2:], boxes[:, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=1)
    union = (box[2:] - box[:2]).prod() + (boxes[:, 2:] - boxes[:, :2]).prod(axis=1) - inter
    return inter / np.maximum(union, 1e-12)
