"""Host postprocess: engine outputs of one image -> detections in original-image pixels.

Input is one image's slice of the graph outputs (docs/architecture.md): ``dets`` float32
``[N, 5]`` (``x1, y1, x2, y2, score`` in resized-input pixels), ``labels`` int64 ``[N]`` (-1 marks
a padding row) and ``masks`` float32 ``[N, Mh, Mw]`` (mask probabilities in the box frame,
Mh = Mw = 28). Steps: :func:`select_valid` -> :func:`rescale_boxes` -> :func:`encode_rle`, or all
at once with :func:`postprocess_image`.

Mask pasting has mmdet's ``_do_paste_mask`` semantics (CPU path, one box at a time) followed by
``>= threshold``: for a box ``(x0, y0, x1, y1)`` only pixels in ``[max(floor(x0) - 1, 0),
min(ceil(x1) + 1, W))`` (same for y) are touched; pixel ``x`` samples mask column
``u = (x + 0.5 - x0) / (x1 - x0) * Mw - 0.5`` (``grid_sample``, ``align_corners=False``), rows the
same way, bilinearly with zeros outside the ``Mh x Mw`` mask. One deliberate difference: a box
with ``x1 <= x0`` or ``y1 <= y0`` pastes nothing, where mmdet divides by zero and, after its
``isinf`` fix-up, samples the mask's centre line.

``rule="torchvision"`` gives torchvision's ``paste_masks_in_image`` followed by ``> threshold``:
the 28x28 mask is padded by one zero pixel on each side, its box scaled about its centre by
(M + 2) / M and truncated to integers ``(x0, y0, x1, y1)`` (``.to(torch.int64)``), the padded mask
resized bilinearly (half-pixel centres, ``align_corners=False``) to ``(y1 - y0 + 1) x
(x1 - x0 + 1)`` pixels and placed at ``(x0, y0)``, clipped to the image; boxes come back to
original pixels by torchvision's ``resize_boxes`` (times float32 original/resized, no clipping).
It is computed by the same column runs as the mmdet paste below (the resized mask is bilinear in
the padded mask, so only the mapping from pixels to mask coordinates differs) and equals
torchvision's output except where a resized value lies within float32 rounding of the threshold.

How the mmdet paste is computed: bilinear sampling is separable, and along one image column the sampled value
is a piecewise-linear function of the mask row coordinate whose knots are the mask rows
(horizontally interpolated at that column, plus a zero knot beyond each end). Its ``>= threshold``
set is therefore a few intervals whose ends are found exactly from the knots, so each column
yields its runs of set pixels directly: the cost is O(columns x Mh) per box rather than
O(pixels x Mh), and COCO RLE (column-major runs) comes straight from those runs without ever
building a full-image mask. The result equals thresholding float32 ``grid_sample`` output except
where that value lies within float32 rounding (~1e-6) of the threshold.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pycocotools import mask as coco_mask

from service.exceptions import InvalidEngineOutputs

# How boxes return to original pixels and masks are pasted: the checkpoint origin's own way.
PasteRule = Literal["mmdet", "torchvision"]
PASTE_RULES: tuple[str, ...] = ("mmdet", "torchvision")

# Image columns pasted per vectorised step; see _mask_runs.
_COLUMNS_PER_CHUNK = 2048


@dataclass(frozen=True)
class ImageDetections:
    """One image's detections, sorted by score, descending.

    Attributes:
        boxes: float32 ``[K, 4]``, ``x1, y1, x2, y2`` in original-image pixels, clipped to the image.
        scores: float32 ``[K]``.
        labels: int64 ``[K]``, class index (the manifest's ``classes[i].index``).
        rles: K COCO RLEs ``{"size": [h0, w0], "counts": str}`` of the pasted masks, or None when
            masks were not requested.
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    rles: list[dict] | None


@dataclass(frozen=True)
class MaskCrop:
    """A pasted mask stored as the region mmdet samples for its box; outside it the mask is False.

    Attributes:
        top: first image row of the region.
        left: first image column of the region.
        mask: bool ``[h, w]`` (Fortran-ordered): image pixels ``[top:top + h, left:left + w]``.
    """

    top: int
    left: int
    mask: np.ndarray


@dataclass(frozen=True)
class _MaskRuns:
    """K pasted masks as vertical runs of set pixels, sorted by (box, x, y_start), disjoint.

    ``box`` (index into the K masks), ``x`` (image column) and the run's image rows
    ``[y_start, y_end)``: int64 ``[R]``. ``top, bottom, left, right``: int64 ``[K]``, each box's
    paste region ``[top, bottom) x [left, right)``, which holds all of its runs.
    """

    box: np.ndarray
    x: np.ndarray
    y_start: np.ndarray
    y_end: np.ndarray
    top: np.ndarray
    bottom: np.ndarray
    left: np.ndarray
    right: np.ndarray


def select_valid(
    dets: np.ndarray,
    labels: np.ndarray,
    masks: np.ndarray,
    score_threshold: float = 0.0,
    max_detections: int | None = None,
    keep_classes: Iterable[int] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keep real detections (``label >= 0``) scoring ``>= score_threshold``, best first.

    Args:
        dets: float32 ``[N, 5]``, ``x1, y1, x2, y2, score``.
        labels: int64 ``[N]``, -1 for padding rows.
        masks: float32 ``[N, Mh, Mw]``.
        score_threshold: minimum score, compared in float32.
        max_detections: keep at most this many (the highest scoring), or None for all.
        keep_classes: class indices to keep, or None for all.

    Returns:
        ``(dets [K, 5], labels [K], masks [K, Mh, Mw])``, sorted by score descending (stable, so
        equal scores keep the engine's order).

    Raises:
        InvalidEngineOutputs: shapes that do not match each other or the contract.
    """
    _check_detections(dets, labels, masks)
    scores = dets[:, 4]
    keep = (labels >= 0) & (scores >= scores.dtype.type(score_threshold))
    if keep_classes is not None:
        keep &= np.isin(labels, np.fromiter(keep_classes, np.int64))
    index = np.flatnonzero(keep)
    index = index[np.argsort(-scores[index], kind="stable")]
    if max_detections is not None:
        index = index[:max_detections]
    return dets[index], labels[index], masks[index]


def rescale_boxes(
    boxes: np.ndarray, scale_factor: tuple[float, float], orig_hw: tuple[int, int], rule: PasteRule = "mmdet"
) -> np.ndarray:
    """Map boxes from resized-input pixels to original-image pixels.

    Args:
        boxes: ``[K, 4]`` ``x1, y1, x2, y2`` in resized-input pixels.
        scale_factor: ``(w_scale, h_scale)`` with resized = original * scale
            (``PreparedImage.scale_factor``).
        orig_hw: ``(h0, w0)`` of the original image.
        rule: ``mmdet``: divided by the scale factor and clipped to the image; ``torchvision``:
            multiplied by float32 ``original / resized`` side lengths, not clipped.

    Returns:
        float32 ``[K, 4]`` in original-image pixels, computed in float32 as the origin does.

    Raises:
        InvalidEngineOutputs: boxes not ``[K, 4]``, or a scale factor that is not positive.
    """
    boxes = np.asarray(boxes)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise InvalidEngineOutputs(f"boxes must be [K, 4], got {list(boxes.shape)}")
    w_scale, h_scale = scale_factor
    if not (w_scale > 0 and h_scale > 0):
        raise InvalidEngineOutputs(f"scale factors must be > 0, got {scale_factor}")
    h0, w0 = orig_hw
    if rule == "torchvision":
        w, h = round(w_scale * w0), round(h_scale * h0)  # the resized sides, integers
        ratio_w, ratio_h = np.float32(w0) / np.float32(w), np.float32(h0) / np.float32(h)
        return boxes.astype(np.float32) * np.array([ratio_w, ratio_h, ratio_w, ratio_h], np.float32)
    out = boxes.astype(np.float32) / np.array([w_scale, h_scale, w_scale, h_scale], np.float32)
    np.clip(out[:, 0::2], 0, w0, out=out[:, 0::2])
    np.clip(out[:, 1::2], 0, h0, out=out[:, 1::2])
    return out


def paste_masks(
    masks: np.ndarray, boxes: np.ndarray, image_hw: tuple[int, int], threshold: float = 0.5,
    rule: PasteRule = "mmdet",
) -> np.ndarray:
    """Paste box-frame mask probabilities into full-image binary masks (see the module docstring).

    Args:
        masks: float ``[K, Mh, Mw]`` mask probabilities in the box frame.
        boxes: float ``[K, 4]`` ``x1, y1, x2, y2`` in pixels of the target image; may reach outside it.
        image_hw: ``(H, W)`` of the target image.
        threshold: ``mmdet``: a pixel is set where the sampled value is ``>= float32(threshold)``;
            boxes with ``x2 <= x1`` or ``y2 <= y1`` paste nothing (mmdet would divide by zero).
            ``torchvision``: where the resized value is ``> threshold``. Must be > 0.
        rule: whose paste, ``mmdet`` or ``torchvision``.

    Returns:
        bool ``[K, H, W]``. For memory, prefer :func:`paste_mask_crops` or :func:`encode_rle`.

    Raises:
        InvalidEngineOutputs: bad shapes, non-finite boxes, or ``threshold <= 0``.
    """
    h, w = image_hw
    full = np.zeros((len(boxes), h, w), bool)
    for k, crop in enumerate(paste_mask_crops(masks, boxes, image_hw, threshold, rule)):
        ch, cw = crop.mask.shape
        full[k, crop.top : crop.top + ch, crop.left : crop.left + cw] = crop.mask
    return full


def paste_mask_crops(
    masks: np.ndarray, boxes: np.ndarray, image_hw: tuple[int, int], threshold: float = 0.5,
    rule: PasteRule = "mmdet",
) -> list[MaskCrop]:
    """:func:`paste_masks`, but each mask kept as the crop of the region its box touches.

    Arguments and errors as :func:`paste_masks`. Returns K crops; a degenerate box, or one whose
    region misses the image, gives an empty crop.
    """
    runs = _mask_runs(masks, boxes, image_hw, threshold, rule)
    top, left = runs.top, runs.left
    crop_h, crop_w = runs.bottom - top, runs.right - left
    crop_area = crop_h * crop_w
    crop_offset = np.cumsum(crop_area) - crop_area
    # Column-major index of each run's ends inside the concatenated crops; a +1 at every start
    # and -1 at every end, accumulated, is the mask. Starts are unique and so are ends.
    b = runs.box
    column_base = crop_offset[b] + (runs.x - left[b]) * crop_h[b] - top[b]
    delta = np.zeros(int(crop_area.sum()) + 1, np.int8)
    delta[column_base + runs.y_start] = 1
    delta[column_base + runs.y_end] -= 1
    filled = np.cumsum(delta[:-1], dtype=np.int8).view(bool)
    return [
        MaskCrop(
            top=int(top[k]),
            left=int(left[k]),
            mask=filled[crop_offset[k] : crop_offset[k] + crop_area[k]].reshape(crop_w[k], crop_h[k]).T,
        )
        for k in range(len(crop_area))
    ]


def encode_rle(
    masks: np.ndarray, boxes: np.ndarray, image_hw: tuple[int, int], threshold: float = 0.5,
    rule: PasteRule = "mmdet",
) -> list[dict]:
    """Paste masks as :func:`paste_masks` does and encode each as COCO RLE of the full image.

    Arguments and errors as :func:`paste_masks`.

    Returns:
        K dicts ``{"size": [H, W], "counts": str}``, byte-identical to
        ``pycocotools.mask.encode(np.asfortranarray(paste_masks(...)[k].astype(np.uint8)))``
        with counts decoded to str. The runs come from the pasting directly; no full mask is built.
    """
    h, w = int(image_hw[0]), int(image_hw[1])
    k = len(boxes)
    runs = _mask_runs(masks, boxes, (h, w), threshold, rule)
    # Column-major pixel index of every run start and end, interleaved: the mask's transitions.
    transitions = np.empty(2 * len(runs.box), np.int64)
    transitions[0::2] = runs.x * h + runs.y_start
    transitions[1::2] = runs.x * h + runs.y_end
    transition_box = np.repeat(runs.box, 2)
    # A run ending where the next one starts (across rows of one column, or across columns when
    # the region spans the image height) is a single run.
    touching = (transitions[1:] == transitions[:-1]) & (transition_box[1:] == transition_box[:-1])
    keep = transitions != h * w  # pycocotools' counts do not close a run at the mask's end
    keep[1:] &= ~touching
    keep[:-1] &= ~touching
    transitions, transition_box = transitions[keep], transition_box[keep]
    # Per box the sequence 0, transitions..., H*W; its differences are the RLE counts.
    per_box = np.bincount(transition_box, minlength=k)
    sequence_start = np.cumsum(per_box + 2) - (per_box + 2)
    sequence = np.empty(int(per_box.sum()) + 2 * k, np.int64)
    sequence[sequence_start] = 0
    sequence[sequence_start + per_box + 1] = h * w
    sequence[np.arange(len(transitions)) + 2 * transition_box + 1] = transitions
    counts = np.diff(sequence)
    uncompressed = [
        {"size": [h, w], "counts": counts[s : s + n + 1]} for s, n in zip(sequence_start, per_box)
    ]
    if not uncompressed:
        return []
    # pycocotools' own C encoder turns counts into its LEB128-like string.
    return [
        {"size": [h, w], "counts": rle["counts"].decode("ascii")}
        for rle in coco_mask.frPyObjects(uncompressed, h, w)
    ]


def postprocess_image(
    dets: np.ndarray,
    labels: np.ndarray,
    masks: np.ndarray,
    scale_factor: tuple[float, float],
    orig_hw: tuple[int, int],
    score_threshold: float,
    mask_threshold: float,
    max_detections: int | None = None,
    keep_classes: Iterable[int] | None = None,
    with_masks: bool = True,
    paste: PasteRule = "mmdet",
) -> ImageDetections:
    """One image's engine outputs -> detections in original-image pixels.

    Args:
        dets, labels, masks: the image's rows of the graph outputs (see module docstring).
        scale_factor: ``(w_scale, h_scale)`` of the image's preprocessing.
        orig_hw: ``(h0, w0)`` of the original image.
        score_threshold, max_detections, keep_classes: as :func:`select_valid`.
        mask_threshold: as ``threshold`` of :func:`paste_masks`.
        with_masks: encode masks as RLE; False leaves ``rles`` None and skips the work.
        paste: the checkpoint origin's box rescaling and mask paste (``manifest.postprocess.paste``).

    Raises:
        InvalidEngineOutputs: outputs that break the contract, or ``mask_threshold <= 0``.
    """
    dets, labels, masks = select_valid(
        dets, labels, masks, score_threshold, max_detections, keep_classes
    )
    boxes = rescale_boxes(dets[:, :4], scale_factor, orig_hw, paste)
    rles = encode_rle(masks, boxes, orig_hw, mask_threshold, paste) if with_masks else None
    return ImageDetections(
        boxes=boxes, scores=dets[:, 4].astype(np.float32), labels=labels.astype(np.int64), rles=rles
    )


def _check_detections(dets: np.ndarray, labels: np.ndarray, masks: np.ndarray) -> None:
    n = len(dets)
    if dets.ndim != 2 or dets.shape[1] != 5:
        raise InvalidEngineOutputs(f"dets must be [N, 5], got {list(dets.shape)}")
    if labels.shape != (n,):
        raise InvalidEngineOutputs(f"labels must be [{n}], got {list(labels.shape)}")
    if masks.ndim != 3 or len(masks) != n:
        raise InvalidEngineOutputs(f"masks must be [{n}, Mh, Mw], got {list(masks.shape)}")


def _paste_regions(
    boxes: np.ndarray, image_hw: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per box the pixel region ``[top, bottom) x [left, right)`` that mmdet's paste samples.

    ``boxes`` float64 ``[K, 4]``. Returns four int64 ``[K]``; the region is empty for degenerate
    boxes and for boxes outside the image.
    """
    h, w = image_hw
    x0, y0, x1, y1 = boxes.T
    left = np.clip(np.floor(x0) - 1, 0, w)
    top = np.clip(np.floor(y0) - 1, 0, h)
    degenerate = (x1 <= x0) | (y1 <= y0)
    right = np.where(degenerate, left, np.clip(np.ceil(x1) + 1, left, w))
    bottom = np.where(degenerate, top, np.clip(np.ceil(y1) + 1, top, h))
    return top.astype(np.int64), bottom.astype(np.int64), left.astype(np.int64), right.astype(np.int64)


def _mask_runs(
    masks: np.ndarray, boxes: np.ndarray, image_hw: tuple[int, int], threshold: float, rule: PasteRule
) -> _MaskRuns:
    """The vertical runs of set pixels of the pasted masks; see the module docstring."""
    masks = np.asarray(masks)
    k = len(boxes)
    if np.shape(boxes) != (k, 4) or masks.ndim != 3 or len(masks) != k:
        raise InvalidEngineOutputs(
            f"need masks [K, Mh, Mw] and boxes [K, 4], got {list(masks.shape)} and {list(np.shape(boxes))}"
        )
    if not np.isfinite(boxes).all():
        raise InvalidEngineOutputs("boxes must be finite")
    # Compared in float32 as torch compares a float32 tensor with a Python float.
    t = float(np.float32(threshold))
    if not t > 0:
        raise InvalidEngineOutputs(f"mask threshold must be > 0, got {threshold}")
    mask_h, mask_w = masks.shape[1:]
    if rule == "mmdet":
        boxes = np.asarray(boxes, np.float64)
        top, bottom, left, right = _paste_regions(boxes, image_hw)
        x0, y0 = boxes[:, 0], boxes[:, 1]
        box_w, box_h = boxes[:, 2] - x0, boxes[:, 3] - y0

        def mask_column(x: np.ndarray, box: np.ndarray) -> np.ndarray:  # u of image column x
            return (x + 0.5 - x0[box]) / box_w[box] * mask_w - 0.5

        # Image row y samples mask row v = (y + 0.5 - y0) / h_box * Mh - 0.5, i.e. y = v * a + b.
        row_a = box_h / mask_h
        row_b = (y0 - 0.5) + 0.5 * row_a
    elif rule == "torchvision":
        top, bottom, left, right, x0, y0, box_w, box_h = _torchvision_regions(
            np.asarray(boxes, np.float32), image_hw, mask_w)
        # Pixel j of the resized (M + 2)-wide padded mask samples padded column
        # max((M + 2) / W * (j + 0.5) - 0.5, 0), i.e. mask column u = that - 1 (clipped below).
        scale_x, scale_y = (mask_w + 2) / box_w, (mask_h + 2) / box_h

        def mask_column(x: np.ndarray, box: np.ndarray) -> np.ndarray:
            return scale_x[box] * (x - x0[box] + 0.5) - 1.5

        row_a = 1 / scale_y
        row_b = 1.5 * row_a + y0 - 0.5
        t = float(np.nextafter(np.float32(t), np.float32(np.inf)))  # "> t" is ">= the next float32"
    else:
        raise InvalidEngineOutputs(f"unknown paste rule {rule!r}; expected one of {PASTE_RULES}")

    # One entry per image column of every box's region.
    columns = np.where(bottom > top, right - left, 0)
    column_box = np.repeat(np.arange(k), columns)
    column_x = np.arange(len(column_box)) - np.repeat(np.cumsum(columns) - columns - left, columns)

    # Horizontal interpolation: along column x the knots are the Mh mask rows sampled at u,
    # framed by a zero knot at each end for the zero padding: left + frac * (right - left) between
    # the two mask columns around u. knot_table holds, per box and mask column j of a
    # zero-bordered copy, the row (right - left | left) for u in [j - 1, j); u is clipped to the
    # support [-1, Mw], outside of which every value is 0.
    u = np.clip(mask_column(column_x, column_box), -1, mask_w)
    u_floor = np.floor(u)
    bordered = np.zeros((k, mask_w + 2, mask_h + 2), np.float32)
    bordered[:, 1:-1, 1:-1] = masks.transpose(0, 2, 1)
    knot_table = np.zeros((k, mask_w + 2, 2, mask_h + 2), np.float32)
    knot_table[:, :-1, 0] = bordered[:, 1:] - bordered[:, :-1]
    knot_table[:, :, 1] = bordered
    knot_table = knot_table.reshape(k * (mask_w + 2), 2 * (mask_h + 2))
    column_pair = column_box * (mask_w + 2) + (u_floor + 1).astype(np.int64)
    column_frac = (u - u_floor).astype(np.float32)
    # Image row y samples mask row v = (y + 0.5 - y0) / h_box * Mh - 0.5, i.e. y = v * a + b.

    # Chunks of columns bound the temporaries (~1 MB) so they reuse heap memory rather than
    # fault in fresh pages on every call, which cost more than the arithmetic. There is always
    # one chunk, so no columns at all still give (empty) int64 runs.
    chunks = [
        _column_runs(
            knot_table[column_pair[c : c + _COLUMNS_PER_CHUNK]],
            column_frac[c : c + _COLUMNS_PER_CHUNK],
            column_box[c : c + _COLUMNS_PER_CHUNK],
            c,
            row_a,
            row_b,
            top,
            bottom,
            t,
        )
        for c in range(0, max(len(column_box), 1), _COLUMNS_PER_CHUNK)
    ]
    run_column, y_start, y_end = (np.concatenate(parts) for parts in zip(*chunks))
    return _MaskRuns(
        box=column_box[run_column],
        x=column_x[run_column],
        y_start=y_start,
        y_end=y_end,
        top=top,
        bottom=bottom,
        left=left,
        right=right,
    )


def _column_runs(
    knot_rows: np.ndarray,
    frac: np.ndarray,
    box: np.ndarray,
    first_column: int,
    row_a: np.ndarray,
    row_b: np.ndarray,
    top: np.ndarray,
    bottom: np.ndarray,
    t: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Runs of set pixels in C image columns.

    Args:
        knot_rows: float32 ``[C, 2 * (Mh + 2)]``, per column ``(right - left | left)`` knot rows.
        frac: float32 ``[C]``, position of the column's u between ``left`` and ``right``.
        box: int64 ``[C]``, the column's box.
        first_column: index of the first of these columns among all columns.
        row_a, row_b: float64 ``[K]``, per box: image row ``y = v * row_a + row_b`` samples mask row v.
        top, bottom: int64 ``[K]``, per box the rows ``[top, bottom)`` of its paste region.
        t: the threshold, > 0.

    Returns:
        int64 ``[R]`` each: the run's column (``first_column`` + index into the C) and its rows
        ``[y_start, y_end)``; runs sorted by column then row, disjoint, non-empty.
    """
    n_knots = knot_rows.shape[1] // 2
    knots = knot_rows[:, :n_knots]
    knots *= frac[:, None]
    knots += knot_rows[:, n_knots:]  # [C, Mh + 2]; knot j is mask row j - 1

    # Threshold crossings between knots. Both end knots are 0 < t, so each column has an even
    # number of crossings, alternately upward (set from here) and downward (set up to here).
    above = knots >= t
    crossing = np.flatnonzero(above[:, 1:] != above[:, :-1])
    column, knot = np.divmod(crossing, n_knots - 1)
    low_index = column * (2 * n_knots) + knot
    knot_values = knot_rows.reshape(-1)
    low = knot_values[low_index]
    v = ((t - low) / (knot_values[low_index + 1] - low)).astype(np.float64)
    v += knot - 1  # the mask row coordinate where the value crosses t
    crossing_box = box[column]
    y = v * row_a[crossing_box]
    y += row_b[crossing_box]
    np.ceil(y[0::2], out=y[0::2])  # first pixel at or past an upward crossing
    np.floor(y[1::2], out=y[1::2])
    y[1::2] += 1  # first pixel past a downward crossing
    np.clip(y, top[crossing_box], bottom[crossing_box], out=y)
    boundary = y.astype(np.int64)
    # Rounding could put a boundary before the previous one of its column; keep them ordered.
    column_key = column * (int(bottom.max(initial=0)) + 1)
    boundary += column_key
    np.maximum.accumulate(boundary, out=boundary)
    boundary -= column_key
    y_start, y_end = boundary[0::2], boundary[1::2]
    nonempty = y_start < y_end
    return column[0::2][nonempty] + first_column, y_start[nonempty], y_end[nonempty]


def _torchvision_regions(boxes: np.ndarray, image_hw: tuple[int, int], mask_size: int) -> tuple[np.ndarray, ...]:
    """torchvision's integer paste boxes of float32 ``boxes [K, 4]`` for ``mask_size``-wide masks:
    ``(top, bottom, left, right)`` of the region inside the image and ``(x0, y0, W, H)`` of the
    resized padded mask, int64 ``[K]`` each (``expand_boxes`` in float32 with scale (M + 2) / M,
    then ``.to(torch.int64)``, which truncates toward zero)."""
    h, w = image_hw
    scale = np.float32((mask_size + 2) / mask_size)
    half_w = (boxes[:, 2] - boxes[:, 0]) * np.float32(0.5) * scale
    half_h = (boxes[:, 3] - boxes[:, 1]) * np.float32(0.5) * scale
    centre_x = (boxes[:, 2] + boxes[:, 0]) * np.float32(0.5)
    centre_y = (boxes[:, 3] + boxes[:, 1]) * np.float32(0.5)
    x0, x1 = np.trunc(centre_x - half_w).astype(np.int64), np.trunc(centre_x + half_w).astype(np.int64)
    y0, y1 = np.trunc(centre_y - half_h).astype(np.int64), np.trunc(centre_y + half_h).astype(np.int64)
    left, top = np.clip(x0, 0, w), np.clip(y0, 0, h)
    right, bottom = np.maximum(np.clip(x1 + 1, 0, w), left), np.maximum(np.clip(y1 + 1, 0, h), top)
    return top, bottom, left, right, x0, y0, np.maximum(x1 - x0 + 1, 1), np.maximum(y1 - y0 + 1, 1)
