"""service.postprocess against mmdet's mask pasting (torch grid_sample) and pycocotools."""

from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as coco_mask

from paste_oracle import mmdet_paste_mask_values
from service.exceptions import InvalidEngineOutputs
from service.postprocess import (
    encode_rle,
    paste_mask_crops,
    paste_masks,
    postprocess_image,
    rescale_boxes,
    select_valid,
)

# pycocotools' decode trips numpy 2's __array__(copy=) deprecation; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

# Float32 grid_sample rounds coordinates and sums; a pixel whose value is this close to the
# threshold may land on either side of it.
NEAR_THRESHOLD = 1e-5
# How many such pixels one comparison may have.
MAX_NEAR_THRESHOLD_DIFFERENCES = 5


def mmdet_values(masks: np.ndarray, boxes: np.ndarray, image_hw: tuple[int, int]) -> np.ndarray:
    """float32 ``[K, H, W]``: mmdet's sampled values pasted into zero images."""
    values = np.zeros((len(boxes), *image_hw), np.float32)
    for k, (crop, rows, cols) in enumerate(mmdet_paste_mask_values(masks, boxes, image_hw)):
        values[k, rows, cols] = crop
    return values


def assert_matches_mmdet(pasted: np.ndarray, values: np.ndarray, threshold: float) -> None:
    differing = pasted != (values >= np.float32(threshold))
    near = np.abs(values[differing] - np.float32(threshold))
    assert (near <= NEAR_THRESHOLD).all(), f"pixels differ away from the threshold: {near.max()}"
    assert differing.sum() <= MAX_NEAR_THRESHOLD_DIFFERENCES


def random_boxes(rng: np.random.Generator, n: int, image_hw: tuple[int, int]) -> np.ndarray:
    """float32 ``[n, 4]``: fractional boxes from sub-pixel to twice the image, some reaching
    outside it, all with a paste region that overlaps the image (mmdet's precondition)."""
    h, w = image_hw
    size = np.exp(rng.uniform(np.log(0.2), np.log(2 * max(h, w)), (n, 2)))
    centre = rng.uniform(-0.1, 1.1, (n, 2)) * [w, h]
    boxes = np.concatenate([centre - size / 2, centre + size / 2], 1).astype(np.float32)
    overlaps = (
        (np.floor(boxes[:, 0]) - 1 < w)
        & (np.floor(boxes[:, 1]) - 1 < h)
        & (np.ceil(boxes[:, 2]) + 1 > 0)
        & (np.ceil(boxes[:, 3]) + 1 > 0)
    )
    return boxes[overlaps]


def smooth_masks(rng: np.random.Generator, n: int) -> np.ndarray:
    """float32 ``[n, 28, 28]`` blob-shaped probabilities, like a mask head's."""
    grid = (np.arange(28) + 0.5) / 14 - 1
    radius = grid[None, :, None] ** 2 + grid[None, None, :] ** 2
    logits = rng.uniform(2, 8, (n, 1, 1)) * (rng.uniform(0.3, 1.2, (n, 1, 1)) - radius)
    return (1 / (1 + np.exp(-logits - rng.normal(0, 0.5, (n, 28, 28))))).astype(np.float32)


@pytest.mark.parametrize("image_hw", [(48, 64), (97, 53), (200, 150)])
@pytest.mark.parametrize("mask_kind", ["noise", "smooth"])
def test_paste_masks_matches_mmdet(image_hw, mask_kind):
    rng = np.random.default_rng(sum(image_hw) + len(mask_kind))
    boxes = random_boxes(rng, 60, image_hw)
    masks = (
        rng.uniform(0, 1, (len(boxes), 28, 28)).astype(np.float32)
        if mask_kind == "noise"
        else smooth_masks(rng, len(boxes))
    )
    pasted = paste_masks(masks, boxes, image_hw, 0.5)
    assert pasted.dtype == bool and pasted.shape == (len(boxes), *image_hw)
    assert pasted.any(axis=(1, 2)).sum() > len(boxes) // 2  # the comparison is not vacuous
    assert_matches_mmdet(pasted, mmdet_values(masks, boxes, image_hw), 0.5)


@pytest.mark.parametrize("threshold", [0.05, 0.3, 0.7, 0.999])
def test_paste_masks_matches_mmdet_at_other_thresholds(threshold):
    rng = np.random.default_rng(7)
    image_hw = (60, 80)
    boxes = random_boxes(rng, 40, image_hw)
    masks = smooth_masks(rng, len(boxes))
    values = mmdet_values(masks, boxes, image_hw)
    assert_matches_mmdet(paste_masks(masks, boxes, image_hw, threshold), values, threshold)


