"""Tests of the demo trainer, its cache and the evaluator (`scripts/demo/train.py`,
`scripts/demo/model_cache.py`, `scripts/demo/eval.py`): a few steps on 128x128 crops of a tiny
synthetic dataset, interrupted and resumed, written as an mmdet checkpoint with the dataset's class
names, reused from the cache, and evaluated through the service's host code."""

from __future__ import annotations

import json
import signal
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch

from build_tools.checkpoint import load_checkpoint
from build_tools.coco_eval import evaluate, load_coco
from build_tools.model import InferenceConfig
from scripts.demo import cli as demo_cli
from scripts.demo import model_cache
from scripts.demo.data import GenerationSettings, coco_categories, write_dataset
from scripts.demo.eval import write_reference_results
from scripts.demo.train import (
    LOSS_NAMES,
    BatchRenorm2d,
    StopRequest,
    TrainingCrops,
    TrainSettings,
    build_training_model,
    dataset_classes,
    internal_label_of_category,
    load_state,
    set_training_mode,
    state_path_for,
    tight_boxes,
    train,
    training_losses,
)

# Bounded by iterations alone (no time bound), so the runs are deterministic.
TINY = replace(TrainSettings(), iterations=6, minutes=None, batch_size=2, crop=128, warmup=1, save_every=2,
               roi_samples=64, freeze_bn_fraction=0.6, bn_calibration_batches=2, precision="fp32")
TINY_ARGS = ["--iterations", "6", "--batch-size", "2", "--crop", "128", "--warmup", "1",
             "--save-every", "2", "--roi-samples", "64", "--freeze-bn-fraction", "0.6", "--bn-calibration-batches", "2", "--precision", "fp32",
             "--no-progress"]
CLASS_NAMES = ("circle", "square", "triangle")


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
    # The CLI has a time bound always; an hour is far more than 6 tiny steps take.
    assert demo_cli.main(["train", "--data", str(dataset), "--out", str(out), *TINY_ARGS, "--minutes", "60"]) == 0
    return out


def test_dataset_categories_map_to_labels_with_background_first(dataset: Path):
    classes = dataset_classes(load_coco(dataset / "annotations" / "instances_train.json"))
    assert classes == ((1, "circle"), (2, "square"), (3, "triangle"))
    assert internal_label_of_category(classes) == {1: 1, 2: 2, 3: 3}
    assert internal_label_of_category(((7, "a"), (3, "b"))) == {7: 1, 3: 2}


def test_time_bound_drives_the_schedule():
    settings = replace(TrainSettings(), iterations=1000, minutes=10.0, warmup=10)
    assert settings.progress(100, 0.0) == pytest.approx(0.1)
    assert settings.progress(100, 300.0) == pytest.approx(0.5)  # half the time spent
    assert settings.progress(5000, 0.0) == 1.0
    assert settings.lr_at(0, 0.0) == pytest.approx(settings.lr / 1000)
    assert settings.lr_at(10, 0.0) == pytest.approx(settings.lr)
    assert settings.lr_at(500, 1.0) == pytest.approx(settings.lr * settings.final_lr_fraction)


def test_crops_are_deterministic_and_targets_match_masks(dataset: Path):
    crops = TrainingCrops(dataset, "train", InferenceConfig.for_origin("mmdet"), TINY)
    first, again = crops.batch(5, 2), crops.batch(5, 2)
    assert first.images.shape == (2, 3, 128, 128)
    torch.testing.assert_close(first.images, again.images, rtol=0, atol=0)
    valid_labels = {1, 2, 3}
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

    initial = build_training_model(TINY, CLASS_NAMES)
    batch = TrainingCrops(dataset, "train", initial.config, TINY).batch(0, 2)  # trained on
    trained = build_training_model(TINY, CLASS_NAMES)
    state = load_state(state_path_for(straight_run))
    trained.load_state_dict(state["model"])
    assert state["bn_frozen"]  # TINY freezes the BN statistics at 60% of the run
    set_training_mode(trained, bn_frozen=True)
    before, after = loss_of(initial), loss_of(trained)
    print(f"loss of the fixed batch: {before:.3f} before, {after:.3f} after")
    assert after < 0.8 * before, (before, after)


