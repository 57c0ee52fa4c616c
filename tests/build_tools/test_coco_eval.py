"""build_tools.coco_eval: the one COCOeval wrapper (maskrcnn-eval, maskrcnn-demo eval, the build
benchmark and verify all score through it), segm scored by mask area as detectron2 does."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from build_tools.coco_eval import STAT_NAMES, ap_difference, evaluate, load_coco

H = W = 200


def rle(mask: np.ndarray) -> dict:
    encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in encoded["size"]], "counts": encoded["counts"].decode("ascii")}


def square(x: int, y: int, side: int) -> np.ndarray:
    mask = np.zeros((H, W), bool)
    mask[y:y + side, x:x + side] = True
    return mask


def frame(x: int, y: int, side: int) -> np.ndarray:
    """A one-pixel outline: a large box (side**2) around a small mask (about 4 * side pixels)."""
    mask = square(x, y, side)
    mask[y + 1:y + side - 1, x + 1:x + side - 1] = False
    return mask


@pytest.fixture()
def coco(tmp_path) -> COCO:
    """One image with one small object: a 20x20 square (area 400 < 32**2)."""
    gt = square(10, 10, 20)
    annotations = {
        "images": [{"id": 1, "file_name": "a.jpg", "height": H, "width": W}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": rle(gt), "area": 400,
                         "bbox": [10, 10, 20, 20], "iscrowd": 0}],
        "categories": [{"id": 1, "name": "thing"}],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(annotations))
    return load_coco(path)


@pytest.fixture()
def results() -> list[dict]:
    """The object found (score 0.5) after a false positive (score 0.9) whose box is large
    (120x120) and whose mask is small (a 476-pixel outline)."""
    return [
        {"image_id": 1, "category_id": 1, "score": 0.9, "bbox": [60, 60, 120, 120], "segmentation": rle(frame(60, 60, 120))},
        {"image_id": 1, "category_id": 1, "score": 0.5, "bbox": [10, 10, 20, 20], "segmentation": rle(square(10, 10, 20))},
    ]


def test_segm_area_ranges_use_mask_areas(coco, results):
    scores = evaluate(coco, results)
    assert set(scores) == {"bbox", "segm"} and all(list(s) == list(STAT_NAMES) for s in scores.values())
    # by mask area the false positive is small, so it costs APs: precision 1/2 at full recall
    assert scores["segm"]["AP"] == pytest.approx(0.5) and scores["segm"]["APs"] == pytest.approx(0.5)
    assert scores["segm"]["APm"] == scores["segm"]["APl"] == -1  # no medium or large ground truth
    # by box area (bbox scoring) it is large and left out of the small range
    assert scores["bbox"]["AP"] == pytest.approx(0.5) and scores["bbox"]["APs"] == pytest.approx(1.0)


def test_pycocotools_with_boxes_kept_would_take_box_areas(coco, results):
    """What evaluate() avoids: segm scored with each result's bbox counts box areas."""
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(coco, coco.loadRes([dict(r) for r in results]), "segm")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    assert evaluator.stats[STAT_NAMES.index("APs")] == pytest.approx(1.0)
    assert evaluate(coco, results, iou_types=("segm",))["segm"]["APs"] == pytest.approx(0.5)


def test_results_are_not_modified_and_image_ids_restrict(coco, results):
    before = json.dumps(results)
    assert evaluate(coco, results, image_ids=[1])["segm"]["AP"] == pytest.approx(0.5)
    assert json.dumps(results) == before
    assert evaluate(coco, results, image_ids=[2])["bbox"]["AP"] == -1  # no ground truth on image 2


def test_no_results_give_zeros_and_it_is_quiet_unless_verbose(coco, results, capsys):
    assert evaluate(coco, []) == {t: dict.fromkeys(STAT_NAMES, 0.0) for t in ("bbox", "segm")}
    evaluate(coco, results)
    assert capsys.readouterr().out == ""
    evaluate(coco, results, iou_types=("segm",), verbose=True)
    out = capsys.readouterr().out
    assert "--- segm ---" in out and "Average Precision" in out and "--- bbox ---" not in out


def test_the_eval_tools_score_through_it():
    """maskrcnn-eval and maskrcnn-demo eval print and return the same summaries for one results file."""
    from build_tools import coco_eval
    from scripts.demo import eval as demo_eval
    from scripts.tools import eval_replay

    assert eval_replay.evaluate is coco_eval.evaluate and demo_eval.evaluate is coco_eval.evaluate


@pytest.fixture()
def six_images(tmp_path) -> tuple[COCO, list[dict]]:
    """Six images with one or two squares each, and those squares as detections (AP 1)."""
    images, annotations, detections = [], [], []
    for image_id in range(1, 7):
        images.append({"id": image_id, "file_name": f"{image_id}.jpg", "height": H, "width": W})
        for k in range(1 + image_id % 2):
            x, y, side = 10 + 90 * k, 20 + 5 * image_id, 30 + 4 * image_id
            box = [x, y, side, side]
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": 1 + k,
                                "segmentation": rle(square(x, y, side)), "area": side * side, "bbox": box,
                                "iscrowd": 0})
            detections.append({"image_id": image_id, "category_id": 1 + k, "score": 0.9 - 0.1 * k, "bbox": box,
                               "segmentation": rle(square(x, y, side))})
    path = tmp_path / "six.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}))
    return load_coco(path), detections


def test_ap_difference_of_identical_results_is_exactly_zero(six_images):
    coco, detections = six_images
    out = ap_difference(coco, detections, [dict(d) for d in detections], [1, 2, 3, 4, 5, 6], samples=50)
    assert out == {t: {"lost": 0.0, "low": 0.0, "high": 0.0, "samples": 50} for t in ("bbox", "segm")}


def test_ap_difference_is_evaluates_loss_and_its_interval_spans_the_image_draws(six_images):
    """One image's detection moved half its side: the loss equals evaluate()'s (pycocotools' whole
    pipeline), draws without that image lose nothing, so the interval runs from 0 to above the loss."""
    coco, detections = six_images
    damaged = [dict(d) for d in detections]
    moved = next(d for d in damaged if d["image_id"] == 3)
    x, y, side, _ = moved["bbox"]
    moved["bbox"] = [x + side // 2, y, side, side]
    moved["segmentation"] = rle(square(x + side // 2, y, side))
    ids = [1, 2, 3, 4, 5, 6]
    before, after = evaluate(coco, detections, ids), evaluate(coco, damaged, ids)
    out = ap_difference(coco, detections, damaged, ids, samples=400, seed=1)
    for iou_type in ("bbox", "segm"):
        expected = 100 * (before[iou_type]["AP"] - after[iou_type]["AP"])
        assert expected > 1.0
        assert out[iou_type]["lost"] == pytest.approx(expected, abs=1e-9)
        assert out[iou_type]["low"] == pytest.approx(0.0, abs=1e-9)  # (5/6)**6 = a third of the draws miss image 3
        assert out[iou_type]["high"] > out[iou_type]["lost"]
    assert ap_difference(coco, detections, damaged, ids, samples=400, seed=1) == out  # seeded: reproducible
    assert ap_difference(coco, detections, [], ids, samples=20)["bbox"]["lost"] == pytest.approx(100.0)


def test_ap_difference_refuses_what_it_cannot_estimate(six_images):
    coco, detections = six_images
    for kwargs in ({"image_ids": []}, {"image_ids": [1], "samples": 1}, {"image_ids": [1], "confidence": 1.0}):
        with pytest.raises(ValueError):
            ap_difference(coco, detections, detections, **kwargs)
