"""The fp32 parity gate (``build_tools.verify``) judges real differences, not fp32 noise.

Self-test: the eager reference of random mmdet checkpoints (R-50, R-101 and a 3-class ResNeXt-101
32x4d, made as tests/build_tools/test_mmdet_reference.py makes them) is judged against itself run
with 2 torch threads instead of 1, and in a subprocess whose oneDNN is held to AVX2
(``ONEDNN_MAX_CPU_ISA`` must be set before torch loads): fp32 noise at the 1e-5 level that reorders
tied scores and moves tiny boxes. Every variant must pass the fp32 gate. Then the same reference
against real defects must fail it: the model with one perturbed weight, masks shifted one pixel,
two classes' labels swapped.

Small input scale and two photographs keep it to a few minutes on 2 cores.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, perturb_batch_norms_, photo_dir
from pycocotools import mask as mask_utils

from build_tools.checkpoint import load_checkpoint, save_mmdet_checkpoint
from build_tools.images import read_rgb
from build_tools.model import build_model, init_random_
from build_tools.origin import project_detect
from build_tools.reference import fp32_pinned, torch_threads
from build_tools.verify import Tolerance, check_tolerance, compare_detections, compare_image
from service.postprocess import ImageDetections

SCALE = (512, 320)  # (long, short) edges: a few times cheaper than 1333x800
PHOTOS = ("astronaut.png", "chelsea.png")
FP32 = Tolerance.for_precision("fp32")
CASES = {
    "r50": ({}, None),
    "r101": ({"depth": 101}, None),
    "x101-32x4d-3-classes": ({"depth": 101, "groups": 32, "width_per_group": 4}, ("helmet", "vest", "boot")),
}


def eager_detections(checkpoint: Path, threads: int = 1, perturbed: bool = False) -> list[ImageDetections]:
    """The eager reference of ``checkpoint`` (this project's model in the service's host code, the
    build's reference where mmdet is not installed) on ``PHOTOS`` with ``threads`` torch threads;
    ``perturbed``: one backbone convolution's weights moved by 2% of their spread first."""
    model = load_checkpoint(checkpoint, resize_scale=SCALE).model
    if perturbed:
        conv = model.backbone.body.layer3[0].conv2.weight
        with torch.no_grad():
            conv.add_(0.02 * conv.std() * torch.randn(conv.shape, generator=torch.Generator().manual_seed(3)))
    detect = project_detect(model)
    with torch_threads(threads), fp32_pinned():
        return [detect(read_rgb(photo_dir() / name)) for name in PHOTOS]


def detections_with_avx2(checkpoint: Path, out: Path) -> list[ImageDetections]:
    """:func:`eager_detections` in a fresh interpreter whose oneDNN kernels are at most AVX2 (the
    variable is read when torch loads, so it cannot be set in this process)."""
    code = ("import pickle, sys; from test_parity_gate import eager_detections; "
            "pickle.dump(eager_detections(sys.argv[1]), open(sys.argv[2], 'wb'))")
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), str(ROOT / "tests"), str(ROOT)])}
    subprocess.run([sys.executable, "-c", code, str(checkpoint), str(out)], env=env, check=True, cwd=ROOT, timeout=600)
    with open(out, "rb") as f:
        return pickle.load(f)


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory) -> tuple[str, Path, list[ImageDetections]]:
    """(name, a random mmdet checkpoint of the case, its eager reference at 1 thread)."""
    arch, classes = CASES[request.param]
    head = {} if classes is None else {"num_classes": len(classes) + 1, "label_to_class": (-1, *range(len(classes)))}
    model = init_random_(build_model("mmdet", **arch, **head), seed=0)
    perturb_batch_norms_(model, seed=1)
    meta = {} if classes is None else {"dataset_meta": {"classes": classes}}
    path = save_mmdet_checkpoint(model, tmp_path_factory.mktemp("gate") / f"{request.param}.pth", meta=meta)
    return request.param, path, eager_detections(path)


def judge(refs: list[ImageDetections], engs: list[ImageDetections]) -> tuple[dict, list[str]]:
    fields = compare_detections(refs, engs, FP32)
    return fields, check_tolerance(fields, FP32)


def _cpu_has_avx512() -> bool:
    return "avx512f" in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else False


