"""Class tables: what a model's output labels are called and which category ids answers carry.

A model's classes come, in this order, from the user's file (``--classes FILE``: one name a line,
or a JSON list), from the checkpoint's meta (mmdet v3 ``meta.dataset_meta.classes``, v2
``meta.CLASSES``), or, for a head of COCO's size (mmdet 80 + background, torchvision's 91 category
id slots), COCO's 80. The head's own size is the class count; the names are checked against it.

Category ids: matched by name from a COCO annotation file (``--categories ANN.json``) when given,
so ``format=coco`` answers evaluate against the user's dataset unchanged; else COCO's ids when
every name is a COCO class name (COCO itself, or a subset of it); else 1..N in class order.

The result is the manifest's ``classes``: ``ClassEntry(index, id, name)``, index = label value.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.manifest import ClassEntry

# The 80 COCO detection classes in COCO order: (category id, name).
COCO_CLASSES: tuple[tuple[int, str], ...] = (
    (1, "person"), (2, "bicycle"), (3, "car"), (4, "motorcycle"), (5, "airplane"), (6, "bus"),
    (7, "train"), (8, "truck"), (9, "boat"), (10, "traffic light"), (11, "fire hydrant"),
    (13, "stop sign"), (14, "parking meter"), (15, "bench"), (16, "bird"), (17, "cat"), (18, "dog"),
    (19, "horse"), (20, "sheep"), (21, "cow"), (22, "elephant"), (23, "bear"), (24, "zebra"),
    (25, "giraffe"), (27, "backpack"), (28, "umbrella"), (31, "handbag"), (32, "tie"),
    (33, "suitcase"), (34, "frisbee"), (35, "skis"), (36, "snowboard"), (37, "sports ball"),
    (38, "kite"), (39, "baseball bat"), (40, "baseball glove"), (41, "skateboard"),
    (42, "surfboard"), (43, "tennis racket"), (44, "bottle"), (46, "wine glass"), (47, "cup"),
    (48, "fork"), (49, "knife"), (50, "spoon"), (51, "bowl"), (52, "banana"), (53, "apple"),
    (54, "sandwich"), (55, "orange"), (56, "broccoli"), (57, "carrot"), (58, "hot dog"),
    (59, "pizza"), (60, "donut"), (61, "cake"), (62, "chair"), (63, "couch"), (64, "potted plant"),
    (65, "bed"), (67, "dining table"), (70, "toilet"), (72, "tv"), (73, "laptop"), (74, "mouse"),
    (75, "remote"), (76, "keyboard"), (77, "cell phone"), (78, "microwave"), (79, "oven"),
    (80, "toaster"), (81, "sink"), (82, "refrigerator"), (84, "book"), (85, "clock"), (86, "vase"),
    (87, "scissors"), (88, "teddy bear"), (89, "hair drier"), (90, "toothbrush"),
)
COCO_CATEGORY_IDS: tuple[int, ...] = tuple(cid for cid, _ in COCO_CLASSES)
COCO_NAMES: tuple[str, ...] = tuple(name for _, name in COCO_CLASSES)
# torchvision's COCO heads have one slot per category id 0..90 (0 = background, 11 ids unused).
TORCHVISION_COCO_SLOTS = 91
# How torchvision's own category lists (``weights.meta["categories"]``) name those slots.
TORCHVISION_UNUSED = "N/A"


class ClassesError(ValueError):
    """Class names or category ids that are missing, unreadable, or do not fit the model's head."""


@dataclass(frozen=True)
class LabelLayout:
    """How a head's outputs map to named classes.

    Attributes:
        num_classes: the head's outputs, background included (internal label 0).
        label_to_class: output class index (0..N-1) of each internal label; -1 for background and
            unused slots.
        names: the N class names, by output class index.
    """

    num_classes: int
    label_to_class: tuple[int, ...]
    names: tuple[str, ...]


def coco_class_table() -> list[ClassEntry]:
    """COCO's 80 classes with COCO's category ids (the table of every COCO model)."""
    return class_table(COCO_NAMES)


def names_from_meta(meta: Mapping[str, Any]) -> tuple[str, ...] | None:
    """The class names an mmdet checkpoint's ``meta`` records (v3 ``dataset_meta.classes``, v2
    ``CLASSES``), or None when it records none."""
    dataset_meta = meta.get("dataset_meta")
    names = dataset_meta.get("classes") if isinstance(dataset_meta, Mapping) else None
    if names is None:
        names = meta.get("CLASSES")
    if names is None:
        return None
    if isinstance(names, str):
        names = (names,)  # mmdet writes a one-class dataset's CLASSES as a bare string
    return _checked_names(names, "the checkpoint's meta")


