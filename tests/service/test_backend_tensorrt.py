"""TensorRT runtime: what is TensorRT's own beyond the contract (tests/service/test_backends.py): its
availability names what is missing and, on a GPU machine with TensorRT, an engine built from the
cached export agrees with ONNX Runtime fp32 as input shapes change from call to call. What it
refuses to build, its flags and profiles are tests/build_tools/test_builder_tensorrt.py's."""

from __future__ import annotations

import numpy as np
import pytest
from engine_reference import EngineAsReference

from build_tools.images import list_images
from build_tools.pipeline import compile_step
from build_tools.verify import Tolerance, check_tolerance, verify
from service.backends import get_backend, load_engine

tensorrt = get_backend("tensorrt")
ok, reason = tensorrt.available()
needs_tensorrt = pytest.mark.skipif(not ok, reason=reason)


def test_availability_names_what_is_missing():
    assert ok or "tensorrt" in reason or "CUDA" in reason
    cuda_ok, cuda_reason = tensorrt.cuda_status()
    assert cuda_ok or cuda_reason


@needs_tensorrt
def test_tensorrt_fp32_matches_onnxruntime(export_dir, engine_dir, photos, tmp_path):
    manifest = compile_step(export_dir, tmp_path / "trt", backend="tensorrt", precision="fp32",
                            verify_images=photos, verify_count=1, progress=False)
    assert manifest.model_file == "model.plan" and manifest.parity.passed, manifest.parity
    assert (tmp_path / "trt" / "timing.cache").stat().st_size > 0
    engine = load_engine(tmp_path / "trt")
    reference = load_engine(engine_dir)
    assert reference.manifest.backend == "onnxruntime" and reference.manifest.precision == "fp32"
    # the photos differ in aspect ratio: input shapes change between calls, buffers grow and are reused
    paths = list_images(photos)
    report = verify(EngineAsReference(reference), engine, paths, manifest.input.spec, progress=False)
    assert report.reference_detections == 100 * len(paths)
    assert not check_tolerance(report, Tolerance.for_precision("fp32")), report
    out = engine.infer(np.zeros((1, 3, 800, 1216), np.float32), np.array([[800, 1216]], np.int64))
    assert {k: (v.dtype, v.shape) for k, v in out.items()} == {
        "dets": (np.float32, (1, 100, 5)), "labels": (np.int64, (1, 100)), "masks": (np.float32, (1, 100, 28, 28))}
