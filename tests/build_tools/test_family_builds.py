"""Every member of the family builds through the real build and passes the fp32 gate unaided.

R-50, R-101, X-101 32x4d and 64x4d, caffe style, COCO's classes and a user's: for each, a random
mmdet checkpoint (BN statistics perturbed, as tests/build_tools/test_mmdet_reference.py makes them)
goes through ``export_step`` and ``compile_step`` (ONNX Runtime fp32) with the build's verify against
its eager reference on real photographs, without ``allow_parity_failure``: a refused engine fails
the test with the gate's reasons. The artifacts are cached on disk like tests/conftest.py's (keyed by
the case and the producers' sources) at a small input scale, so a rerun with unchanged sources costs
only the reads.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from conftest import CACHE, build_into, cache_key, perturb_batch_norms_, photo_dir

from build_tools.checkpoint import save_mmdet_checkpoint
from build_tools.classes import COCO_CATEGORY_IDS, COCO_NAMES
from build_tools.model import build_model, init_random_
from build_tools.pipeline import compile_step, export_step
from service.manifest import Manifest

SCALE = (512, 320)  # (long, short) edges: a few times cheaper than 1333x800
VERIFY_IMAGES = 2


@dataclass(frozen=True)
class Member:
    """One family member: its backbone and style, the classes its head has and what its
    checkpoint's meta records (COCO's 80 unnamed, or a user's named in the meta)."""

    name: str
    arch: dict = field(default_factory=dict)
    style: str = "pytorch"
    classes: tuple[str, ...] | None = None  # None: COCO's 80
    meta: dict = field(default_factory=dict)


MEMBERS = {m.name: m for m in (
    Member("r50"),
    Member("r101", {"depth": 101}),
    Member("x101-32x4d-3-classes", {"depth": 101, "groups": 32, "width_per_group": 4}, classes=("helmet", "vest", "boot"),
           meta={"dataset_meta": {"classes": ("helmet", "vest", "boot")}}),
    Member("x101-64x4d", {"depth": 101, "groups": 64, "width_per_group": 4}),
    Member("r50-caffe-2-classes", style="caffe", classes=("crack", "rust"),
           meta={"CLASSES": ("crack", "rust"), "cfg": "model = dict(backbone=dict(type='ResNet', depth=50, style='caffe'))"}),
)}


def _checkpoint(member: Member, path: Path) -> None:
    head = {} if member.classes is None else {"num_classes": len(member.classes) + 1,
                                              "label_to_class": (-1, *range(len(member.classes)))}
    model = init_random_(build_model("mmdet", member.style, **member.arch, **head), seed=0)
    perturb_batch_norms_(model, seed=1)
    if member.style == "caffe":
        # caffe-style weights see pixels minus the mean, not divided by the std (~58): trained ones
        # have a first convolution that much smaller; unscaled, random features saturate and every
        # detection is a sub-pixel box at the score threshold, which leaves the gate nothing to judge
        with torch.no_grad():
            model.backbone.body.conv1.weight.div_(58.0)
    tmp = path.with_name(f"{path.name}.tmp")
    save_mmdet_checkpoint(model, tmp, meta=member.meta)
    tmp.rename(path)


def _build(checkpoint: Path, out: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="maskrcnn-test-family-") as tmp:
        export_dir = export_step(Path(tmp) / "export", str(checkpoint), resize_scale=SCALE)
        compile_step(export_dir, out, precision="fp32", verify_images=photo_dir(), verify_count=VERIFY_IMAGES,
                     progress=False)


def built_member(member: Member) -> Path:
    """The verified ONNX Runtime fp32 artifact of ``member``'s random checkpoint (kept beside it in
    the test cache: the artifact's eager reference reads it)."""
    key = cache_key(member=repr(member), scale=SCALE, images=VERIFY_IMAGES)
    folder = CACHE / f"family-{member.name}-{key}"
    if not (folder / "manifest.json").is_file():
        CACHE.mkdir(parents=True, exist_ok=True)
        checkpoint = CACHE / f"family-checkpoint-{member.name}-{key}.pth"
        if not checkpoint.is_file():
            _checkpoint(member, checkpoint)
        build_into(folder, lambda tmp: _build(checkpoint, tmp))
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MEMBERS))
def test_member_builds_and_passes_the_fp32_gate(name):
    member = MEMBERS[name]
    manifest = Manifest.load(built_member(member))  # a refused engine raised BuildError with the gate's reasons
    config = manifest.inference_config
    arch = {"depth": 50, "groups": 1, "width_per_group": 64, **member.arch}
    assert {k: config[k] for k in arch} == arch and config["style"] == member.style
    names = member.classes or COCO_NAMES
    assert [c.name for c in manifest.classes] == list(names)
    assert [c.id for c in manifest.classes] == (list(COCO_CATEGORY_IDS) if member.classes is None
                                                else list(range(1, len(names) + 1)))
    parity = manifest.parity
    assert parity.passed and not parity.failures
    assert parity.tolerance["min_box_match_rate"] == 0.99  # fp32's own tolerance, not a loosened one
    assert parity.exclusions is not None and parity.exclusions.judged > 0
    assert parity.fp32_pins["reference torch.backends.mkldnn.fp32_precision"] == "ieee"
    assert parity.fp32_pins["engine"] == "onnxruntime fp32 kernels"
