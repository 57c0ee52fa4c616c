"""Lets ``build_tools.verify.verify`` use a compiled engine as the reference instead of eager PyTorch."""

from __future__ import annotations

import torch

from service.backends.base import OUTPUT_NAMES


class EngineAsReference:
    """Lets ``verify`` use an engine as the reference, in place of the eager model it calls."""

    def __init__(self, engine):
        self.engine = engine

    def __call__(self, images: torch.Tensor, image_sizes: torch.Tensor):
        out = self.engine.infer(images.numpy(), image_sizes.numpy())
        return tuple(torch.from_numpy(out[name]) for name in OUTPUT_NAMES)
