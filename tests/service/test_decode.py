"""decode_image: formats, colour modes, EXIF orientation and the limits checked before decoding."""

from __future__ import annotations

import time

import numpy as np
import pytest
from PIL import Image

from service.decode import decode_image
from service.exceptions import InvalidImage, PayloadTooLarge
from service_images import cmyk_jpeg, encode, exif_rotated_jpeg, gradient, gray16_png, png_header_only, png_rgb16

LIMITS = {"max_bytes": 2**20, "max_pixels": 10_000_000, "min_side": 8}


def decode(data: bytes, **overrides) -> np.ndarray:
    return decode_image(data, **{**LIMITS, **overrides})


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "WEBP"])
def test_lossless_formats_round_trip(fmt):
    rgb = gradient()
    options = {"lossless": True} if fmt == "WEBP" else {}
    out = decode(encode(rgb, fmt, **options))
    assert out.dtype == np.uint8 and out.shape == (48, 64, 3)
    np.testing.assert_array_equal(out, rgb)


def test_jpeg_decodes_close_to_the_source():
    rgb = gradient()
    out = decode(encode(rgb, "JPEG", quality=95))
    assert out.shape == rgb.shape
    assert np.abs(out.astype(int) - rgb).mean() < 12  # noise in the source makes JPEG lossier


def test_exif_orientation_is_applied():
    rgb = gradient(48, 64)
    out = decode(exif_rotated_jpeg(rgb, orientation=6))
    assert out.shape == (64, 48, 3)  # viewed upright: rotated 90 degrees clockwise
    error = np.abs(out.astype(int) - np.rot90(rgb, k=-1)).mean()
    wrong_way = np.abs(out.astype(int) - np.rot90(rgb, k=1)).mean()
    assert error < 12 and wrong_way > 4 * error


def test_grayscale_is_replicated():
    gray = gradient()[:, :, 0]
    out = decode(encode(gray, "PNG"))
    assert out.shape == (48, 64, 3)
    for channel in range(3):
        np.testing.assert_array_equal(out[:, :, channel], gray)


def test_alpha_is_dropped():
    rgb = gradient()
    rgba = np.concatenate([rgb, np.full((*rgb.shape[:2], 1), 7, np.uint8)], axis=2)
    np.testing.assert_array_equal(decode(encode(rgba, "PNG")), rgb)


def test_palette_image_is_converted():
    rgb = gradient()
    palette = Image.fromarray(rgb).quantize(16)
    out = decode(encode(palette, "PNG"))
    np.testing.assert_array_equal(out, np.asarray(palette.convert("RGB")))


def test_sixteen_bit_gray_keeps_the_high_byte():
    data, samples = gray16_png()
    out = decode(data)
    np.testing.assert_array_equal(out[:, :, 0], (samples >> 8).astype(np.uint8))
    np.testing.assert_array_equal(out[:, :, 0], out[:, :, 2])


def test_sixteen_bit_rgb_keeps_the_high_byte():
    rgb16 = gradient().astype(np.uint16) * 257 + 3
    out = decode(png_rgb16(rgb16))
    np.testing.assert_array_equal(out, (rgb16 >> 8).astype(np.uint8))


def test_cmyk_jpeg_is_converted():
    out = decode(cmyk_jpeg())
    assert out.shape == (48, 64, 3)
    assert np.abs(out.reshape(-1, 3).mean(0) - [255, 0, 0]).max() < 8


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_pixel_limit_is_checked_from_the_header_before_decoding():
    bomb = png_header_only(10_000, 10_000)
    started = time.perf_counter()
    with pytest.raises(PayloadTooLarge, match="100000000 pixels"):
        decode(bomb)
    assert time.perf_counter() - started < 0.5


def test_byte_limit():
    with pytest.raises(PayloadTooLarge, match="bytes"):
        decode(encode(gradient(), "PNG"), max_bytes=1024)


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "empty"),
        (b"hello, this is text, not an image", "not a JPEG"),
        (b"<!doctype html><html><body>hi</body></html>", "not a JPEG"),
        (encode(gradient(), "GIF"), "not a JPEG"),
        (encode(gradient(), "TIFF"), "not a JPEG"),
        (encode(gradient(), "JPEG")[:-400], "corrupt or truncated"),
        (encode(gradient(), "PNG")[:100], "corrupt or truncated"),
        (encode(gradient(1, 1), "PNG"), "at least 8 pixels"),
        (encode(gradient(4, 640), "PNG"), "at least 8 pixels"),
    ],
    ids=["empty", "text", "html", "gif", "tiff", "truncated-jpeg", "truncated-png", "1x1", "4x640"],
)
def test_bad_images_are_refused(data, message):
    with pytest.raises(InvalidImage, match=message):
        decode(data)


def test_a_large_jpeg_decodes_reduced_to_the_same_engine_input_geometry():
    from service.decode import decode_opened, open_image, upright_size
    from service.preprocess import InputSpec, prepare_image

    big = np.kron(gradient(300, 400, seed=5), np.ones((10, 10, 1), np.uint8))  # 3000x4000, smooth
    data = encode(big, "JPEG", quality=95)
    limits = {"max_bytes": 2**26, "max_pixels": 10**8, "min_side": 8}
    spec = InputSpec()
    width, height = upright_size(open_image(data, **limits))
    h, w = spec.resized_hw((height, width))
    exact = decode_opened(open_image(data, **limits))
    reduced = decode_opened(open_image(data, **limits), reduce_to=(w, h))
    assert exact.shape == (3000, 4000, 3) and reduced.shape == (1500, 2000, 3)  # 1/2: still covers 1067x800
    full = prepare_image(exact, spec)
    fast = prepare_image(reduced, spec, orig_hw=(height, width))
    assert fast.orig_hw == full.orig_hw == (3000, 4000)
    assert fast.resized_hw == full.resized_hw and fast.scale_factor == full.scale_factor
    assert np.abs(fast.tensor - full.tensor).mean() < 0.05  # normalised units: pixels barely differ
    # PNG (no DCT scaling) and small JPEGs decode in full whatever is asked
    assert decode_opened(open_image(encode(big, "PNG"), **limits), reduce_to=(w, h)).shape == (3000, 4000, 3)
    small = encode(gradient(800, 1000, seed=1), "JPEG")
    assert decode_opened(open_image(small, **limits), reduce_to=(w, h)).shape == (800, 1000, 3)


def test_the_upright_size_of_a_truncated_png_is_a_client_error():
    from service.decode import open_image, upright_size

    png = encode(gradient(64, 64), "PNG")
    header = open_image(png[: len(png) // 2], max_bytes=2**20, max_pixels=10**6, min_side=8)
    with pytest.raises(InvalidImage, match="corrupt or truncated"):
        upright_size(header)
