"""Shape helpers of the builders that compile fixed shape ranges (TensorRT, MagicMind): build time only."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from service.manifest import ShapeProfile

# H and W ranges and the batch range when no shape profile is given.
DEFAULT_HW = {"min": (32, 32), "opt": (800, 1344), "max": (1344, 1344)}
DEFAULT_MAX_BATCH = 8


def profile_shapes(
    input_shapes: Mapping[str, Sequence[int]],
    shape_profile: ShapeProfile | None = None,
) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """(min, opt, max) shape of every graph input, for an optimisation profile.

    Args:
        input_shapes: the graph's input shapes in graph order, -1 for dynamic dimensions:
            ``images [B, 3, H, W]`` and ``image_sizes [B, 2]``.
        shape_profile: the manifest's shape profile, or None for the defaults: H and W from 32 to
            1344, opt 800 x 1344, a dynamic batch from 1 to 8. A mutable batch runs from its
            ``min`` to its ``max`` with opt = max.

    Static dimensions keep their value; a dynamic dimension 0 takes the batch range, dynamic
    dimensions 2 and 3 of a 4-D input the H and W ranges.

    Raises:
        ValueError: a dynamic dimension this model does not have, a profile whose fixed batch
            differs from the graph's, or min > opt > max out of order.
    """
    if shape_profile is None:
        hw = DEFAULT_HW
        fixed_batch = None
        batch_range = {"min": 1, "opt": DEFAULT_MAX_BATCH, "max": DEFAULT_MAX_BATCH}
    else:
        hw = {"min": shape_profile.min_hw, "opt": shape_profile.opt_hw, "max": shape_profile.max_hw}
        batch = shape_profile.batch
        fixed_batch = None if batch.mutable else batch.size
        if fixed_batch is not None:
            batch_range = dict.fromkeys(("min", "opt", "max"), fixed_batch)
        else:
            batch_range = {"min": batch.min, "opt": batch.max, "max": batch.max}
    shapes = {}
    for name, dims in input_shapes.items():
        dims = tuple(int(d) for d in dims)
        if dims and dims[0] >= 0 and fixed_batch not in (None, dims[0]):
            raise ValueError(f"the shape profile's batch {fixed_batch} differs from the graph's fixed batch {dims[0]}")
        per_key = []
        for key in ("min", "opt", "max"):
            shape = []
            for axis, d in enumerate(dims):
                if d >= 0:
                    shape.append(d)
                elif axis == 0:
                    shape.append(int(batch_range[key]))
                elif len(dims) == 4 and axis in (2, 3):
                    shape.append(int(hw[key][axis - 2]))
                else:
                    raise ValueError(
                        f"input {name} {list(dims)}: dimension {axis} is dynamic; only batch, H and W may be")
            per_key.append(tuple(shape))
        low, opt, high = per_key
        if not all(a <= b <= c for a, b, c in zip(low, opt, high)):
            raise ValueError(f"input {name}: shape profile out of order, min {low} opt {opt} max {high}")
        shapes[name] = (low, opt, high)
    return shapes


def pad_to(array: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """``array`` padded at the end of every axis with zeros to ``shape`` (images bottom/right, as
    the host pads a batch; an ``image_sizes`` row of zeros for a batch slot added).

    Raises:
        ValueError: ``array`` is larger than ``shape`` on some axis.
    """
    if len(shape) != array.ndim or any(s > t for s, t in zip(array.shape, shape)):
        raise ValueError(f"cannot pad an array of shape {list(array.shape)} to {list(shape)}")
    return np.pad(array, [(0, t - s) for s, t in zip(array.shape, shape)])
