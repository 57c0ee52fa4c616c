"""Decode: image bytes (JPEG, PNG, WebP, BMP) to an RGB uint8 array, upright, within limits.

The limits are checked from the header before any pixel is decoded: ``PIL.Image.open`` reads only
the header, so a 100-megapixel bomb costs a few bytes of parsing and a 413.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from service.exceptions import InvalidImage, PayloadTooLarge

# PIL format names we decode. PIL's JPEG opener also reads MPO, the multi-picture JPEG some
# cameras write (its first frame is used).
SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP")
_SIXTEEN_BIT_GRAY = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def decode_image(data: bytes, *, max_bytes: int, max_pixels: int, min_side: int) -> np.ndarray:
    """Decode an encoded image to ``uint8 [h, w, 3]`` RGB, EXIF orientation applied.

    :func:`open_image` then :func:`decode_opened`; see them for the conversions and errors.
    """
    return decode_opened(open_image(data, max_bytes=max_bytes, max_pixels=max_pixels, min_side=min_side))


def open_image(data: bytes, *, max_bytes: int, max_pixels: int, min_side: int) -> Image.Image:
    """Read the image header only and check the limits; ``.size`` is ``(width, height)``, pixels
    (before EXIF orientation).

    Raises:
        PayloadTooLarge: more than ``max_bytes`` bytes, or more than ``max_pixels`` pixels.
        InvalidImage: empty, not one of the supported formats, a malformed header, or a side
            shorter than ``min_side`` pixels.
    """
    if not data:
        raise InvalidImage("the image is empty (0 bytes)")
    if len(data) > max_bytes:
        raise PayloadTooLarge(f"the image is {len(data)} bytes; the limit is {max_bytes} (MASKRCNN_MAX_BYTES)")
    try:
        image = Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)
    except UnidentifiedImageError:
        raise InvalidImage("the payload is not a JPEG, PNG, WebP or BMP image") from None
    except Image.DecompressionBombError as exc:
        raise PayloadTooLarge(f"the image header declares too many pixels: {exc}") from None
    except Exception as exc:  # PIL raises many types on malformed headers; all are the client's data.
        raise InvalidImage(f"the image header is malformed: {exc}") from None

    check_size(*image.size, max_pixels=max_pixels, min_side=min_side)
    return image


def check_size(width: int, height: int, *, max_pixels: int, min_side: int) -> None:
    """The pixel limits, for an encoded image's header or raw pixels.

    Raises:
        PayloadTooLarge: more than ``max_pixels`` pixels.
        InvalidImage: a side shorter than ``min_side`` pixels.
    """
    if width * height > max_pixels:
        raise PayloadTooLarge(
            f"the image is {width}x{height} = {width * height} pixels; "
            f"the limit is {max_pixels} (MASKRCNN_MAX_PIXELS)"
        )
    if min(width, height) < min_side:
        raise InvalidImage(f"the image is {width}x{height}; each side must be at least {min_side} pixels")


# EXIF orientations that turn the image by 90 degrees (width and height trade places).
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)


def check_pixels(rgb: np.ndarray, *, max_pixels: int, min_side: int) -> np.ndarray:
    """Pixels that came decoded (the v2 protocol's ``image_rgb``), within the limits encoded images
    meet (:func:`check_size`); C-contiguous.

    Raises:
        InvalidImage: not uint8 ``[h, w, 3]``, or a side shorter than ``min_side``.
        PayloadTooLarge: more than ``max_pixels`` pixels.
    """
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise InvalidImage(f"raw pixels must be uint8 [height, width, 3] RGB, got {rgb.dtype} {list(rgb.shape)}")
    height, width = rgb.shape[:2]
    check_size(width, height, max_pixels=max_pixels, min_side=min_side)
    return np.ascontiguousarray(rgb)


def upright_size(image: Image.Image) -> tuple[int, int]:
    """``(width, height)`` of an :func:`open_image` result once its EXIF orientation is applied.

    Raises:
        InvalidImage: the EXIF block cannot be read (PIL reads a PNG's pixel data to find it).
    """
    width, height = image.size
    try:
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception as exc:  # truncated data or a malformed EXIF block: the client's data
        raise InvalidImage(f"the {image.format} image data is corrupt or truncated: {exc}") from None
    if orientation in _TRANSPOSING_ORIENTATIONS:
        return height, width
    return width, height


def decode_opened(image: Image.Image, reduce_to: tuple[int, int] | None = None) -> np.ndarray:
    """The pixels of an :func:`open_image` result as ``uint8 [h, w, 3]`` RGB, EXIF orientation applied.

    ``reduce_to``: upright ``(width, height)`` the image will be resized to anyway. A JPEG at least
    twice that size is then decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, PIL's
    ``draft``), the smallest that still covers it: less time and memory, slightly different pixels
    than decoding in full and resizing. Other formats decode in full.

    Grayscale is replicated to three channels, alpha is dropped (as OpenCV's ``IMREAD_COLOR``
    does, which mmdet's reference pipeline uses), 16-bit samples keep their high byte, CMYK and
    palette images are converted.

    Raises:
        InvalidImage: corrupt or truncated pixel data, or a malformed EXIF block.
    """
    if reduce_to is not None and image.format == "JPEG":
        width, height = reduce_to
        if upright_size(image) != image.size:
            width, height = height, width
        image.draft("RGB", (width, height))
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
    except Exception as exc:  # truncated or corrupt pixel data, or a malformed EXIF block.
        raise InvalidImage(f"the {image.format} image data is corrupt or truncated: {exc}") from None
    return _to_rgb8(image)


def _to_rgb8(image: Image.Image) -> np.ndarray:
    """``uint8 [h, w, 3]`` RGB from any PIL mode our formats produce."""
    if image.mode == "RGB":
        return np.asarray(image, dtype=np.uint8)
    if image.mode in _SIXTEEN_BIT_GRAY:
        gray = (np.asarray(image).astype(np.int64) >> 8).clip(0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)
