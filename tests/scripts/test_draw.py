"""``maskrcnn-draw`` from results files, run as the console script: what it refuses, and why."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from service_images import encode, gradient

DRAW = str(Path(sys.executable).with_name("maskrcnn-draw"))
# one dog (COCO id 18) on a 64x48 image, as a COCO results list of images 7 and 8 and as a /predict answer
DOG = {"category_id": 18, "bbox": [4.0, 4.0, 20.0, 16.0], "score": 0.9}
ANSWER = {"detections": [{"bbox": [4.0, 4.0, 24.0, 20.0], "score": 0.9, "category_id": 18, "category_name": "dog"}],
          "image": {"height": 48, "width": 64}}


@pytest.fixture()
def files(tmp_path: Path) -> Path:
    (tmp_path / "image.png").write_bytes(encode(gradient(48, 64), "PNG"))
    (tmp_path / "coco.json").write_text(json.dumps([{**DOG, "image_id": 7}, {**DOG, "image_id": 8}]))
    (tmp_path / "answer.json").write_text(json.dumps(ANSWER))
    return tmp_path


def draw(files: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([DRAW, str(files / "image.png"), "--out", str(files / "out.png"), *args],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("args, message", [
    (["--results", "coco.json"], "the results hold 2 images; choose one with --image-id"),
    (["--results", "coco.json", "--image-id", "9"], "--image-id 9 is not in the results (their image ids: 7, 8)"),
    (["--results", "answer.json", "--image-id", "7"], "this file is a /predict answer of one image"),
    (["--results", "answer.json", "--classes", "dog,unicorn"], "--classes unicorn: no class of the results "
                                                               "(theirs: dog) nor of COCO"),
    (["--url", "http://127.0.0.1:9", "--image-id", "7"], "with --url there is none to pick"),
])
def test_what_cannot_be_drawn_as_asked_is_refused_with_what_to_do(files, args, message):
    args = [str(files / a) if a.endswith(".json") else a for a in args]
    run = draw(files, *args)
    assert run.returncode == 2, run.stdout
    assert message in run.stderr
    assert not (files / "out.png").exists()


@pytest.mark.parametrize("args", [["--results", "coco.json", "--image-id", "8", "--classes", "dog"],
                                  ["--results", "answer.json", "--classes", "18"],
                                  ["--results", "answer.json", "--classes", "cat"]])
def test_known_classes_and_held_image_ids_draw(files, args):
    run = draw(files, *[str(files / a) if a.endswith(".json") else a for a in args])
    assert run.returncode == 0, run.stderr
    drawn = 0 if "cat" in args else 1
    assert f"{drawn} detections drawn" in run.stdout
    assert Image.open(files / "out.png").size == (64, 48)
