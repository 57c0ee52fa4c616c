"""The user's own model: class tables from the checkpoint or a file, and the Mask R-CNN backbone family.

Unit tests check class names, category ids, backbone detection and the errors for what does not
fit. The served tests write random-init checkpoints in mmdet's exact key layout (our
``save_mmdet_checkpoint``) for R-101 (COCO head, no names), X-101 32x4d (3 classes named in v3
meta, ids from a COCO annotation file) and X-101 64x4d (2 classes named in v2 meta, ids 1..N),
export each once (cached on disk like tests/conftest.py's engines, at a small input scale) and
serve it through the real service.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from conftest import CACHE, build_into, cache_key, photo_dir
from service_images import encode, gradient

from build_tools import cli
from build_tools.checkpoint import (
    KNOWN_CHECKPOINTS,
    CheckpointError,
    detect_backbone,
    load_checkpoint,
    model_state_to_mmdet,
    save_mmdet_checkpoint,
)
from build_tools.classes import (
    COCO_CATEGORY_IDS,
    COCO_NAMES,
    ClassesError,
    class_table,
    label_layout,
    names_from_meta,
    read_category_ids,
    read_class_names,
)
from build_tools.images import read_rgb
from build_tools.model import build_model, init_random_
from build_tools.pipeline import compile_step, export_step
from build_tools.reference import reference_for_manifest, run_eager
from scripts.tools.service_process import LiveServer, serving
from service.backends import Engine, load_engine
from service.manifest import Manifest
from service.preprocess import pad_batch, prepare_image
from service.settings import Settings

R101 = {"depth": 101}
X101_32X4D = {"depth": 101, "groups": 32, "width_per_group": 4}
X101_64X4D = {"depth": 101, "groups": 64, "width_per_group": 4}
SMALL_SCALE = (512, 320)  # (long, short) edges of the served test engines: a few times cheaper than 1333x800


def three_class_mmdet(**arch) -> torch.nn.Module:
    """An mmdet-configured model with a 3-class head (random weights)."""
    return init_random_(build_model("mmdet", num_classes=4, label_to_class=(-1, 0, 1, 2), **arch), seed=5)


@pytest.fixture(scope="module")
def three_class_file(tmp_path_factory) -> Path:
    """An R-50 mmdet checkpoint with 3 classes and no names in its meta."""
    return save_mmdet_checkpoint(three_class_mmdet(), tmp_path_factory.mktemp("ck") / "three.pth")


# -- class names and category ids ------------------------------------------------------------------

def test_names_come_from_v3_or_v2_meta():
    assert names_from_meta({"dataset_meta": {"classes": ("helmet", "vest")}}) == ("helmet", "vest")
    assert names_from_meta({"CLASSES": ["helmet"]}) == ("helmet",)
    assert names_from_meta({"CLASSES": "helmet"}) == ("helmet",)  # how mmdet v2 writes a single class
    assert names_from_meta({"epoch": 12}) is None


@pytest.mark.parametrize("text", ["helmet\n vest \n\nboot\n", '["helmet", "vest", "boot"]'], ids=["lines", "json"])
def test_names_file_is_one_a_line_or_a_json_list(tmp_path, text):
    path = tmp_path / "classes.txt"
    path.write_text(text)
    assert read_class_names(path) == ("helmet", "vest", "boot")


@pytest.mark.parametrize(
    "text, message",
    [("", "names no classes"), ("a\nb\na\n", "'a' more than once"), ('["a", 3]', "non-empty strings"),
     ("[not json", "not valid JSON")],
    ids=["empty", "repeated", "not-strings", "bad-json"],
)
def test_bad_names_files_are_refused(tmp_path, text, message):
    path = tmp_path / "classes.txt"
    path.write_text(text)
    with pytest.raises(ClassesError, match=message):
        read_class_names(path)


def test_category_ids_are_cocos_for_coco_names_else_one_to_n_or_from_the_annotation_file(tmp_path):
    assert [c.id for c in class_table(COCO_NAMES)] == list(COCO_CATEGORY_IDS)
    assert [(c.index, c.id) for c in class_table(("dog", "person"))] == [(0, 18), (1, 1)]  # a COCO subset
    assert [c.id for c in class_table(("helmet", "person"))] == [1, 2]
    ann = tmp_path / "instances.json"
    ann.write_text(json.dumps({"images": [], "annotations": [],
                               "categories": [{"id": 9, "name": "vest"}, {"id": 7, "name": "helmet"}]}))
    assert [c.id for c in class_table(("helmet", "vest"), read_category_ids(ann), str(ann))] == [7, 9]
    with pytest.raises(ClassesError, match=r"has no category named 'boot'; its categories are 'vest', 'helmet'"):
        class_table(("helmet", "boot"), read_category_ids(ann), str(ann))
    (tmp_path / "not_coco.json").write_text("[]")
    with pytest.raises(ClassesError, match="not a COCO annotation file"):
        read_category_ids(tmp_path / "not_coco.json")


def test_torchvision_heads_take_n_names_or_torchvisions_own_list_with_unused_slots():
    assert label_layout("torchvision", ("a", "b"), 3).label_to_class == (-1, 0, 1)
    own = label_layout("torchvision", ("__background__", "a", "N/A", "b"), 4)
    assert (own.label_to_class, own.names) == ((-1, 0, -1, 1), ("a", "b"))
    coco = label_layout("torchvision", None, 91)
    assert coco.names == COCO_NAMES and coco.label_to_class[1] == 0 and coco.label_to_class[12] == -1


def test_checkpoint_meta_names_its_classes_and_the_file_overrides_them(tmp_path):
    path = save_mmdet_checkpoint(three_class_mmdet(), tmp_path / "named.pth",
                                 meta={"dataset_meta": {"classes": ["helmet", "vest", "boot"]}})
    assert load_checkpoint(path).class_names == ("helmet", "vest", "boot")
    assert load_checkpoint(path, class_names=("a", "b", "c")).class_names == ("a", "b", "c")


def test_names_that_do_not_fit_the_head_name_its_keys_and_shapes(three_class_file):
    with pytest.raises(CheckpointError, match=r"2 class names given, but the head \(roi_head.bbox_head.fc_cls.weight "
                                              r"\(4, 1024\).*has 3 classes plus background"):
        load_checkpoint(three_class_file, class_names=("a", "b"))
    with pytest.raises(CheckpointError, match="has 3 classes and the checkpoint records no class names.*--classes"):
        load_checkpoint(three_class_file)


def test_cli_flags_reach_the_class_table(tmp_path, capsys):
    names = tmp_path / "classes.txt"
    names.write_text("helmet\nvest\n")
    ann = tmp_path / "instances.json"
    ann.write_text(json.dumps({"categories": [{"id": 7, "name": "helmet"}]}))
    code = cli.main(["export", "--random-init", "--classes", str(names), "--categories", str(ann),
                     "--out", str(tmp_path / "e")])
    assert code == 2 and "has no category named 'vest'" in capsys.readouterr().err


# -- backbones ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "arch, keys",
    [({}, 360), (R101, 666), (X101_32X4D, 666), (X101_64X4D, 666)],
    ids=["r50", "r101", "x101-32x4d", "x101-64x4d"],
)
def test_backbone_is_detected_from_keys_and_shapes(arch, keys):
    expected = {"depth": 50, "groups": 1, "width_per_group": 64, **arch}
    mmdet = model_state_to_mmdet(build_model("mmdet", **arch))
    assert len(mmdet) == keys  # mmdet's layout, num_batches_tracked included (R-50: tests/build_tools/data)
    assert detect_backbone(mmdet, "mmdet") == expected
    assert detect_backbone(build_model("torchvision", **arch).state_dict(), "torchvision") == expected


def test_an_unknown_backbone_layout_names_the_keys(tmp_path):
    state = model_state_to_mmdet(build_model("mmdet"))
    short = {k: v for k, v in state.items() if not k.startswith("backbone.layer3.5.")}
    torch.save({"state_dict": short}, tmp_path / "r46.pth")
    with pytest.raises(CheckpointError, match=r"unknown backbone layout: backbone.layer1..layer4 hold \(3, 4, 5, 3\) "
                                              r"bottleneck blocks .*backbone.layer1.0.conv2.weight has shape \(64, 64, 3, 3\)"):
        load_checkpoint(tmp_path / "r46.pth")


def test_caffe_style_is_read_from_the_meta_config_or_given(tmp_path):
    model = init_random_(build_model("mmdet", "caffe"), seed=2)
    config_text = "model = dict(backbone=dict(type='ResNet', depth=50, style='caffe'))"
    with_meta = save_mmdet_checkpoint(model, tmp_path / "caffe.pth", meta={"cfg": config_text})
    without = save_mmdet_checkpoint(model, tmp_path / "plain.pth")
    for loaded in (load_checkpoint(with_meta), load_checkpoint(without, style="caffe")):
        config = loaded.model.config
        assert (config.style, config.mean, config.std) == ("caffe", (123.675, 116.28, 103.53), (1.0, 1.0, 1.0))
        first = loaded.model.backbone.body.layer2[0]
        assert (first.conv1.stride, first.conv2.stride) == ((2, 2), (1, 1))
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.model.state_dict().values()))
    assert load_checkpoint(without).model.config.style == "pytorch"
    assert all(KNOWN_CHECKPOINTS[name]["style"] == ("caffe" if "_caffe_" in name else "pytorch")
               for name in KNOWN_CHECKPOINTS)


def test_caffe_weights_see_rgb_as_mmdet_sees_bgr(tmp_path):
    """The file's first conv reads BGR; ours, with reversed input channels, gives the same features on RGB."""
    model = init_random_(build_model("mmdet", "caffe"), seed=4)
    path = save_mmdet_checkpoint(model, tmp_path / "caffe.pth")
    file_conv1 = torch.load(path, weights_only=True)["state_dict"]["backbone.conv1.weight"]
    rgb = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ours = torch.nn.functional.conv2d(rgb, load_checkpoint(path, style="caffe").model.backbone.body.conv1.weight,
                                      stride=2, padding=3)
    theirs = torch.nn.functional.conv2d(rgb.flip(1), file_conv1, stride=2, padding=3)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_torchvision_caffe_is_refused(tmp_path):
    path = tmp_path / "tv.pth"
    torch.save(build_model("torchvision").state_dict(), path)
    with pytest.raises(CheckpointError, match="caffe-style ResNet exists only in mmdet checkpoints"):
        load_checkpoint(path, style="caffe")


