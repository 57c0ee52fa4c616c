"""ONNX export of ``MaskRCNN`` (TorchScript exporter, opset 17).

Graph contract (docs/architecture.md): inputs ``images [B,3,H,W]`` float32 and ``image_sizes
[B,2]`` int64, outputs ``dets [B,N,5]``, ``labels [B,N]``, ``masks [B,N,28,28]``; B fixed, H and W
dynamic. Masks stay per-box 28x28: pasting full-image masks in the graph would move
N x H x W floats per image for nothing the host cannot do faster inside each box.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from build_tools.model import MaskRCNN

INPUT_NAMES = ("images", "image_sizes")
OUTPUT_NAMES = ("dets", "labels", "masks")
OPSET = 17
MASK_SIZE = 28


class ExportError(RuntimeError):
    """The requested export cannot be produced (e.g. an unsupported shape mode)."""


def export_onnx(
    model: MaskRCNN,
    path: str | Path,
    *,
    batch_size: int = 1,
    shape_mutable: bool = False,
    example_hw: tuple[int, int] = (800, 1216),
) -> Path:
    """Trace ``model`` and write an ONNX file; returns the path.

    The exporter traces one call, so the per-image loops of the RPN and RoI heads are unrolled for
    ``batch_size`` images: the batch dimension is therefore fixed. ``shape_mutable=True`` (a dynamic
    batch) is refused rather than silently producing a graph that only works at the traced size.
    """
    if shape_mutable:
        raise ExportError(
            "--shape-mutable (dynamic batch) is not supported by this export: the traced graph "
            "unrolls per-image post-processing for a fixed batch size. Build one engine per batch "
            "size with --batch-size N instead."
        )
    if batch_size < 1:
        raise ExportError(f"--batch-size must be >= 1, got {batch_size}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = example_hw
    images = torch.zeros(batch_size, 3, h, w)
    # a little structure so every branch (RPN top-k, NMS, mask head) sees non-empty tensors
    images[:, :, h // 4: h // 2, w // 4: w // 2] = 1.5
    image_sizes = torch.tensor([[h, w]] * batch_size, dtype=torch.int64)
    dynamic_axes = {
        "images": {2: "height", 3: "width"},
    }
    model = model.eval()
    with torch.no_grad(), warnings.catch_warnings():
        # the tracer warns about every Python int it records; the graph's dynamic parts are
        # checked by the parity tests at sizes other than the traced one
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (images, image_sizes),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=list(INPUT_NAMES),
            output_names=list(OUTPUT_NAMES),
            dynamic_axes=dynamic_axes,
            do_constant_folding=True,
        )
    return path
