"""Mask R-CNN R50-FPN built from torchvision's detection modules, configured per checkpoint origin.

One implementation serves both checkpoint families. ``InferenceConfig.for_origin`` gives the test
settings the weights were trained with (mmdet's or torchvision's); the differences are confined to
three small pieces named after what they do: the anchor generator, the RoIAlign flavour, and the
RoI level mapping.

``MaskRCNN.forward(images, image_sizes)`` is the exported graph and the eager reference at once:

- ``images``: float32 ``[B, 3, H, W]``, normalised RGB, padded (see ``service.preprocess``).
- ``image_sizes``: int64 ``[B, 2]``, ``(h, w)`` of each image's valid region; boxes are clipped to it.
- returns ``dets`` float32 ``[B, N, 5]`` (x1, y1, x2, y2, score in input pixels), ``labels`` int64
  ``[B, N]`` (class index 0..79, -1 for padding) and ``masks`` float32 ``[B, N, 28, 28]`` (mask
  probability of the predicted class, in the box frame), N = ``detections_per_img``, rows sorted by
  score, padding rows all zero with label -1.

Training (the demo trainer) uses the torchvision sub-modules' own training paths:
``model.backbone``, ``model.rpn(ImageList, features, targets)`` and
``model.roi_heads(features, proposals, image_sizes, targets)``.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import resnet50
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign, batched_nms, roi_align
from torchvision.ops.poolers import _convert_to_roi_format

from service.manifest import COCO_CATEGORY_IDS

Origin = Literal["mmdet", "torchvision"]

# torchvision's detection checkpoints index classes by raw COCO category id (0 = background);
# mmdet's use 0..79 in COCO order with background last. Internally we always put background at 0.
TORCHVISION_NUM_CLASSES = 91
MMDET_NUM_CLASSES = 81


@dataclass(frozen=True)
class InferenceConfig:
    """Test-time settings of one checkpoint origin. Every field is recorded in the manifest."""

    origin: Origin
    num_classes: int  # including background at index 0
    # output class index (0..79, COCO order) of each internal label; -1 for background / unused ids
    label_to_class: tuple[int, ...]
    roi_aligned: bool
    roi_sampling_ratio: int
    anchor_style: Literal["mmdet", "torchvision"]
    bn_eps: float
    mean: tuple[float, float, float]  # RGB, 0..255 scale
    std: tuple[float, float, float]
    resize_scale: tuple[int, int] = (1333, 800)  # (long edge, short edge)
    pad_divisor: int = 32
    rpn_pre_nms_top_n: int = 1000  # per level
    rpn_post_nms_top_n: int = 1000  # per image
    rpn_nms_thresh: float = 0.7
    rpn_min_size: float = 0.0  # proposals need w > min and h > min
    score_thresh: float = 0.05  # detections need score > thresh
    nms_thresh: float = 0.5
    detections_per_img: int = 100
    box_min_size: float = 0.0  # detections need w >= min and h >= min (torchvision: 1e-2)
    mask_threshold: float = 0.5
    notes: tuple[str, ...] = field(default=())

    @staticmethod
    def for_origin(origin: str) -> "InferenceConfig":
        if origin == "mmdet":
            return InferenceConfig(
                origin="mmdet",
                num_classes=MMDET_NUM_CLASSES,
                label_to_class=(-1, *range(80)),
                roi_aligned=True,
                roi_sampling_ratio=0,
                anchor_style="mmdet",
                bn_eps=1e-5,
                mean=(123.675, 116.28, 103.53),
                std=(58.395, 57.12, 57.375),
            )
        if origin == "torchvision":
            class_of_id = {cid: i for i, cid in enumerate(COCO_CATEGORY_IDS)}
            return InferenceConfig(
                origin="torchvision",
                num_classes=TORCHVISION_NUM_CLASSES,
                label_to_class=tuple(class_of_id.get(i, -1) if i else -1 for i in range(91)),
                roi_aligned=False,
                roi_sampling_ratio=2,
                anchor_style="torchvision",
                bn_eps=0.0,
                mean=(0.485 * 255, 0.456 * 255, 0.406 * 255),
                std=(0.229 * 255, 0.224 * 255, 0.225 * 255),
                rpn_min_size=1e-3,
                box_min_size=1e-2,
                notes=(
                    "Host resize uses cv2 bilinear on uint8 before normalisation; torchvision "
                    "resizes the normalised float tensor (torch bilinear).",
                    "Detections of torchvision's 11 unused category ids are dropped.",
                    "Masks are pasted the mmdet way (grid-sample bilinear), not torchvision's "
                    "expand-and-resize.",
                ),
            )
        raise ValueError(f"unknown checkpoint origin {origin!r}; expected 'mmdet' or 'torchvision'")

    def with_overrides(self, **changes) -> "InferenceConfig":
        return replace(self, **changes)


def clip_boxes(boxes: Tensor, size: Tensor) -> Tensor:
    """Clip xyxy ``boxes [..., 4]`` to ``size`` = int64 tensor ``(h, w)``; export-safe (no constants)."""
    h = size[0].to(boxes.dtype)
    w = size[1].to(boxes.dtype)
    x = boxes[..., 0::2].clamp(min=0.0)
    y = boxes[..., 1::2].clamp(min=0.0)
    x = torch.minimum(x, w)
    y = torch.minimum(y, h)
    return torch.stack((x[..., 0], y[..., 0], x[..., 1], y[..., 1]), dim=-1)


class FixedStrideAnchorGenerator(AnchorGenerator):
    """mmdet's anchors: base anchors centred on (0, 0) and NOT rounded, fixed strides per level.

    torchvision rounds base anchors to integers and derives each level's stride by integer division
    of the padded image size, which gives 61 instead of 64 on the pooled level for an 800-high
    input; mmdet uses the nominal strides.
    """

    def __init__(self, sizes, aspect_ratios, strides: tuple[int, ...]):
        super().__init__(sizes, aspect_ratios)
        self.strides = strides

    def generate_anchors(self, scales, aspect_ratios, dtype=torch.float32, device=torch.device("cpu")):
        scales = torch.as_tensor(scales, dtype=dtype, device=device)
        aspect_ratios = torch.as_tensor(aspect_ratios, dtype=dtype, device=device)
        h_ratios = torch.sqrt(aspect_ratios)
        w_ratios = 1 / h_ratios
        ws = (w_ratios[:, None] * scales[None, :]).view(-1)
        hs = (h_ratios[:, None] * scales[None, :]).view(-1)
        return torch.stack([-ws, -hs, ws, hs], dim=1) / 2

    def forward(self, image_list: ImageList, feature_maps: list[Tensor]) -> list[Tensor]:
        dtype, device = feature_maps[0].dtype, feature_maps[0].device
        self.set_cell_anchors(dtype, device)
        per_level = []
        for feature, stride, base in zip(feature_maps, self.strides, self.cell_anchors):
            grid_h, grid_w = feature.shape[-2:]
            shifts_x = torch.arange(0, grid_w, dtype=torch.int32, device=device) * stride
            shifts_y = torch.arange(0, grid_h, dtype=torch.int32, device=device) * stride
            shift_y, shift_x = torch.meshgrid(shifts_y, shifts_x, indexing="ij")
            shift_x, shift_y = shift_x.reshape(-1), shift_y.reshape(-1)
            shifts = torch.stack((shift_x, shift_y, shift_x, shift_y), dim=1).to(dtype)
            per_level.append((shifts.view(-1, 1, 4) + base.view(1, -1, 4)).reshape(-1, 4))
        anchors = torch.cat(per_level)
        return [anchors for _ in range(image_list.tensors.shape[0])]


class LevelMappedRoIAlign(MultiScaleRoIAlign):
    """Multi-level RoIAlign with the aligned flag exposed and an explicit level rule.

    ``finest_scale`` follows mmdet: level = floor(log2(sqrt(area) / finest_scale + 1e-6)) clamped
    to the available levels; torchvision's rule (canonical 224 at level 4) is the same mapping up to
    where the epsilon sits, and is used for torchvision checkpoints.
    """

    def __init__(self, output_size: int, sampling_ratio: int, aligned: bool, rule: Literal["mmdet", "torchvision"]):
        super().__init__(["0", "1", "2", "3"], output_size, sampling_ratio)
        self.aligned = aligned
        self.rule = rule
        self.level_scales = (1 / 4, 1 / 8, 1 / 16, 1 / 32)

    def level_of(self, rois: Tensor) -> Tensor:
        area = (rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2])
        scale = torch.sqrt(area)
        if self.rule == "mmdet":
            levels = torch.floor(torch.log2(scale / 56 + 1e-6))
        else:
            levels = torch.floor(4 + torch.log2(scale / 224) + 1e-6) - 2
        return levels.clamp(min=0, max=len(self.level_scales) - 1).to(torch.int64)

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes=None) -> Tensor:
        features = [x[name] for name in self.featmap_names]
        rois = _convert_to_roi_format(boxes)
        levels = self.level_of(rois)
        pooled, order = [], []
        for level, (feature, scale) in enumerate(zip(features, self.level_scales)):
            idx = torch.where(levels == level)[0]
            pooled.append(roi_align(
                feature,
                rois[idx],
                output_size=self.output_size,
                spatial_scale=scale,
                sampling_ratio=self.sampling_ratio,
                aligned=self.aligned,
            ))
            order.append(idx)
        # Back to RoI order with one gather: ONNX Runtime's ScatterElements (torchvision's export
        # path) costs about 7% of the whole model on CPU, a Gather next to nothing.
        return torch.cat(pooled)[torch.argsort(torch.cat(order))]


class ProposalNetwork(RegionProposalNetwork):
    """torchvision's RPN with proposal filtering that clips to tensor image sizes (export-safe)
    and removes boxes with ``w <= min_size or h <= min_size`` as mmdet does."""

    def filter_proposals(self, proposals, objectness, image_shapes, num_anchors_per_level):
        num_images = proposals.shape[0]
        objectness = objectness.detach().reshape(num_images, -1)
        levels = torch.cat(
            [torch.full((n,), i, dtype=torch.int64, device=proposals.device) for i, n in enumerate(num_anchors_per_level)]
        )
        levels = levels.reshape(1, -1).expand_as(objectness)
        top_n_idx = self._get_top_n_idx(objectness, num_anchors_per_level)
        batch_idx = torch.arange(num_images, device=proposals.device)[:, None]
        objectness = torch.sigmoid(objectness[batch_idx, top_n_idx])
        levels = levels[batch_idx, top_n_idx]
        proposals = proposals[batch_idx, top_n_idx]

        final_boxes, final_scores = [], []
        for boxes, scores, lvl, size in zip(proposals, objectness, levels, image_shapes):
            boxes = clip_boxes(boxes, size)
            wh = boxes[:, 2:] - boxes[:, :2]
            keep = torch.where((wh[:, 0] > self.min_size) & (wh[:, 1] > self.min_size))[0]
            boxes, scores, lvl = boxes[keep], scores[keep], lvl[keep]
            keep = batched_nms(boxes, scores, lvl, self.nms_thresh)[: self.post_nms_top_n()]
            final_boxes.append(boxes[keep])
            final_scores.append(scores[keep])
        return final_boxes, final_scores


class DetectionHeads(RoIHeads):
    """torchvision's RoI heads (training path unchanged) with an export-friendly inference path."""

    def __init__(self, *args, box_min_size: float, label_to_class: tuple[int, ...], **kwargs):
        super().__init__(*args, **kwargs)
        self.box_min_size = box_min_size
        self.register_buffer("label_to_class", torch.tensor(label_to_class, dtype=torch.int64), persistent=False)
        valid = [i for i, c in enumerate(label_to_class) if c >= 0]
        self.register_buffer("scored_labels", torch.tensor(valid, dtype=torch.int64), persistent=False)

    def detect(self, features: dict[str, Tensor], proposals: list[Tensor], image_sizes: Tensor):
        """Per image: (boxes [K,4], scores [K], labels [K] internal, masks [K,28,28] probabilities)."""
        box_features = self.box_head(self.box_roi_pool(features, proposals))
        class_logits, box_regression = self.box_predictor(box_features)
        pred_boxes = self.box_coder.decode(box_regression, proposals)
        pred_scores = F.softmax(class_logits, -1)
        counts = [p.shape[0] for p in proposals]

        results = []
        for i, (boxes, scores) in enumerate(zip(pred_boxes.split(counts), pred_scores.split(counts))):
            boxes = clip_boxes(boxes, image_sizes[i])[:, self.scored_labels]
            scores = scores[:, self.scored_labels]
            labels = self.scored_labels.view(1, -1).expand_as(scores)
            boxes, scores, labels = boxes.reshape(-1, 4), scores.reshape(-1), labels.reshape(-1)
            keep = torch.where(scores > self.score_thresh)[0]
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            if self.box_min_size > 0:
                wh = boxes[:, 2:] - boxes[:, :2]
                keep = torch.where((wh[:, 0] >= self.box_min_size) & (wh[:, 1] >= self.box_min_size))[0]
                boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            keep = batched_nms(boxes, scores, labels, self.nms_thresh)[: self.detections_per_img]
            results.append((boxes[keep], scores[keep], labels[keep]))

        mask_logits = self.mask_predictor(self.mask_head(self.mask_roi_pool(features, [r[0] for r in results])))
        masks_per_image = mask_logits.split([r[0].shape[0] for r in results])
        out = []
        for (boxes, scores, labels), logits in zip(results, masks_per_image):
            index = torch.arange(logits.shape[0], device=labels.device)
            out.append((boxes, scores, labels, logits[index, labels].sigmoid()))
        return out