def test_paste_masks_hand_checked_box():
    # A 4x4-pixel box at (2, 2) of a mask that is 1 on its left half: mask column u of pixel x is
    # (x + 0.5 - 2) / 4 * 28 - 0.5, so x = 2..3 sample u = 3 and 10 (value 1), x = 4 samples
    # u = 17, x = 1 samples u = -4 (outside: 0), and x = 5 lies outside the paste region [1, 7).
    masks = np.zeros((1, 28, 28), np.float32)
    masks[0, :, :14] = 1
    pasted = paste_masks(masks, np.array([[2, 2, 6, 6]], np.float32), (10, 10))[0]
    expected = np.zeros((10, 10), bool)
    expected[2:6, 2:4] = True
    np.testing.assert_array_equal(pasted, expected)


def test_degenerate_boxes_and_boxes_off_the_image_paste_nothing():
    masks = np.ones((6, 28, 28), np.float32)
    boxes = np.array(
        [
            [5, 5, 5, 9],  # zero width
            [5, 5, 9, 5],  # zero height
            [9, 5, 5, 9],  # negative width
            [30, 5, 40, 9],  # right of the image
            [-20, -20, -8, -9],  # above-left of the image
            [2, 3, 7, 8],  # a real box, to show the others are not lost in the shuffle
        ],
        np.float32,
    )
    pasted = paste_masks(masks, boxes, (20, 25))
    assert not pasted[:5].any()
    assert pasted[5].any()
    assert [c.mask.size for c in paste_mask_crops(masks, boxes, (20, 25))][:5] == [0] * 5


def test_paste_mask_crops_are_the_mmdet_regions_of_paste_masks():
    rng = np.random.default_rng(3)
    image_hw = (70, 90)
    boxes = random_boxes(rng, 40, image_hw)
    masks = smooth_masks(rng, len(boxes))
    pasted = paste_masks(masks, boxes, image_hw)
    regions = [(rows, cols) for _, rows, cols in mmdet_paste_mask_values(masks, boxes, image_hw)]
    for k, (crop, (rows, cols)) in enumerate(zip(paste_mask_crops(masks, boxes, image_hw), regions)):
        assert (crop.top, crop.left) == (rows.start, cols.start)
        assert crop.mask.shape == (rows.stop - rows.start, cols.stop - cols.start)
        np.testing.assert_array_equal(crop.mask, pasted[k, rows, cols])
        outside = pasted[k].copy()
        outside[rows, cols] = False
        assert not outside.any()


def pycocotools_rles(pasted: np.ndarray) -> list[dict]:
    return [coco_mask.encode(np.asfortranarray(m.astype(np.uint8))) for m in pasted]


@pytest.mark.parametrize("image_hw", [(48, 64), (31, 77)])
def test_encode_rle_is_byte_identical_to_pycocotools(image_hw):
    rng = np.random.default_rng(11)
    boxes = random_boxes(rng, 80, image_hw)
    masks = np.where(
        rng.uniform(0, 1, (len(boxes), 1, 1)) < 0.5,
        smooth_masks(rng, len(boxes)),
        rng.uniform(0, 1, (len(boxes), 28, 28)),
    ).astype(np.float32)
    rles = encode_rle(masks, boxes, image_hw)
    pasted = paste_masks(masks, boxes, image_hw)
    for rle, expected, mask in zip(rles, pycocotools_rles(pasted), pasted):
        assert rle == {"size": list(image_hw), "counts": expected["counts"].decode("ascii")}
        np.testing.assert_array_equal(coco_mask.decode(rle), mask)


def test_encode_rle_edge_runs():
    # Runs that start at pixel 0, end at the last pixel, span whole columns (so runs of adjacent
    # columns join), and an empty mask.
    h, w = 12, 9
    masks = np.stack([np.ones((28, 28)), np.ones((28, 28)), np.zeros((28, 28)), np.ones((28, 28))])
    masks[3, 10:18] = 0  # a hole: two runs per column
    boxes = np.array(
        [[-3, -3, w + 3, h + 3], [4.5, 2.2, w + 1, h + 1], [1, 1, 5, 5], [-1, -1, w + 1, h + 1]],
        np.float32,
    )
    pasted = paste_masks(masks.astype(np.float32), boxes, (h, w))
    assert pasted[0].all() and pasted[1, -1, -1] and not pasted[2].any()
    assert pasted[3].any() and not pasted[3].all()
    rles = encode_rle(masks.astype(np.float32), boxes, (h, w))
    for rle, expected in zip(rles, pycocotools_rles(pasted)):
        assert rle["counts"] == expected["counts"].decode("ascii")


