"""Tests of the synthetic COCO-layout dataset generator (`scripts/demo/data.py`,
`maskrcnn-demo data`)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from scripts.demo import cli as demo_cli
from scripts.demo.data import (
    GenerationSettings,
    InvalidSettingsError,
    OutputNotEmptyError,
    coco_categories,
    generate_image,
    generate_split_image,
    write_dataset,
)

SEED = 7
SETTINGS = GenerationSettings(min_size=20, max_size=200, max_objects=6)
SPLIT_SIZES = {"train": 3, "val": 2}
CLI_ARGS = ["--train", "3", "--val", "2", "--min-size", "20", "--max-size", "200",
            "--objects-per-image", "6"]


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out_dir = tmp_path_factory.mktemp("demo_data") / "dataset"
    write_dataset(
        out_dir, train_images=SPLIT_SIZES["train"], val_images=SPLIT_SIZES["val"], seed=SEED,
        settings=SETTINGS, progress=False,
    )
    return out_dir


def _file_hashes(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*")) if path.is_file()
    }


def _tight_bbox(mask: np.ndarray) -> list[int]:
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]


@pytest.mark.parametrize("split", ["train", "val"])
def test_annotations_load_and_masks_match_bbox_and_area(dataset_dir: Path, split: str) -> None:
    coco = COCO(str(dataset_dir / "annotations" / f"instances_{split}.json"))
    assert len(coco.imgs) == SPLIT_SIZES[split]
    assert coco.dataset["categories"] == coco_categories()
    for image_info in coco.imgs.values():
        image = cv2.imread(str(dataset_dir / split / image_info["file_name"]))
        assert image.shape == (image_info["height"], image_info["width"], 3)
    assert coco.anns
    for annotation in coco.anns.values():
        mask = coco.annToMask(annotation).astype(bool)
        assert annotation["iscrowd"] == 0
        assert annotation["category_id"] in coco.cats
        assert annotation["area"] == int(mask.sum())
        assert annotation["bbox"] == _tight_bbox(mask)


def test_annotations_are_the_generated_masks(dataset_dir: Path) -> None:
    coco = COCO(str(dataset_dir / "annotations" / "instances_val.json"))
    for index in range(SPLIT_SIZES["val"]):
        _, instances = generate_split_image(SEED, "val", index, SETTINGS)
        annotations = coco.loadAnns(coco.getAnnIds(imgIds=[index + 1]))
        assert [a["category_id"] for a in annotations] == [i.category_id for i in instances]
        for annotation, instance in zip(annotations, instances):
            np.testing.assert_array_equal(coco.annToMask(annotation).astype(bool), instance.mask)


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_ground_truth_as_detections_scores_ap_one(dataset_dir: Path, iou_type: str) -> None:
    ground_truth = COCO(str(dataset_dir / "annotations" / "instances_train.json"))
    results = []
    for annotation in ground_truth.anns.values():
        result = {"image_id": annotation["image_id"], "category_id": annotation["category_id"],
                  "score": 1.0}
        if iou_type == "bbox":
            result["bbox"] = annotation["bbox"]
        else:
            rle = ground_truth.annToRLE(annotation)
            result["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
        results.append(result)
    evaluation = COCOeval(ground_truth, ground_truth.loadRes(results), iou_type)
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    assert evaluation.stats[0] == pytest.approx(1.0)


def test_same_seed_gives_identical_files_and_another_seed_differs(
    dataset_dir: Path, tmp_path: Path
) -> None:
    again, other_seed = tmp_path / "again", tmp_path / "other_seed"
    assert demo_cli.main(["data", "--out", str(again), "--seed", str(SEED), *CLI_ARGS]) == 0
    expected = _file_hashes(dataset_dir)
    assert _file_hashes(again) == expected
    other_args = ["data", "--out", str(other_seed), "--seed", str(SEED + 1), *CLI_ARGS]
    assert demo_cli.main(other_args) == 0
    other = _file_hashes(other_seed)
    assert other.keys() == expected.keys()
    assert all(other[name] != expected[name] for name in expected)


def test_refuses_non_empty_output_unless_forced(tmp_path: Path) -> None:
    out_dir = tmp_path / "dataset"
    (out_dir / "train").mkdir(parents=True)
    (out_dir / "train" / "stale.jpg").write_bytes(b"not an image")
    (out_dir / "notes.txt").write_text("kept")
    with pytest.raises(OutputNotEmptyError):
        write_dataset(out_dir, train_images=1, val_images=0, seed=SEED, progress=False)
    with pytest.raises(SystemExit) as exit_info:
        demo_cli.main(["data", "--out", str(out_dir), "--train", "1", "--val", "0"])
    assert exit_info.value.code == 2
    forced = ["data", "--out", str(out_dir), "--train", "1", "--val", "0", "--force"]
    assert demo_cli.main(forced) == 0
    assert sorted(path.name for path in (out_dir / "train").iterdir()) == ["000000000001.jpg"]
    assert (out_dir / "notes.txt").read_text() == "kept"
    assert json.loads((out_dir / "annotations" / "instances_val.json").read_text())["images"] == []


def test_categories_are_the_three_shapes_with_ids_one_to_three(dataset_dir: Path) -> None:
    assert [(c["id"], c["name"]) for c in coco_categories()] == [(1, "circle"), (2, "square"), (3, "triangle")]
    train = json.loads((dataset_dir / "annotations" / "instances_train.json").read_text())
    assert train["info"]["seed"] == SEED
    assert train["info"]["settings"]["max_objects"] == SETTINGS.max_objects
    assert {a["category_id"] for a in train["annotations"]} <= {1, 2, 3}


def test_default_scenes_are_few_large_objects_that_never_overlap() -> None:
    defaults = GenerationSettings()
    counts = []
    for index in range(6):
        _, instances = generate_split_image(SEED, "train", index)
        counts.append(len(instances))
        for instance in instances:
            assert instance.polygon is not None  # nothing occluded: every mask is its polygon
            _, _, width, height = instance.bbox
            assert defaults.min_size - 2 <= max(width, height) <= defaults.max_size + 1
    assert all(1 <= count <= defaults.max_objects for count in counts) and sum(counts) > len(counts)


def test_generate_image_instances_are_exact_disjoint_and_visible_enough() -> None:
    settings = GenerationSettings(min_size=100, max_size=300, max_objects=8, min_visible_fraction=0.4)
    polygon_count = occluded_count = 0
    for seed in range(4):
        image, instances = generate_image(np.random.default_rng(seed), 640, 480, settings)
        assert image.shape == (480, 640, 3) and image.dtype == np.uint8
        covered = np.zeros((480, 640), dtype=bool)
        for instance in instances:
            assert instance.mask.dtype == bool and instance.mask.shape == (480, 640)
            assert not (covered & instance.mask).any()
            covered |= instance.mask
            assert instance.mask.sum() >= settings.min_visible_pixels
            assert list(instance.bbox) == _tight_bbox(instance.mask)
            if instance.polygon is None:
                occluded_count += 1
            else:
                polygon_count += 1
                rle = mask_utils.merge(mask_utils.frPyObjects([list(instance.polygon)], 480, 640))
                np.testing.assert_array_equal(mask_utils.decode(rle).astype(bool), instance.mask)
    assert polygon_count and occluded_count


def test_invalid_settings_raise_typed_errors() -> None:
    with pytest.raises(InvalidSettingsError):
        GenerationSettings(min_size=50, max_size=40)
    with pytest.raises(InvalidSettingsError):
        generate_image(np.random.default_rng(0), 64, 48, GenerationSettings(min_size=60))
    with pytest.raises(InvalidSettingsError):
        write_dataset(Path("unused"), train_images=-1, val_images=0, seed=0, progress=False)
