"""The test oracle of service.postprocess's mask pasting: mmdet's CPU ``_do_paste_mask``, written
from its definition with torch ``grid_sample`` (tests/service/test_postprocess.py)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F


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