def test_torchvision_v2_layout_is_refused_naming_its_keys(tmp_path):
    import torchvision

    v2 = torchvision.models.detection.maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None)
    torch.save(v2.state_dict(), tmp_path / "v2.pth")
    with pytest.raises(CheckpointError, match=r"maskrcnn_resnet50_fpn_v2 layout \(roi_heads.box_head.0.0.weight "
                                              r"\(a 4-conv box head\)"):
        load_checkpoint(tmp_path / "v2.pth")


def test_every_published_checkpoint_of_the_family_is_known():
    family = [f"mask_rcnn_{b}_fpn_{s}_coco" for b in ("r50", "r101", "x101_32x4d", "x101_64x4d")
              for s in ("1x", "2x", "mstrain-poly_3x")]
    caffe = [f"mask_rcnn_{b}_caffe_fpn_{s}_coco" for b in ("r50", "r101") for s in ("1x", "mstrain-poly_3x")]
    for name in family + caffe:
        entry = KNOWN_CHECKPOINTS[name]
        assert entry["format"] == "mmdet" and len(entry["sha256_prefix"]) == 8
        assert entry["url"].startswith(f"https://download.openmmlab.com/mmdetection/v2.0/mask_rcnn/{name}/{name}")
        assert entry["url"].endswith(f"-{entry['sha256_prefix']}.pth")


