"""Encoded test images for the service tests, made in code (no binary corpus in the repository)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def gradient(h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    """uint8 ``[h, w, 3]`` RGB with distinct content per seed (a smooth gradient plus noise)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) * 127 // max(h + w - 2, 1)], -1)
    return np.clip(base + rng.integers(-20, 21, base.shape), 0, 255).astype(np.uint8)


def encode(array_or_image: np.ndarray | Image.Image, fmt: str, **save_options) -> bytes:
    image = array_or_image if isinstance(array_or_image, Image.Image) else Image.fromarray(array_or_image)
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save_options)
    return buffer.getvalue()


def exif_rotated_jpeg(rgb: np.ndarray, orientation: int = 6) -> bytes:
    """JPEG of ``rgb`` with an EXIF Orientation tag; orientation 6 means "rotate 90 degrees clockwise to view"."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(rgb, "JPEG", quality=95, exif=exif.tobytes())


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` RGB pixels, with one tiny IDAT: a decompression bomb's header."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + png_chunk(b"IEND", b"")


def png_rgb16(rgb16: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG (PIL cannot write one), ``rgb16`` uint16 ``[h, w, 3]``."""
    h, w, _ = rgb16.shape
    raw = b"".join(b"\x00" + rgb16[y].astype(">u2").tobytes() for y in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(raw)) + png_chunk(b"IEND", b"")


def gray16_png(h: int = 48, w: int = 64) -> tuple[bytes, np.ndarray]:
    """A 16-bit grayscale PNG and its samples (uint16 ``[h, w]``)."""
    samples = (np.arange(h * w, dtype=np.uint32).reshape(h, w) * 65535 // (h * w - 1)).astype(np.uint16)
    return encode(Image.fromarray(samples), "PNG"), samples


def cmyk_jpeg(h: int = 48, w: int = 64) -> bytes:
    """A CMYK JPEG, all red (C=0, M=Y=255, K=0)."""
    return encode(Image.new("CMYK", (w, h), (0, 255, 255, 0)), "JPEG", quality=95)


def images_input(client_module, images: list[bytes]):
    """The v2 input ``image`` of a tritonclient module (``tritonclient.http`` or ``.grpc``): one
    BYTES element per encoded image."""
    tensor = client_module.InferInput("image", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=object))
    return tensor
