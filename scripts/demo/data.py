"""Synthetic COCO-layout instance-segmentation data: plain, well-separated shapes of three classes.

No COCO download is possible where this project is developed, so accuracy is measured on a
dataset we can generate and a model trained on it here, from scratch, on CPU. The data is made
easy enough for that model to become confident (so a fraction of an AP point lost by an engine
is measurable): each image is a plain background (one colour with a gentle gradient and a little
sensor noise) holding 1..`max_objects` large, solid-coloured shapes that do not overlap. The
three shape kinds are the dataset's own categories (`SHAPE_CATEGORIES`: circle, square,
triangle, ids 1..3), not COCO's. Each kind is painted in its own family of hues (reds, greens,
blues), so colour and outline both tell the classes apart: with shape alone and any colour, 45
minutes of training left the box head unsure of the class (detections of the wrong shape at
scores up to 0.8, about 19 detections above 0.3 per 2.6 objects).

Layout written by `write_dataset` (the COCO layout; `maskrcnn-demo data` on the command line):

    OUT/annotations/instances_train.json    OUT/train/000000000001.jpg ...
    OUT/annotations/instances_val.json      OUT/val/000000000001.jpg ...

Masks are exact. Every shape is a polygon rasterised with pycocotools, the rasteriser that
`COCO.annToMask` uses, so the polygon written for an unoccluded object decodes to exactly the
painted pixels. When settings allow overlap (`min_visible_fraction` < 1), an object partly hidden
by a later one gets an RLE of its visible pixels instead. `area` is the visible pixel count and
`bbox` the tight `[x, y, w, h]` of the visible pixels.

Output is deterministic: image `i` of a split draws all its randomness from
`np.random.default_rng([seed, split_id, i])`, and JSON is written with sorted keys and fixed
separators, so the same arguments give byte-identical files on the same machine and library
versions (JPEG encoders and SIMD float paths may differ between machines). The annotation
files' `info` records the seed and the generation settings (`data_info`), which the demo model's
cache key includes (`scripts.demo.model_cache`).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
from pycocotools import mask as mask_utils
from tqdm import tqdm


class DemoDataError(Exception):
    """A dataset request that cannot be carried out; the CLI reports it as a usage error
    (exit status 2)."""


class InvalidSettingsError(DemoDataError, ValueError):
    """Generation settings that are out of range or contradict each other."""


class OutputNotEmptyError(DemoDataError, FileExistsError):
    """The output folder already holds files and overwriting was not asked for."""


def _unit_circle(rng: np.random.Generator) -> np.ndarray:
    return _regular_polygon(64, rng.uniform(0.0, 2.0 * math.pi))


def _unit_square(rng: np.random.Generator) -> np.ndarray:
    # Tilted by at most 30 degrees, so a square never turns into a diamond that looks pointed.
    return _regular_polygon(4, math.pi / 4 + rng.uniform(-math.pi / 6, math.pi / 6))


def _unit_triangle(rng: np.random.Generator) -> np.ndarray:
    return _regular_polygon(3, rng.uniform(0.0, 2.0 * math.pi))


def _regular_polygon(vertex_count: int, phase: float) -> np.ndarray:
    """Vertices of a regular polygon on the unit circle: float64 `[vertex_count, 2]`, (x, y)."""
    angles = phase + 2.0 * math.pi * np.arange(vertex_count) / vertex_count
    return np.stack([np.cos(angles), np.sin(angles)], axis=1)


@dataclass(frozen=True)
class ShapeCategory:
    """One kind of synthetic shape and its category in the written annotation files.

    `unit_outline(rng)` returns the shape's polygon, already oriented, at an arbitrary scale:
    float64 `[N, 2]` (x, y) vertices of a convex polygon. `hue` (degrees, 0..360) is the centre of
    the hues its objects are painted in (`_category_colour`).
    """

    category_id: int
    name: str
    unit_outline: Callable[[np.random.Generator], np.ndarray]
    hue: float


# The one table of the dataset's categories (ids 1..3, the demo model's class table).
SHAPE_CATEGORIES: tuple[ShapeCategory, ...] = (
    ShapeCategory(1, "circle", _unit_circle, hue=0.0),
    ShapeCategory(2, "square", _unit_square, hue=120.0),
    ShapeCategory(3, "triangle", _unit_triangle, hue=240.0),
)
_CATEGORY_BY_ID = {category.category_id: category for category in SHAPE_CATEGORIES}
SUPERCATEGORY = "shape"

# (width, height) in pixels, landscape and portrait; the service resizes both to 1067x800.
IMAGE_SIZES: tuple[tuple[int, int], ...] = ((640, 480), (480, 640))

SPLIT_IDS: dict[str, int] = {"train": 0, "val": 1}

JPEG_QUALITY = 90

# Shapes keep this many pixels from the image border: pycocotools drops polygon edge points
# outside the image, so a polygon must lie inside it to rasterise as drawn.
_BORDER_PX = 1.0
_PLACEMENT_TRIES = 12
_COLOUR_TRIES = 8
_MIN_COLOUR_DISTANCE = 90.0


@dataclass(frozen=True)
class GenerationSettings:
    """What the objects in a generated image may look like.

    - `min_size`, `max_size`: range of an object's size, the longer side of its axis-aligned
      box in pixels of the written image, before occlusion; sampled log-uniformly and capped per
      image so the shape fits inside it. The defaults become about 80..210 px at the service's
      test scale (x 1.67), inside one 256 px training crop.
    - `max_objects`: each image aims for a uniformly drawn 1..max_objects objects; fewer are
      placed when no position keeps every object visible enough.
    - `min_visible_fraction`, `min_visible_pixels`: an object stays at least this visible
      (fraction of its own pixels, and pixel count); a new object that would hide more of an
      earlier one is placed elsewhere or dropped, so every painted object is annotated. The
      default fraction 1 allows no overlap at all.
    """

    min_size: int = 48
    max_size: int = 128
    max_objects: int = 4
    min_visible_fraction: float = 1.0
    min_visible_pixels: int = 100

    def __post_init__(self) -> None:
        if self.min_size < 1:
            raise InvalidSettingsError(f"min_size must be at least 1 pixel, got {self.min_size}")
        if self.max_size < self.min_size:
            raise InvalidSettingsError(
                f"max_size ({self.max_size}) must not be below min_size ({self.min_size})"
            )
        if self.max_objects < 1:
            raise InvalidSettingsError(f"max_objects must be at least 1, got {self.max_objects}")
        if not 0.0 < self.min_visible_fraction <= 1.0:
            raise InvalidSettingsError(
                f"min_visible_fraction must be in (0, 1], got {self.min_visible_fraction}"
            )
        if self.min_visible_pixels < 1:
            raise InvalidSettingsError(
                f"min_visible_pixels must be at least 1, got {self.min_visible_pixels}"
            )


@dataclass(frozen=True)
class Instance:
    """One annotated object of a generated image.

    - `category_id`: the dataset's category id (see `SHAPE_CATEGORIES`).
    - `mask`: bool `[height, width]`, the object's visible pixels (after occlusion).
    - `bbox`: `(x, y, w, h)` ints, COCO convention: the tight box of `mask`, pixel `x` spans
      `[x, x + 1)`, so `x + w` is one past the last column.
    - `polygon`: flat `(x0, y0, x1, y1, ...)` float pixel coordinates whose pycocotools
      rasterisation is exactly `mask`, or None when the object is partly occluded.
    """

    category_id: int
    mask: np.ndarray
    bbox: tuple[int, int, int, int]
    polygon: tuple[float, ...] | None


@dataclass
class _PlacedShape:
    """A shape placed in an image: bool `[height, width]` masks of all its pixels and of those
    still visible, their pixel counts, and `box_slices` (rows, columns) of its full mask's box."""

    category_id: int
    polygon: tuple[float, ...]
    full_mask: np.ndarray
    full_pixels: int
    visible_mask: np.ndarray
    visible_pixels: int
    box_slices: tuple[slice, slice]