class MaskRCNN(nn.Module):
    """ResNet-50-FPN Mask R-CNN; see the module docstring for the forward contract."""

    def __init__(self, config: InferenceConfig, norm_layer: type[nn.Module] | None = None):
        super().__init__()
        self.config = config
        if norm_layer is None:
            def norm_layer(channels):
                return FrozenBatchNorm2d(channels, eps=config.bn_eps)
        body = resnet50(weights=None, norm_layer=norm_layer)
        self.backbone = _resnet_fpn_extractor(body, trainable_layers=5)

        sizes = ((32,), (64,), (128,), (256,), (512,))
        ratios = ((0.5, 1.0, 2.0),) * 5
        if config.anchor_style == "mmdet":
            anchors = FixedStrideAnchorGenerator(sizes, ratios, strides=(4, 8, 16, 32, 64))
        else:
            anchors = AnchorGenerator(sizes, ratios)
        self.rpn = ProposalNetwork(
            anchors,
            RPNHead(256, anchors.num_anchors_per_location()[0]),
            fg_iou_thresh=0.7,
            bg_iou_thresh=0.3,
            batch_size_per_image=256,
            positive_fraction=0.5,
            pre_nms_top_n={"training": 2000, "testing": config.rpn_pre_nms_top_n},
            post_nms_top_n={"training": 1000, "testing": config.rpn_post_nms_top_n},
            nms_thresh=config.rpn_nms_thresh,
        )
        self.rpn.min_size = config.rpn_min_size

        rule = "mmdet" if config.origin == "mmdet" else "torchvision"
        self.roi_heads = DetectionHeads(
            LevelMappedRoIAlign(7, config.roi_sampling_ratio, config.roi_aligned, rule),
            TwoMLPHead(256 * 7 * 7, 1024),
            FastRCNNPredictor(1024, config.num_classes),
            fg_iou_thresh=0.5,
            bg_iou_thresh=0.5,
            batch_size_per_image=512,
            positive_fraction=0.25,
            bbox_reg_weights=None,
            score_thresh=config.score_thresh,
            nms_thresh=config.nms_thresh,
            detections_per_img=config.detections_per_img,
            mask_roi_pool=LevelMappedRoIAlign(14, config.roi_sampling_ratio, config.roi_aligned, rule),
            mask_head=MaskRCNNHeads(256, [256, 256, 256, 256], 1),
            mask_predictor=MaskRCNNPredictor(256, 256, config.num_classes),
            box_min_size=config.box_min_size,
            label_to_class=config.label_to_class,
        )

    def features(self, images: Tensor) -> "OrderedDict[str, Tensor]":
        return self.backbone(images)

    def forward(self, images: Tensor, image_sizes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        features = self.features(images)
        sizes = [image_sizes[i] for i in range(images.shape[0])]
        proposals, _ = self.rpn(ImageList(images, sizes), features)
        detections = self.roi_heads.detect(features, proposals, image_sizes)
        n = self.config.detections_per_img
        dets, labels, masks = [], [], []
        for boxes, scores, internal_labels, probs in detections:
            k = boxes.shape[0]
            det = torch.cat((boxes, scores[:, None]), dim=1)
            dets.append(F.pad(det, (0, 0, 0, n - k)))
            cls = self.roi_heads.label_to_class[internal_labels]
            labels.append(F.pad(cls, (0, n - k), value=-1))
            masks.append(F.pad(probs, (0, 0, 0, 0, 0, n - k)))
        return torch.stack(dets), torch.stack(labels), torch.stack(masks)


def build_model(origin: str, **overrides) -> MaskRCNN:
    """A model in eval mode with the test settings of ``origin`` (weights uninitialised/random)."""
    config = InferenceConfig.for_origin(origin).with_overrides(**overrides)
    return MaskRCNN(config).eval()


def init_random_(model: MaskRCNN, seed: int) -> MaskRCNN:
    """Deterministic random weights whose activations stay in a sane range through 50 layers.

    Frozen BN statistics are set so each BN is roughly identity-scaled; with default conv init the
    detector then produces a spread of scores and boxes, which is what export/parity tests need.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * math.sqrt(1.0 / fan_in))
                if module.bias is not None:
                    module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.01)
            elif isinstance(module, FrozenBatchNorm2d):
                module.weight.fill_(1.0)
                module.bias.zero_()
                module.running_mean.zero_()
                module.running_var.fill_(1.0)
        if model.config.origin == "mmdet":
            # mmdet has no background slots in its class-specific layers; a loaded mmdet checkpoint
            # leaves them zero, so random weights do too (they are never read at inference).
            model.roi_heads.box_predictor.bbox_pred.weight[:4] = 0
            model.roi_heads.box_predictor.bbox_pred.bias[:4] = 0
            model.roi_heads.mask_predictor.mask_fcn_logits.weight[:1] = 0
            model.roi_heads.mask_predictor.mask_fcn_logits.bias[:1] = 0
    return model