def test_encode_rle_of_no_detections():
    assert encode_rle(np.zeros((0, 28, 28), np.float32), np.zeros((0, 4), np.float32), (5, 5)) == []


def test_paste_rejects_bad_input():
    masks, boxes = np.ones((1, 28, 28), np.float32), np.array([[1, 1, 4, 4]], np.float32)
    with pytest.raises(InvalidEngineOutputs):
        encode_rle(masks, boxes, (8, 8), threshold=0.0)
    with pytest.raises(InvalidEngineOutputs):
        encode_rle(masks, boxes[:, :3], (8, 8))
    with pytest.raises(InvalidEngineOutputs):
        encode_rle(np.ones((2, 28, 28), np.float32), boxes, (8, 8))
    with pytest.raises(InvalidEngineOutputs):
        encode_rle(masks, np.array([[1, 1, np.nan, 4]], np.float32), (8, 8))


def test_rescale_boxes_divides_per_axis_and_clips():
    boxes = np.array([[10, 20, 110, 220], [-5, -5, 2000, 2000]], np.float32)
    out = rescale_boxes(boxes, (2.0, 4.0), (100, 60))
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, [[5, 5, 55, 55], [0, 0, 60, 100]])
    with pytest.raises(InvalidEngineOutputs):
        rescale_boxes(boxes, (0.0, 1.0), (100, 60))


def engine_rows() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Six rows as one image's graph outputs: four detections and two padding rows."""
    dets = np.array(
        [
            [0, 0, 10, 10, 0.9],
            [5, 5, 20, 20, 0.3],
            [1, 1, 8, 8, 0.95],
            [2, 2, 6, 6, 0.04],
            [0, 0, 0, 0, 0],
            [0, 0, 0, 0, 0],
        ],
        np.float32,
    )
    labels = np.array([3, 0, 7, 3, -1, -1], np.int64)
    masks = np.arange(6, dtype=np.float32)[:, None, None] * np.ones((6, 28, 28), np.float32) / 10
    return dets, labels, masks


def test_select_valid_drops_padding_and_sorts_by_score():
    dets, labels, masks = engine_rows()
    kept_dets, kept_labels, kept_masks = select_valid(dets, labels, masks)
    np.testing.assert_array_equal(kept_labels, [7, 3, 0, 3])
    np.testing.assert_array_equal(kept_dets[:, 4], np.float32([0.95, 0.9, 0.3, 0.04]))
    np.testing.assert_array_equal(kept_masks[:, 0, 0], np.float32([0.2, 0.0, 0.1, 0.3]))


@pytest.mark.parametrize(
    "kwargs, expected_labels",
    [
        ({"score_threshold": 0.3}, [7, 3, 0]),  # >= threshold
        ({"score_threshold": 0.31}, [7, 3]),
        ({"max_detections": 2}, [7, 3]),
        ({"keep_classes": [3]}, [3, 3]),
        ({"keep_classes": {0, 7}, "max_detections": 1}, [7]),
        ({"score_threshold": 0.99}, []),
    ],
)
def test_select_valid_filters(kwargs, expected_labels):
    _, kept_labels, kept_masks = select_valid(*engine_rows(), **kwargs)
    np.testing.assert_array_equal(kept_labels, expected_labels)
    assert kept_masks.shape == (len(expected_labels), 28, 28)


def test_select_valid_rejects_mismatched_rows():
    dets, labels, masks = engine_rows()
    with pytest.raises(InvalidEngineOutputs):
        select_valid(dets, labels[:5], masks)
    with pytest.raises(InvalidEngineOutputs):
        select_valid(dets[:, :4], labels, masks)