def generate_image(
    rng: np.random.Generator,
    width: int,
    height: int,
    settings: GenerationSettings = GenerationSettings(),
) -> tuple[np.ndarray, list[Instance]]:
    """Generate one image and its instances from `rng` (deterministic for a given rng state).

    Returns the RGB uint8 image `[height, width, 3]` and its instances in painting order
    (later ones lie on top; their masks are disjoint). Raises `InvalidSettingsError` when
    `settings.min_size` does not fit in the image.
    """
    largest_fitting = _largest_object_size(width, height)
    if settings.min_size > largest_fitting:
        raise InvalidSettingsError(
            f"min_size {settings.min_size} does not fit a {width}x{height} image "
            f"(at most {largest_fitting})"
        )
    placed = _place_shapes(rng, width, height, settings, min(settings.max_size, largest_fitting))
    image = _background(rng, height, width)
    for shape in placed:
        _paint_object(rng, image, shape)
    image = image + rng.normal(0.0, rng.uniform(1.0, 4.0), size=image.shape).astype(np.float32)
    image = np.clip(image.round(), 0, 255).astype(np.uint8)
    instances = [
        Instance(
            category_id=shape.category_id,
            mask=shape.visible_mask,
            bbox=_tight_bbox(shape.visible_mask),
            polygon=shape.polygon if shape.visible_pixels == shape.full_pixels else None,
        )
        for shape in placed
    ]
    return image, instances


