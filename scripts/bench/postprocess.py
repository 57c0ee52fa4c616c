"""Benchmark host postprocess (select -> rescale -> paste -> COCO RLE) against mmdet's way.

The baseline, measured in the same run, is the straightforward implementation: mmdet's CPU
``_do_paste_mask`` (torch ``grid_sample`` over each box's region), ``>= threshold`` into a
full-image bool mask, then ``pycocotools.mask.encode`` of its Fortran-ordered uint8 copy.
:func:`mmdet_paste_mask_values` is that reference; tests/test_postprocess.py checks
service.postprocess against it.

Workload per image: 100 detections with box sides log-uniform in [2 %, 90 %] of the image side
(about 5 image areas of pasted region in total, a busy COCO image), smooth blob-shaped 28x28
masks. Torch runs with 1 thread, as one service worker thread would.

    python -m scripts.bench.postprocess [--repeats 20]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterator

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as coco_mask

from service.postprocess import postprocess_image, rescale_boxes, select_valid
from service.preprocess import InputSpec

MASK_SIZE = 28


def mmdet_paste_mask_values(
    masks: np.ndarray, boxes: np.ndarray, image_hw: tuple[int, int]
) -> Iterator[tuple[np.ndarray, slice, slice]]:
    """The straightforward reference of mmdet's mask pasting, written from its definition.

    For each box, the image region from ``floor(x1) - 1`` to ``ceil(x2) + 1`` (likewise in y, clipped
    to the image) is sampled from the box's mask with ``torch.nn.functional.grid_sample``
    (bilinear, zero padding, ``align_corners=False``), pixel centres mapped linearly so the box
    edges fall on the grid's -1 and +1.

    Args:
        masks: float32 ``[K, Mh, Mw]`` mask probabilities in the box frame.
        boxes: float32 ``[K, 4]`` ``x1, y1, x2, y2`` in image pixels with ``x2 > x1``, ``y2 > y1``.
        image_hw: ``(H, W)``.

    Yields:
        Per box: float32 sampled values ``[h, w]`` and the ``(rows, cols)`` slices of the image
        they cover.
    """
    img_h, img_w = image_hw
    for mask, (x1, y1, x2, y2) in zip(np.asarray(masks, np.float32), np.asarray(boxes, np.float32)):
        x1, y1, x2, y2 = (torch.tensor(float(v), dtype=torch.float32) for v in (x1, y1, x2, y2))
        cols = slice(max(int(torch.floor(x1)) - 1, 0), min(int(torch.ceil(x2)) + 1, img_w))
        rows = slice(max(int(torch.floor(y1)) - 1, 0), min(int(torch.ceil(y2)) + 1, img_h))
        centres_x = torch.arange(cols.start, cols.stop, dtype=torch.float32) + 0.5
        centres_y = torch.arange(rows.start, rows.stop, dtype=torch.float32) + 0.5
        grid_x = (centres_x - x1) / (x2 - x1) * 2 - 1
        grid_y = (centres_y - y1) / (y2 - y1) * 2 - 1
        gy, gx = torch.meshgrid(grid_y, grid_x, indexing="ij")
        grid = torch.stack((gx, gy), dim=-1)[None]
        values = F.grid_sample(torch.from_numpy(mask)[None, None], grid, align_corners=False)
        yield values[0, 0].numpy(), rows, cols


def reference_postprocess(
    dets: np.ndarray,
    labels: np.ndarray,
    masks: np.ndarray,
    scale_factor: tuple[float, float],
    orig_hw: tuple[int, int],
    score_threshold: float,
    mask_threshold: float,
) -> list[dict]:
    """The baseline: mmdet paste, full-image bool mask per box, pycocotools encode. Returns RLEs."""
    dets, labels, masks = select_valid(dets, labels, masks, score_threshold)
    boxes = rescale_boxes(dets[:, :4], scale_factor, orig_hw)
    rles = []
    for values, rows, cols in mmdet_paste_mask_values(masks, boxes, orig_hw):
        full = np.zeros(orig_hw, bool)
        full[rows, cols] = values >= mask_threshold
        rle = coco_mask.encode(np.asfortranarray(full.astype(np.uint8)))
        rles.append({"size": rle["size"], "counts": rle["counts"].decode("ascii")})
    return rles


def synthetic_outputs(
    orig_hw: tuple[int, int], n: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[float, float]]:
    """Engine outputs for one image of size ``orig_hw``: ``(dets [n, 5], labels [n], masks
    [n, 28, 28], scale_factor)``, boxes in resized-input pixels as the graph emits them."""
    h_in, w_in = InputSpec().resized_hw(orig_hw)
    side = np.exp(rng.uniform(np.log(0.02), np.log(0.9), size=(n, 2)))
    size = side * [w_in, h_in]
    corner = rng.uniform(0, 1, size=(n, 2)) * ([w_in, h_in] - size)
    dets = np.concatenate([corner, corner + size, np.sort(rng.uniform(0.05, 1, (n, 1)), 0)[::-1]], 1)
    grid = (np.arange(MASK_SIZE) + 0.5) / MASK_SIZE * 2 - 1
    ellipse = 1 - grid[None, :, None] ** 2 - grid[None, None, :] ** 2
    noise = np.stack([cv2.resize(rng.normal(size=(7, 7)), (MASK_SIZE, MASK_SIZE)) for _ in range(n)])
    masks = 1 / (1 + np.exp(-(6 * ellipse + 2 * noise)))
    labels = rng.integers(0, 80, n)
    return dets.astype(np.float32), labels, masks.astype(np.float32), (w_in / orig_hw[1], h_in / orig_hw[0])


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--detections", type=int, default=100)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    print(f"{'image (w x h)':>14} {'dets':>5} {'ours ms':>9} {'reference ms':>13} {'speed-up':>9} {'identical RLEs':>15}")
    for orig_hw in [(480, 640), (800, 1333)]:
        dets, labels, masks, scale = synthetic_outputs(orig_hw, args.detections, rng)
        call = dict(scale_factor=scale, orig_hw=orig_hw, score_threshold=0.05, mask_threshold=0.5)
        ours = postprocess_image(dets, labels, masks, **call).rles
        reference = reference_postprocess(dets, labels, masks, **call)
        same = sum(a == b for a, b in zip(ours, reference))
        ours_ms = median_ms(lambda: postprocess_image(dets, labels, masks, **call), args.repeats)
        ref_ms = median_ms(
            lambda: reference_postprocess(dets, labels, masks, **call), max(args.repeats // 10, 1)
        )
        print(
            f"{orig_hw[1]:>6} x {orig_hw[0]:<5} {len(ours):>5} {ours_ms:>9.2f} {ref_ms:>13.1f}"
            f" {ref_ms / ours_ms:>8.0f}x {same:>9}/{len(ours)}"
        )


if __name__ == "__main__":
    main()
