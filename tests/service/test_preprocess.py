"""service.preprocess against the input contract (mmdet's test pipeline) computed by hand."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from service.exceptions import InvalidImage
from service.preprocess import (
    InputSpec,
    InvalidInputSpecError,
    pad_batch,
    prepare_image,
)

MEAN = np.array([123.675, 116.28, 103.53], np.float32)
STD = np.array([58.395, 57.12, 57.375], np.float32)


def random_image(hw: tuple[int, int], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*hw, 3), dtype=np.uint8)


@pytest.mark.parametrize(
    "orig_hw, resized_hw",
    [
        ((480, 640), (800, 1067)),  # s = min(1333 / 640, 800 / 480) = 5 / 3
        ((640, 480), (1067, 800)),  # portrait
        ((427, 640), (800, 1199)),  # s = 800 / 427; 640 * s = 1199.06
        ((800, 1333), (800, 1333)),  # already fits
        ((2000, 3000), (800, 1200)),  # shrink: s = 0.4
        ((100, 2000), (67, 1333)),  # long edge binds: s = 0.6665, 100 * s + 0.5 = 67.15
        ((1, 1), (800, 800)),
    ],
)
def test_resized_size_follows_mmcv_rescale(orig_hw, resized_hw):
    prepared = prepare_image(random_image(orig_hw), InputSpec())
    assert prepared.resized_hw == resized_hw
    assert prepared.tensor.shape == (3, *resized_hw)
    assert prepared.orig_hw == orig_hw
    assert prepared.scale_factor == (resized_hw[1] / orig_hw[1], resized_hw[0] / orig_hw[0])


def test_keep_ratio_false_resizes_to_the_scale_as_width_height():
    spec = InputSpec(keep_ratio=False)
    assert prepare_image(random_image((480, 640)), spec).resized_hw == (800, 1333)


@pytest.mark.parametrize("orig_hw", [(480, 640), (37, 29), (800, 1333)])
def test_tensor_is_cv2_resize_then_float32_normalisation(orig_hw):
    rgb = random_image(orig_hw, seed=orig_hw[0])
    prepared = prepare_image(rgb, InputSpec())
    h, w = prepared.resized_hw
    resized = cv2.resize(rgb, (w, h), interpolation=cv2.INTER_LINEAR)
    expected = ((resized.astype(np.float32) - MEAN) / STD).transpose(2, 0, 1)
    assert prepared.tensor.dtype == np.float32 and prepared.tensor.flags.c_contiguous
    np.testing.assert_array_equal(prepared.tensor, expected)
    # The same float32 arithmetic in torch (mmdet v3's data preprocessor) gives the same bits.
    torch_expected = (torch.from_numpy(resized).float() - torch.from_numpy(MEAN)) / torch.from_numpy(STD)
    np.testing.assert_array_equal(prepared.tensor, torch_expected.permute(2, 0, 1).numpy())


def test_strided_views_are_accepted():
    bgr = random_image((30, 40))
    rgb_view = bgr[:, :, ::-1]
    np.testing.assert_array_equal(
        prepare_image(rgb_view, InputSpec()).tensor,
        prepare_image(np.ascontiguousarray(rgb_view), InputSpec()).tensor,
    )


def test_normalisation_of_known_pixels():
    rgb = np.zeros((800, 1333, 3), np.uint8)  # no resize at this size
    rgb[0, 0] = (255, 0, 128)
    tensor = prepare_image(rgb, InputSpec()).tensor
    np.testing.assert_allclose(
        tensor[:, 0, 0], [(255 - 123.675) / 58.395, -116.28 / 57.12, (128 - 103.53) / 57.375], rtol=1e-6
    )
    np.testing.assert_allclose(tensor[:, 1, 1], -MEAN / STD, rtol=1e-6)


def test_custom_mean_and_std_are_used():
    spec = InputSpec(mean=(0.0, 10.0, 20.0), std=(1.0, 2.0, 4.0))
    rgb = np.full((800, 800, 3), 100, np.uint8)
    np.testing.assert_array_equal(prepare_image(rgb, spec).tensor[:, 5, 5], [100, 45, 20])


def test_cv2_resize_samples_pixel_centres_like_torch_bilinear():
    # Loose check that the resize geometry is align_corners=False bilinear; cv2 works in fixed
    # point on uint8 and rounds, so values agree to about one grey level.
    rgb = cv2.GaussianBlur(random_image((120, 160)), (7, 7), 2)
    prepared = prepare_image(rgb, InputSpec())
    ours = prepared.tensor * STD[:, None, None] + MEAN[:, None, None]
    theirs = F.interpolate(
        torch.from_numpy(rgb).permute(2, 0, 1)[None].float(),
        size=prepared.resized_hw,
        mode="bilinear",
        align_corners=False,
    )[0].numpy()
    assert np.abs(ours - theirs).max() <= 1.0


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((10, 10, 3), np.float32),
        np.zeros((10, 10), np.uint8),
        np.zeros((10, 10, 4), np.uint8),
        np.zeros((0, 10, 3), np.uint8),
        np.zeros((1, 3000, 3), np.uint8),  # 1333 / 3000 + 0.5 rounds to 0 rows
        [[[0, 0, 0]]],
    ],
)
def test_prepare_image_rejects_non_rgb_uint8(bad):
    with pytest.raises(InvalidImage):
        prepare_image(bad, InputSpec())


def test_pad_batch_pads_to_the_largest_image_rounded_up():
    spec = InputSpec()
    prepared = [prepare_image(random_image(hw, i), spec) for i, hw in enumerate([(480, 640), (640, 480)])]
    images, image_sizes = pad_batch(prepared, 32)
    # (800, 1067) and (1067, 800) -> max (1067, 1067) -> (1088, 1088)
    assert images.shape == (2, 3, 1088, 1088) and images.dtype == np.float32
    assert image_sizes.dtype == np.int64
    np.testing.assert_array_equal(image_sizes, [[800, 1067], [1067, 800]])
    for image, p in zip(images, prepared):
        h, w = p.resized_hw
        np.testing.assert_array_equal(image[:, :h, :w], p.tensor)
        assert not image[:, h:].any() and not image[:, :, w:].any()


def test_pad_batch_fills_a_fixed_batch_and_honours_min_hw():
    prepared = [prepare_image(random_image((480, 640)), InputSpec())]
    images, image_sizes = pad_batch(prepared, 32, batch_size=3, min_hw=(1000, 600))
    assert images.shape == (3, 3, 1024, 1088)
    assert not images[1:].any()
    np.testing.assert_array_equal(image_sizes, [[800, 1067]] * 3)


def test_pad_batch_rejects_bad_batches():
    prepared = [prepare_image(random_image((40, 40)), InputSpec())] * 2
    with pytest.raises(ValueError):
        pad_batch(prepared, 32, batch_size=1)
    with pytest.raises(ValueError):
        pad_batch([], 32)
    with pytest.raises(ValueError):
        pad_batch(prepared, 0)


def test_input_spec_round_trips_through_the_manifest():
    spec = InputSpec(mean=(1.0, 2.0, 3.0), std=(4.0, 5.0, 6.0), resize_scale=(1024, 640), pad_divisor=64)
    d = spec.to_manifest_input()
    assert d == {
        "mean": [1.0, 2.0, 3.0],
        "std": [4.0, 5.0, 6.0],
        "resize": {"scale": [1024, 640], "keep_ratio": True, "rounding": "half_up", "input": "uint8"},
        "pad_divisor": 64,
        "layout": "NCHW",
        "dtype": "float32",
        "color": "RGB",
        "normalized_in_graph": False,
        "pad_value": 0.0,
    }
    assert InputSpec.from_manifest_input(d) == spec
    assert InputSpec.from_manifest_input(InputSpec().to_manifest_input()) == InputSpec()


# Marks a key to remove from the manifest.
MISSING = object()


@pytest.mark.parametrize(
    "key, value",
    [
        ("mean", MISSING),
        ("pad_divisor", MISSING),
        ("resize", {"keep_ratio": True}),
        ("std", [1.0, 0.0, 1.0]),
        ("mean", [1.0, 2.0]),
        ("layout", "NHWC"),
        ("normalized_in_graph", True),
        ("resize", {"scale": [1333, 800], "keep_ratio": "yes"}),
    ],
)
def test_input_spec_rejects_manifests_it_cannot_serve(key, value):
    d = InputSpec().to_manifest_input()
    if value is MISSING:
        del d[key]
    else:
        d[key] = value
    with pytest.raises(InvalidInputSpecError):
        InputSpec.from_manifest_input(d)


@pytest.mark.parametrize("orig_hw", [(480, 640), (427, 640), (333, 500), (1000, 750)])
def test_the_torchvision_spec_reproduces_generalized_rcnn_transform(orig_hw):
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    spec = InputSpec(mean=tuple(255 * m for m in mean), std=tuple(255 * s for s in std), rounding="floor",
                     resize_input="normalized")
    rgb = random_image(orig_hw)
    transform = GeneralizedRCNNTransform(min_size=800, max_size=1333, image_mean=list(mean), image_std=list(std))
    images, _ = transform([torch.from_numpy(rgb).permute(2, 0, 1).float() / 255])
    theirs_hw = tuple(images.image_sizes[0])
    prepared = prepare_image(rgb, spec)
    assert prepared.resized_hw == theirs_hw
    h, w = theirs_hw
    # OpenCV's float bilinear weights are coarser than torch's: within 5e-4 normalised units
    # (0.03 grey levels)
    np.testing.assert_allclose(prepared.tensor, images.tensors[0, :, :h, :w].numpy(), atol=5e-4)