# -- served: 32x4d, X-101 64x4d ---------------------------------------------------------

@dataclass(frozen=True)
class Case:
    """One served architecture: its backbone, head, what its checkpoint's meta records, and the
    class table the manifest must end up with."""

    name: str
    arch: dict
    names: tuple[str, ...]  # the head's classes
    meta: dict = field(default_factory=dict)
    categories: dict[str, int] | None = None  # a COCO annotation file's ids by name
    expected_ids: tuple[int, ...] = ()


CASES = {
    "r101": Case("r101", R101, COCO_NAMES, expected_ids=COCO_CATEGORY_IDS),
    "x101_32x4d": Case("x101_32x4d", X101_32X4D, ("helmet", "vest", "boot"),
                       meta={"dataset_meta": {"classes": ("helmet", "vest", "boot")}},
                       categories={"boot": 11, "helmet": 7, "vest": 9}, expected_ids=(7, 9, 11)),
    "x101_64x4d": Case("x101_64x4d", X101_64X4D, ("crack", "rust"), meta={"CLASSES": ("crack", "rust")},
                       expected_ids=(1, 2)),
}


def _write_checkpoint(case: Case, path: Path) -> None:
    n = len(case.names)
    model = init_random_(build_model("mmdet", num_classes=n + 1, label_to_class=(-1, *range(n)), **case.arch), seed=11)
    tmp = path.with_name(f"{path.name}.tmp")
    save_mmdet_checkpoint(model, tmp, meta=case.meta)
    tmp.rename(path)


