"""Checkpoint loading: mmdet key mapping, torchvision layout, and clear errors for bad files."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch

from build_tools.checkpoint import (
    KNOWN_CHECKPOINTS,
    CheckpointError,
    detect_format,
    fetch_checkpoint,
    load_checkpoint,
    model_state_to_mmdet,
    save_mmdet_checkpoint,
    sha256_of,
)
from build_tools.model import build_model, init_random_

REFERENCE_KEYS = Path(__file__).parent / "data" / "mmdet_mask_rcnn_r50_fpn_keys.txt"


def reference_shapes() -> dict[str, tuple[int, ...]]:
    """mmdet's own key list for Mask R-CNN R50-FPN: key -> shape."""
    shapes = {}
    for line in REFERENCE_KEYS.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape, _dtype = line.split("\t")
        shapes[key] = tuple(int(v) for v in shape.strip("()").split(",") if v.strip())
    return shapes


@pytest.fixture(scope="module")
def mmdet_model():
    return init_random_(build_model("mmdet"), seed=3)


@pytest.fixture(scope="module")
def mmdet_file(mmdet_model, tmp_path_factory) -> Path:
    return save_mmdet_checkpoint(mmdet_model, tmp_path_factory.mktemp("ck") / "mmdet.pth", meta={"epoch": 12})


def test_mmdet_layout_has_every_reference_key_with_its_shape(mmdet_model):
    expected = reference_shapes()
    assert len(expected) == 360
    produced = model_state_to_mmdet(mmdet_model)
    assert set(produced) == set(expected)
    wrong = {k: (tuple(produced[k].shape), s) for k, s in expected.items() if tuple(produced[k].shape) != s}
    assert not wrong


def test_mmdet_checkpoint_round_trips_exactly(mmdet_model, mmdet_file):
    loaded = load_checkpoint(mmdet_file)
    assert loaded.format == "mmdet"
    assert loaded.model.config.origin == "mmdet"
    assert loaded.model.config.roi_aligned and loaded.model.config.roi_sampling_ratio == 0
    ours, theirs = mmdet_model.state_dict(), loaded.model.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert len(loaded.sha256) == 64


def test_mmdet_class_layout_moves_background_first(mmdet_model):
    mm = model_state_to_mmdet(mmdet_model)
    ours = mmdet_model.state_dict()
    # mmdet's fc_cls row 80 is background; ours is row 0. Class k is row k in mmdet, k+1 in ours.
    assert torch.equal(mm["roi_head.bbox_head.fc_cls.weight"][80], ours["roi_heads.box_predictor.cls_score.weight"][0])
    assert torch.equal(mm["roi_head.bbox_head.fc_cls.weight"][5], ours["roi_heads.box_predictor.cls_score.weight"][6])
    assert torch.equal(mm["roi_head.bbox_head.fc_reg.weight"][4:8], ours["roi_heads.box_predictor.bbox_pred.weight"][8:12])
    assert torch.equal(mm["roi_head.mask_head.conv_logits.weight"][7],
                       ours["roi_heads.mask_predictor.mask_fcn_logits.weight"][8])


def test_torchvision_checkpoint_loads_with_torchvision_settings(tmp_path):
    import torchvision

    reference = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
    path = tmp_path / "tv.pth"
    torch.save(reference.state_dict(), path)
    loaded = load_checkpoint(path)
    assert loaded.format == "torchvision"
    config = loaded.model.config
    assert (config.roi_aligned, config.roi_sampling_ratio, config.num_classes) == (False, 2, 91)
    # the published checkpoint has frozen BN (no num_batches_tracked); a fresh model has plain BN
    theirs = {k: v for k, v in reference.state_dict().items() if not k.endswith("num_batches_tracked")}
    ours = loaded.model.state_dict()
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_detect_format_names_what_it_expected():
    with pytest.raises(CheckpointError, match="cannot tell the checkpoint format"):
        detect_format({"encoder.weight": torch.zeros(1)})


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p, good: None, "does not exist"),
        (lambda p, good: p.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 3]), "cannot read"),
        (lambda p, good: p.write_text("hello, not a checkpoint"), "cannot read"),
        (lambda p, good: torch.save([1, 2, 3], p), "not a state_dict"),
    ],
    ids=["missing-file", "truncated", "text-file", "list-not-dict"],
)
def test_unreadable_files_get_clear_errors(tmp_path, mmdet_file, make, message):
    path = tmp_path / "bad.pth"
    make(path, mmdet_file)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


