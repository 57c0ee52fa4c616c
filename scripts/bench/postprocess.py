"""Benchmark host postprocess (select -> rescale -> paste -> COCO RLE) against the full-mask way.

The baseline, measured in the same run, is the straightforward implementation of the same
result: every mask pasted into a full-image bool mask (``service.postprocess.paste_masks``), then
``pycocotools.mask.encode`` of their Fortran-ordered uint8 copy. The service pastes each mask only
inside its box and encodes the RLE from those crops (``postprocess_image``); both must give
identical RLEs (tests/service/test_postprocess.py checks the paste itself against mmdet's).

Workload per image: 100 detections with box sides log-uniform in [2 %, 90 %] of the image side
(about 5 image areas of pasted region in total, a busy COCO image), smooth blob-shaped 28x28
masks.

    python -m scripts.bench.postprocess [--repeats 20]
"""

from __future__ import annotations

import argparse
import statistics

import cv2
import numpy as np
from pycocotools import mask as coco_mask

from build_tools.timing import time_calls
from service.postprocess import (
    paste_masks,
    postprocess_image,
    rescale_boxes,
    select_valid,
)
from service.preprocess import InputSpec

MASK_SIZE = 28


def full_mask_postprocess(
    dets: np.ndarray,
    labels: np.ndarray,
    masks: np.ndarray,
    scale_factor: tuple[float, float],
    orig_hw: tuple[int, int],
    score_threshold: float,
    mask_threshold: float,
) -> list[dict]:
    """The baseline: full-image bool masks (``paste_masks``), pycocotools encode. Returns RLEs."""
    dets, labels, masks = select_valid(dets, labels, masks, score_threshold)
    boxes = rescale_boxes(dets[:, :4], scale_factor, orig_hw)
    full = paste_masks(masks, boxes, orig_hw, mask_threshold)
    rles = coco_mask.encode(np.asfortranarray(full.transpose(1, 2, 0).astype(np.uint8)))
    return [{"size": rle["size"], "counts": rle["counts"].decode("ascii")} for rle in rles]


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


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m scripts.bench.postprocess", description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--detections", type=int, default=100)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"{'image (w x h)':>14} {'dets':>5} {'ours ms':>9} {'full-mask ms':>13} {'speed-up':>9} {'identical RLEs':>15}")
    for orig_hw in [(480, 640), (800, 1333)]:
        dets, labels, masks, scale = synthetic_outputs(orig_hw, args.detections, rng)
        call = dict(scale_factor=scale, orig_hw=orig_hw, score_threshold=0.05, mask_threshold=0.5)
        ours = postprocess_image(dets, labels, masks, **call).rles
        baseline = full_mask_postprocess(dets, labels, masks, **call)
        same = sum(a == b for a, b in zip(ours, baseline))
        seconds = time_calls({"ours": lambda: postprocess_image(dets, labels, masks, **call),
                              "full": lambda: full_mask_postprocess(dets, labels, masks, **call)},
                             args.repeats, warmup=1)
        ours_ms, full_ms = (1e3 * statistics.median(seconds[k]) for k in ("ours", "full"))
        print(
            f"{orig_hw[1]:>6} x {orig_hw[0]:<5} {len(ours):>5} {ours_ms:>9.2f} {full_ms:>13.1f}"
            f" {full_ms / ours_ms:>8.0f}x {same:>9}/{len(ours)}"
        )


if __name__ == "__main__":
    main()