def _build_artifact(case: Case, checkpoint: Path, out: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="maskrcnn-test-export-") as tmp:
        categories = None
        if case.categories is not None:
            categories = Path(tmp) / "instances.json"
            categories.write_text(json.dumps({"categories": [{"id": i, "name": n} for n, i in case.categories.items()]}))
        export_dir = export_step(Path(tmp) / "export", str(checkpoint), score_threshold=0.0, resize_scale=SMALL_SCALE,
                                 categories_file=categories)
        # parity is checked below on the raw outputs: random weights leave mask probabilities near
        # 0.5, where verify's thresholded mask IoU on small boxes measures noise, not the engine
        compile_step(export_dir, out, run_verify=False, progress=False)


def cached_backbone_artifact(case: Case) -> Path:
    """ONNX Runtime fp32 artifact of ``case``'s random-init mmdet checkpoint (kept beside it in the
    test cache: the artifact's eager reference reads it), built once per change of the producers."""
    key = cache_key(case=case.name, arch=sorted(case.arch.items()), names=case.names, meta=repr(case.meta),
                    categories=repr(case.categories), scale=SMALL_SCALE)
    folder = CACHE / f"artifact-{case.name}-{key}"
    if not (folder / "manifest.json").is_file():
        CACHE.mkdir(parents=True, exist_ok=True)
        checkpoint = CACHE / f"checkpoint-{case.name}-{key}.pth"
        if not checkpoint.is_file():
            _write_checkpoint(case, checkpoint)
        build_into(folder, lambda tmp: _build_artifact(case, checkpoint, tmp))
    return folder


@pytest.fixture(scope="module", params=list(CASES))
def served(request) -> Iterator[tuple[Case, Engine, LiveServer]]:
    case = CASES[request.param]
    engine = load_engine(cached_backbone_artifact(case))
    with serving(Settings(max_wait_ms=0, request_timeout_ms=120_000), engine) as server:
        yield case, engine, server


IMAGE = encode(gradient(48, 64, seed=3), "PNG")


@pytest.mark.slow
def test_the_manifest_and_v1_models_hold_the_checkpoints_classes_and_architecture(served):
    case, _, server = served
    manifest = Manifest.model_validate(httpx.get(server.url + "/v1/models").json())
    assert [c.name for c in manifest.classes] == list(case.names)
    assert [c.id for c in manifest.classes] == list(case.expected_ids)
    assert [c.index for c in manifest.classes] == list(range(len(case.names)))
    config = manifest.inference_config
    arch = {"depth": 50, "groups": 1, "width_per_group": 64, **case.arch}
    assert {k: config[k] for k in arch} == arch and config["style"] == "pytorch"
    assert config["num_classes"] == len(case.names) + 1 and manifest.checkpoint.format == "mmdet"


@pytest.mark.slow
def test_the_engine_matches_the_eager_model_its_manifest_rebuilds(served):
    case, engine, _ = served
    reference = reference_for_manifest(engine.manifest)  # architecture and label layout from the manifest
    assert reference.class_names == case.names
    spec = engine.manifest.input.spec
    images, sizes = pad_batch([prepare_image(read_rgb(photo_dir() / "astronaut.png"), spec)], spec.pad_divisor)
    ours, theirs = engine.infer(images, sizes), run_eager(reference.model, images, sizes)
    np.testing.assert_array_equal(ours["labels"], theirs["labels"])
    assert (ours["labels"] >= 0).all() and ours["labels"].max() < len(case.names)
    np.testing.assert_allclose(ours["dets"], theirs["dets"], atol=1e-2)  # pixels; measured <= 7e-4
    np.testing.assert_allclose(ours["masks"], theirs["masks"], atol=1e-4)  # measured <= 3e-6


@pytest.mark.slow
def test_answers_name_the_classes_and_filter_by_those_names(served):
    case, engine, server = served
    answer = server.post(IMAGE, "image/png", params={"masks": "false"})
    assert answer.status_code == 200, answer.text
    detections = answer.json()["detections"]
    assert len(detections) == engine.manifest.postprocess.max_detections  # score threshold 0: every row
    id_of = dict(zip(case.names, case.expected_ids))
    assert all(d["category_id"] == id_of[d["category_name"]] for d in detections)

    wanted = sorted({d["category_name"] for d in detections})[:2]
    filtered = server.post(IMAGE, "image/png", params={"masks": "false", "classes": ",".join(wanted)})
    assert filtered.status_code == 200, filtered.text
    kept = filtered.json()["detections"]
    assert kept and {d["category_name"] for d in kept} <= set(wanted)
    assert kept == [d for d in detections if d["category_name"] in wanted]

    unknown = server.post(IMAGE, "image/png", params={"classes": "unicorn"})
    assert unknown.status_code == 422 and "use the engine's class names" in unknown.text