def test_checkpoint_is_mmdet_with_class_names_and_computes_what_the_trained_model_does(straight_run: Path):
    raw = torch.load(straight_run, map_location="cpu", weights_only=True)
    assert raw["state_dict"]["roi_head.bbox_head.fc_cls.weight"].shape == (4, 1024)  # 3 classes + background
    assert raw["meta"]["iterations"] == TINY.iterations
    assert raw["meta"]["dataset_meta"]["classes"] == list(CLASS_NAMES)
    loaded = load_checkpoint(straight_run)
    assert loaded.format == "mmdet" and loaded.class_names == CLASS_NAMES

    trained = build_training_model(TINY, CLASS_NAMES)
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

    def stop_after_five(iteration: int, losses: dict[str, float]) -> None:
        seen.append(iteration)
        assert set(losses) == {*LOSS_NAMES, "total"}
        if iteration == 5:
            stop(signal.SIGTERM)  # what the signal handler does

    first = train(dataset, out, TINY, progress=False, stop=stop, on_step=stop_after_five)
    assert (first.iteration, first.finished, first.stopped_by) == (5, False, signal.SIGTERM)
    saved = load_state(state_path_for(out))
    assert saved["iteration"] == 5 and saved["bn_frozen"] and saved["seconds"] > 0
    assert not out.exists()

    second = train(dataset, out, resume=True, progress=False, on_step=lambda i, _: seen.append(i))
    assert second.finished and second.settings == TINY
    assert seen == [1, 2, 3, 4, 5, 6]
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
    loaded = load_checkpoint(straight_run, score_thresh=0.0, resize_scale=(400, 320))
    model = loaded.model
    results_path = tmp_path / "results.json"
    image_ids = write_reference_results(loaded, dataset, "val", results_path, limit=1, progress=False)
    results = json.loads(results_path.read_text())
    assert image_ids == [1] and len(results) == model.config.detections_per_img
    height, width = 0, 0
    for result in results:
        assert result["image_id"] == 1 and result["category_id"] in {c["id"] for c in coco_categories()}
        x, y, w, h = result["bbox"]
        height, width = result["segmentation"]["size"]
        assert 0 <= x <= x + w <= width and 0 <= y <= y + h <= height
    scores = [r["score"] for r in results]
    assert scores == sorted(scores, reverse=True)
    ap = evaluate(load_coco(dataset / "annotations" / "instances_val.json"), results, image_ids)
    assert set(ap) == {"bbox", "segm"} and all(-1 <= v <= 1 for s in ap.values() for v in s.values())


def test_a_matching_cached_model_is_reused(dataset: Path, straight_run: Path, tmp_path: Path, capsys):
    cli_settings = replace(TINY, minutes=60.0)  # what the straight run's CLI options make
    assert model_cache.read_record(straight_run)["iterations"] == TINY.iterations
    before = straight_run.stat().st_mtime_ns
    again = train(dataset, straight_run, cli_settings, progress=False,
                  on_step=lambda *_: pytest.fail("trained again"))
    assert again.cached and again.finished and straight_run.stat().st_mtime_ns == before
    assert demo_cli.main(["train", "--data", str(dataset), "--out", str(straight_run), *TINY_ARGS,
                          "--minutes", "60"]) == 0
    assert "cached model" in capsys.readouterr().out
    assert straight_run.stat().st_mtime_ns == before

    copy = tmp_path / "copy.pth"  # the same model and record under another name
    copy.write_bytes(straight_run.read_bytes())
    model_cache.record_path_for(copy).write_bytes(model_cache.record_path_for(straight_run).read_bytes())
    assert train(dataset, copy, cli_settings, progress=False).cached
    other = train(dataset, copy, replace(cli_settings, iterations=2), progress=False)  # another key
    assert other.finished and not other.cached and other.iteration == 2


def test_cache_key_changes_with_the_code_the_data_and_the_settings(dataset: Path, tmp_path: Path):
    for name in model_cache.CODE_FILES:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes((model_cache.REPO_ROOT / name).read_bytes())
    annotations = json.loads((dataset / "annotations" / "instances_train.json").read_text())
    settings = asdict(TrainSettings())
    key = model_cache.cache_key(annotations, settings, tmp_path)
    assert key == model_cache.cache_key(annotations, settings, tmp_path)
    assert key == model_cache.cache_key(annotations, settings)  # the copy is the repository's code
    keys = {key}
    for name in model_cache.CODE_FILES:
        edited = tmp_path / name
        original = edited.read_bytes()
        edited.write_bytes(original + b"\n# changed\n")
        keys.add(model_cache.cache_key(annotations, settings, tmp_path))
        edited.write_bytes(original)
    other_data = {**annotations, "info": {**annotations["info"], "seed": annotations["info"]["seed"] + 1}}
    keys.add(model_cache.cache_key(other_data, settings, tmp_path))
    keys.add(model_cache.cache_key(annotations, {**settings, "lr": 0.01}, tmp_path))
    assert len(keys) == len(model_cache.CODE_FILES) + 3


def _renorm(seed: int = 0) -> BatchRenorm2d:
    torch.manual_seed(seed)
    norm = BatchRenorm2d(8, eps=1e-5, momentum=0.1)
    with torch.no_grad():
        norm.running_mean.uniform_(-1, 1)
        norm.running_var.uniform_(0.5, 2.0)
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-1, 1)
    return norm


def test_batch_renormalisation_trains_the_function_eval_mode_computes():
    x = (torch.randn(2, 8, 5, 5) * 1.3 + 0.4).requires_grad_()
    weights = torch.arange(x.numel(), dtype=torch.float32).reshape(x.shape)
    norm = _renorm()
    expected = norm.eval()(x)
    (eval_grad,) = torch.autograd.grad((expected * weights).sum(), x)
    before = norm.running_mean.clone()
    norm.train()
    norm.r_max, norm.d_max = 1e6, 1e6  # unclipped corrections
    y = norm(x)
    torch.testing.assert_close(y, expected.detach(), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(norm.running_mean, before)  # the running statistics still learn
    # the gradient sees the batch's statistics (eval mode's is the plain per-channel scale)
    (grad,) = torch.autograd.grad((y * weights).sum(), x)
    assert not torch.allclose(grad, eval_grad)


def test_batch_renormalisation_with_no_room_is_batch_norm():
    x = torch.randn(2, 8, 5, 5) * 2 - 1
    norm = _renorm().train()
    norm.r_max, norm.d_max = 1.0, 0.0
    plain = torch.nn.functional.batch_norm(x, None, None, norm.weight, norm.bias, training=True, eps=norm.eps)
    torch.testing.assert_close(norm(x), plain, rtol=1e-5, atol=1e-5)
