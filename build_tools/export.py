"""ONNX export of ``MaskRCNN`` (TorchScript exporter, opset 17).

Graph contract (docs/architecture.md): inputs ``images [B,3,H,W]`` float32 and ``image_sizes
[B,2]`` int64, outputs ``dets [B,N,5]``, ``labels [B,N]``, ``masks [B,N,28,28]``; H and W dynamic,
B fixed, or dynamic (1..max) with ``shape_mutable``. Both come from the same traced code: the model's
inference path has no per-image Python loop (``build_tools.model``), so the graph is the same and
only the batch axis is declared fixed or dynamic. Masks stay per-box 28x28: pasting full-image masks
in the graph would move N x H x W floats per image for nothing the host cannot do faster inside
each box.
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
    dynamic_axes = {
        "images": {2: "height", 3: "width"},
    }
    if shape_mutable:
        dynamic_axes = {
            "images": {0: "batch", 2: "height", 3: "width"},
            "image_sizes": {0: "batch"},
            **{name: {0: "batch"} for name in OUTPUT_NAMES},
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
