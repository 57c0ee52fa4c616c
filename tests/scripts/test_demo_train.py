"""Tests of the demo trainer and evaluator (`scripts/demo/train.py`, `scripts/demo/eval.py`):
a few steps on 128x128 crops of a tiny synthetic dataset, interrupted and resumed, written as an
mmdet checkpoint and evaluated through the service's host code."""

from __future__ import annotations

import json
import signal
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from build_tools.checkpoint import load_checkpoint
from build_tools.classes import COCO_CATEGORY_IDS
from build_tools.coco_eval import evaluate, load_coco
from build_tools.model import InferenceConfig
from scripts.demo import cli as demo_cli
from scripts.demo.data import GenerationSettings, write_dataset
from scripts.demo.eval import write_reference_results
from scripts.demo.train import (
    LOSS_NAMES,
    StopRequest,
    TrainingCrops,
    TrainSettings,
    build_training_model,
    internal_label_of_category,
    load_state,
    set_training_mode,
    state_path_for,
    tight_boxes,
    train,
    training_losses,
)

TINY = replace(TrainSettings(), iterations=4, batch_size=2, crop=128, lr=3e-4, warmup=1, save_every=2,
               roi_samples=64, bn_calibration_batches=2, precision="fp32")
TINY_ARGS = ["--iterations", "4", "--batch-size", "2", "--crop", "128", "--lr", "3e-4", "--warmup", "1",
             "--save-every", "2", "--roi-samples", "64", "--bn-calibration-batches", "2", "--precision", "fp32",
             "--no-progress"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo_train") / "data"
    write_dataset(out, train_images=3, val_images=1, seed=3, progress=False,
                  settings=GenerationSettings(min_size=20, max_size=60, max_objects=4))
    return out


@pytest.fixture(scope="module")
def straight_run(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The mmdet checkpoint of an uninterrupted TINY run, trained through the CLI."""
    out = tmp_path_factory.mktemp("straight") / "demo.pth"
    assert demo_cli.main(["train", "--data", str(dataset), "--out", str(out), *TINY_ARGS]) == 0
    return out


def test_category_ids_map_to_mmdet_labels_with_background_first():
    label_of = internal_label_of_category(InferenceConfig.for_origin("mmdet"))
    assert len(label_of) == 80
    assert label_of[1] == 1  # person, the first COCO class
    assert label_of[37] == 1 + COCO_CATEGORY_IDS.index(37)  # sports ball
    assert sorted(label_of.values()) == list(range(1, 81))


def test_crops_are_deterministic_and_targets_match_masks(dataset: Path):
    config = InferenceConfig.for_origin("mmdet")
    crops = TrainingCrops(dataset, "train", config, TINY)
    first, again = crops.batch(5, 2), crops.batch(5, 2)
    assert first.images.shape == (2, 3, 128, 128)
    torch.testing.assert_close(first.images, again.images, rtol=0, atol=0)
    valid_labels = set(internal_label_of_category(config).values())
    objects = 0
    for target, size in zip(first.targets, first.image_sizes):
        assert size.tolist() == [128, 128]  # resized images are far larger than the crop
        masks = target["masks"].numpy()
        np.testing.assert_array_equal(target["boxes"].numpy(), tight_boxes(masks))
        assert set(target["labels"].tolist()) <= valid_labels
        assert (masks.reshape(len(masks), -1).sum(axis=1) > 0).all()
        objects += len(masks)
    assert objects > 0  # crops are biased towards objects


def test_training_reduces_the_loss_of_a_fixed_batch(dataset: Path, straight_run: Path):
    def loss_of(model) -> float:
        torch.manual_seed(0)  # the RPN and RoI samplers draw from torch's RNG
        with torch.no_grad():
            return float(sum(training_losses(model, batch).values()))

    initial = build_training_model(TINY)
    batch = TrainingCrops(dataset, "train", initial.config, TINY).batch(0, 2)  # trained on
    trained = build_training_model(TINY)
    state = load_state(state_path_for(straight_run))
    trained.load_state_dict(state["model"])
    assert state["bn_frozen"]  # TINY freezes the BN statistics half-way
    set_training_mode(trained, bn_frozen=True)
    before, after = loss_of(initial), loss_of(trained)
    assert after < 0.75 * before, (before, after)


def test_checkpoint_is_mmdet_and_computes_what_the_trained_model_does(straight_run: Path):
    raw = torch.load(straight_run, map_location="cpu", weights_only=True)
    assert raw["state_dict"]["roi_head.bbox_head.fc_cls.weight"].shape == (81, 1024)
    assert raw["meta"]["iterations"] == TINY.iterations
    loaded = load_checkpoint(straight_run)
    assert loaded.format == "mmdet"

    trained = build_training_model(TINY)
    trained.load_state_dict(load_state(state_path_for(straight_run))["model"])
    trained.eval()  # BatchNorm with running statistics == the frozen copy
    images = torch.randn(1, 3, 128, 160, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, actual = trained.backbone(images), loaded.model.backbone(images)
    for level in expected:
        torch.testing.assert_close(actual[level], expected[level], rtol=1e-4, atol=1e-4)


def test_interrupted_run_resumes_where_it_stopped(dataset: Path, straight_run: Path, tmp_path: Path):
    out = tmp_path / "resumed.pth"
    stop = StopRequest()
    seen: list[int] = []

    def stop_after_three(iteration: int, losses: dict[str, float]) -> None:
        seen.append(iteration)
        assert set(losses) == {*LOSS_NAMES, "total"}
        if iteration == 3:
            stop(signal.SIGTERM)  # what the signal handler does

    first = train(dataset, out, TINY, progress=False, stop=stop, on_step=stop_after_three)
    assert (first.iteration, first.finished, first.stopped_by) == (3, False, signal.SIGTERM)
    saved = load_state(state_path_for(out))
    assert saved["iteration"] == 3 and saved["bn_frozen"]
    assert not out.exists()

    second = train(dataset, out, resume=True, progress=False, on_step=lambda i, _: seen.append(i))
    assert second.finished and second.settings == TINY
    assert seen == [1, 2, 3, 4]
    # Same crops, same sampler draws, same optimizer state: the run it would have been.
    resumed = torch.load(out, map_location="cpu", weights_only=True)["state_dict"]
    straight = torch.load(straight_run, map_location="cpu", weights_only=True)["state_dict"]
    for key, value in straight.items():
        torch.testing.assert_close(resumed[key], value, msg=key)


def test_resume_without_state_is_a_usage_error(dataset: Path, tmp_path: Path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        demo_cli.main(["train", "--data", str(dataset), "--out", str(tmp_path / "x.pth"), "--resume"])
    assert exit_info.value.code == 2
    assert "no training state" in capsys.readouterr().err


def test_reference_results_go_through_the_service_postprocess(dataset: Path, straight_run: Path, tmp_path: Path):
    # Every detection kept; small images keep the test fast.
    model = load_checkpoint(straight_run, score_thresh=0.0, resize_scale=(400, 320)).model
    results_path = tmp_path / "results.json"
    image_ids = write_reference_results(model, dataset, "val", results_path, limit=1, progress=False)
    results = json.loads(results_path.read_text())
    assert image_ids == [1] and len(results) == model.config.detections_per_img
    height, width = 0, 0
    for result in results:
        assert result["image_id"] == 1 and result["category_id"] in COCO_CATEGORY_IDS
        x, y, w, h = result["bbox"]
        height, width = result["segmentation"]["size"]
        assert 0 <= x <= x + w <= width and 0 <= y <= y + h <= height
    scores = [r["score"] for r in results]
    assert scores == sorted(scores, reverse=True)
    ap = evaluate(load_coco(dataset / "annotations" / "instances_val.json"), results, image_ids)
    assert set(ap) == {"bbox", "segm"} and all(-1 <= v <= 1 for s in ap.values() for v in s.values())
