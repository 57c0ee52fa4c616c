"""The origin framework's own model of a checkpoint: the reference an engine is judged by.

A user's question is whether the served model is as accurate as the model they trained, in the
framework they trained it in. So the reference of a torchvision checkpoint is torchvision's own
``MaskRCNN`` (as ``maskrcnn_resnet50_fpn`` builds it: its ``GeneralizedRCNNTransform``, its
postprocess and ``paste_masks_in_image``), and the reference of an mmdet checkpoint is mmdet's own
model (``build_tools.mmdet_reference``: its test pipeline and ``inference_detector``) where mmdet is
installed. Where it is not, the reference of an mmdet checkpoint is this project's eager
mmdet-equivalent model inside the service's host code, and the reference's ``name`` says so
(``"maskrcnn-serve"``); docs/fidelity.md lists what that model is measured to differ by from mmdet.

Every reference answers one image at a time with :class:`service.postprocess.ImageDetections`
in original-image pixels (class-index labels of the manifest's class table, COCO RLE masks), so
verify, ``maskrcnn-eval --eager`` and the benchmarks compare the engine with it the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from pycocotools import mask as mask_utils

from build_tools.checkpoint import LoadedCheckpoint
from build_tools.model import RESNET_LAYERS, InferenceConfig, MaskRCNN
from build_tools.reference import eager_reference, run_eager
from service.manifest import CheckpointInfo, ClassEntry
from service.postprocess import ImageDetections, postprocess_image
from service.preprocess import pad_batch, prepare_image

ReferenceName = Literal["torchvision", "mmdet", "maskrcnn-serve"]
Preference = Literal["origin", "maskrcnn-serve"]


@dataclass
class OriginReference:
    """One framework's eager model of a checkpoint.

    Attributes:
        name: ``torchvision`` or ``mmdet`` (the origin's own model), or ``maskrcnn-serve`` (this
            project's eager model, where the origin's cannot run or was not asked for).
        detail: what ran, with versions, and why when it is not the origin's own model.
        detect: uint8 RGB ``[H, W, 3]`` -> that image's detections, best first.
        loaded: this project's model of the same checkpoint (its config names the label layout).
    """

    name: ReferenceName
    detail: str
    detect: Callable[[np.ndarray], ImageDetections]
    loaded: LoadedCheckpoint

    @property
    def is_origin(self) -> bool:
        return self.name != "maskrcnn-serve"

    def record(self) -> dict[str, str]:
        """What the manifest's parity report and the benchmarks write about the reference."""
        return {"name": self.name, "detail": self.detail}


def _encode(masks: np.ndarray) -> list[dict]:
    """COCO RLEs (counts as str) of bool ``[K, H, W]`` masks."""
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return list(rles)


def _detections(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, masks: np.ndarray) -> ImageDetections:
    """Detections sorted by score, descending, masks (bool ``[K, H, W]``) as RLEs."""
    order = np.argsort(-scores, kind="stable")
    boxes, scores, labels, masks = boxes.reshape(-1, 4)[order], scores[order], labels[order], masks[order]
    rles = _encode(masks) if len(masks) else []
    return ImageDetections(boxes.astype(np.float32), scores.astype(np.float32), labels.astype(np.int64), rles)


# --- this project's eager model ------------------------------------------------------------------


def project_detect(model: MaskRCNN) -> Callable[[np.ndarray], ImageDetections]:
    """This project's eager model inside the service's host code (its preprocess, the graph in
    PyTorch, its postprocess with the origin's paste rule), thresholds of the model's config."""
    config = model.config
    spec = config.input_spec()

    def detect(rgb: np.ndarray) -> ImageDetections:
        prepared = prepare_image(rgb, spec)
        images, sizes = pad_batch([prepared], spec.pad_divisor)
        outputs = run_eager(model, images, sizes)
        return postprocess_image(
            outputs["dets"][0], outputs["labels"][0], outputs["masks"][0], prepared.scale_factor, prepared.orig_hw,
            score_threshold=config.score_thresh, mask_threshold=config.mask_threshold,
            max_detections=config.detections_per_img, paste=config.paste_rule)

    return detect


