"""Checkpoint loading: mmdetection v2/v3 and torchvision Mask R-CNN (ResNet/ResNeXt-FPN) into ``MaskRCNN``.

What the model is comes from the checkpoint itself: the backbone from the keys and shapes of its
ResNet (blocks per stage give the depth, ``layer1.0.conv2``'s shape the groups and width per group),
the class count from the box head's shapes, the class names from its meta (or ``--classes``,
``build_tools.classes``), the ResNet style from the config text mmdet records in its meta (or
``--style caffe``, or the published checkpoint's entry in ``KNOWN_CHECKPOINTS``).

mmdet layout -> ours (background moves from last to index 0, class-agnostic slots are added; N
classes):

=================================================  ==========================================
mmdet key                                           our key
=================================================  ==========================================
``backbone.<resnet>``                               ``backbone.body.<resnet>``
``neck.lateral_convs.i.conv.*``                     ``backbone.fpn.inner_blocks.i.0.*``
``neck.fpn_convs.i.conv.*``                         ``backbone.fpn.layer_blocks.i.0.*``
``rpn_head.rpn_conv/rpn_cls/rpn_reg``               ``rpn.head.conv.0.0/cls_logits/bbox_pred``
``roi_head.bbox_head.shared_fcs.0/1``               ``roi_heads.box_head.fc6/fc7``
``roi_head.bbox_head.fc_cls`` (N + 1, bg last)      ``roi_heads.box_predictor.cls_score`` (bg first)
``roi_head.bbox_head.fc_reg`` (4N)                  ``roi_heads.box_predictor.bbox_pred`` (4N + 4, bg rows 0)
``roi_head.mask_head.convs.i.conv``                 ``roi_heads.mask_head.i.0``
``roi_head.mask_head.upsample``                     ``roi_heads.mask_predictor.conv5_mask``
``roi_head.mask_head.conv_logits`` (N)              ``roi_heads.mask_predictor.mask_fcn_logits`` (N + 1)
=================================================  ==========================================

Caffe-style weights (BGR input in mmdet) get ``backbone.conv1.weight``'s input channels reversed,
so the host feeds RGB as for every other model.
"""

from __future__ import annotations

import difflib
import hashlib
import re
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from build_tools.classes import ClassesError, label_layout, names_from_meta
from build_tools.model import (
    RESNET_LAYERS,
    InferenceConfig,
    MaskRCNN,
    Style,
    init_random_,
)

CheckpointFormat = Literal["mmdet", "torchvision"]
# Where published checkpoints are downloaded to (one file each, named as published).
CHECKPOINT_CACHE = Path.home() / ".cache" / "maskrcnn-serve"

