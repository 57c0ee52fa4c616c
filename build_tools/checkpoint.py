"""Checkpoint loading: mmdetection v2/v3 and torchvision Mask R-CNN R50-FPN into ``MaskRCNN``.

mmdet layout -> ours (background moves from last to index 0, class-agnostic slots are added):

=================================================  ==========================================
mmdet key                                           our key
=================================================  ==========================================
``backbone.<resnet>``                               ``backbone.body.<resnet>``
``neck.lateral_convs.i.conv.*``                     ``backbone.fpn.inner_blocks.i.0.*``
``neck.fpn_convs.i.conv.*``                         ``backbone.fpn.layer_blocks.i.0.*``
``rpn_head.rpn_conv/rpn_cls/rpn_reg``               ``rpn.head.conv.0.0/cls_logits/bbox_pred``
``roi_head.bbox_head.shared_fcs.0/1``               ``roi_heads.box_head.fc6/fc7``
``roi_head.bbox_head.fc_cls`` (81, bg last)         ``roi_heads.box_predictor.cls_score`` (bg first)
``roi_head.bbox_head.fc_reg`` (320)                 ``roi_heads.box_predictor.bbox_pred`` (324, bg rows 0)
``roi_head.mask_head.convs.i.conv``                 ``roi_heads.mask_head.i.0``
``roi_head.mask_head.upsample``                     ``roi_heads.mask_predictor.conv5_mask``
``roi_head.mask_head.conv_logits`` (80)             ``roi_heads.mask_predictor.mask_fcn_logits`` (81)
=================================================  ==========================================
"""

from __future__ import annotations

import hashlib
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from build_tools.model import MaskRCNN, build_model, init_random_

CheckpointFormat = Literal["mmdet", "torchvision"]

# Published checkpoints users can fetch by name. Both projects name their files after the first
# eight hex digits of the file's sha256, which is what we check.
KNOWN_CHECKPOINTS: dict[str, dict[str, str]] = {
    "mask_rcnn_r50_fpn_1x_coco": {
        "url": "https://download.openmmlab.com/mmdetection/v2.0/mask_rcnn/mask_rcnn_r50_fpn_1x_coco/"
        "mask_rcnn_r50_fpn_1x_coco_20200205-d4b0c5d6.pth",
        "sha256_prefix": "d4b0c5d6",
        "format": "mmdet",
    },
    "maskrcnn_resnet50_fpn_coco": {
        "url": "https://download.pytorch.org/models/maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth",
        "sha256_prefix": "bf2d0c1e",
        "format": "torchvision",
    },
}


class CheckpointError(ValueError):
    """A checkpoint cannot be fetched, read, recognised or mapped onto the model."""


@dataclass
class LoadedCheckpoint:
    model: MaskRCNN
    format: str  # "mmdet", "torchvision" or "random-init"
    sha256: str | None
    source: str


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