# --- torchvision ---------------------------------------------------------------------------------


def torchvision_model(config: InferenceConfig, state: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    """torchvision's own ``MaskRCNN`` for ``config``'s architecture and test settings, holding
    ``state`` (the state dict of this project's model of the same checkpoint, whose keys are
    torchvision's), in eval mode.

    R-50 is built exactly as ``maskrcnn_resnet50_fpn`` builds it for its published weights
    (``resnet50`` with ``FrozenBatchNorm2d``, all layers returned by the FPN extractor,
    ``overwrite_eps`` with the checkpoint's BN epsilon); deeper or grouped backbones use the same
    ``ResNet(Bottleneck, ...)`` constructor with their depth and groups.
    """
    from torchvision.models.detection import MaskRCNN as TorchvisionMaskRCNN
    from torchvision.models.detection._utils import overwrite_eps
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.models.resnet import Bottleneck, ResNet
    from torchvision.ops import FrozenBatchNorm2d

    backbone = ResNet(Bottleneck, list(RESNET_LAYERS[config.depth]), groups=config.groups,
                      width_per_group=config.width_per_group, norm_layer=FrozenBatchNorm2d)
    backbone = _resnet_fpn_extractor(backbone, 5)
    long_edge, short_edge = config.resize_scale
    model = TorchvisionMaskRCNN(
        backbone,
        num_classes=config.num_classes,
        min_size=short_edge,
        max_size=long_edge,
        image_mean=[m / 255.0 for m in config.mean],
        image_std=[s / 255.0 for s in config.std],
        rpn_pre_nms_top_n_test=config.rpn_pre_nms_top_n,
        rpn_post_nms_top_n_test=config.rpn_post_nms_top_n,
        rpn_nms_thresh=config.rpn_nms_thresh,
        box_score_thresh=config.score_thresh,
        box_nms_thresh=config.nms_thresh,
        box_detections_per_img=config.detections_per_img,
    )
    overwrite_eps(model, config.bn_eps)
    model.load_state_dict(dict(state), strict=True)
    return model.eval()


def torchvision_detect(model: torch.nn.Module, config: InferenceConfig) -> Callable[[np.ndarray], ImageDetections]:
    """torchvision's model on one RGB image as torchvision's users call it (a float tensor in
    0..1), its pasted masks thresholded at ``config.mask_threshold`` as torchvision's COCO
    evaluation does; labels mapped to the class table (unused slots dropped)."""
    label_to_class = np.asarray(config.label_to_class, np.int64)

    def detect(rgb: np.ndarray) -> ImageDetections:
        tensor = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float() / 255.0
        with torch.no_grad():
            out = model([tensor])[0]
        classes = label_to_class[out["labels"].numpy()]
        keep = classes >= 0
        masks = (out["masks"][:, 0] > config.mask_threshold).numpy()[keep]
        return _detections(out["boxes"].numpy()[keep], out["scores"].numpy()[keep], classes[keep], masks)

    return detect


# --- mmdet ---------------------------------------------------------------------------------------


def mmdet_model_config(config: InferenceConfig) -> dict:
    """mmdet's model config of ``config``'s architecture, with its class count: the R50-FPN base
    config, or the config file mmdet's wheel ships for the deeper, grouped or caffe members."""
    from build_tools import mmdet_reference

    num_classes = config.num_classes - 1
    if (config.depth, config.groups, config.style) == (50, 1, "pytorch"):
        base = dict(mmdet_reference.MASK_RCNN_R50_FPN)
        roi = dict(base["roi_head"])
        roi["bbox_head"] = dict(roi["bbox_head"], num_classes=num_classes)
        roi["mask_head"] = dict(roi["mask_head"], num_classes=num_classes)
        return dict(base, roi_head=roi)
    if config.groups == 1:
        name = f"mask-rcnn_r{config.depth}{'-caffe' if config.style == 'caffe' else ''}_fpn_1x_coco"
    else:
        name = f"mask-rcnn_x{config.depth}-{config.groups}x{config.width_per_group}d_fpn_1x_coco"
    return mmdet_reference.zoo_model_config(name, num_classes)


def mmdet_detect(checkpoint_path: str, config: InferenceConfig, class_names: Sequence[str]
                 ) -> Callable[[np.ndarray], ImageDetections]:
    """mmdet's own model of an mmdet checkpoint file (``inference_detector`` on the image as mmcv
    reads files, BGR), with ``config``'s score threshold and resize scale (a smaller one builds
    cheap smoke and test engines)."""
    from build_tools.mmdet_reference import MMDetReference

    model_config = mmdet_model_config(config)
    model_config["test_cfg"] = dict(model_config["test_cfg"])
    model_config["test_cfg"]["rcnn"] = dict(model_config["test_cfg"]["rcnn"], score_thr=config.score_thresh,
                                            max_per_img=config.detections_per_img,
                                            mask_thr_binary=config.mask_threshold)
    reference = MMDetReference(checkpoint_path, model_config, tuple(class_names), scale=config.resize_scale)

    def detect(rgb: np.ndarray) -> ImageDetections:
        run = reference.detect(np.ascontiguousarray(rgb[:, :, ::-1]))
        d = run.detections
        return _detections(d.boxes, d.scores, d.labels, d.masks)

    return detect


def _versions(*names: str) -> str:
    import importlib.metadata

    return ", ".join(f"{n} {importlib.metadata.version(n)}" for n in names)


def origin_reference(
    checkpoint: CheckpointInfo,
    inference_config: Mapping[str, Any],
    classes: Sequence[ClassEntry],
    *,
    score_threshold: float | None = None,
    prefer: Preference = "origin",
) -> OriginReference:
    """The reference an engine built from ``checkpoint`` with ``inference_config`` is judged by.

    ``prefer="origin"``: the origin framework's own model (torchvision's for torchvision-origin
    configs, random weights included; mmdet's for mmdet checkpoint files where mmdet is installed),
    else this project's eager model, named ``maskrcnn-serve`` with the reason in ``detail``.
    ``prefer="maskrcnn-serve"``: this project's eager model (what the graph was exported from).

    Raises:
        BuildError: the checkpoint file changed since it was recorded.
        CheckpointError: the checkpoint cannot be read or does not fit.
    """
    loaded = eager_reference(checkpoint, inference_config, classes, score_threshold=score_threshold)
    return reference_of_loaded(loaded, checkpoint, classes, prefer=prefer)


def reference_of_loaded(
    loaded: LoadedCheckpoint,
    checkpoint: CheckpointInfo,
    classes: Sequence[ClassEntry],
    *,
    prefer: Preference = "origin",
) -> OriginReference:
    """As :func:`origin_reference`, for a checkpoint already loaded as this project's model
    (``loaded``; its config decides the origin and the test settings); ``checkpoint`` says where
    the weights came from (mmdet's own model reads the file again)."""
    config = loaded.model.config
    project = OriginReference("maskrcnn-serve", "", project_detect(loaded.model), loaded)
    if prefer == "maskrcnn-serve":
        project.detail = "this project's eager model in the service's host code (asked for)"
        return project
    if config.origin == "torchvision":
        model = torchvision_model(config, loaded.model.state_dict())
        return OriginReference("torchvision", f"torchvision.models.detection.MaskRCNN ({_versions('torchvision')})",
                               torchvision_detect(model, config), loaded)
    from build_tools import mmdet_reference

    reason = mmdet_reference.unavailable_reason()
    if checkpoint.format == "random-init" or not checkpoint.source:
        reason = "random weights have no mmdet checkpoint file"
    if reason is None:
        names = [c.name for c in sorted(classes, key=lambda c: c.index)]
        return OriginReference("mmdet", f"mmdet's inference_detector ({_versions('mmdet', 'mmengine', 'mmcv-lite')})",
                               mmdet_detect(str(checkpoint.source), config, names), loaded)
    project.detail = (f"this project's eager mmdet-equivalent model in the service's host code; mmdet's own could "
                      f"not run: {reason}")
    return project