_MMDET_ZOO = "https://download.openmmlab.com/mmdetection/v2.0/mask_rcnn"
# mmdetection's model zoo (configs/mask_rcnn/metafile.yml), all COCO: name -> file.
_MMDET_FILES = {
    "mask_rcnn_r50_fpn_1x_coco": "mask_rcnn_r50_fpn_1x_coco_20200205-d4b0c5d6.pth",
    "mask_rcnn_r50_fpn_2x_coco":
        "mask_rcnn_r50_fpn_2x_coco_bbox_mAP-0.392__segm_mAP-0.354_20200505_003907-3e542a40.pth",
    "mask_rcnn_r50_fpn_mstrain-poly_3x_coco": "mask_rcnn_r50_fpn_mstrain-poly_3x_coco_20210524_201154-21b550bb.pth",
    "mask_rcnn_r101_fpn_1x_coco": "mask_rcnn_r101_fpn_1x_coco_20200204-1efe0ed5.pth",
    "mask_rcnn_r101_fpn_2x_coco":
        "mask_rcnn_r101_fpn_2x_coco_bbox_mAP-0.408__segm_mAP-0.366_20200505_071027-14b391c7.pth",
    "mask_rcnn_r101_fpn_mstrain-poly_3x_coco": "mask_rcnn_r101_fpn_mstrain-poly_3x_coco_20210524_200244-5675c317.pth",
    "mask_rcnn_x101_32x4d_fpn_1x_coco": "mask_rcnn_x101_32x4d_fpn_1x_coco_20200205-478d0b67.pth",
    "mask_rcnn_x101_32x4d_fpn_2x_coco":
        "mask_rcnn_x101_32x4d_fpn_2x_coco_bbox_mAP-0.422__segm_mAP-0.378_20200506_004702-faef898c.pth",
    "mask_rcnn_x101_32x4d_fpn_mstrain-poly_3x_coco":
        "mask_rcnn_x101_32x4d_fpn_mstrain-poly_3x_coco_20210524_201410-abcd7859.pth",
    "mask_rcnn_x101_64x4d_fpn_1x_coco": "mask_rcnn_x101_64x4d_fpn_1x_coco_20200201-9352eb0d.pth",
    "mask_rcnn_x101_64x4d_fpn_2x_coco": "mask_rcnn_x101_64x4d_fpn_2x_coco_20200509_224208-39d6f70c.pth",
    "mask_rcnn_x101_64x4d_fpn_mstrain-poly_3x_coco":
        "mask_rcnn_x101_64x4d_fpn_mstrain-poly_3x_coco_20210526_120447-c376f129.pth",
    "mask_rcnn_r50_caffe_fpn_1x_coco":
        "mask_rcnn_r50_caffe_fpn_1x_coco_bbox_mAP-0.38__segm_mAP-0.344_20200504_231812-0ebd1859.pth",
    "mask_rcnn_r50_caffe_fpn_mstrain-poly_3x_coco":
        "mask_rcnn_r50_caffe_fpn_mstrain-poly_3x_coco_bbox_mAP-0.408__segm_mAP-0.37_20200504_163245-42aa3d00.pth",
    "mask_rcnn_r101_caffe_fpn_1x_coco": "mask_rcnn_r101_caffe_fpn_1x_coco_20200601_095758-805e06c1.pth",
    "mask_rcnn_r101_caffe_fpn_mstrain-poly_3x_coco":
        "mask_rcnn_r101_caffe_fpn_mstrain-poly_3x_coco_20210526_132339-3c33ce02.pth",
}


def _published(url: str, format: CheckpointFormat, style: Style = "pytorch") -> dict[str, str]:
    # Both projects name their files after the first eight hex digits of the file's sha256
    # (``...-d4b0c5d6.pth``), which is what the download is checked against.
    return {"url": url, "sha256_prefix": url[-12:-4], "format": format, "style": style}


# Published checkpoints users can fetch by name: url, sha256_prefix, format, style.
KNOWN_CHECKPOINTS: dict[str, dict[str, str]] = {
    **{name: _published(f"{_MMDET_ZOO}/{name}/{file}", "mmdet", "caffe" if "_caffe_" in name else "pytorch")
       for name, file in _MMDET_FILES.items()},
    "maskrcnn_resnet50_fpn_coco": _published(
        "https://download.pytorch.org/models/maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth", "torchvision"),
}


class CheckpointError(ValueError):
    """A checkpoint cannot be fetched, read, recognised or mapped onto the model."""


