"""Mask R-CNN with a ResNet/ResNeXt-FPN backbone, built from torchvision's detection modules and
configured per checkpoint origin.

One implementation serves both checkpoint families. ``InferenceConfig.for_origin`` gives the test
settings the weights were trained with (mmdet's or torchvision's); the differences are confined to
three small pieces named after what they do: the anchor generator, the RoIAlign flavour, and the
RoI level mapping. The backbone is torchvision's ``ResNet(Bottleneck, ...)`` with the depth, groups
and width per group the config records (R-50, R-101, X-101 32x4d / 64x4d), in pytorch style
(stride on the 3x3 conv) or caffe style (stride on the first 1x1 conv). The class count and the
label -> class mapping are the config's too (``build_tools.classes.label_layout``).

``MaskRCNN.forward(images, image_sizes, mask_score_threshold, mask_max_detections)`` is the exported
graph and the eager reference at once:

- ``images``: float32 ``[B, 3, H, W]``, normalised RGB, padded (see ``service.preprocess``).
- ``image_sizes``: int64 ``[B, 2]``, ``(h, w)`` of each image's valid region; boxes are clipped to it.
- ``mask_score_threshold`` float32 ``[B]`` and ``mask_max_detections`` int64 ``[B]`` (optional in
  eager use): which detections get a mask, per image. The mask head runs only on the rows the host
  will return for a request with that score threshold and max detections (``service.postprocess.
  select_valid``: label >= 0, score >= threshold, the first ``max_detections`` of those by score,
  ties in row order); the other rows' masks are zero. Omitted, every detection gets its mask.
- returns ``dets`` float32 ``[B, N, 5]`` (x1, y1, x2, y2, score in input pixels), ``labels`` int64
  ``[B, N]`` (class index 0..C-1 of the manifest's class table, -1 for padding) and ``masks`` float32 ``[B, N, 28, 28]`` (mask
  probability of the predicted class, in the box frame), N = ``detections_per_img``, rows sorted by
  score, padding rows all zero with label -1.

The inference path has no per-image Python loop, so one traced graph serves any batch size: the
candidates of all images are processed together with an image index (one anchor set broadcast over
the batch, per-image sizes for clipping, one NMS with the image as ONNX NonMaxSuppression's batch
dimension, per-image top-k as a rank within the image, RoIs in ``[K, 5]`` format), and the final
detections are scattered into the padded ``[B, N, ...]`` outputs at ``image * N + rank``. Each
image gets exactly what running it alone would give (same candidates, same order, same NMS
inputs), in eager PyTorch and in the exported graph, so an image's detections do not depend on
the batch it is served in.

Training (the demo trainer) uses the torchvision sub-modules' own training paths:
``model.backbone``, ``model.rpn(ImageList, features, targets)`` and
``model.roi_heads(features, proposals, image_sizes, targets)``.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import TypeAdapter
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import (
    RegionProposalNetwork,
    RPNHead,
    concat_box_prediction_layers,
)
from torchvision.models.resnet import Bottleneck, ResNet
from torchvision.ops import (
    FrozenBatchNorm2d,
    MultiScaleRoIAlign,
    batched_nms,
    nms,
    roi_align,
)
from torchvision.ops.poolers import _convert_to_roi_format

from build_tools.classes import label_layout
from service.postprocess import PasteRule
from service.preprocess import InputSpec

Origin = Literal["mmdet", "torchvision"]
Style = Literal["pytorch", "caffe"]

# Bottleneck blocks per stage (layer1..layer4) of each ResNet depth the model builds.
RESNET_LAYERS: dict[int, tuple[int, int, int, int]] = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
# mmdet's caffe-style preprocessing: BGR with mean (103.53, 116.28, 123.675) and std 1. The host
# feeds RGB, so the first conv's input channels are reversed when such weights load, and mean/std
# are the same numbers in RGB order.
CAFFE_MEAN_RGB = (123.675, 116.28, 103.53)
CAFFE_STD = (1.0, 1.0, 1.0)


@dataclass(frozen=True)
class InferenceConfig:
    """Test-time settings and architecture of one checkpoint. Every field is recorded in the manifest.

    Internally background is label 0 (mmdet's files put it last; the loader moves it). The backbone
    is ``ResNet(Bottleneck, RESNET_LAYERS[depth], groups=groups, width_per_group=width_per_group)``:
    R-50/R-101 are groups 1 x width 64, ResNeXt-101 32x4d is 32 x 4, 64x4d is 64 x 4.
    """

    origin: Origin
    num_classes: int  # head outputs, including background at index 0
    # output class index (0..C-1, the manifest's class table) of each internal label; -1 for
    # background and unused slots (torchvision's 11 unused COCO ids)
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
    depth: int = 50  # ResNet depth: a key of RESNET_LAYERS
    groups: int = 1  # conv2 groups of every bottleneck (ResNeXt cardinality)
    width_per_group: int = 64  # conv2 channels per group in layer1 (doubling per stage)
    style: Style = "pytorch"  # "caffe": stride on the first 1x1 conv of a stage (mmdet's caffe ResNet)
    notes: tuple[str, ...] = field(default=())

    @staticmethod
    def for_origin(origin: str, style: str = "pytorch") -> InferenceConfig:
        """``origin``'s test settings for a COCO head on R-50 (``with_overrides`` changes them);
        ``style="caffe"`` (mmdet only) takes caffe-style preprocessing (mean in RGB order, std 1)."""
        if style not in ("pytorch", "caffe"):
            raise ValueError(f"unknown ResNet style {style!r}; expected 'pytorch' or 'caffe'")
        if style == "caffe" and origin != "mmdet":
            raise ValueError("caffe-style ResNet exists only in mmdet checkpoints")
        layout = label_layout(origin, None)
        if origin == "mmdet":
            caffe = style == "caffe"
            return InferenceConfig(
                origin="mmdet",
                num_classes=layout.num_classes,
                label_to_class=layout.label_to_class,
                roi_aligned=True,
                roi_sampling_ratio=0,
                anchor_style="mmdet",
                bn_eps=1e-5,
                mean=CAFFE_MEAN_RGB if caffe else (123.675, 116.28, 103.53),
                std=CAFFE_STD if caffe else (58.395, 57.12, 57.375),
                style=style,
                notes=("Caffe-style weights take BGR input in mmdet; here the first conv's input channels "
                       "are reversed at load, so the host feeds RGB (same arithmetic).",) if caffe else (),
            )
        if origin == "torchvision":
            return InferenceConfig(
                origin="torchvision",
                num_classes=layout.num_classes,
                label_to_class=layout.label_to_class,
                roi_aligned=False,
                roi_sampling_ratio=2,
                anchor_style="torchvision",
                bn_eps=0.0,
                mean=(0.485 * 255, 0.456 * 255, 0.406 * 255),
                std=(0.229 * 255, 0.224 * 255, 0.225 * 255),
                rpn_min_size=1e-3,
                box_min_size=1e-2,
                notes=(
                    "The host resizes the normalised image as torchvision does (floored sides, bilinear), with "
                    "OpenCV: within 5e-4 of torch's values (0.03 grey levels).",
                    "Unused label slots (torchvision's 11 unused COCO category ids) compete in NMS and the top 100 as "
                    "in torchvision; their detections are then dropped (COCO evaluation ignores them).",
                    "Boxes and masks return to the image as torchvision's resize_boxes and paste_masks_in_image "
                    "do (pixels differ only where a value is within float32 rounding of 0.5).",
                ),
            )
        raise ValueError(f"unknown checkpoint origin {origin!r}; expected 'mmdet' or 'torchvision'")

    def with_overrides(self, **changes) -> InferenceConfig:
        return replace(self, **changes)

    @staticmethod
    def from_record(record: Mapping[str, Any]) -> InferenceConfig:
        """The config a manifest's ``inference_config`` (or ``export.json``) records, validated
        (JSON lists back to tuples; fields older records lack take their defaults)."""
        return TypeAdapter(InferenceConfig).validate_python(dict(record))

    def input_spec(self) -> InputSpec:
        """The host preprocessing these settings expect (mean/std in RGB uint8 units, keep-ratio
        resize to ``resize_scale`` = (long, short) edges, padding to ``pad_divisor``), rounded and
        ordered as the origin does: torchvision floors the resized sides and resizes the normalised
        image; mmdet rounds half up and resizes the uint8 image."""
        torchvision = self.origin == "torchvision"
        return InputSpec(mean=self.mean, std=self.std, resize_scale=self.resize_scale, pad_divisor=self.pad_divisor,
                         rounding="floor" if torchvision else "half_up",
                         resize_input="normalized" if torchvision else "uint8")

    @property
    def paste_rule(self) -> PasteRule:
        """How boxes return to original pixels and masks are pasted on the host: the origin's own."""
        return "torchvision" if self.origin == "torchvision" else "mmdet"


def clip_boxes(boxes: Tensor, size: Tensor) -> Tensor:
    """Clip xyxy ``boxes [..., N, 4]`` to ``size`` = int64 ``(h, w)`` of shape ``[..., 2]``: one size
    for all boxes (``[2]``) or one per leading index (``[B, 2]`` for ``[B, N, 4]``); export-safe."""
    hw = size.to(boxes.dtype).unsqueeze(-2)
    h, w = hw[..., 0:1], hw[..., 1:2]
    x = boxes[..., 0::2].clamp(min=0.0)
    y = boxes[..., 1::2].clamp(min=0.0)
    x = torch.minimum(x, w)
    y = torch.minimum(y, h)
    return torch.stack((x[..., 0], y[..., 0], x[..., 1], y[..., 1]), dim=-1)


class _NonMaxSuppression(torch.autograd.Function):
    """ONNX ``NonMaxSuppression`` with its batch dimension: one independent NMS per image.

    ``boxes [B, M, 4]``, ``scores [B, 1, M]``; candidates with score <= ``score_threshold`` take no
    part. Returns ``[S, 3]`` int64 rows ``(image, 0, candidate)``, image-major and in decreasing score
    order within an image, at most ``max_per_image`` per image (the order ONNX Runtime and OpenVINO
    give; ``nms_per_image`` does not rely on the image-major part). Only used while exporting: the
    eager ``forward`` is what the tracer runs to get the example values.
    """

    @staticmethod
    def forward(ctx, boxes: Tensor, scores: Tensor, max_per_image: int, iou_threshold: float,
                score_threshold: float) -> Tensor:
        rows = []
        for b in range(boxes.shape[0]):
            idx = torch.where(scores[b, 0] > score_threshold)[0]
            keep = idx[nms(boxes[b, idx], scores[b, 0, idx], iou_threshold)[:max_per_image]]
            rows.append(torch.stack((torch.full_like(keep, b), torch.zeros_like(keep), keep), dim=1))
        return torch.cat(rows)

    @staticmethod
    def symbolic(g, boxes, scores, max_per_image: int, iou_threshold: float, score_threshold: float):
        return g.op(
            "NonMaxSuppression", boxes, scores,
            g.op("Constant", value_t=torch.tensor([max_per_image], dtype=torch.int64)),
            g.op("Constant", value_t=torch.tensor([iou_threshold], dtype=torch.float32)),
            g.op("Constant", value_t=torch.tensor([score_threshold], dtype=torch.float32)),
        )


def nms_per_image(
    boxes: Tensor, scores: Tensor, groups: Tensor, valid: Tensor, iou_threshold: float, max_per_image: int
) -> tuple[Tensor, Tensor]:
    """Class-aware NMS of every image at once; images never suppress each other.

    ``boxes [B, M, 4]``, ``scores [B, M]`` (>= 0), ``groups [B, M]`` (NMS runs per group within an
    image), ``valid [B, M]`` (candidates that take part). Returns ``(image [S], candidate [S])`` of the
    kept candidates, at most ``max_per_image`` per image, each image's in decreasing score order.

    Within an image this is exactly torchvision's ``batched_nms`` of its valid candidates (eager:
    the call itself, per image, which picks per-group NMS or the coordinate offset trick by size;
    exported: the offset trick that torchvision's traced ``batched_nms`` uses, with each image's own
    maximum coordinate). The image is ONNX NonMaxSuppression's batch dimension rather than part of
    the offset, so the offsets, hence the float rounding of the IoUs, do not grow with the batch and
    an image's result does not depend on the batch it runs in.
    """
    if torch.onnx.is_in_onnx_export():
        masked = torch.where(valid[..., None], boxes, torch.zeros_like(boxes))
        max_coordinate = masked.amax(dim=(1, 2))
        offsets = groups.to(boxes) * (max_coordinate[:, None] + 1)
        scores = torch.where(valid, scores, torch.full_like(scores, -1.0))
        selected = _NonMaxSuppression.apply(boxes + offsets[..., None], scores[:, None], max_per_image,
                                            float(iou_threshold), -0.5)
        return selected[:, 0], selected[:, 2]
    images, candidates = [], []
    for b in range(boxes.shape[0]):
        idx = torch.where(valid[b])[0]
        keep = idx[batched_nms(boxes[b, idx], scores[b, idx], groups[b, idx], iou_threshold)[:max_per_image]]
        images.append(torch.full_like(keep, b))
        candidates.append(keep)
    return torch.cat(images), torch.cat(candidates)


def rank_within_image(image: Tensor, image_ids: Tensor) -> Tensor:
    """Position of each element among the earlier elements of the same image (0, 1, ...);
    ``image_ids`` = ``arange(B)``. A one-hot running count: no per-image loop, any batch size."""
    onehot = (image[:, None] == image_ids[None, :]).to(torch.int64)
    return (onehot.cumsum(0) * onehot).sum(1) - 1


def rows_returned(image: Tensor, scores: Tensor, classes: Tensor, score_threshold: Tensor,
                  max_detections: Tensor) -> Tensor:
    """Which detections the host returns (bool ``[D]``): ``classes >= 0`` and ``scores >=
    score_threshold[image]``, and among those of its image the first ``max_detections[image]`` by
    score, ties broken by row order, exactly as ``service.postprocess.select_valid``'s stable sort
    of the image's rows (which are these rows in this order)."""
    candidate = (classes >= 0) & (scores >= score_threshold[image])
    row = torch.arange(scores.shape[0], device=scores.device)
    ahead = (image[:, None] == image[None, :]) & candidate[None, :] & (
        (scores[None, :] > scores[:, None]) | ((scores[None, :] == scores[:, None]) & (row[None, :] < row[:, None])))
    return candidate & (ahead.sum(1) < max_detections[image])


def scatter_rows(out: Tensor, index: Tensor, rows: Tensor) -> Tensor:
    """``out`` with ``out[index[i]] = rows[i]`` (one ScatterND when exported)."""
    out = out.clone()
    out[index] = rows
    return out


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
        return [anchors for _ in range(len(image_list.image_sizes))]


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
        return self.pool(x, _convert_to_roi_format(boxes))

    def pool(self, x: dict[str, Tensor], rois: Tensor) -> Tensor:
        """RoIAlign of ``rois [K, 5]`` = ``(image index, x1, y1, x2, y2)``, each on its level, in RoI order."""
        pooled, order = self.pool_by_level(x, rois)
        return pooled[torch.argsort(order)]

    def pool_by_level(self, x: dict[str, Tensor], rois: Tensor) -> tuple[Tensor, Tensor]:
        """RoIAlign of ``rois [K, 5]`` grouped by level: ``(pooled [K, C, S, S], order [K])``, row ``j``
        pooled from ``rois[order[j]]`` (by level, then by RoI index). The heads run on the rows in
        this order and put their small results back in RoI order (``argsort(order)``): reordering
        the pooled features themselves (one Gather of K x C x S x S values, and in OpenVINO a layout
        reorder before it) cost 8 % of an int8 engine's time (AMX Xeon, 1000 RoIs)."""
        features = [x[name] for name in self.featmap_names]
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
        return torch.cat(pooled), torch.cat(order)


class ProposalNetwork(RegionProposalNetwork):
    """torchvision's RPN with proposal filtering that clips to tensor image sizes (export-safe)
    and removes boxes with ``w <= min_size or h <= min_size`` as mmdet does.

    ``propose`` is the inference path: every image of the batch at once, with no per-image Python
    loop, so the exported graph serves any batch size. Training goes through torchvision's
    ``forward``, whose ``filter_proposals`` (overridden here) runs the same selection.
    """

    def propose(self, images: Tensor, features: list[Tensor], image_sizes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Proposals of all images: ``(image [K], boxes [K, 4], rank [K])``, image-major, each image's
        by decreasing objectness (``rank`` = position within its image, < ``post_nms_top_n``)."""
        objectness, deltas = self.head(features)
        # one anchor set for the (padded) batch shape, shared by every image
        anchors = self.anchor_generator(ImageList(images, [image_sizes[0]]), features)[0]
        num_anchors_per_level = [o[0].shape[0] * o[0].shape[1] * o[0].shape[2] for o in objectness]
        objectness, deltas = concat_box_prediction_layers(objectness, deltas)
        num_images = images.shape[0]
        deltas = deltas.detach().reshape(num_images, -1, 4)

        def decode(top_n_idx: Tensor) -> Tensor:
            # only the pre-NMS top-k of each level are decoded (~1/60 of the anchors at 800x1333);
            # decoding is per anchor, so the boxes are those of decoding every anchor first
            picked = deltas.gather(1, top_n_idx[..., None].expand(-1, -1, 4)).reshape(-1, 4)
            return self.box_coder.decode_single(picked, anchors[top_n_idx].reshape(-1, 4)).reshape(num_images, -1, 4)

        image, boxes, _ = self.select_proposals(decode, objectness, image_sizes, num_anchors_per_level)
        return image, boxes, rank_within_image(image, torch.arange(num_images, device=image.device))

    def select_proposals(
        self, decode: Callable[[Tensor], Tensor], objectness: Tensor, image_sizes: Tensor, num_anchors_per_level
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Top-k per level, clip, drop small boxes, NMS per level, keep ``post_nms_top_n``; per image.

        ``decode(top_n_idx [B, k]) -> boxes [B, k, 4]`` gives the proposal boxes of the selected anchors,
        ``objectness`` (``B * A`` logits), ``image_sizes [B, 2]``. Returns ``(image [K], boxes [K, 4],
        scores [K])``, image-major, each image's by decreasing score.
        """
        num_images = image_sizes.shape[0]
        objectness = objectness.detach().reshape(num_images, -1)
        levels = torch.cat(
            [torch.full((n,), i, dtype=torch.int64, device=objectness.device) for i, n in enumerate(num_anchors_per_level)]
        )
        top_n_idx = self._get_top_n_idx(objectness, num_anchors_per_level)  # [B, k]
        scores = torch.sigmoid(objectness.gather(1, top_n_idx))
        levels = levels[top_n_idx]
        boxes = clip_boxes(decode(top_n_idx), image_sizes)
        wh = boxes[..., 2:] - boxes[..., :2]
        valid = (wh[..., 0] > self.min_size) & (wh[..., 1] > self.min_size)
        image, candidate = nms_per_image(boxes, scores, levels, valid, self.nms_thresh, self.post_nms_top_n())
        flat = image * boxes.shape[1] + candidate
        return image, boxes.reshape(-1, 4)[flat], scores.reshape(-1)[flat]

    def filter_proposals(self, proposals, objectness, image_shapes, num_anchors_per_level):
        sizes = torch.stack([torch.as_tensor(s, dtype=torch.int64, device=proposals.device) for s in image_shapes])

        def decoded(top_n_idx: Tensor) -> Tensor:
            return proposals.gather(1, top_n_idx[..., None].expand(-1, -1, 4))

        image, boxes, scores = self.select_proposals(decoded, objectness, sizes, num_anchors_per_level)
        counts = torch.bincount(image, minlength=proposals.shape[0]).tolist()
        return list(boxes.split(counts)), list(scores.split(counts))


class DetectionHeads(RoIHeads):
    """torchvision's RoI heads (training path unchanged) with an export-friendly inference path."""

    def __init__(self, *args, box_min_size: float, label_to_class: tuple[int, ...], **kwargs):
        super().__init__(*args, **kwargs)
        self.box_min_size = box_min_size
        self.register_buffer("label_to_class", torch.tensor(label_to_class, dtype=torch.int64), persistent=False)
        # Every foreground slot competes, as in the origin: torchvision scores its 11 unused COCO
        # slots too, so they take places in NMS and the top-k. Such a detection has class -1 and the
        # host drops it, as COCO evaluation ignores a category it has no annotations of.
        foreground = list(range(1, len(label_to_class)))
        self.register_buffer("scored_labels", torch.tensor(foreground, dtype=torch.int64), persistent=False)

    def detect(self, features: dict[str, Tensor], proposals: list[Tensor], image_sizes: Tensor):
        """Per image: (boxes [K,4], scores [K], labels [K] internal, masks [K,28,28] probabilities),
        from per-image proposal lists (the inference path uses ``detect_padded``)."""
        counts = [p.shape[0] for p in proposals]
        device = image_sizes.device
        image = torch.cat([torch.full((n,), i, dtype=torch.int64, device=device) for i, n in enumerate(counts)])
        rank = torch.cat([torch.arange(n, device=device) for n in counts])
        det_image, boxes, scores, labels, probs = self.detections(
            features, image, torch.cat(proposals), rank, image_sizes, max(counts, default=0))
        split = torch.bincount(det_image, minlength=len(proposals)).tolist()
        return list(zip(boxes.split(split), scores.split(split), labels.split(split), probs.split(split)))

    def detect_padded(
        self, features: dict[str, Tensor], image: Tensor, proposals: Tensor, rank: Tensor, image_sizes: Tensor,
        slots_per_image: int, mask_selection: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Detections of all images at once, padded: ``dets [B, N, 5]``, ``labels [B, N]`` (output
        class index, -1 = padding), ``masks [B, N, 28, 28]``, N = ``detections_per_img``; each
        image's rows at ``image * N + rank`` (rank = position by score within the image).
        ``mask_selection``: ``(score_threshold [B], max_detections [B])`` of :func:`rows_returned`,
        or None for a mask on every row."""
        num_images = image_sizes.shape[0]
        det_image, det_boxes, det_scores, det_labels, probs = self.detections(
            features, image, proposals, rank, image_sizes, slots_per_image, mask_selection)
        n = self.detections_per_img
        mask_hw = tuple(int(v) for v in probs.shape[1:])  # 28 x 28 by architecture: static in the graph
        out = det_image * n + rank_within_image(det_image, torch.arange(num_images, device=image.device))
        dets = scatter_rows(det_boxes.new_zeros((num_images * n, 5)), out,
                            torch.cat((det_boxes, det_scores[:, None]), dim=1))
        classes = scatter_rows(det_labels.new_full((num_images * n,), -1), out, self.label_to_class[det_labels])
        masks = scatter_rows(probs.new_zeros((num_images * n, *mask_hw)), out, probs)
        return dets.reshape(-1, n, 5), classes.reshape(-1, n), masks.reshape(-1, n, *mask_hw)

    def detections(
        self, features: dict[str, Tensor], image: Tensor, proposals: Tensor, rank: Tensor, image_sizes: Tensor,
        slots_per_image: int, mask_selection: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Box head, per-image class-aware NMS and mask head for the proposals of all images.

        ``image [K]``, ``proposals [K, 4]`` and ``rank [K]`` (position within its image, below
        ``slots_per_image``) as ``ProposalNetwork.propose`` gives them. Each image's (proposal, class)
        candidates are laid out densely as ``[B, slots_per_image * classes]`` (unused slots invalid)
        for the per-image NMS, in the order the per-image code had them, so ties break the same way.
        Returns ``(image [D], boxes [D, 4], scores [D], internal labels [D], mask probabilities
        [D, 28, 28])``, at most ``detections_per_img`` per image, each image's by decreasing score;
        with ``mask_selection`` (see :meth:`detect_padded`) the mask head runs only on the rows
        :func:`rows_returned` selects, and the others' masks are zero.
        """
        num_images = image_sizes.shape[0]
        rois = torch.cat((image.to(proposals.dtype)[:, None], proposals), dim=1)
        pooled, order = self.box_roi_pool.pool_by_level(features, rois)
        class_logits, box_regression = self.box_predictor(self.box_head(pooled))
        back = torch.argsort(order)  # RoI order again: a gather of the logits and deltas
        class_logits, box_regression = class_logits[back], box_regression[back]
        boxes = self.box_coder.decode(box_regression, [proposals])
        boxes = clip_boxes(boxes, image_sizes[image])[:, self.scored_labels]  # [K, C, 4]
        scores = F.softmax(class_logits, -1)[:, self.scored_labels]  # [K, C]
        num_classes = scores.shape[1]

        slot = image * slots_per_image + rank
        dense_boxes = scatter_rows(boxes.new_zeros((num_images * slots_per_image, num_classes, 4)), slot, boxes)
        dense_scores = scatter_rows(scores.new_full((num_images * slots_per_image, num_classes), -1.0), slot, scores)
        dense_boxes = dense_boxes.reshape(num_images, -1, 4)
        dense_scores = dense_scores.reshape(num_images, -1)
        labels = self.scored_labels.repeat(slots_per_image)[None].expand_as(dense_scores)
        valid = dense_scores > self.score_thresh
        if self.box_min_size > 0:
            wh = dense_boxes[..., 2:] - dense_boxes[..., :2]
            valid = valid & (wh[..., 0] >= self.box_min_size) & (wh[..., 1] >= self.box_min_size)
        det_image, candidate = nms_per_image(dense_boxes, dense_scores, labels, valid, self.nms_thresh,
                                             self.detections_per_img)
        flat = det_image * dense_scores.shape[1] + candidate
        det_boxes = dense_boxes.reshape(-1, 4)[flat]
        det_scores = dense_scores.reshape(-1)[flat]
        det_labels = labels.reshape(-1)[flat]

        if mask_selection is None:
            return det_image, det_boxes, det_scores, det_labels, self.mask_probabilities(
                features, det_image, det_boxes, det_labels)
        returned = rows_returned(det_image, det_scores, self.label_to_class[det_labels], *mask_selection)
        rows = torch.nonzero(returned)[:, 0]
        probs = self.mask_probabilities(features, det_image[rows], det_boxes[rows], det_labels[rows])
        mask_hw = tuple(int(v) for v in probs.shape[1:])
        return det_image, det_boxes, det_scores, det_labels, scatter_rows(
            probs.new_zeros((det_scores.shape[0], *mask_hw)), rows, probs)

    def mask_probabilities(self, features: dict[str, Tensor], image: Tensor, boxes: Tensor, labels: Tensor) -> Tensor:
        """Mask head on ``boxes [K, 4]`` of images ``image [K]``: ``[K, 28, 28]`` probabilities of ``labels``."""
        mask_rois = torch.cat((image.to(boxes.dtype)[:, None], boxes), dim=1)
        pooled, order = self.mask_roi_pool.pool_by_level(features, mask_rois)
        mask_logits = self.mask_predictor(self.mask_head(pooled))
        index = torch.arange(mask_logits.shape[0], device=labels.device)
        # each row's own label's mask, then RoI order again: a gather of [K, 28, 28]
        return mask_logits[index, labels[order]].sigmoid()[torch.argsort(order)]


class MaskRCNN(nn.Module):
    """ResNet/ResNeXt-FPN Mask R-CNN of ``config``; see the module docstring for the forward contract."""

    def __init__(self, config: InferenceConfig, norm_layer: type[nn.Module] | None = None):
        super().__init__()
        self.config = config
        if norm_layer is None:
            def norm_layer(channels):
                return FrozenBatchNorm2d(channels, eps=config.bn_eps)
        self.backbone = _resnet_fpn_extractor(resnet_body(config, norm_layer), trainable_layers=5)

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

    def features(self, images: Tensor) -> OrderedDict[str, Tensor]:
        return self.backbone(images)

    def forward(self, images: Tensor, image_sizes: Tensor, mask_score_threshold: Tensor | None = None,
                mask_max_detections: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        features = self.features(images)
        image, proposals, rank = self.rpn.propose(images, list(features.values()), image_sizes)
        selection = None if mask_score_threshold is None else (mask_score_threshold, mask_max_detections)
        return self.roi_heads.detect_padded(features, image, proposals, rank, image_sizes,
                                            self.rpn.post_nms_top_n(), selection)


def resnet_body(config: InferenceConfig, norm_layer) -> ResNet:
    """torchvision's ResNet of ``config``'s depth, groups and width per group; in caffe style the
    stride of each stage's first block moves from its 3x3 conv to its first 1x1 conv."""
    if config.depth not in RESNET_LAYERS:
        raise ValueError(f"no ResNet of depth {config.depth}; known depths: {', '.join(map(str, RESNET_LAYERS))}")
    body = ResNet(Bottleneck, list(RESNET_LAYERS[config.depth]), groups=config.groups,
                  width_per_group=config.width_per_group, norm_layer=norm_layer)
    if config.style == "caffe":
        for stage in (body.layer2, body.layer3, body.layer4):
            first = stage[0]
            first.conv1.stride, first.conv2.stride = first.conv2.stride, first.conv1.stride
    return body


def build_model(origin: str, style: str = "pytorch", **overrides) -> MaskRCNN:
    """A model in eval mode with the test settings of ``origin`` in ``style`` and ``overrides``
    (``InferenceConfig`` fields), weights uninitialised."""
    return MaskRCNN(InferenceConfig.for_origin(origin, style).with_overrides(**overrides)).eval()


def init_random_(model: MaskRCNN, seed: int) -> MaskRCNN:
    """Deterministic random weights whose activations stay in a sane range through 50-101 layers.

    Frozen BN statistics are set so each BN is roughly identity-scaled; with default conv init the
    detector then produces a spread of scores and boxes, which is what export/parity tests need.
    Each residual branch adds its variance to the stage's, so a stage deeper than R-50's has its
    branches' last BN scaled by sqrt(R-50 blocks / blocks): its output spread stays R-50's (deeper
    R-101 stages otherwise give 4x larger features and degenerate boxes). R-50 is left as is.
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
        body = model.backbone.body
        for stage, r50_blocks in zip((body.layer1, body.layer2, body.layer3, body.layer4), RESNET_LAYERS[50]):
            for block in stage:
                block.bn3.weight.mul_(min(1.0, math.sqrt(r50_blocks / len(stage))))
        if model.config.origin == "mmdet":
            # mmdet has no background slots in its class-specific layers; a loaded mmdet checkpoint
            # leaves them zero, so random weights do too (they are never read at inference).
            model.roi_heads.box_predictor.bbox_pred.weight[:4] = 0
            model.roi_heads.box_predictor.bbox_pred.bias[:4] = 0
            model.roi_heads.mask_predictor.mask_fcn_logits.weight[:1] = 0
            model.roi_heads.mask_predictor.mask_fcn_logits.bias[:1] = 0
    return model
