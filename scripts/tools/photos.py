"""Images the CLIs and benchmarks send or time when the user gives none."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def synthetic_photo(h: int = 480, w: int = 640) -> bytes:
    """A COCO-sized JPEG (``h`` x ``w`` pixels, quality 90) with smooth colour structure and noise:
    realistic entropy, and as many proposals as real photos give. The same bytes every call."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([128 + 100 * np.sin(x / 37), 128 + 100 * np.cos(y / 23), 128 + 80 * np.sin((x + y) / 51)], -1)
    rgb = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def sample_photo(name: str) -> Path:
    """The scikit-image sample photograph called ``name`` (e.g. ``coffee.png``).

    Raises:
        FileNotFoundError: it is not among ``build_tools.images.sample_photographs()``.
    """
    from build_tools.images import (
        sample_photographs,  # late: build_tools needs torch, the HTTP tools do not
    )

    for path in sample_photographs():
        if path.name == name:
            return path
    raise FileNotFoundError(f"{name} is not among scikit-image's sample photographs")


def photo_paths(folder: str | Path | None, count: int) -> list[Path]:
    """``count`` image files, cycled: those of ``folder`` (sorted by name), else scikit-image's sample
    photographs."""
    from build_tools.images import (  # late: build_tools needs torch, the HTTP tools do not
        list_images,
        sample_photographs,
    )

    paths = list_images(folder) if folder else sample_photographs()
    return [paths[i % len(paths)] for i in range(count)]