@dataclass
class LoadedCheckpoint:
    """A model with its weights, where they came from, and the names of its output classes.

    Attributes:
        model: the model in eval mode.
        format: ``mmdet``, ``torchvision`` or ``random-init``.
        sha256: hex digest of the checkpoint file (None for random weights).
        source: the file, or ``random-init seed N``.
        class_names: the name of each output class index (label value) 0..C-1.
    """

    model: MaskRCNN
    format: str
    sha256: str | None
    source: str
    class_names: tuple[str, ...]


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# mmdet's ResNet uses torchvision's names (conv1, bn1, layerN.i.convK, downsample.0/1), so the
# backbone maps by prefix alone.
_MMDET_RULES: list[tuple[str, str]] = [
    (r"^backbone\.(.*)$", r"backbone.body.\1"),
    (r"^neck\.lateral_convs\.(\d)\.conv\.(weight|bias)$", r"backbone.fpn.inner_blocks.\1.0.\2"),
    (r"^neck\.fpn_convs\.(\d)\.conv\.(weight|bias)$", r"backbone.fpn.layer_blocks.\1.0.\2"),
    (r"^rpn_head\.rpn_conv\.(weight|bias)$", r"rpn.head.conv.0.0.\1"),
    (r"^rpn_head\.rpn_cls\.(weight|bias)$", r"rpn.head.cls_logits.\1"),
    (r"^rpn_head\.rpn_reg\.(weight|bias)$", r"rpn.head.bbox_pred.\1"),
    (r"^roi_head\.bbox_head\.shared_fcs\.0\.(weight|bias)$", r"roi_heads.box_head.fc6.\1"),
    (r"^roi_head\.bbox_head\.shared_fcs\.1\.(weight|bias)$", r"roi_heads.box_head.fc7.\1"),
    (r"^roi_head\.bbox_head\.fc_cls\.(weight|bias)$", r"roi_heads.box_predictor.cls_score.\1"),
    (r"^roi_head\.bbox_head\.fc_reg\.(weight|bias)$", r"roi_heads.box_predictor.bbox_pred.\1"),
    (r"^roi_head\.mask_head\.convs\.(\d)\.conv\.(weight|bias)$", r"roi_heads.mask_head.\1.0.\2"),
    (r"^roi_head\.mask_head\.upsample\.(weight|bias)$", r"roi_heads.mask_predictor.conv5_mask.\1"),
    (r"^roi_head\.mask_head\.conv_logits\.(weight|bias)$", r"roi_heads.mask_predictor.mask_fcn_logits.\1"),
]


def _rename(key: str, rules: list[tuple[str, str]]) -> str | None:
    for pattern, repl in rules:
        if re.match(pattern, key):
            return re.sub(pattern, repl, key)
    return None


def _input_channels(key: str, value: Tensor, style: str) -> Tensor:
    """``value`` of the first conv with its input channels reversed for caffe style (BGR <-> RGB;
    the same operation both ways); every other tensor unchanged."""
    return value.flip(1) if style == "caffe" and key == "backbone.conv1.weight" else value


def mmdet_to_model_state(state: dict[str, Tensor], style: str = "pytorch") -> tuple[dict[str, Tensor], list[str]]:
    """Map an mmdet state_dict (ResNet ``style``) to ours. Returns (mapped state, unexpected mmdet keys)."""
    mapped: dict[str, Tensor] = {}
    unexpected: list[str] = []
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        new = _rename(key, _MMDET_RULES)
        if new is None:
            unexpected.append(key)
            continue
        value = _input_channels(key, value, style)
        if new.startswith("roi_heads.box_predictor.cls_score"):
            value = torch.cat((value[-1:], value[:-1]))  # background last -> first
        elif new.startswith("roi_heads.box_predictor.bbox_pred"):
            value = torch.cat((torch.zeros_like(value[:4]), value))  # class-specific, add bg slot
        elif new.startswith("roi_heads.mask_predictor.mask_fcn_logits"):
            value = torch.cat((torch.zeros_like(value[:1]), value))
        mapped[new] = value
    return mapped, unexpected


