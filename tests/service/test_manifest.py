"""The manifest is validated when read: a malformed artifact fails at load with the field named."""

from __future__ import annotations

import json

import pytest

from conftest import minimal_manifest
from service.manifest import Manifest, ManifestError


def test_a_saved_manifest_reads_back_equal(tmp_path):
    manifest = minimal_manifest(tmp_path)
    again = Manifest.load(tmp_path)
    assert again == manifest
    assert again.batch_size == 1 and again.max_batch_size == 1
    assert again.input.spec.pad_divisor == 32
    assert [c.name for c in again.classes[:2]] == ["person", "bicycle"]


@pytest.mark.parametrize(
    "change, field",
    [
        ({"shape_profile": {"batch": {"mutable": True}, "min_hw": [32, 32], "opt_hw": [800, 1344],
                            "max_hw": [1344, 1344]}}, "shape_profile.batch"),
        ({"input": {"mean": [0, 0, 0], "std": [1, 1, 1], "resize": {"scale": [1333, 800]}, "pad_divisor": 32,
                    "layout": "NHWC"}}, "input.layout"),
        ({"postprocess": {"score_threshold": 0.05, "mask_threshold": 1.5, "max_detections": 100}},
         "postprocess.mask_threshold"),
        ({"classes": [{"index": 0, "id": 1}]}, "classes.0.name"),
        ({"parity": {"passed": True}}, "parity.images"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_a_malformed_section_is_refused_with_its_field_named(tmp_path, change, field):
    minimal_manifest(tmp_path)
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    with pytest.raises(ManifestError, match=field.replace(".", r"\.")):
        Manifest.load(tmp_path)


def test_an_input_section_the_host_cannot_produce_is_refused(tmp_path):
    minimal_manifest(tmp_path)
    path = tmp_path / "manifest.json"
    data = json.loads(path.read_text())
    data["input"]["std"] = [0.0, 1.0, 1.0]
    path.write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="std values must be finite and > 0"):
        Manifest.load(tmp_path)