def _largest_object_size(width: int, height: int) -> int:
    """The largest object size in pixels that fits inside a `width` x `height` image."""
    return int(min(width, height) - 2 * _BORDER_PX) - 1


def _place_shapes(
    rng: np.random.Generator,
    width: int,
    height: int,
    settings: GenerationSettings,
    max_size: int,
) -> list[_PlacedShape]:
    """Choose shapes one on top of the next, keeping every earlier one visible enough."""
    placed: list[_PlacedShape] = []
    for _ in range(int(rng.integers(1, settings.max_objects + 1))):
        for _ in range(_PLACEMENT_TRIES):
            candidate = _sample_shape(rng, width, height, settings.min_size, max_size)
            if candidate.full_pixels < settings.min_visible_pixels:
                continue
            rows, cols = candidate.box_slices
            candidate_box = candidate.full_mask[rows, cols]
            hidden = [
                int(np.count_nonzero(shape.visible_mask[rows, cols] & candidate_box))
                for shape in placed
            ]
            if all(
                shape.visible_pixels - hidden_pixels >= _min_visible_pixels(shape, settings)
                for shape, hidden_pixels in zip(placed, hidden)
            ):
                for shape, hidden_pixels in zip(placed, hidden):
                    if hidden_pixels:
                        shape.visible_mask = shape.visible_mask & ~candidate.full_mask
                        shape.visible_pixels -= hidden_pixels
                placed.append(candidate)
                break
    return placed


def _min_visible_pixels(shape: _PlacedShape, settings: GenerationSettings) -> float:
    """How many of `shape`'s pixels must stay visible."""
    return max(settings.min_visible_pixels, settings.min_visible_fraction * shape.full_pixels)


def _sample_shape(
    rng: np.random.Generator, width: int, height: int, min_size: int, max_size: int
) -> _PlacedShape:
    """A random shape whose axis-aligned box has a longer side of min_size..max_size pixels,
    placed wholly inside a `width` x `height` image."""
    category = SHAPE_CATEGORIES[int(rng.integers(len(SHAPE_CATEGORIES)))]
    outline = category.unit_outline(rng)
    size = math.exp(rng.uniform(math.log(min_size), math.log(max_size)))
    outline = (outline - outline.min(axis=0)) * (size / np.ptp(outline, axis=0).max())
    extent = outline.max(axis=0)
    left = rng.uniform(_BORDER_PX, width - _BORDER_PX - extent[0])
    top = rng.uniform(_BORDER_PX, height - _BORDER_PX - extent[1])
    # Rounded once, here: the written polygon is exactly the one rasterised.
    polygon = tuple(round(float(value), 2) for value in (outline + (left, top)).ravel())
    mask = _rasterise_polygon(polygon, height, width)
    x, y, box_width, box_height = _tight_bbox(mask)
    return _PlacedShape(
        category_id=category.category_id,
        polygon=polygon,
        full_mask=mask,
        full_pixels=int(np.count_nonzero(mask)),
        visible_mask=mask,
        visible_pixels=int(np.count_nonzero(mask)),
        box_slices=(slice(y, y + box_height), slice(x, x + box_width)),
    )


def _rasterise_polygon(polygon: Sequence[float], height: int, width: int) -> np.ndarray:
    """Rasterise a flat (x, y, ...) pixel-coordinate polygon exactly as `COCO.annToMask` does.

    Returns bool `[height, width]`."""
    rle = mask_utils.merge(mask_utils.frPyObjects([list(polygon)], height, width))
    return mask_utils.decode(rle).astype(bool)


def _tight_bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Tight COCO `(x, y, w, h)` of a bool mask's true pixels; `(0, 0, 0, 0)` when empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return (0, 0, 0, 0)
    return (int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1))


# How far an object's hue, saturation and value stray: hues stay within 25 degrees of the
# category's, 70 degrees from the next category's; saturation and value keep colours off grey.
_HUE_SPREAD_DEG = 25.0
_SATURATION_RANGE = (0.6, 1.0)
_VALUE_RANGE = (0.55, 1.0)