def model_state_to_mmdet(model: MaskRCNN) -> dict[str, Tensor]:
    """Our state_dict in mmdet's layout (the inverse of ``mmdet_to_model_state``), including the
    ``num_batches_tracked`` buffers mmdet's BatchNorm carries."""
    if model.config.origin != "mmdet":
        raise CheckpointError("only a model built with origin='mmdet' can be written as an mmdet checkpoint")
    out: dict[str, Tensor] = {}
    mmdet_of = _mmdet_names_of_ours(RESNET_LAYERS[model.config.depth])
    for key, value in model.state_dict().items():
        name = mmdet_of.get(key)
        if name is None:
            raise CheckpointError(f"no mmdet name for model key {key!r}")
        value = _input_channels(name, value.detach().clone(), model.config.style)
        if key.startswith("roi_heads.box_predictor.cls_score"):
            value = torch.cat((value[1:], value[:1]))
        elif key.startswith("roi_heads.box_predictor.bbox_pred"):
            value = value[4:]
        elif key.startswith("roi_heads.mask_predictor.mask_fcn_logits"):
            value = value[1:]
        out[name] = value
        if name.startswith("backbone.") and name.endswith(".running_var"):
            out[name.replace("running_var", "num_batches_tracked")] = torch.tensor(0, dtype=torch.int64)
    return out


def _mmdet_names_of_ours(layers: tuple[int, ...]) -> dict[str, str]:
    """Our key -> mmdet key, derived by mapping mmdet's reference key list forward."""
    names = {}
    for mm_key in _reference_mmdet_keys(layers):
        ours = _rename(mm_key, _MMDET_RULES)
        if ours is not None and not mm_key.endswith("num_batches_tracked"):
            names[ours] = mm_key
    return names


def _reference_mmdet_keys(layers: tuple[int, ...]) -> list[str]:
    """mmdet's Mask R-CNN ResNet-FPN parameter names for a ResNet with ``layers`` bottleneck blocks
    per stage ((3, 4, 6, 3): R-50); ResNeXt has the same names."""
    keys = ["backbone.conv1.weight"] + [f"backbone.bn1.{p}" for p in ("weight", "bias", "running_mean", "running_var")]
    for layer, blocks in enumerate(layers, start=1):
        for b in range(blocks):
            prefix = f"backbone.layer{layer}.{b}"
            for i in (1, 2, 3):
                keys.append(f"{prefix}.conv{i}.weight")
                keys += [f"{prefix}.bn{i}.{p}" for p in ("weight", "bias", "running_mean", "running_var")]
            if b == 0:
                keys.append(f"{prefix}.downsample.0.weight")
                keys += [f"{prefix}.downsample.1.{p}" for p in ("weight", "bias", "running_mean", "running_var")]
    for i in range(4):
        keys += [f"neck.lateral_convs.{i}.conv.{p}" for p in ("weight", "bias")]
        keys += [f"neck.fpn_convs.{i}.conv.{p}" for p in ("weight", "bias")]
    for m in ("rpn_conv", "rpn_cls", "rpn_reg"):
        keys += [f"rpn_head.{m}.{p}" for p in ("weight", "bias")]
    for m in ("fc_cls", "fc_reg", "shared_fcs.0", "shared_fcs.1"):
        keys += [f"roi_head.bbox_head.{m}.{p}" for p in ("weight", "bias")]
    for m in ("convs.0.conv", "convs.1.conv", "convs.2.conv", "convs.3.conv", "upsample", "conv_logits"):
        keys += [f"roi_head.mask_head.{m}.{p}" for p in ("weight", "bias")]
    return keys


def detect_format(state: dict[str, Any]) -> CheckpointFormat:
    """Tell an mmdet state_dict from a torchvision one by their distinctive key prefixes."""
    if any(k.startswith(("roi_head.", "rpn_head.", "neck.")) for k in state):
        return "mmdet"
    if any(k.startswith(("roi_heads.", "rpn.", "backbone.body.")) for k in state):
        return "torchvision"
    sample = ", ".join(list(state)[:5]) or "no keys"
    raise CheckpointError(
        "cannot tell the checkpoint format: expected mmdet keys (backbone.*, neck.*, rpn_head.*, "
        f"roi_head.*) or torchvision keys (backbone.body.*, rpn.*, roi_heads.*); found {sample}"
    )