def _edited(mmdet_file: Path, tmp_path: Path, edit) -> Path:
    data = torch.load(mmdet_file, weights_only=True)
    edit(data["state_dict"])
    out = tmp_path / "edited.pth"
    torch.save(data, out)
    return out


def test_missing_keys_are_named(tmp_path, mmdet_file):
    def drop(state):
        del state["roi_head.mask_head.conv_logits.weight"]
        del state["neck.fpn_convs.2.conv.bias"]

    with pytest.raises(CheckpointError, match="missing keys: .*mask_fcn_logits.weight") as err:
        load_checkpoint(_edited(mmdet_file, tmp_path, drop))
    assert "layer_blocks.2.0.bias" in str(err.value)


def test_unexpected_keys_are_named(tmp_path, mmdet_file):
    def add(state):
        state["roi_head.mask_iou_head.fc.weight"] = torch.zeros(3)

    with pytest.raises(CheckpointError, match="unexpected keys: roi_head.mask_iou_head.fc.weight"):
        load_checkpoint(_edited(mmdet_file, tmp_path, add))


def test_a_head_whose_layers_disagree_on_the_class_count_names_them(tmp_path, mmdet_file):
    def widen(state):
        state["roi_head.bbox_head.fc_cls.weight"] = torch.zeros(92, 1024)

    with pytest.raises(CheckpointError, match=r"disagree on the class count: roi_head.bbox_head.fc_cls.weight "
                                              r"\(92, 1024\) holds 91 classes .*roi_head.bbox_head.fc_reg.weight "
                                              r"\(320, 1024\) \(expected 364 rows\)"):
        load_checkpoint(_edited(mmdet_file, tmp_path, widen))


def test_a_wrong_layer_shape_is_named(tmp_path, mmdet_file):
    def narrow(state):
        state["roi_head.bbox_head.shared_fcs.1.weight"] = torch.zeros(1024, 512)

    with pytest.raises(CheckpointError, match=r"shape mismatches: roi_heads.box_head.fc7.weight \(1024, 512\)"):
        load_checkpoint(_edited(mmdet_file, tmp_path, narrow))


def test_random_init_is_deterministic():
    a = load_checkpoint(None, random_init_seed=7).model.state_dict()
    b = load_checkpoint(None, random_init_seed=7).model.state_dict()
    c = load_checkpoint(None, random_init_seed=8).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["backbone.body.conv1.weight"], c["backbone.body.conv1.weight"])


def test_no_source_is_an_error():
    with pytest.raises(CheckpointError, match="--random-init"):
        load_checkpoint(None)


def test_unknown_published_name_is_not_a_path_lookup(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "mask_rcnn_r50_fpn_2x_coco")


def test_a_typo_of_a_published_name_gets_the_near_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the typo is no file here
    with pytest.raises(CheckpointError, match="mask_rcnn_r101_fpn_1x does not exist and is no published name: "
                       "did you mean mask_rcnn_r101_fpn_1x_coco"):
        load_checkpoint("mask_rcnn_r101_fpn_1x")
    with pytest.raises(CheckpointError, match="unknown checkpoint name 'mask_rcnn_r50_fpn_1x_cooc': did you mean "
                       "mask_rcnn_r50_fpn_1x_coco"):
        fetch_checkpoint("mask_rcnn_r50_fpn_1x_cooc", tmp_path)
    with pytest.raises(CheckpointError, match="is no published name: `maskrcnn-build fetch --help`"):
        load_checkpoint("some_typo_name")


def _unreachable_url() -> str:
    """A URL on a loopback port nobody listens on: the download is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/mask_rcnn_test"


def test_a_failed_download_says_where_to_place_the_file_and_the_placed_file_then_works(
        mmdet_file, tmp_path, monkeypatch):
    prefix = sha256_of(mmdet_file)[:8]
    name = "mask_rcnn_test_coco"
    monkeypatch.setitem(KNOWN_CHECKPOINTS, name, {"url": f"{_unreachable_url()}/{name}-{prefix}.pth",
                                                   "sha256_prefix": prefix, "format": "mmdet", "style": "pytorch"})
    cache = tmp_path / "cache"
    target = cache / f"{name}-{prefix}.pth"
    with pytest.raises(CheckpointError, match=f"place it at {target}: the name {name} then works offline"):
        fetch_checkpoint(name, cache)
    target.write_bytes(mmdet_file.read_bytes())  # what the message says to do
    assert fetch_checkpoint(name, cache) == target
    assert load_checkpoint(name, cache_dir=cache).sha256 == sha256_of(mmdet_file)