@pytest.mark.slow
def test_the_reference_passes_against_itself_at_other_threads_and_isa(case, tmp_path):
    name, checkpoint, refs = case
    assert sum(len(d.labels) for d in refs) > 50, "the self-test needs detections to judge"
    variants = {"itself": refs, "2 threads": eager_detections(checkpoint, threads=2),
                "AVX2": detections_with_avx2(checkpoint, tmp_path / "avx2.pkl")}
    for variant, engs in variants.items():
        fields, failures = judge(refs, engs)
        assert not failures, f"{name} vs {variant}: {failures}; {fields}"
        assert fields["exclusions"].judged > 0.5 * fields["reference_detections"], fields
    if _cpu_has_avx512():  # else AVX2 is this CPU's own ISA and the variant proves nothing new
        differs = [float(np.abs(np.sort(a.scores) - np.sort(b.scores)).max()) for a, b in zip(refs, variants["AVX2"])]
        assert max(differs) > 0, "oneDNN held to AVX2 computed bit-identical scores: the variant is not exercised"


@pytest.mark.slow
def test_a_perturbed_weight_fails(case):
    name, checkpoint, refs = case
    _, failures = judge(refs, eager_detections(checkpoint, perturbed=True))
    assert failures, f"{name}: a perturbed backbone weight passed the fp32 gate"


def _shift_right(rle: dict) -> dict:
    mask = np.roll(mask_utils.decode(rle), 1, axis=1)
    mask[:, 0] = 0
    shifted = mask_utils.encode(np.asfortranarray(mask))
    shifted["counts"] = shifted["counts"].decode("ascii")
    return shifted


@pytest.mark.slow
def test_masks_shifted_one_pixel_fail(case):
    name, _, refs = case
    engs = [ImageDetections(d.boxes, d.scores, d.labels, [_shift_right(r) for r in d.rles]) for d in refs]
    fields, failures = judge(refs, engs)
    assert fields["box_match_rate"] == 1.0 and any("mask" in f for f in failures), (name, failures)


@pytest.mark.slow
def test_two_classes_with_swapped_labels_fail(case):
    name, _, refs = case
    counts = np.bincount(np.concatenate([d.labels for d in refs]), minlength=2)
    a, b = np.argsort(-counts, kind="stable")[:2]  # the two most frequent classes (or the one and another)
    swap = np.arange(len(counts))
    swap[[a, b]] = swap[[b, a]]
    engs = [ImageDetections(d.boxes, d.scores, swap[d.labels], d.rles) for d in refs]
    _, failures = judge(refs, engs)
    assert any(f.startswith("box_match_rate") for f in failures) and any("label" in f for f in failures), (name, failures)


# -- the matching rules, on hand-made detections -------------------------------------------------------

def _detections(boxes, scores, labels) -> ImageDetections:
    return ImageDetections(np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(scores, np.float32),
                           np.asarray(labels, np.int64), None)


def test_matching_ignores_order_and_judges_boxes_by_their_size():
    ref = _detections([[0, 0, 100, 50], [10, 10, 30, 30]], [0.9, 0.8], [1, 2])
    reordered = _detections([[10, 10, 30, 30], [0.4, 0, 100.9, 50.3]], [0.8, 0.9], [2, 1])
    result = compare_image(ref, reordered, FP32)
    assert (result.matched, result.judged) == (2, 2)  # 0.9 px on a 100 px side is within 1 %
    moved = _detections([[0, 0, 100, 50], [12, 10, 32, 30]], [0.9, 0.8], [1, 2])
    assert compare_image(ref, moved, FP32).matched == 1  # 2 px on a 20 px box is 10 %


def test_tiny_boxes_are_left_out_and_counted():
    ref = _detections([[0, 0, 100, 50], [5, 5, 10, 5.02]], [0.9, 0.9], [1, 1])
    eng = _detections([[0, 0, 100, 50], [5, 5, 10, 5.03]], [0.9, 0.9], [1, 1])
    result = compare_image(ref, eng, FP32)
    assert (result.small_reference, result.small_engine, result.matched, result.judged) == (1, 1, 1, 1)


def test_a_tied_nms_swap_and_the_cut_are_excused_a_lone_miss_is_not():
    ref = _detections([[0, 0, 100, 100], [200, 0, 300, 100], [0, 200, 50, 250]], [0.9, 0.7000, 0.3], [1, 1, 1])
    # NMS kept a tied overlapping candidate for the second; the third fell below the engine's cut
    eng = _detections([[0, 0, 100, 100], [220, 0, 320, 100], [0, 400, 50, 450]], [0.9, 0.7004, 0.3003], [1, 1, 1])
    result = compare_image(ref, eng, FP32)
    assert (result.matched, result.tied, result.at_cut, result.judged) == (1, 1, 1, 1)
    untied = _detections([[0, 0, 100, 100], [220, 0, 320, 100], [0, 400, 50, 450]], [0.9, 0.71, 0.3003], [1, 1, 1])
    result = compare_image(ref, untied, FP32)
    assert (result.matched, result.tied, result.judged) == (1, 0, 2)
