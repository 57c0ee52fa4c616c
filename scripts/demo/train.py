"""`maskrcnn-demo train`: train the project's Mask R-CNN R50-FPN from scratch on the synthetic data.

No pretrained weights can be fetched where this project is developed, so the demo model that
accuracy is measured with is trained here, from scratch, on CPU. A run is bounded by wall time
(``--minutes``, default 55) as well as by iterations: the learning-rate schedule and the BN freeze
follow the run's progress, the larger of the fraction of iterations done and of minutes spent, so a
time-bounded run still ends with a decayed learning rate on the function the service computes.

- The architecture is exactly ``build_tools.model.MaskRCNN`` with mmdet's settings and a head for
  the dataset's own categories (the demo data's 3 classes: 3 + background outputs, background at
  internal label 0; the dataset's category of index ``i`` in id order has label ``i + 1``). Its
  BN layers train as batch renormalisation (:class:`BatchRenorm2d`, Ioffe 2017): the forward pass
  normalises with the running statistics (a batch's own statistics enter only through the
  gradient and through corrections clipped to ``renorm_r_max``/``renorm_d_max``), so the function
  trained is the one the service computes with ``FrozenBatchNorm2d``. The running statistics
  start as averages over ``bn_calibration_batches`` batches of the initial network. Measured on
  this data: with ordinary BN (batch statistics of two crops) the network came to depend on them
  (after 160 steps classifier and mask losses 0.49 and 0.41 with batch statistics, 0.99 and 1.15
  with running ones) and fell back to chance when the statistics were frozen later in the run
  (at 25 % or 60 %); with statistics frozen from the first step (a plain affine per channel, no
  normalisation) it did not learn to localise within 450 steps (every detection scored about 0.4,
  box AP 0.0). The final weights and statistics are copied into the ``FrozenBatchNorm2d`` model the
  service uses (:func:`to_inference_model`) and written as an mmdetection checkpoint whose meta
  names the classes (``dataset_meta.classes``), so ``maskrcnn-build`` reads the class table from it
  and evaluation exercises the real loading path.
- The recipe: SGD with momentum 0.9, learning rate 0.02 reached by a linear warm-up, then a
  cosine decay over the run's progress; weight decay 1e-4; batch 2 crops of 256 x 256 pixels.
- Object scale is the test scale: every image is resized exactly as the service does
  (``service.preprocess.prepare_image``, keep ratio to 1333x800), then a random ``crop`` x ``crop``
  window, usually placed on an object, is cut out and flipped at random. Small crops keep an
  iteration cheap without teaching the network a scale it never sees at test time.
- Training-only changes, none of which alters the exported graph: the RPN and RoI heads sample
  ``rpn_samples`` anchors and ``roi_samples`` RoIs per image instead of 256 and 512 (a crop holds
  an object or two, and a head trained from scratch among hundreds of negatives per positive
  learns to call everything background), the last BN of every residual block starts at zero
  (standard for training from scratch), and the forward pass may run in bfloat16 autocast
  (``precision="bf16"``, faster on CPUs with AVX512-BF16; weights, BN statistics and losses stay
  float32).

Resumable: the training state (model, optimizer, iteration, training seconds so far, torch RNG,
settings) is written every ``save_every`` iterations and when SIGINT or SIGTERM arrives, next to
the output as ``<out stem>.state.pth``. The data a given iteration sees is a pure function of
``(seed, iteration)``, so a resumed run draws the same crops it would have drawn without the
interruption (with ``minutes`` set, where the schedule stands also depends on the time spent).

Cached: a finished run records its cache key beside the checkpoint (``scripts.demo.model_cache``);
a later ``train`` with the same code, data and settings finds it and does not train again.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import cv2
import numpy as np
import torch
from pycocotools.coco import COCO
from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList
from torchvision.models.resnet import Bottleneck
from tqdm import tqdm

from build_tools import coco_eval
from build_tools.checkpoint import save_mmdet_checkpoint
from build_tools.classes import label_layout
from build_tools.images import read_rgb
from build_tools.model import InferenceConfig, MaskRCNN, build_model
from scripts.demo import model_cache
from service.preprocess import prepare_image

ORIGIN = "mmdet"
# Batches the initial BN statistics are measured on are numbered from here (training batches
# are numbered by iteration, so these never repeat one).
CALIBRATION_BATCHES_FROM = 10**9
LOSS_NAMES = ("loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask")


class TrainError(Exception):
    """A training request that cannot be carried out (bad data folder, missing state to resume);
    the CLI reports it as a usage error (exit status 2)."""


@dataclass(frozen=True)
class TrainSettings:
    """Everything that decides a training run; stored in the training state.

    - ``iterations``: most optimizer steps; ``minutes``: most wall-clock minutes spent training
      (None: no time bound). The run ends at whichever comes first; its progress (0..1) is the
      larger of the two fractions done, and the schedule below follows it.
    - ``batch_size``: crops per step; ``crop``: side of the square training window, pixels of the
      test-scale (resized) image.
    - ``lr``: SGD peak learning rate (momentum ``momentum``, weight decay ``weight_decay``), reached
      after ``warmup`` steps by a linear ramp from ``lr / 1000``, then following a cosine over the
      run's progress down to ``lr * final_lr_fraction``.
    - ``clip_norm``: gradients are clipped to this global L2 norm.
    - ``object_crop_probability``: chance a crop is placed on a random object rather than anywhere.
    - ``min_visible_fraction``: an object cut by the crop is kept as a target only when at least
      this fraction of its pixels is inside; smaller pieces are left unlabelled.
    - ``roi_samples``, ``rpn_samples``: RoIs (anchors) sampled per image for the box and mask (RPN)
      losses, at most a quarter (half) of them positive. Fewer than the 512 (256) of a
      pretrained-backbone schedule: a crop holds one or two objects, and with hundreds of
      negatives per positive a head trained from scratch settles on "background everywhere".
    - ``freeze_bn_fraction``: at this progress the BN statistics are measured afresh on
      ``bn_calibration_batches`` batches and frozen (see :func:`freeze_batch_norm_`); 1 (the
      default) never freezes them: batch renormalisation already trains on running statistics.
    - ``renorm_r_max``, ``renorm_d_max``, ``renorm_warmup``, ``renorm_momentum``: batch
      renormalisation's clipping of the scale and shift corrections (ramped linearly from 1 and 0
      over ``renorm_warmup`` steps, as the paper does) and the running statistics' momentum.
    - ``box_head_lr_factor``: the box head's FCs and predictor learn at ``lr`` times this (the default
      0.125 makes 0.0025, mmdet's 0.02 for batch 16 scaled to batch 2). At the full rate, fc7's ReLU
      units died during the warm-up's last steps and the peak (alive on a batch of RoIs: 98 % at
      step 80, 23 % at 200, 10 % at 240; a run ended with 6 % alive and box AP 0.012), while the
      backbone, RPN and mask head learned.
    - ``precision``: ``"bf16"`` runs the forward pass in bfloat16 autocast, ``"fp32"`` does not.
    """

    iterations: int = 20000
    minutes: float | None = 55.0
    batch_size: int = 2
    crop: int = 256
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup: int = 100
    final_lr_fraction: float = 0.01
    clip_norm: float = 10.0
    seed: int = 0
    save_every: int = 50
    object_crop_probability: float = 0.9
    min_visible_fraction: float = 0.3
    roi_samples: int = 64
    rpn_samples: int = 128
    freeze_bn_fraction: float = 1.0
    renorm_r_max: float = 3.0
    renorm_d_max: float = 5.0
    renorm_warmup: int = 500
    renorm_momentum: float = 0.02
    bn_calibration_batches: int = 30
    box_head_lr_factor: float = 0.125
    precision: str = "fp32"

    def __post_init__(self) -> None:
        positive = ("iterations", "batch_size", "crop", "save_every", "roi_samples", "rpn_samples",
                    "bn_calibration_batches")
        for name in positive:
            if getattr(self, name) < 1:
                raise TrainError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.minutes is not None and not self.minutes > 0:
            raise TrainError(f"minutes must be > 0 (or None: no time bound), got {self.minutes}")
        if not 0.0 <= self.freeze_bn_fraction <= 1.0:
            raise TrainError(f"freeze_bn_fraction must be in [0, 1], got {self.freeze_bn_fraction}")
        if self.renorm_r_max < 1.0 or self.renorm_d_max < 0.0 or not 0.0 < self.renorm_momentum <= 1.0:
            raise TrainError(f"batch renormalisation needs r_max >= 1, d_max >= 0 and 0 < momentum <= 1, got "
                             f"{self.renorm_r_max}, {self.renorm_d_max}, {self.renorm_momentum}")
        if not 0.0 < self.box_head_lr_factor <= 1.0:
            raise TrainError(f"box_head_lr_factor must be in (0, 1], got {self.box_head_lr_factor}")
        if not self.lr > 0:
            raise TrainError(f"lr must be > 0, got {self.lr}")
        if self.precision not in ("fp32", "bf16"):
            raise TrainError(f"precision must be fp32 or bf16, got {self.precision!r}")

    def progress(self, iteration: int, seconds: float) -> float:
        """How far a run is (0..1, 1 = done) after ``iteration`` steps and ``seconds`` of training."""
        by_time = seconds / (60.0 * self.minutes) if self.minutes is not None else 0.0
        return min(max(iteration / self.iterations, by_time), 1.0)

    def lr_at(self, iteration: int, progress: float) -> float:
        """Learning rate of step ``iteration`` (0-based) taken at run ``progress`` (0..1)."""
        if iteration < self.warmup:
            return self.lr * (0.001 + 0.999 * iteration / self.warmup)
        floor = self.lr * self.final_lr_fraction
        return floor + (self.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class Batch:
    """One training step's input.

    - ``images``: float32 ``[B, 3, crop, crop]``, normalised RGB, zero outside each valid region.
    - ``image_sizes``: B int64 ``(h, w)`` tensors, the valid region of each crop.
    - ``targets``: B dicts: ``boxes`` float32 ``[K, 4]`` (x1, y1, x2, y2 in crop pixels, x2 one
      past the last column), ``labels`` int64 ``[K]`` (internal labels, 1..C), ``masks`` uint8
      ``[K, crop, crop]``.
    """

    images: Tensor
    image_sizes: list[Tensor]
    targets: list[dict[str, Tensor]]


def dataset_classes(coco: COCO) -> tuple[tuple[int, str], ...]:
    """``(category id, name)`` of a dataset's categories in id order: the model's classes, class
    index ``i`` being internal label ``i + 1``."""
    return tuple((c["id"], c["name"]) for c in sorted(coco.loadCats(coco.getCatIds()), key=lambda c: c["id"]))


def internal_label_of_category(classes: Sequence[tuple[int, str]]) -> dict[int, int]:
    """Category id -> the model's internal label (background is 0) of ``dataset_classes``."""
    return {category_id: index + 1 for index, (category_id, _) in enumerate(classes)}


