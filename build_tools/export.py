"""ONNX export of ``MaskRCNN`` (TorchScript exporter, opset 17).

Graph contract (docs/architecture.md): inputs ``images [B,3,H,W]`` float32, ``image_sizes
[B,2]`` int64, ``mask_score_threshold [B]`` float32 and ``mask_max_detections [B]`` int64 (which
detections get a mask: those the request will get back), outputs ``dets [B,N,5]``, ``labels [B,N]``, ``masks [B,N,28,28]``; H and W dynamic,
B fixed, or dynamic (1..max) with ``shape_mutable``. Both come from the same traced code: the model's
inference path has no per-image Python loop (``build_tools.model``), so the graph is the same and
only the batch axis is declared fixed or dynamic. Masks stay per-box 28x28: pasting full-image masks
in the graph would move N x H x W floats per image for nothing the host cannot do faster inside
each box.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from build_tools.errors import BuildError
from build_tools.model import InferenceConfig, MaskRCNN
from service.backends.base import IMAGE_INPUTS, INPUT_NAMES, OUTPUT_NAMES
from service.manifest import CheckpointInfo, ClassEntry

OPSET = 17
MASK_SIZE = 28
EXPORT_INFO = "export.json"


class ExportError(RuntimeError):
    """The requested export cannot be produced (e.g. an unsupported shape mode)."""


class ExportInfo(BaseModel):
    """``export.json``: what produced an export folder's ``model.onnx``.

    Attributes:
        checkpoint: the weights (file and sha256, or the random-init seed).
        inference_config: the test settings and architecture traced into the graph.
        classes: the class table of its output labels (names and category ids; the manifest's).
        batch_size: the graph's fixed batch, or the largest batch of a mutable one.
        shape_mutable: the batch axis is dynamic (1..``batch_size``).
        opset: ONNX opset of the graph.
        onnx_sha256: sha256 (hex) of ``model.onnx``.
        tools: versions of the tools that exported it (``python``, ``torch``, ``onnx``, ...).
        inputs: the graph's input names (``service.backends.base.INPUT_NAMES``).
    """

    model_config = ConfigDict(extra="forbid")

    checkpoint: CheckpointInfo
    inference_config: InferenceConfig
    classes: list[ClassEntry]
    batch_size: int
    shape_mutable: bool = False
    opset: int
    onnx_sha256: str
    tools: dict[str, str]
    # exports from before the mask selection inputs take the images only
    inputs: tuple[str, ...] = IMAGE_INPUTS

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / EXPORT_INFO
        path.write_text(json.dumps(self.model_dump(mode="json"), indent=2) + "\n")
        return path


def read_export_info(export_dir: str | Path) -> ExportInfo:
    """The validated ``export.json`` of an export folder.

    Raises:
        BuildError: the folder has no ``export.json``, or it cannot be read or is malformed.
    """
    path = Path(export_dir) / EXPORT_INFO
    if not path.is_file():
        raise BuildError(f"{export_dir} is not an export folder ({EXPORT_INFO} missing); run `maskrcnn-build export` first")
    try:
        return ExportInfo.model_validate_json(path.read_text())
    except (OSError, ValidationError) as exc:
        raise BuildError(f"cannot read {path}: {exc}; export again with `maskrcnn-build export`") from exc


def export_onnx(
    model: MaskRCNN,
    path: str | Path,
    *,
    batch_size: int = 1,
    shape_mutable: bool = False,
    example_hw: tuple[int, int] = (800, 1216),
) -> Path:
    """Trace ``model`` and write an ONNX file; returns the path.

    ``shape_mutable=False``: the graph's batch is ``batch_size``. ``shape_mutable=True``: the batch
    axis of every input and output is dynamic and ``batch_size`` is the largest batch the artifact
    is built for (recorded in the manifest; the graph itself runs any batch, it is traced at 2).
    """
    if batch_size < 1:
        raise ExportError(f"--batch-size must be >= 1, got {batch_size}")
    if shape_mutable and batch_size < 2:
        raise ExportError(
            "--shape-mutable (dynamic batch) takes --batch-size as the largest batch and needs it >= 2 "
            f"(got {batch_size}); a dynamic batch of at most 1 is the fixed batch-1 graph"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = example_hw
    # a dynamic batch is traced at 2, not 1, so no size-1 broadcast gets baked into the graph
    traced_batch = 2 if shape_mutable else batch_size
    images = torch.zeros(traced_batch, 3, h, w)
    # a little structure so every branch (RPN top-k, NMS, mask head) sees non-empty tensors
    images[:, :, h // 4: h // 2, w // 4: w // 2] = 1.5
    image_sizes = torch.tensor([[h, w]] * traced_batch, dtype=torch.int64)
    # a threshold and a limit that leave some rows without a mask, so the selection is traced
    mask_score_threshold = torch.full((traced_batch,), 0.05)
    mask_max_detections = torch.full((traced_batch,), 50, dtype=torch.int64)
    dynamic_axes = {
        "images": {2: "height", 3: "width"},
    }
    if shape_mutable:
        dynamic_axes = {
            "images": {0: "batch", 2: "height", 3: "width"},
            **{name: {0: "batch"} for name in INPUT_NAMES[1:]},
            **{name: {0: "batch"} for name in OUTPUT_NAMES},
        }
    model = model.eval()
    with torch.no_grad(), warnings.catch_warnings():
        # the tracer warns about every Python int it records; the graph's dynamic parts are
        # checked by the parity tests at sizes other than the traced one
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (images, image_sizes, mask_score_threshold, mask_max_detections),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=list(INPUT_NAMES),
            output_names=list(OUTPUT_NAMES),
            dynamic_axes=dynamic_axes,
            do_constant_folding=True,
        )
    return path