def test_postprocess_image_composes_the_steps():
    rng = np.random.default_rng(5)
    orig_hw, scale = (45, 70), (1.5, 2.0)
    n = 12
    boxes = random_boxes(rng, 200, (90, 105))[:n] * 0.9
    dets = np.concatenate([boxes, rng.uniform(0, 1, (n, 1))], 1).astype(np.float32)
    labels = rng.integers(-1, 80, n)
    masks = smooth_masks(rng, n)
    result = postprocess_image(dets, labels, masks, scale, orig_hw, 0.2, 0.5, max_detections=8)
    kept_dets, kept_labels, kept_masks = select_valid(dets, labels, masks, 0.2, 8)
    expected_boxes = rescale_boxes(kept_dets[:, :4], scale, orig_hw)
    np.testing.assert_array_equal(result.boxes, expected_boxes)
    np.testing.assert_array_equal(result.scores, kept_dets[:, 4])
    np.testing.assert_array_equal(result.labels, kept_labels)
    assert result.rles == encode_rle(kept_masks, expected_boxes, orig_hw, 0.5)
    assert 0 < len(result.rles) <= 8
    assert all(r["size"] == [45, 70] for r in result.rles)
    assert postprocess_image(dets, labels, masks, scale, orig_hw, 0.2, 0.5, with_masks=False).rles is None


def _torchvision_cases(seed: int = 0):
    """Random 28x28 masks with boxes of every kind: inside, partly outside, 1-px, huge, degenerate (not wholly
    outside the image: torchvision itself fails on those, and detections are clipped to the image)."""
    rng = np.random.default_rng(seed)
    h, w = 480, 640
    boxes = [
        [100.3, 50.7, 300.2, 400.9], [-40.5, -30.2, 120.8, 90.1], [600.2, 400.4, 700.9, 530.6],
        [10.0, 10.0, 11.0, 11.0], [200.5, 200.5, 200.9, 200.7], [-500.0, -400.0, 1200.0, 900.0],
        [320.0, 240.0, 320.0, 240.0],
    ]
    for _ in range(40):
        x1, y1 = rng.uniform(-50, w, 2) * (1, h / w)
        boxes.append([x1, y1, x1 + rng.uniform(0.5, 400), y1 + rng.uniform(0.5, 300)])
    boxes = np.asarray(boxes, np.float32)
    masks = rng.uniform(0, 1, (len(boxes), 28, 28)).astype(np.float32)
    masks[::3] = (masks[::3] > 0.6).astype(np.float32)  # some hard-edged masks
    return masks, boxes, (h, w)


def test_torchvision_paste_equals_paste_masks_in_image():
    import torch
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    masks, boxes, image_hw = _torchvision_cases()
    theirs = paste_masks_in_image(torch.from_numpy(masks)[:, None], torch.from_numpy(boxes), image_hw)[:, 0].numpy()
    ours = paste_masks(masks, boxes, image_hw, 0.5, rule="torchvision")
    differ = ours != (theirs > 0.5)
    # only where torch's resized value lies within float32 rounding of the threshold (the hard-edged
    # masks interpolate to exactly 0.5 at their edges, where the two roundings decide differently)
    assert np.all(np.abs(theirs[differ] - 0.5) < 1e-5), np.abs(theirs[differ] - 0.5).max()
    assert ours.sum() > 100_000 and differ.sum() < 1e-3 * ours.sum()
    soft = np.ones(len(masks), bool)
    soft[::3] = False
    assert not differ[soft].any()  # probabilities from a model: no ties, the same pixels


def test_torchvision_rle_is_byte_identical_to_pycocotools_of_its_paste():
    masks, boxes, image_hw = _torchvision_cases(seed=1)
    full = paste_masks(masks, boxes, image_hw, 0.5, rule="torchvision")
    rles = encode_rle(masks, boxes, image_hw, 0.5, rule="torchvision")
    expected = [coco_mask.encode(np.asfortranarray(m.astype(np.uint8))) for m in full]
    assert [r["counts"] for r in rles] == [e["counts"].decode() for e in expected]


def test_torchvision_box_rescale_equals_resize_boxes():
    import torch
    from torchvision.models.detection.transform import resize_boxes

    rng = np.random.default_rng(2)
    boxes = rng.uniform(0, 800, (50, 4)).astype(np.float32)
    orig_hw, resized_hw = (427, 640), (800, 1199)
    scale_factor = (resized_hw[1] / orig_hw[1], resized_hw[0] / orig_hw[0])
    theirs = resize_boxes(torch.from_numpy(boxes), list(resized_hw), list(orig_hw)).numpy()
    np.testing.assert_array_equal(rescale_boxes(boxes, scale_factor, orig_hw, rule="torchvision"), theirs)