def load_coco(annotation_file: Path) -> COCO:
    """A pycocotools index of ``annotation_file``, without its chatter on stdout."""
    if not annotation_file.is_file():
        raise TrainError(f"annotation file {annotation_file} not found (make data with `maskrcnn-demo data`)")
    return coco_eval.load_coco(annotation_file)


def tight_boxes(masks: np.ndarray) -> np.ndarray:
    """float32 ``[K, 4]`` tight ``x1, y1, x2, y2`` of bool/uint8 ``[K, H, W]`` masks (x2, y2 one
    past the last set column/row; all zero for an empty mask)."""
    boxes = np.zeros((len(masks), 4), np.float32)
    for k, mask in enumerate(masks):
        rows = np.flatnonzero(mask.any(axis=1))
        cols = np.flatnonzero(mask.any(axis=0))
        if rows.size:
            boxes[k] = (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
    return boxes


def _window_start(rng: np.random.Generator, low: float, high: float, size: int, crop: int) -> int:
    """Start of a ``crop``-long window inside ``[0, size)`` that holds ``[low, high)`` when it fits,
    and lies inside it when it does not."""
    first, last = (high - crop, low) if high - low <= crop else (low, high - crop)
    limit = max(size - crop, 0)
    first, last = int(np.clip(math.ceil(first), 0, limit)), int(np.clip(math.floor(last), 0, limit))
    return int(rng.integers(first, max(first, last) + 1))


class TrainingCrops:
    """A COCO-layout split as test-scale training crops.

    ``batch(iteration, batch_size)`` is a pure function of ``(seed, iteration)``: resuming a run
    needs no data-loader state.
    """

    def __init__(self, data_dir: str | Path, split: str, config: InferenceConfig, settings: TrainSettings):
        data_dir = Path(data_dir)
        self.coco = load_coco(data_dir / "annotations" / f"instances_{split}.json")
        self.image_dir = data_dir / split
        self.image_ids = sorted(self.coco.getImgIds())
        if not self.image_ids:
            raise TrainError(f"{data_dir} split {split!r} has no images")
        self.classes = dataset_classes(self.coco)
        self.spec = config.input_spec()
        self.label_of = internal_label_of_category(self.classes)
        self.settings = settings

    def load(self, image_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Image ``image_id`` at test scale: normalised float32 ``[3, h, w]``, its instance masks
        uint8 ``[K, h, w]`` (resized nearest-neighbour, as mmdet resizes masks) and internal labels
        int64 ``[K]``."""
        info = self.coco.imgs[image_id]
        prepared = prepare_image(read_rgb(self.image_dir / info["file_name"]), self.spec)
        h, w = prepared.resized_hw
        annotations = self.coco.imgToAnns[image_id]
        masks = np.zeros((len(annotations), h, w), np.uint8)
        for k, annotation in enumerate(annotations):
            masks[k] = cv2.resize(self.coco.annToMask(annotation), (w, h), interpolation=cv2.INTER_NEAREST)
        labels = np.array([self.label_of[a["category_id"]] for a in annotations], np.int64)
        return prepared.tensor, masks, labels

    def sample(self, rng: np.random.Generator) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """One random crop: (image ``[3, crop, crop]``, valid ``(h, w)``, target dict)."""
        s, crop = self.settings, self.settings.crop
        image, masks, labels = self.load(self.image_ids[int(rng.integers(len(self.image_ids)))])
        _, h, w = image.shape
        boxes = tight_boxes(masks)
        if len(boxes) and rng.random() < s.object_crop_probability:
            x1, y1, x2, y2 = boxes[int(rng.integers(len(boxes)))]
            top, left = _window_start(rng, y1, y2, h, crop), _window_start(rng, x1, x2, w, crop)
        else:
            top, left = int(rng.integers(max(h - crop, 0) + 1)), int(rng.integers(max(w - crop, 0) + 1))
        window = (slice(top, top + crop), slice(left, left + crop))
        image, cropped = image[:, window[0], window[1]], masks[:, window[0], window[1]]
        valid_h, valid_w = image.shape[1:]
        visible = cropped.reshape(len(cropped), -1).sum(axis=1)
        keep = (visible > 0) & (visible >= s.min_visible_fraction * masks.reshape(len(masks), -1).sum(axis=1))
        cropped, labels = cropped[keep], labels[keep]
        if rng.random() < 0.5:
            image, cropped = image[:, :, ::-1], cropped[:, :, ::-1]
        padded_image = np.zeros((3, crop, crop), np.float32)
        padded_image[:, :valid_h, :valid_w] = image
        padded_masks = np.zeros((len(cropped), crop, crop), np.uint8)
        padded_masks[:, :valid_h, :valid_w] = cropped
        target = {
            "boxes": torch.from_numpy(tight_boxes(padded_masks)),
            "labels": torch.from_numpy(labels),
            "masks": torch.from_numpy(padded_masks),
        }
        return torch.from_numpy(padded_image), torch.tensor([valid_h, valid_w]), target

    def batch(self, iteration: int, batch_size: int) -> Batch:
        rng = np.random.default_rng([self.settings.seed, iteration])
        samples = [self.sample(rng) for _ in range(batch_size)]
        return Batch(
            images=torch.stack([image for image, _, _ in samples]),
            image_sizes=[size for _, size, _ in samples],
            targets=[target for _, _, target in samples],
        )


class BatchRenorm2d(nn.BatchNorm2d):
    """Batch renormalisation (Ioffe 2017) with ``nn.BatchNorm2d``'s parameters and buffers.

    In training, ``x_hat = (x - mean_B) / std_B * r + d`` with ``r = std_B / std_run`` clipped to
    ``[1 / r_max, r_max]`` and ``d = (mean_B - mean_run) / std_run`` clipped to ``[-d_max, d_max]``,
    both without gradient: unclipped, the forward value is ``(x - mean_run) / std_run``, what eval
    mode (and the service's ``FrozenBatchNorm2d``) computes, while the gradient still sees the
    batch's statistics. ``r_max = 1, d_max = 0`` is ordinary BN. Eval mode is ``nn.BatchNorm2d``'s.
    """

    r_max: float = 1.0
    d_max: float = 0.0

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return super().forward(x)
        mean = x.mean(dim=(0, 2, 3))
        var = x.var(dim=(0, 2, 3), unbiased=False)
        std = (var + self.eps).sqrt()
        with torch.no_grad():
            running_std = (self.running_var + self.eps).sqrt()
            r = (std / running_std).clamp(1.0 / self.r_max, self.r_max)
            d = ((mean - self.running_mean) / running_std).clamp(-self.d_max, self.d_max)
            n = x.numel() / x.shape[1]
            self.running_mean.lerp_(mean.float(), self.momentum)
            self.running_var.lerp_(var.float() * n / max(n - 1, 1), self.momentum)
            self.num_batches_tracked += 1
        scale = (r / std) * self.weight
        shift = self.bias + (d - mean / std * r) * self.weight
        return x * scale[None, :, None, None] + shift[None, :, None, None]


def set_renorm_limits(model: nn.Module, settings: TrainSettings, iteration: int) -> tuple[float, float]:
    """Batch renormalisation's clipping at ``iteration``: ramped linearly from (1, 0) to
    (``renorm_r_max``, ``renorm_d_max``) over ``renorm_warmup`` steps. Returns ``(r_max, d_max)``."""
    ramp = min(1.0, iteration / max(settings.renorm_warmup, 1))
    r_max = 1.0 + (settings.renorm_r_max - 1.0) * ramp
    d_max = settings.renorm_d_max * ramp
    for module in model.modules():
        if isinstance(module, BatchRenorm2d):
            module.r_max, module.d_max = r_max, d_max
    return r_max, d_max


def measure_batch_norm_(model: MaskRCNN, batches: Iterable[Batch]) -> None:
    """Set the BN running statistics to plain averages over ``batches`` of the network as it is
    (no freezing): the starting point of batch renormalisation's running statistics."""
    norms = _batch_norms(model)
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    model.train()
    with torch.no_grad():
        for batch in batches:
            _cumulative_backbone_pass(model, batch)
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum


def _cumulative_backbone_pass(model: MaskRCNN, batch: Batch) -> None:
    """One backbone pass whose BN layers add this batch's statistics to a cumulative average
    (``momentum=None``: ``nn.BatchNorm2d``'s own rule)."""
    norms = _batch_norms(model)
    with _plain_batch_norm(norms):
        model.backbone(batch.images)


@contextlib.contextmanager
def _plain_batch_norm(norms: Sequence[nn.BatchNorm2d]):
    """Inside the block every BN layer runs ``nn.BatchNorm2d.forward`` (batch statistics, its own
    running-statistics update), also the :class:`BatchRenorm2d` ones."""
    renorms = [n for n in norms if isinstance(n, BatchRenorm2d)]
    for n in renorms:
        n.forward = functools.partial(nn.BatchNorm2d.forward, n)
    try:
        yield
    finally:
        for n in renorms:
            del n.forward


def build_training_model(settings: TrainSettings, class_names: Sequence[str]) -> MaskRCNN:
    """The mmdet-configured Mask R-CNN with a head for ``class_names`` (plus background) and
    trainable ``BatchNorm2d``, seeded by ``settings.seed``, in train mode."""
    layout = label_layout(ORIGIN, class_names)
    config = InferenceConfig.for_origin(ORIGIN).with_overrides(
        num_classes=layout.num_classes, label_to_class=layout.label_to_class)
    torch.manual_seed(settings.seed)
    model = MaskRCNN(config, norm_layer=functools.partial(BatchRenorm2d, eps=config.bn_eps,
                                                          momentum=settings.renorm_momentum))
    for module in model.modules():
        if isinstance(module, Bottleneck):
            # Each residual block starts as the identity: a 50-layer network trains from scratch.
            nn.init.zeros_(module.bn3.weight)
    init_box_head_as_mmdet_(model)
    model.roi_heads.fg_bg_sampler.batch_size_per_image = settings.roi_samples
    model.rpn.fg_bg_sampler.batch_size_per_image = settings.rpn_samples
    return model.train()


def init_box_head_as_mmdet_(model: MaskRCNN) -> None:
    """Initialise the box head as mmdet's ``Shared2FCBBoxHead`` does (Xavier-uniform shared FCs
    with zero bias, ``fc_cls`` normal std 0.01, ``fc_reg`` normal std 0.001, zero biases) instead
    of ``nn.Linear``'s default.

    The model is mmdet's, so its head starts as mmdet trains it. This alone did not keep fc7's
    ReLU units alive at the full learning rate (23 % alive at step 200, against 959 of 1024 dead at
    the end of a run with the default initialisation); ``box_head_lr_factor`` does."""
    head, predictor = model.roi_heads.box_head, model.roi_heads.box_predictor
    for fc in (head.fc6, head.fc7):
        nn.init.xavier_uniform_(fc.weight)
        nn.init.zeros_(fc.bias)
    nn.init.normal_(predictor.cls_score.weight, std=0.01)
    nn.init.normal_(predictor.bbox_pred.weight, std=0.001)
    nn.init.zeros_(predictor.cls_score.bias)
    nn.init.zeros_(predictor.bbox_pred.bias)


def parameter_groups(model: MaskRCNN, settings: TrainSettings) -> list[dict]:
    """SGD parameter groups: the box head (FCs and predictor) at ``box_head_lr_factor`` of the
    learning rate, everything else at the full rate (each group's ``lr_factor``)."""
    head = [*model.roi_heads.box_head.parameters(), *model.roi_heads.box_predictor.parameters()]
    ids = {id(p) for p in head}
    rest = [p for p in model.parameters() if id(p) not in ids]
    return [{"params": rest, "lr_factor": 1.0}, {"params": head, "lr_factor": settings.box_head_lr_factor}]


class AliveUnits:
    """Watches the box head's fc7: ``fraction`` is the share of its ReLU units positive on at least
    one RoI of the last training step (a dying head shows here first); a forward hook, no extra pass."""

    def __init__(self, model: MaskRCNN) -> None:
        self.fraction = float("nan")
        self._hook = model.roi_heads.box_head.fc7.register_forward_hook(self._record)

    def _record(self, _module: nn.Module, _inputs, output: Tensor) -> None:
        self.fraction = float((output.detach() > 0).any(dim=0).float().mean())

    def remove(self) -> None:
        self._hook.remove()


def _batch_norms(model: nn.Module) -> list[nn.BatchNorm2d]:
    return [module for module in model.modules() if isinstance(module, nn.BatchNorm2d)]


def set_training_mode(model: MaskRCNN, bn_frozen: bool) -> None:
    """Train mode for the losses; with ``bn_frozen`` the BN layers normalise with their running
    statistics (and stop updating them) while their scale and shift still learn."""
    model.train()
    for norm in _batch_norms(model) if bn_frozen else ():
        norm.eval()


def freeze_batch_norm_(model: MaskRCNN, batches: Iterable[Batch]) -> None:
    """Measure the BN statistics as plain averages over ``batches`` (fp32), then freeze them.

    Why: trained with the statistics of two crops at a time, the network comes to rely on them,
    and with running statistics instead its RPN ranks large boxes first; the service's
    ``FrozenBatchNorm2d`` model then finds almost nothing. Training on with frozen statistics
    makes the training function the served one.
    """
    measure_batch_norm_(model, batches)
    set_training_mode(model, bn_frozen=True)


def to_inference_model(model: MaskRCNN) -> MaskRCNN:
    """The service's model (``FrozenBatchNorm2d``, eval mode) holding ``model``'s weights and BN
    running statistics; in eval mode both compute the same function."""
    config = model.config
    frozen = build_model(config.origin, num_classes=config.num_classes, label_to_class=config.label_to_class)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    frozen.load_state_dict(state, strict=True)
    return frozen


def training_losses(model: MaskRCNN, batch: Batch, precision: str = "fp32") -> dict[str, Tensor]:
    """The five Mask R-CNN losses (``LOSS_NAMES``) of ``batch``, through torchvision's training
    paths of the model's RPN and RoI heads. ``model`` must be in train mode."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        features = model.backbone(batch.images)
        proposals, rpn_losses = model.rpn(ImageList(batch.images, batch.image_sizes), features, batch.targets)
        _, head_losses = model.roi_heads(features, proposals, batch.image_sizes, batch.targets)
    losses = {**rpn_losses, **head_losses}
    return {name: losses[name].float() for name in LOSS_NAMES}


def state_path_for(out: str | Path) -> Path:
    """Where the training state of a run writing ``out`` lives: ``<out stem>.state.pth``."""
    out = Path(out)
    return out.with_name(out.stem + ".state.pth")


def save_state(path: Path, model: MaskRCNN, optimizer: torch.optim.Optimizer, iteration: int,
               seconds: float, settings: TrainSettings, bn_frozen: bool) -> None:
    """Write the training state atomically (a crash mid-write leaves the previous state);
    ``seconds``: wall time spent training so far, over all sessions of the run."""
    partial = path.with_name(path.name + ".part")
    torch.save({
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "iteration": iteration,
        "seconds": seconds,
        "bn_frozen": bn_frozen,
        "torch_rng": torch.get_rng_state(),
        "settings": asdict(settings),
    }, partial)
    os.replace(partial, path)


def load_state(path: Path) -> dict:
    if not path.is_file():
        raise TrainError(f"no training state to resume at {path}")
    return torch.load(path, map_location="cpu", weights_only=True)


class StopRequest:
    """Set by SIGINT/SIGTERM (or a test); the loop saves its state and stops after the current step.
    A second signal does not wait for the step: it raises ``KeyboardInterrupt``."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __call__(self, signum: int, _frame=None) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    @contextlib.contextmanager
    def installed(self):
        previous = {sig: signal.signal(sig, self) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


@dataclass
class TrainResult:
    """``iteration``: steps done so far; ``finished``: the run is done (its progress reached 1) and
    the mmdet checkpoint is written; ``losses``: mean of each loss and of their ``total`` over the
    last (up to) 20 steps (the recorded final losses for a cached model); ``seconds``: wall time of
    this call; ``cached``: the checkpoint was already there for this cache key, nothing trained."""

    iteration: int
    finished: bool
    losses: dict[str, float]
    seconds: float
    settings: TrainSettings
    stopped_by: int | None = None
    cached: bool = False


def restore_or_start(model: MaskRCNN, optimizer: torch.optim.Optimizer, saved: dict | None,
                     crops: TrainingCrops, settings: TrainSettings) -> tuple[int, float, bool]:
    """Load a saved training state into ``model`` and ``optimizer`` (with the RNG), or start a run
    by measuring batch-norm statistics; either way set the training mode. Returns the run's
    ``(iteration, seconds trained, batch norm frozen)``."""
    iteration, trained_seconds, bn_frozen = 0, 0.0, False
    if saved is not None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        torch.set_rng_state(saved["torch_rng"])
        iteration, bn_frozen = int(saved["iteration"]), bool(saved["bn_frozen"])
        trained_seconds = float(saved["seconds"])
    else:
        # batch renormalisation's running statistics start as the initial network's population ones
        measure_batch_norm_(model, (crops.batch(CALIBRATION_BATCHES_FROM + j, settings.batch_size)
                                    for j in range(settings.bn_calibration_batches)))
    set_training_mode(model, bn_frozen)
    return iteration, trained_seconds, bn_frozen


def training_step(model: MaskRCNN, optimizer: torch.optim.Optimizer, batch: Batch, settings: TrainSettings,
                  iteration: int, lr: float) -> dict[str, float]:
    """One SGD step at learning rate ``lr`` (times each group's ``lr_factor``) on ``batch``,
    gradients clipped to ``settings.clip_norm``. Returns each loss and their ``total``."""
    set_renorm_limits(model, settings, iteration)
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_factor"]
    losses = training_losses(model, batch, settings.precision)
    total = sum(losses.values())
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), settings.clip_norm)
    optimizer.step()
    return {name: v.item() for name, v in losses.items()} | {"total": total.item()}


def write_trained_model(model: MaskRCNN, out: Path, key: str, *, data_dir: str | Path, iterations: int,
                        seconds: float, settings: TrainSettings, final_losses: dict[str, float],
                        class_names: Sequence[str]) -> None:
    """The finished run's mmdet checkpoint at ``out`` (its meta says how it was trained) and its
    cache record under ``key``."""
    save_mmdet_checkpoint(to_inference_model(model), out, meta={
        "source": "maskrcnn-demo train (scripts/demo/train.py)",
        "data": str(data_dir),
        "iterations": iterations,
        "train_seconds": seconds,
        "settings": asdict(settings),
        "final_losses": final_losses,
        "dataset_meta": {"classes": list(class_names)},
    })
    model_cache.write_record(out, key, iterations=iterations, seconds=seconds, final_losses=final_losses)


def train(
    data_dir: str | Path,
    out: str | Path,
    settings: TrainSettings = TrainSettings(),
    *,
    resume: bool = False,
    retrain: bool = False,
    overrides: dict | None = None,
    split: str = "train",
    progress: bool = True,
    log_every: int = 20,
    stop: StopRequest | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train on ``split`` of ``data_dir``; write the mmdet checkpoint ``out`` and its cache key at the end.

    When ``out`` already holds a checkpoint whose recorded cache key matches this code, data and
    settings (``scripts.demo.model_cache``), nothing is trained (``cached``), unless ``retrain``.
    With ``resume``, the model, optimizer, iteration, time spent, RNG and settings come from the
    saved state; ``overrides`` (settings fields) replace saved ones, e.g. a larger ``iterations``
    extends a run. ``stop`` (installed as the SIGINT/SIGTERM handler when None) ends the run early
    with its state saved. ``on_step(iteration, losses)`` is called after every step (iteration 1-based).
    """
    started = time.perf_counter()
    out = Path(out)
    state_path = state_path_for(out)
    saved = load_state(state_path) if resume else None
    if saved is not None:
        settings = TrainSettings(**{f.name: saved["settings"][f.name] for f in fields(TrainSettings)
                                    if f.name in saved["settings"]})
    settings = replace(settings, **(overrides or {}))
    crops = TrainingCrops(data_dir, split, InferenceConfig.for_origin(ORIGIN), settings)
    key = model_cache.cache_key(crops.coco.dataset, asdict(settings))
    if not retrain and model_cache.matches(out, key):
        recorded = model_cache.read_record(out)
        return TrainResult(recorded["iterations"], True, recorded["final_losses"], time.perf_counter() - started,
                           settings, cached=True)
    class_names = tuple(name for _, name in crops.classes)
    model = build_training_model(settings, class_names)
    optimizer = torch.optim.SGD(parameter_groups(model, settings), lr=settings.lr, momentum=settings.momentum,
                                weight_decay=settings.weight_decay)
    iteration, trained_seconds, bn_frozen = restore_or_start(model, optimizer, saved, crops, settings)
    out.parent.mkdir(parents=True, exist_ok=True)

    recent: deque[dict[str, float]] = deque(maxlen=20)
    alive = AliveUnits(model)
    stop_request = stop or StopRequest()
    handlers = contextlib.nullcontext() if stop is not None else stop_request.installed()
    session_start = time.perf_counter() - trained_seconds  # the clock of the whole run

    def run_progress() -> float:
        return settings.progress(iteration, time.perf_counter() - session_start)

    # The bar counts per mille of the run's progress: with a time bound, the step count is unknown.
    bar = tqdm(total=1000, initial=round(1000 * run_progress()), unit="‰", desc="train", disable=not progress)
    with handlers, bar:
        while run_progress() < 1.0 and stop_request.signum is None:
            if not bn_frozen and run_progress() >= settings.freeze_bn_fraction:
                # The crops of the coming steps: they are trained on anyway.
                freeze_batch_norm_(model, (crops.batch(iteration + j, settings.batch_size)
                                           for j in range(settings.bn_calibration_batches)))
                bn_frozen = True
                bar.write(f"iter {iteration}: BN statistics measured on {settings.bn_calibration_batches} "
                          "batches and frozen")
            lr = settings.lr_at(iteration, run_progress())
            values = training_step(model, optimizer, crops.batch(iteration, settings.batch_size), settings,
                                   iteration, lr)
            iteration += 1
            if not all(math.isfinite(v) for v in values.values()):
                raise TrainError(f"loss became {values} at iteration {iteration}; lower --lr")
            recent.append(values)
            bar.update(round(1000 * run_progress()) - bar.n)
            bar.set_postfix({"it": iteration} | {name.removeprefix("loss_"): f"{v:.3f}"
                                                 for name, v in _mean(recent).items()}, refresh=False)
            if iteration % log_every == 0:
                mean = _mean(recent)
                bar.write(f"iter {iteration} progress {run_progress():.3f} lr {lr:.2e} "
                          + " ".join(f"{k.removeprefix('loss_')} {v:.4f}" for k, v in mean.items())
                          + f" fc7_alive {alive.fraction:.3f}"
                          + f" elapsed {time.perf_counter() - session_start:.0f}s")
                sys.stdout.flush()
            if on_step is not None:
                on_step(iteration, values)
            if iteration % settings.save_every == 0:
                save_state(state_path, model, optimizer, iteration, time.perf_counter() - session_start,
                           settings, bn_frozen)
        alive.remove()
        trained_seconds = time.perf_counter() - session_start
        save_state(state_path, model, optimizer, iteration, trained_seconds, settings, bn_frozen)

    finished = run_progress() >= 1.0 and stop_request.signum is None
    if finished:
        write_trained_model(model, out, key, data_dir=data_dir, iterations=iteration, seconds=trained_seconds,
                            settings=settings, final_losses=_mean(recent), class_names=class_names)
    return TrainResult(iteration, finished, _mean(recent), time.perf_counter() - started, settings,
                       stop_request.signum)


def _mean(recent: Sequence[dict[str, float]]) -> dict[str, float]:
    if not recent:
        return {}
    return {name: sum(r[name] for r in recent) / len(recent) for name in recent[0]}


def main(argv: Sequence[str] | None = None) -> int:
    """`maskrcnn-demo train`: train the demo model. Returns the exit status."""
    defaults = TrainSettings()
    parser = argparse.ArgumentParser(
        prog="maskrcnn-demo train",
        description="Train the project's Mask R-CNN R50-FPN (mmdet layout) from scratch on a "
        "synthetic COCO-layout dataset (`maskrcnn-demo data`) and write an mmdetection checkpoint.",
    )
    parser.add_argument("--data", type=Path, required=True, help="dataset folder (COCO layout)")
    parser.add_argument("--out", type=Path, required=True,
                        help="mmdet checkpoint to write; the training state goes to <stem>.state.pth beside it")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the saved training state; options given here replace the saved ones")
    parser.add_argument("--retrain", action="store_true",
                        help="train even when OUT is a cached model of this code, data and settings")
    # Defaults are None so that --resume can tell which options were given.
    options = {
        "iterations": (int, "most optimizer steps"),
        "minutes": (float, "most wall-clock minutes of training; the run stops and saves then"),
        "batch_size": (int, "crops per step"),
        "crop": (int, "training window side, pixels of the resized (test-scale) image"),
        "lr": (float, "SGD peak learning rate"),
        "warmup": (int, "linear warm-up steps"),
        "seed": (int, "seed of the initial weights and of the crops"),
        "save_every": (int, "write the training state every this many steps"),
        "roi_samples": (int, "RoIs sampled per image for the box and mask losses"),
        "rpn_samples": (int, "anchors sampled per image for the RPN losses"),
        "freeze_bn_fraction": (float, "run progress (0..1) at which BN statistics are frozen"),
        "bn_calibration_batches": (int, "batches the initial (and any frozen) BN statistics are measured on"),
        "renorm_r_max": (float, "batch renormalisation: largest scale correction r"),
        "renorm_d_max": (float, "batch renormalisation: largest shift correction d"),
        "renorm_warmup": (int, "steps over which the corrections' limits ramp up"),
        "renorm_momentum": (float, "momentum of the BN running statistics"),
        "box_head_lr_factor": (float, "the box head's learning rate as a fraction of --lr"),
        "precision": (str, "fp32 or bf16 (autocast forward pass)"),
    }
    for name, (kind, help_text) in options.items():
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=None,
                            help=f"{help_text} (default {getattr(defaults, name)})")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; 1 is faster on a machine "
                        "busy with other work, where multi-threaded steps stall on preempted threads)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    overrides = {name: getattr(args, name) for name in options if getattr(args, name) is not None}
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        result = train(args.data, args.out, resume=args.resume, retrain=args.retrain, overrides=overrides,
                       progress=not args.no_progress)
    except TrainError as error:
        parser.error(str(error))
    losses = " ".join(f"{k.removeprefix('loss_')} {v:.4f}" for k, v in result.losses.items())
    if result.cached:
        print(f"{args.out} is the cached model of this code, data and settings "
              f"({model_cache.record_path_for(args.out)}); not training (--retrain does)")
        return 0
    if not result.finished:
        print(f"stopped at iteration {result.iteration} ({losses}); "
              f"training state in {state_path_for(args.out)}; continue with --resume")
        return 128 + (result.stopped_by or 0)
    print(f"trained {result.iteration} iterations in {result.seconds:.0f}s; last-20 mean losses: {losses}; "
          f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