# Keys only torchvision's maskrcnn_resnet50_fpn_v2 has, and what each shows.
_TORCHVISION_V2_KEYS = {
    "roi_heads.box_head.0.0.weight": "a 4-conv box head",
    "backbone.fpn.inner_blocks.0.1.weight": "normalised FPN convs",
    "rpn.head.conv.1.0.weight": "a 2-conv RPN head",
}


def refuse_unsupported(state: dict[str, Tensor], fmt: CheckpointFormat, source: str) -> None:
    """Raise ``CheckpointError`` for a known layout this model does not build (torchvision's
    ``maskrcnn_resnet50_fpn_v2``), naming the keys that show it."""
    found = [f"{key} ({what})" for key, what in _TORCHVISION_V2_KEYS.items() if key in state]
    if fmt == "torchvision" and found:
        raise CheckpointError(
            f"{source} is torchvision's maskrcnn_resnet50_fpn_v2 layout ({'; '.join(found)}), which is not "
            "supported: use maskrcnn_resnet50_fpn (v1) weights (maskrcnn_resnet50_fpn_coco) or an mmdet checkpoint"
        )


def detect_backbone(state: dict[str, Tensor], fmt: CheckpointFormat) -> dict[str, int]:
    """``depth``, ``groups`` and ``width_per_group`` of the checkpoint's ResNet/ResNeXt.

    Blocks per stage (the ``layerN.i`` indices) give the depth (``RESNET_LAYERS``); ``layer1.0.conv2``
    is ``[width, width / groups, 3, 3]`` with ``width = groups * width_per_group``.

    Raises:
        CheckpointError: a layout that is not R-50/R-101 bottlenecks, naming the keys and shapes.
    """
    prefix = "backbone." if fmt == "mmdet" else "backbone.body."
    blocks = []
    for stage in range(1, 5):
        pattern = re.compile(rf"^{re.escape(prefix)}layer{stage}\.(\d+)\.conv1\.weight$")
        blocks.append(len({m.group(1) for m in map(pattern.match, state) if m}))
    depth = {layers: d for d, layers in RESNET_LAYERS.items()}.get(tuple(blocks))
    conv2_key = f"{prefix}layer1.0.conv2.weight"
    conv2 = state.get(conv2_key)
    shape = None if conv2 is None else tuple(conv2.shape)
    if depth is None or shape is None or len(shape) != 4 or shape[2:] != (3, 3) or shape[0] % shape[1]:
        known = ", ".join(f"{layers} (R-{d})" for d, layers in RESNET_LAYERS.items())
        raise CheckpointError(
            f"unknown backbone layout: {prefix}layer1..layer4 hold {tuple(blocks)} bottleneck blocks "
            f"({prefix}layerN.i.conv1.weight) and {conv2_key} has shape {shape}; supported: {known} blocks "
            "with a grouped 3x3 conv2 [groups x width_per_group, width_per_group, 3, 3] (ResNet, ResNeXt)"
        )
    return {"depth": depth, "groups": shape[0] // shape[1], "width_per_group": shape[1]}


# The box and mask predictors of each format: (class scores, box deltas, mask logits) and what
# their first dimension holds for N classes.
_HEAD_KEYS = {
    "mmdet": (("roi_head.bbox_head.fc_cls.weight", 1, 1), ("roi_head.bbox_head.fc_reg.weight", 4, 0),
              ("roi_head.mask_head.conv_logits.weight", 1, 0)),
    "torchvision": (("roi_heads.box_predictor.cls_score.weight", 1, 1),
                    ("roi_heads.box_predictor.bbox_pred.weight", 4, 4),
                    ("roi_heads.mask_predictor.mask_fcn_logits.weight", 1, 1)),
}


def head_classes(state: dict[str, Tensor], fmt: CheckpointFormat) -> tuple[int, str]:
    """The head's outputs including background (from the class-score layer's shape), checked against
    the box and mask predictors; and the keys with their shapes, for messages.

    Raises:
        CheckpointError: no class-score layer, or predictors that disagree on the class count.
    """
    (scores_key, _, _), *others = _HEAD_KEYS[fmt]
    if scores_key not in state:
        raise CheckpointError(f"missing key {scores_key}: the class scores, whose shape gives the class count")
    classes = state[scores_key].shape[0] - 1
    described = [f"{scores_key} {tuple(state[scores_key].shape)}"]
    wrong = []
    for key, per_class, extra in others:
        if key in state:
            described.append(f"{key} {tuple(state[key].shape)}")
            if state[key].shape[0] != per_class * classes + extra:
                wrong.append(f"{key} {tuple(state[key].shape)} (expected {per_class * classes + extra} rows)")
    if wrong:
        raise CheckpointError(
            f"the head's layers disagree on the class count: {described[0]} holds {classes} classes + "
            f"background but {', '.join(wrong)} (a class-agnostic or otherwise unsupported head)"
        )
    return classes + 1, f"the head ({', '.join(described)})"


_CAFFE_STYLE = re.compile(r"""['"]?style['"]?\s*[=:]\s*['"]caffe['"]""")


def style_from_meta(meta: dict[str, Any]) -> Style | None:
    """The ResNet style the config text in an mmdet checkpoint's meta (v3 ``cfg``, v2 ``config``)
    gives, or None when the meta holds no config."""
    for key in ("cfg", "config"):
        if isinstance(meta.get(key), str):
            return "caffe" if _CAFFE_STYLE.search(meta[key]) else "pytorch"
    return None


def read_state_dict(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The tensors of a checkpoint file and its metadata (mmdet's ``meta``), with clear errors."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for truncated or foreign files
        raise CheckpointError(f"cannot read {path} as a PyTorch checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} holds a {type(raw).__name__}, not a state_dict")
    meta = raw.get("meta", {}) if isinstance(raw.get("meta"), dict) else {}
    state = raw.get("state_dict", raw.get("model", raw))
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: no state_dict of tensors found (top-level keys: {sorted(raw)[:8]})")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    return state, meta


def _summarise(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def architecture_name(config: InferenceConfig) -> str:
    """``R-50``, ``R-101``, ``X-101-32x4d``, ... with ``-caffe`` for caffe style: Mask R-CNN ``<this>``-FPN."""
    base = f"R-{config.depth}" if config.groups == 1 else f"X-{config.depth}-{config.groups}x{config.width_per_group}d"
    return base + ("-caffe" if config.style == "caffe" else "")


def load_into(model: MaskRCNN, state: dict[str, Tensor], source: str) -> None:
    """Strictly load a state_dict in our layout, raising ``CheckpointError`` naming what is wrong."""
    expected = model.state_dict()
    problems = []
    missing = [k for k in expected if k not in state]
    if missing:
        problems.append(f"missing keys: {_summarise(missing)}")
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        problems.append(f"unexpected keys: {_summarise(unexpected)}")
    wrong = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if wrong:
        problems.append(f"shape mismatches: {_summarise(wrong)}")
    if problems:
        raise CheckpointError(
            f"{source} does not fit Mask R-CNN {architecture_name(model.config)}-FPN: " + "; ".join(problems))
    model.load_state_dict(state, strict=True)


def _torchvision_to_model_state(model: MaskRCNN, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Older torchvision checkpoints use pre-v2 names; the modules' own loading hooks rename them,
    so let them run on a scratch model of the same config and read the result back in the current layout."""
    scratch = MaskRCNN(model.config)
    try:
        incompatible = scratch.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shapes that do not fit; load_into names them
        raise CheckpointError(f"the checkpoint does not fit Mask R-CNN {architecture_name(model.config)}-FPN: "
                              f"{exc}") from exc
    renamed = scratch.state_dict()
    for key in incompatible.missing_keys:
        renamed.pop(key, None)
    renamed.update({k: state[k] for k in incompatible.unexpected_keys})
    return renamed


def near_checkpoint_names(name: str, count: int = 3) -> list[str]:
    """The published checkpoint names closest to ``name`` (a typo of one), best first; maybe none."""
    return difflib.get_close_matches(name, KNOWN_CHECKPOINTS, n=count, cutoff=0.6)


def _names_hint(name: str) -> str:
    near = near_checkpoint_names(name)
    if near:
        return f"did you mean {' or '.join(near)}?"
    return "`maskrcnn-build fetch --help` and the README's \"Checkpoints\" list the published names"


def fetch_checkpoint(name: str, cache_dir: str | Path) -> Path:
    """The published checkpoint ``name`` in ``cache_dir``, downloaded when it is not there yet
    (a file placed there under its published file name is used as it is); its sha256 prefix is
    checked either way.

    Raises:
        CheckpointError: an unknown name (with the near ones), a failed download (saying where to
            put the file by hand), or a file whose sha256 does not match.
    """
    if name not in KNOWN_CHECKPOINTS:
        raise CheckpointError(f"unknown checkpoint name {name!r}: {_names_hint(name)}")
    entry = KNOWN_CHECKPOINTS[name]
    target = Path(cache_dir) / entry["url"].rsplit("/", 1)[1]
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".part")
        try:
            with urllib.request.urlopen(entry["url"], timeout=60) as response, open(partial, "wb") as out:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
        except (urllib.error.URLError, OSError) as exc:
            partial.unlink(missing_ok=True)
            raise CheckpointError(
                f"cannot download {name} from {entry['url']} ({exc}). Download that file where you can and "
                f"place it at {target}: the name {name} then works offline (its sha256 is checked); or give "
                "the file's path to --checkpoint"
            ) from exc
        partial.rename(target)
    digest = sha256_of(target)
    if not digest.startswith(entry["sha256_prefix"]):
        raise CheckpointError(
            f"{target} has sha256 {digest}, which does not start with {entry['sha256_prefix']} as the "
            "published file's does; delete it and download again"
        )
    return target


def checkpoint_config(
    state: dict[str, Tensor], meta: dict[str, Any], fmt: CheckpointFormat, *,
    class_names: Sequence[str] | None = None, style: Style | None = None,
) -> tuple[InferenceConfig, tuple[str, ...]]:
    """The config a checkpoint's tensors and meta call for, and its class names.

    Backbone from the keys (``detect_backbone``); class count from the head (``head_classes``),
    named by ``class_names`` or the meta's names or, for a head of COCO's size, COCO's; ResNet
    style ``style``, else what the meta's config says, else pytorch.

    Raises:
        CheckpointError: an unknown backbone, an inconsistent head, or names that do not fit it.
    """
    num_classes, head = head_classes(state, fmt)
    names = class_names if class_names is not None else names_from_meta(meta)
    try:
        layout = label_layout(fmt, names, num_classes, head=head)
    except ClassesError as exc:
        given = "--classes" if class_names is not None else "the checkpoint's meta"
        raise CheckpointError(f"{exc} (names from {given})" if names is not None else str(exc)) from exc
    style = style or style_from_meta(meta) or "pytorch"
    if style == "caffe" and fmt != "mmdet":
        raise CheckpointError("caffe-style ResNet exists only in mmdet checkpoints; this one is torchvision's")
    config = InferenceConfig.for_origin(fmt, style).with_overrides(
        num_classes=layout.num_classes, label_to_class=layout.label_to_class, **detect_backbone(state, fmt))
    return config, layout.names


def load_checkpoint(
    path: str | Path | None,
    format: str = "auto",
    *,
    class_names: Sequence[str] | None = None,
    style: Style | None = None,
    config: InferenceConfig | None = None,
    random_init_seed: int | None = None,
    origin: str = "mmdet",
    cache_dir: str | Path = CHECKPOINT_CACHE,
    **config_overrides,
) -> LoadedCheckpoint:
    """Build the model from a checkpoint file, a published checkpoint name, or random weights.

    ``format`` is ``auto``, ``mmdet`` or ``torchvision``; the model gets the test settings of the
    checkpoint's origin, the backbone and class count its tensors have, the names ``class_names``
    gives (else its meta's, else COCO's for a COCO-sized head) and ResNet ``style`` (else its
    meta's or its published entry's, else pytorch). With ``random_init_seed`` (and no path) the
    model uses ``origin``'s settings, R-50 in ``style``, a head for ``class_names`` (default COCO's)
    and deterministic random weights. ``config`` rebuilds exactly a recorded config instead (the
    eager reference of a built engine; ``class_names`` then are its recorded names).
    ``config_overrides`` replace ``InferenceConfig`` fields (``score_thresh=...``).

    Raises:
        CheckpointError: the file cannot be fetched or read, or does not fit (named keys and shapes).
    """
    if path is None:
        if random_init_seed is None:
            raise CheckpointError("give a checkpoint (file or published name) or --random-init")
        if config is None:
            try:
                layout = label_layout(origin, class_names)
            except ClassesError as exc:
                raise CheckpointError(str(exc)) from exc
            config = InferenceConfig.for_origin(origin, style or "pytorch").with_overrides(
                num_classes=layout.num_classes, label_to_class=layout.label_to_class)
            class_names = layout.names
        model = init_random_(MaskRCNN(config.with_overrides(**config_overrides)).eval(), random_init_seed)
        return LoadedCheckpoint(model, "random-init", None, f"random-init seed {random_init_seed}",
                                _named(config, class_names))
    published = KNOWN_CHECKPOINTS.get(str(path))
    if published is not None:
        path = fetch_checkpoint(str(path), cache_dir)
        style = style or published["style"]
    elif not Path(path).is_file():
        # a bare word (no folder, no suffix) was more likely meant as a published name
        bare = not Path(path).suffix and len(Path(path).parts) == 1
        hint = f" and is no published name: {_names_hint(str(path))}" if bare else ""
        raise CheckpointError(f"checkpoint {path} does not exist{hint}")
    state, meta = read_state_dict(path)
    fmt = detect_format(state) if format == "auto" else format
    if fmt not in ("mmdet", "torchvision"):
        raise CheckpointError(f"unknown checkpoint format {format!r}; expected auto, mmdet or torchvision")
    refuse_unsupported(state, fmt, str(path))
    if config is None:
        config, class_names = checkpoint_config(state, meta, fmt, class_names=class_names, style=style)
    model = MaskRCNN(config.with_overrides(**config_overrides)).eval()
    if fmt == "mmdet":
        mapped, unexpected = mmdet_to_model_state(state, model.config.style)
        if unexpected:
            raise CheckpointError(f"{path} does not fit Mask R-CNN {architecture_name(model.config)}-FPN: "
                                  f"unexpected keys: {_summarise(unexpected)}")
    else:
        mapped = _torchvision_to_model_state(model, state)
    load_into(model, mapped, str(path))
    return LoadedCheckpoint(model, fmt, sha256_of(path), str(path), _named(model.config, class_names))


def _named(config: InferenceConfig, class_names: Sequence[str] | None) -> tuple[str, ...]:
    """``class_names`` checked against the output classes of ``config``'s label layout."""
    count = sum(1 for c in config.label_to_class if c >= 0)
    if class_names is None or len(class_names) != count:
        raise CheckpointError(f"the model has {count} output classes; {len(class_names or ())} class names given")
    return tuple(class_names)


def save_mmdet_checkpoint(model: MaskRCNN, path: str | Path, meta: dict[str, Any] | None = None) -> Path:
    """Write ``model`` as an mmdet checkpoint (``{'state_dict': ..., 'meta': ...}``); class names
    go in ``meta`` as mmdet writes them (v3 ``{"dataset_meta": {"classes": [...]}}``, v2 ``CLASSES``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model_state_to_mmdet(model), "meta": dict(meta or {})}, path)
    return path