def _category_colour(rng: np.random.Generator, category_id: int) -> np.ndarray:
    """A random RGB colour (float32 `[3]`, 0..255) of the category's hue family."""
    hue = (_CATEGORY_BY_ID[category_id].hue + rng.uniform(-_HUE_SPREAD_DEG, _HUE_SPREAD_DEG)) % 360.0
    hsv = np.array([[[hue / 2.0, 255.0 * rng.uniform(*_SATURATION_RANGE), 255.0 * rng.uniform(*_VALUE_RANGE)]]],
                   np.float32)
    return cv2.cvtColor(hsv.round().astype(np.uint8), cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)


def _linear_ramp(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A ramp from 0 to 1 across a `[height, width]` area in a random direction: float32."""
    angle = rng.uniform(0.0, 2.0 * math.pi)
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
    projection = cols * math.cos(angle) + rows * math.sin(angle)
    span = float(np.ptp(projection))
    return (projection - projection.min()) / span if span > 0 else np.zeros_like(projection)


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Background: float32 RGB `[height, width, 3]` in 0..255, a grey of level 96..160 tinted by at
    most 12 levels per channel, fading by at most 24 levels per channel along a random direction.

    Every image's background is of one colour family on purpose: the service normalises with fixed
    statistics (frozen BN), and a network trained from scratch on backgrounds of any colour learned
    only while batch statistics removed each image's colour (docs in scripts/demo/train.py)."""
    base = rng.uniform(96.0, 160.0) + rng.uniform(-12.0, 12.0, size=3).astype(np.float32)
    shift = rng.uniform(-24.0, 24.0, size=3).astype(np.float32)
    return np.clip(base + shift * _linear_ramp(rng, height, width)[:, :, None], 0.0, 255.0)


def _paint_object(rng: np.random.Generator, image: np.ndarray, shape: _PlacedShape) -> None:
    """Paint a solid, slightly shaded object into float32 RGB `image` over its full mask, in a
    colour of its category's hue family at least `_MIN_COLOUR_DISTANCE` from its surroundings
    when one is found."""
    rows, cols = shape.box_slices
    crop = image[rows, cols]
    inside = shape.full_mask[rows, cols]
    height, width = inside.shape
    surroundings = crop[inside].mean(axis=0)
    colour = _category_colour(rng, shape.category_id)
    for _ in range(_COLOUR_TRIES):
        if np.linalg.norm(colour - surroundings) >= _MIN_COLOUR_DISTANCE:
            break
        colour = _category_colour(rng, shape.category_id)
    shading = 1.0 + rng.uniform(0.0, 0.2) * (_linear_ramp(rng, height, width) - 0.5)
    crop[inside] = (colour * shading[:, :, None])[inside]


def image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The random generator of image `index` (0-based) of `split` ("train" or "val")."""
    return np.random.default_rng([seed, SPLIT_IDS[split], index])


def generate_split_image(
    seed: int, split: str, index: int, settings: GenerationSettings = GenerationSettings()
) -> tuple[np.ndarray, list[Instance]]:
    """Image `index` (0-based) of `split` exactly as `write_dataset` writes it (before JPEG).

    The size is drawn from `IMAGE_SIZES`; returns what `generate_image` returns.
    """
    rng = image_rng(seed, split, index)
    width, height = IMAGE_SIZES[int(rng.integers(len(IMAGE_SIZES)))]
    return generate_image(rng, width, height, settings)


def coco_categories() -> list[dict]:
    """The `categories` list of the written annotation files, sorted by id."""
    return [
        {"id": category.category_id, "name": category.name, "supercategory": SUPERCATEGORY}
        for category in sorted(SHAPE_CATEGORIES, key=lambda category: category.category_id)
    ]


def data_info(seed: int, split: str, settings: GenerationSettings) -> dict:
    """The `info` of a written annotation file: what produced it (seed and settings)."""
    return {
        "description": "maskrcnn-serve synthetic shapes (scripts/demo/data.py)",
        "seed": seed,
        "split": split,
        "settings": asdict(settings),
    }


def coco_segmentation(instance: Instance) -> list[list[float]] | dict:
    """COCO `segmentation` of an instance: its polygon when exact, else an RLE with a string
    `counts` (`{"size": [height, width], "counts": "..."}`)."""
    if instance.polygon is not None:
        return [list(instance.polygon)]
    rle = mask_utils.encode(np.asfortranarray(instance.mask, dtype=np.uint8))
    return {"size": [int(size) for size in rle["size"]], "counts": rle["counts"].decode("ascii")}


def write_dataset(
    out_dir: Path,
    *,
    train_images: int,
    val_images: int,
    seed: int,
    settings: GenerationSettings = GenerationSettings(),
    force: bool = False,
    progress: bool = True,
) -> dict[str, int]:
    """Write the COCO-layout dataset under `out_dir` and return annotation counts per split.

    Refuses (`OutputNotEmptyError`) when `out_dir` holds anything, unless `force`, which
    replaces the `annotations/`, `train/` and `val/` folders and leaves other files alone.
    Raises `InvalidSettingsError` for negative image counts or sizes that fit no image.
    """
    if train_images < 0 or val_images < 0:
        raise InvalidSettingsError(
            f"image counts must not be negative, got train={train_images} val={val_images}"
        )
    largest_fitting = min(_largest_object_size(width, height) for width, height in IMAGE_SIZES)
    if settings.min_size > largest_fitting:
        raise InvalidSettingsError(
            f"min_size {settings.min_size} does not fit the smallest image "
            f"(at most {largest_fitting})"
        )
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        if not force:
            raise OutputNotEmptyError(
                f"{out_dir} is not empty; use --force (force=True) to replace its "
                "annotations/, train/ and val/"
            )
        for name in ("annotations", *SPLIT_IDS):
            shutil.rmtree(out_dir / name, ignore_errors=True)
    (out_dir / "annotations").mkdir(parents=True, exist_ok=True)
    counts = {"train": train_images, "val": val_images}
    annotation_counts = {}
    with tqdm(total=train_images + val_images, unit="image", disable=not progress) as bar:
        for split, image_count in counts.items():
            bar.set_description(split)
            annotation_counts[split] = _write_split(
                out_dir, split, image_count, seed, settings, bar
            )
    return annotation_counts


def _write_split(
    out_dir: Path, split: str, image_count: int, seed: int, settings: GenerationSettings, bar: tqdm
) -> int:
    image_dir = out_dir / split
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index in range(image_count):
        image, instances = generate_split_image(seed, split, index, settings)
        image_id = index + 1
        file_name = f"{image_id:012d}.jpg"
        ok, encoded = cv2.imencode(
            ".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]
        )
        if not ok:
            raise DemoDataError(f"OpenCV could not encode {split}/{file_name} as JPEG")
        (image_dir / file_name).write_bytes(encoded.tobytes())
        height, width = image.shape[:2]
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        for instance in instances:
            annotations.append({
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": instance.category_id,
                "segmentation": coco_segmentation(instance),
                "area": int(np.count_nonzero(instance.mask)),
                "bbox": list(instance.bbox),
                "iscrowd": 0,
            })
        bar.update()
    dataset = {
        "info": data_info(seed, split, settings),
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": coco_categories(),
    }
    (out_dir / "annotations" / f"instances_{split}.json").write_text(
        json.dumps(dataset, sort_keys=True, separators=(",", ":")), encoding="utf-8"
    )
    return len(annotations)


def main(argv: Sequence[str] | None = None) -> int:
    """`maskrcnn-demo data`: write a synthetic COCO-layout dataset. Returns the exit status."""
    defaults = GenerationSettings()
    parser = argparse.ArgumentParser(
        prog="maskrcnn-demo data",
        description="Write a synthetic COCO-layout instance-segmentation dataset (plain, "
        "well-separated circles, squares and triangles; category ids 1..3) under OUT.",
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--train", type=int, default=800, help="training images (default 800)")
    parser.add_argument("--val", type=int, default=50, help="validation images (default 50)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--min-size", type=int, default=defaults.min_size,
                        help=f"smallest object size in pixels (default {defaults.min_size})")
    parser.add_argument("--max-size", type=int, default=defaults.max_size,
                        help=f"largest object size in pixels (default {defaults.max_size})")
    parser.add_argument("--objects-per-image", type=int, default=defaults.max_objects,
                        help=f"most objects per image (default {defaults.max_objects})")
    parser.add_argument("--min-visible", type=float, default=defaults.min_visible_fraction,
                        help="fraction of an object that must stay visible; below 1 objects may "
                        f"overlap (default {defaults.min_visible_fraction:g}: none do)")
    parser.add_argument("--force", action="store_true",
                        help="replace annotations/, train/ and val/ in a non-empty OUT")
    args = parser.parse_args(argv)
    try:
        settings = GenerationSettings(
            min_size=args.min_size, max_size=args.max_size, max_objects=args.objects_per_image,
            min_visible_fraction=args.min_visible,
        )
        annotation_counts = write_dataset(
            args.out, train_images=args.train, val_images=args.val, seed=args.seed,
            settings=settings, force=args.force,
        )
    except DemoDataError as error:
        parser.error(str(error))
    print(
        f"wrote {args.train} train images ({annotation_counts['train']} objects) and "
        f"{args.val} val images ({annotation_counts['val']} objects) to {args.out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
