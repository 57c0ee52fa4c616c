"""The build path end to end with real exports and real ONNX Runtime sessions.

The cached engines (tests/conftest.py) are the random-init R50-FPN at score threshold 0, so every
image yields the full 100 detections and parity is checked on all of them.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from build_tools import cli
from build_tools.classes import COCO_CATEGORY_IDS
from build_tools.errors import BuildError
from build_tools.export import ExportError, export_onnx
from build_tools.images import list_images, read_rgb
from build_tools.pipeline import calibration_feeds, compile_step
from build_tools.verify import Tolerance, check_tolerance, verify
from service.backends import canonical_precision, load_engine
from service.backends.base import UnsupportedPrecision
from service.manifest import Manifest, ManifestError


def test_fp32_engine_matches_eager_on_photographs_of_several_sizes(engine_dir, reference_model, photos):
    engine = load_engine(engine_dir)
    paths = list_images(photos)
    spec = engine.manifest.input.spec
    sizes = {spec.resized_hw(read_hw(p)) for p in paths}
    assert len(sizes) >= 4, sizes  # several distinct input shapes through the dynamic H/W graph

    report = verify(reference_model, engine, paths, spec, progress=False)
    assert report.reference_detections == 100 * len(paths)
    assert report.engine_detections == 100 * len(paths)
    assert report.box_match_rate >= 0.99
    assert report.label_agreement >= 0.99
    assert report.mask_iou_mean >= 0.98
    assert report.score_abs_diff_max < 1e-3
    assert report.box_ap >= 0.98 and report.mask_ap >= 0.95
    assert not check_tolerance(report, Tolerance.for_precision("fp32"))


def read_hw(path) -> tuple[int, int]:
    h, w = read_rgb(path).shape[:2]
    return h, w


def test_fixed_batch_of_two_matches_eager_batch(engine_dir_b2, reference_model, photos):
    engine = load_engine(engine_dir_b2)
    assert engine.batch_size == 2
    paths = list_images(photos)[:2]  # two different sizes padded into one batch
    report = verify(reference_model, engine, paths, engine.manifest.input.spec, progress=False)
    assert report.reference_detections == 200
    assert report.box_match_rate >= 0.99 and report.label_agreement >= 0.99


def test_outputs_follow_the_padding_contract(engine_dir, photos):
    engine = load_engine(engine_dir)
    spec = engine.manifest.input.spec
    feed = next(calibration_feeds(list_images(photos)[:1], spec, 1))
    out = engine.infer(feed["images"], feed["image_sizes"])
    assert out["dets"].shape == (1, 100, 5) and out["dets"].dtype == np.float32
    assert out["labels"].shape == (1, 100) and out["labels"].dtype == np.int64
    assert out["masks"].shape == (1, 100, 28, 28) and out["masks"].dtype == np.float32
    scores = out["dets"][0, :, 4]
    assert np.all(np.diff(scores) <= 1e-7), "rows are sorted by score"
    assert np.all((out["labels"] >= 0) & (out["labels"] < 80))
    h, w = feed["image_sizes"][0]
    boxes = out["dets"][0, :, :4]
    assert boxes[:, [0, 2]].max() <= w and boxes[:, [1, 3]].max() <= h and boxes.min() >= 0
    assert 0.0 <= out["masks"].min() and out["masks"].max() <= 1.0


def test_manifest_records_the_contract(engine_dir):
    manifest = Manifest.load(engine_dir)
    assert manifest.format_version == 1
    assert (manifest.backend, manifest.precision) == ("onnxruntime", "fp32")
    assert manifest.batch_size == 1
    assert [c.id for c in manifest.classes] == list(COCO_CATEGORY_IDS)
    assert manifest.classes[0].name == "person" and manifest.classes[79].name == "toothbrush"
    assert manifest.input.mean == (123.675, 116.28, 103.53)
    assert manifest.input.names == ("images", "image_sizes", "mask_score_threshold", "mask_max_detections")
    assert manifest.inference_config["roi_aligned"] is True
    assert manifest.inference_config["roi_sampling_ratio"] == 0
    assert manifest.checkpoint.format == "random-init"
    assert {"torch", "onnxruntime", "onnx", "opset"} <= set(manifest.to_dict()["tools"])
    assert manifest.parity.passed is True and manifest.parity.box_match_rate >= 0.99
    assert manifest.calibration is None
    json.dumps(manifest.to_dict())


def test_int8_engine_is_calibrated_on_real_images_and_recorded(export_dir, photos, tmp_path):
    manifest = compile_step(export_dir, tmp_path / "int8", precision="qint8_mixed_float16",
                            calib_images=photos, calib_count=2, verify_images=photos, verify_count=1,
                            allow_parity_failure=True, progress=False)
    assert manifest.precision == "int8"
    assert manifest.calibration.images == 2 and len(manifest.calibration.sha256) == 64
    assert manifest.tools.backend["graph"] == "static QDQ int8"
    engine = load_engine(tmp_path / "int8")
    import onnx

    ops = {n.op_type for n in onnx.load(str(tmp_path / "int8" / manifest.model_file)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    # random weights make int8 fidelity meaningless; the report must still be there and honest
    assert manifest.parity.reference_detections == 100
    assert engine.batch_size == 1


def test_int8_without_calibration_images_is_refused(export_dir, tmp_path):
    with pytest.raises(BuildError, match="--calib-images"):
        compile_step(export_dir, tmp_path / "x", precision="int8", run_verify=False)


def test_fp16_on_onnxruntime_cpu_is_refused_with_a_reason(export_dir, tmp_path):
    with pytest.raises(UnsupportedPrecision, match="no kernels"):
        compile_step(export_dir, tmp_path / "x", precision="force_float16", run_verify=False)


def test_failed_parity_keeps_no_artifact(export_dir, photos, tmp_path):
    impossible = Tolerance(1.1, 1.1, 1.1, 1.1, 1.1)
    with pytest.raises(BuildError, match="misses its tolerance"):
        compile_step(export_dir, tmp_path / "eng", verify_images=photos, verify_count=1, tolerance=impossible,
                     progress=False)
    assert not (tmp_path / "eng").exists()
    assert (tmp_path / "eng.partial" / "manifest.json").is_file()


def test_seed_precision_aliases():
    assert canonical_precision("force_float32") == "fp32"
    assert canonical_precision("force_float16") == "fp16"
    assert canonical_precision("qint8_mixed_float16") == "int8"
    with pytest.raises(UnsupportedPrecision, match="unknown precision"):
        canonical_precision("int4")


def test_shape_mutable_with_max_batch_one_is_refused_clearly(reference_model, tmp_path, capsys):
    # a mutable graph needs its largest batch (--batch-size) >= 2; tests/test_mutable_batch.py covers the rest
    with pytest.raises(ExportError, match="batch"):
        export_onnx(reference_model, tmp_path / "m.onnx", shape_mutable=True)
    code = cli.main(["export", "--random-init", "--shape-mutable", "--out", str(tmp_path / "e")])
    assert code == 2
    assert "--shape-mutable" in capsys.readouterr().err


def test_cli_reports_bad_checkpoint_without_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.pth"
    bad.write_text("not a checkpoint")
    code = cli.main(["all", "--checkpoint", str(bad), "--out", str(tmp_path / "a"), "--no-verify"])
    err = capsys.readouterr().err
    assert code == 2 and "cannot read" in err and "Traceback" not in err


def test_manifest_load_errors(tmp_path):
    with pytest.raises(ManifestError, match="not an engine artifact"):
        Manifest.load(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format_version": 99}))
    with pytest.raises(ManifestError, match="format_version 99"):
        Manifest.load(tmp_path)
