"""Image files the build reads: calibration and verify sets, and the sample photographs used when
none are given."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from build_tools.checkpoint import sha256_of
from build_tools.errors import BuildError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
# Colour photographs among scikit-image's bundled samples, of several sizes and aspect ratios.
SAMPLE_PHOTOGRAPHS = ("astronaut.png", "chelsea.png", "coffee.png", "motorcycle_left.png", "rocket.jpg",
                      "hubble_deep_field.jpg")


def list_images(folder: str | Path, limit: int | None = None) -> list[Path]:
    """The image files of ``folder`` (by suffix, sorted by name), at most ``limit`` of them.

    Raises:
        FileNotFoundError: no such folder, or no image in it.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return paths[:limit] if limit else paths


def read_rgb(path: str | Path) -> np.ndarray:
    """RGB uint8 ``[h, w, 3]`` of an image file.

    Raises:
        ValueError: the file cannot be decoded.
    """
    import cv2

    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError(f"cannot decode image {path}")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def sample_photographs(limit: int | None = None) -> list[Path]:
    """Colour photographs among scikit-image's bundled samples: the verify images when none are given.

    Raises:
        BuildError: scikit-image is not installed or has none of them.
    """
    try:
        import skimage
    except ImportError as exc:
        raise BuildError("give --verify-images DIR (scikit-image, the default source, is not installed)") from exc
    folder = Path(skimage.data_dir)
    paths = [folder / n for n in SAMPLE_PHOTOGRAPHS if (folder / n).is_file()]
    if not paths:
        raise BuildError(f"no sample photographs in {folder}; give --verify-images DIR")
    return paths[:limit] if limit else paths


def image_set_hash(paths: Sequence[Path]) -> str:
    """sha256 (hex) of an image set: each file's name and content sha256, in the given order."""
    digest = hashlib.sha256()
    for p in paths:
        digest.update(p.name.encode() + b"\0" + sha256_of(p).encode() + b"\n")
    return digest.hexdigest()