def read_class_names(path: str | Path) -> tuple[str, ...]:
    """Class names from ``path``: a JSON list of strings, or one name a line (blank lines and
    surrounding spaces ignored).

    Raises:
        ClassesError: the file is missing, empty, malformed, or names a class twice.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ClassesError(f"cannot read the class names file {path}: {exc}") from exc
    if text.lstrip().startswith("["):
        try:
            names = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ClassesError(f"{path} starts like a JSON list but is not valid JSON ({exc})") from exc
    else:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    return _checked_names(names, str(path))


def _checked_names(names: Any, where: str) -> tuple[str, ...]:
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) and n.strip() for n in names):
        raise ClassesError(f"class names in {where} must be a list of non-empty strings")
    names = tuple(n.strip() for n in names)
    if not names:
        raise ClassesError(f"{where} names no classes")
    repeated = sorted({n for n in names if names.count(n) > 1 and n != TORCHVISION_UNUSED})
    if repeated:
        raise ClassesError(f"{where} names {', '.join(map(repr, repeated))} more than once")
    return names


def read_category_ids(path: str | Path) -> dict[str, int]:
    """Category name -> id from a COCO annotation file's ``categories``.

    Raises:
        ClassesError: the file is missing or not a COCO annotation file.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        categories = data["categories"]
        return {str(c["name"]): int(c["id"]) for c in categories}
    except OSError as exc:
        raise ClassesError(f"cannot read the annotation file {path}: {exc}") from exc
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ClassesError(
            f"{path} is not a COCO annotation file (expected a 'categories' list of {{'id', 'name'}}): {exc!r}"
        ) from exc


def class_table(names: Sequence[str], category_ids: Mapping[str, int] | None = None,
                source: str = "--categories") -> list[ClassEntry]:
    """The manifest's class table for ``names`` (by output class index).

    Ids: ``category_ids[name]`` when given (``source`` names where they came from, for errors);
    else COCO's when every name is a COCO class name; else 1..N.

    Raises:
        ClassesError: a name ``category_ids`` does not have.
    """
    if category_ids is not None:
        missing = [n for n in names if n not in category_ids]
        if missing:
            raise ClassesError(
                f"{source} has no category named {', '.join(map(repr, missing))}; its categories are "
                f"{', '.join(map(repr, category_ids))}"
            )
        ids = [category_ids[n] for n in names]
    elif set(names) <= set(COCO_NAMES):
        coco_id = dict(zip(COCO_NAMES, COCO_CATEGORY_IDS))
        ids = [coco_id[n] for n in names]
    else:
        ids = list(range(1, len(names) + 1))
    return [ClassEntry(index=i, id=cid, name=name) for i, (cid, name) in enumerate(zip(ids, names))]


def label_layout(origin: str, names: Sequence[str] | None, num_classes: int | None = None,
                 head: str = "the head") -> LabelLayout:
    """The label layout of a head with ``num_classes`` outputs (background included; None: the
    size ``names`` need, for a new model) named by ``names`` (None: COCO's, for a head of COCO's size).

    mmdet heads have N + 1 outputs, background last in the file (first here): N names. torchvision
    heads have background first: N = outputs - 1 names, or one name per output (torchvision's own
    form: background first, ``"N/A"`` for unused slots); COCO's 80 names on its 91-slot head map by
    category id, as torchvision's COCO weights do. ``head`` names the head's keys and shapes in errors.

    Raises:
        ClassesError: no names for a head not of COCO's size, or a count that does not fit.
    """
    if origin not in ("mmdet", "torchvision"):
        raise ClassesError(f"unknown checkpoint origin {origin!r}; expected 'mmdet' or 'torchvision'")
    coco_slots = TORCHVISION_COCO_SLOTS if origin == "torchvision" else len(COCO_NAMES) + 1
    if names is None:
        if num_classes not in (None, coco_slots):
            raise ClassesError(
                f"{head} has {num_classes - 1} classes and the checkpoint records no class names "
                "(meta.dataset_meta.classes or meta.CLASSES); give them with --classes FILE (one name a line)"
            )
        names = COCO_NAMES
    names = tuple(names)
    if origin == "torchvision" and names == COCO_NAMES and num_classes in (None, TORCHVISION_COCO_SLOTS):
        class_of_id = {cid: i for i, cid in enumerate(COCO_CATEGORY_IDS)}
        return LabelLayout(TORCHVISION_COCO_SLOTS,
                           tuple(class_of_id.get(i, -1) for i in range(TORCHVISION_COCO_SLOTS)), names)
    if origin == "torchvision" and num_classes is not None and len(names) == num_classes:
        used = [n for n in names[1:] if n != TORCHVISION_UNUSED]
        order = iter(range(len(used)))
        return LabelLayout(num_classes, (-1, *(-1 if n == TORCHVISION_UNUSED else next(order) for n in names[1:])),
                           tuple(used))
    if num_classes is not None and len(names) != num_classes - 1:
        forms = "" if origin == "mmdet" else f" (or {num_classes}: background first, 'N/A' for unused slots)"
        raise ClassesError(
            f"{len(names)} class names given, but {head} has {num_classes - 1} classes plus background: "
            f"give {num_classes - 1} names{forms}"
        )
    return LabelLayout(len(names) + 1, (-1, *range(len(names))), names)