def mmdet_to_model_state(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """Map an mmdet state_dict to ours. Returns (mapped state, unexpected mmdet keys)."""
    mapped: dict[str, Tensor] = {}
    unexpected: list[str] = []
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        new = _rename(key, _MMDET_RULES)
        if new is None:
            unexpected.append(key)
            continue
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
    mmdet_of = _mmdet_names_of_ours()
    for key, value in model.state_dict().items():
        name = mmdet_of.get(key)
        if name is None:
            raise CheckpointError(f"no mmdet name for model key {key!r}")
        value = value.detach().clone()
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


def _mmdet_names_of_ours() -> dict[str, str]:
    """Our key -> mmdet key, derived by mapping mmdet's reference key list forward."""
    names = {}
    for mm_key in _reference_mmdet_keys():
        ours = _rename(mm_key, _MMDET_RULES)
        if ours is not None and not mm_key.endswith("num_batches_tracked"):
            names[ours] = mm_key
    return names


def _reference_mmdet_keys() -> list[str]:
    """mmdet's Mask R-CNN R50-FPN parameter names, generated from the ResNet-50 layout."""
    keys = ["backbone.conv1.weight"] + [f"backbone.bn1.{p}" for p in ("weight", "bias", "running_mean", "running_var")]
    for layer, blocks in enumerate((3, 4, 6, 3), start=1):
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
        raise CheckpointError(f"{source} does not fit Mask R-CNN R50-FPN: " + "; ".join(problems))
    model.load_state_dict(state, strict=True)


def _torchvision_to_model_state(model: MaskRCNN, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Older torchvision checkpoints use pre-v2 names; the modules' own loading hooks rename them,
    so let them run on a scratch model and read the result back in the current layout."""
    scratch = build_model("torchvision")
    incompatible = scratch.load_state_dict(state, strict=False)
    renamed = scratch.state_dict()
    for key in incompatible.missing_keys:
        renamed.pop(key, None)
    renamed.update({k: state[k] for k in incompatible.unexpected_keys})
    return renamed


def fetch_checkpoint(name: str, cache_dir: str | Path) -> Path:
    """Download a published checkpoint by name into ``cache_dir``, checking its sha256 prefix."""
    if name not in KNOWN_CHECKPOINTS:
        raise CheckpointError(f"unknown checkpoint name {name!r}; known: {', '.join(KNOWN_CHECKPOINTS)}")
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
                f"cannot download {name} from {entry['url']} ({exc}); download it yourself and pass "
                "the file path instead"
            ) from exc
        partial.rename(target)
    digest = sha256_of(target)
    if not digest.startswith(entry["sha256_prefix"]):
        raise CheckpointError(
            f"{target} has sha256 {digest}, which does not start with {entry['sha256_prefix']} as the "
            "published file's does; delete it and download again"
        )
    return target


def load_checkpoint(
    path: str | Path | None,
    format: str = "auto",
    *,
    random_init_seed: int | None = None,
    origin: str = "mmdet",
    cache_dir: str | Path = Path.home() / ".cache" / "maskrcnn-serve",
    **config_overrides,
) -> LoadedCheckpoint:
    """Build the model from a checkpoint file, a published checkpoint name, or random weights.

    ``format`` is ``auto``, ``mmdet`` or ``torchvision``; the model gets the test settings of the
    checkpoint's origin. With ``random_init_seed`` (and no path) the model uses ``origin``'s
    settings and deterministic random weights.
    """
    if path is None:
        if random_init_seed is None:
            raise CheckpointError("give a checkpoint (file or published name) or --random-init")
        model = init_random_(build_model(origin, **config_overrides), random_init_seed)
        return LoadedCheckpoint(model, "random-init", None, f"random-init seed {random_init_seed}")
    if str(path) in KNOWN_CHECKPOINTS:
        path = fetch_checkpoint(str(path), cache_dir)
    state, _meta = read_state_dict(path)
    detected = detect_format(state)
    fmt = detected if format == "auto" else format
    if fmt not in ("mmdet", "torchvision"):
        raise CheckpointError(f"unknown checkpoint format {format!r}; expected auto, mmdet or torchvision")
    model = build_model(fmt, **config_overrides)
    if fmt == "mmdet":
        mapped, unexpected = mmdet_to_model_state(state)
        if unexpected:
            raise CheckpointError(f"{path} does not fit Mask R-CNN R50-FPN: unexpected keys: {_summarise(unexpected)}")
    else:
        mapped = _torchvision_to_model_state(model, state)
    load_into(model, mapped, str(path))
    return LoadedCheckpoint(model.eval(), fmt, sha256_of(path), str(path))


def save_mmdet_checkpoint(model: MaskRCNN, path: str | Path, meta: dict[str, Any] | None = None) -> Path:
    """Write ``model`` as an mmdet checkpoint (``{'state_dict': ..., 'meta': ...}``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model_state_to_mmdet(model), "meta": dict(meta or {})}, path)
    return path
