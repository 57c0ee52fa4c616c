"""The pipeline, directly (no HTTP server): one image through decode -> preprocess -> batch ->
infer -> postprocess on the real ONNX Runtime engine, admitted by the real AdmissionControl."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Gauge

from service.admission import AdmissionControl, MemoryBudget
from service.backends import load_engine
from service.engine_pool import EnginePool
from service.exceptions import DeadlineExceeded, InvalidImage
from service.metrics import Metrics
from service.pipeline import Pipeline
from service.postprocess import postprocess_image
from service.preprocess import pad_batch, prepare_image
from service.request import PredictOptions, read_body
from service.settings import Settings
from service.stages import STAGES
from service_images import encode, gradient
from test_admission import request_with_body

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine(engine_dir):
    return load_engine(engine_dir)


def run_pipeline(engine, sources, options: PredictOptions, *, keep_pixels=False, timeout_ms=None, per_request=None):
    """Each source through one admitted request (with ``options``, or ``per_request[i]``); returns the
    results (or errors), the pipeline and the memory held at the end."""
    metrics = Metrics()

    async def main():
        pool = EnginePool([engine])
        async with Pipeline(Settings(), pool, metrics) as pipeline:
            gate = AdmissionControl(Settings(), MemoryBudget(2**30, 1), pipeline.batcher, lambda: pool.serving,
                                    Gauge("in_flight", "-", registry=CollectorRegistry()))
            gate.not_ready_reason = None
            results = []
            for i, source in enumerate(sources):
                request, _ = request_with_body(b"")
                asked = options if per_request is None else per_request[i]
                try:
                    async with gate.admit(request, timeout_ms, read_body) as admission:
                        if timeout_ms is not None:
                            await asyncio.sleep(timeout_ms / 1000)
                        results.append(await pipeline.run(source, pipeline.resolve(asked), admission,
                                                          keep_pixels=keep_pixels))
                except Exception as exc:  # the error is the result under test
                    results.append(exc)
            return results, pipeline, gate.budget.in_use_bytes, gate.budget

    return asyncio.run(main()), metrics


def test_one_image_reads_top_to_bottom_and_matches_the_stages_called_by_hand(engine):
    rgb = gradient(120, 160, seed=4)
    options = PredictOptions(score_threshold=0.0, max_detections=7)
    ((results, pipeline, held, _), metrics) = run_pipeline(engine, [encode(rgb, "PNG"), rgb], options, keep_pixels=True)
    from_bytes, from_pixels = results

    prepared = prepare_image(rgb, engine.manifest.input.spec)
    images, sizes = pad_batch([prepared], engine.manifest.input.pad_divisor, batch_size=1)
    out = engine.infer(images, sizes)
    expected = postprocess_image(out["dets"][0], out["labels"][0], out["masks"][0], prepared.scale_factor,
                                 prepared.orig_hw, 0.0, 0.5, max_detections=7)
    for result in (from_bytes, from_pixels):
        assert len(result.detections.labels) == 7
        np.testing.assert_array_equal(result.detections.labels, expected.labels)
        np.testing.assert_allclose(result.detections.boxes, expected.boxes, atol=1e-3)
        assert result.detections.rles == expected.rles
        assert result.image.orig_hw == (120, 160)
        np.testing.assert_array_equal(result.pixels, rgb)  # kept to draw on
        assert all(getattr(result.seconds, stage) >= 0 for stage in STAGES)
        assert result.seconds.inference > 0 and result.seconds.total >= result.seconds.inference
    assert held == 0  # everything the requests held went back
    assert pipeline.classes.categories([0])[1] == [engine.manifest.classes[0].name]
    count = metrics.stage_seconds.labels("total")._sum.get()
    assert count > 0


def test_masks_off_a_bad_image_and_a_passed_deadline(engine):
    ((results, _, held, _), _) = run_pipeline(
        engine, [encode(gradient(seed=2), "PNG"), b"not an image", np.zeros((4, 4), np.uint8)],
        PredictOptions(masks=False))
    assert results[0].detections.rles is None and results[0].pixels is None
    assert isinstance(results[1], InvalidImage) and isinstance(results[2], InvalidImage)
    assert held == 0
    ((late,), _, held, _), _ = run_pipeline(engine, [encode(gradient(seed=2), "PNG")], PredictOptions(), timeout_ms=50)
    assert isinstance(late, DeadlineExceeded) and "before decode" in late.message
    assert held == 0


def test_masks_only_for_the_detections_returned_give_identical_answers(engine):
    """The graph runs the mask head only on the rows a request gets back: every answer equals the
    host postprocess of the engine's outputs with a mask on every row."""
    rgb = gradient(240, 320, seed=11)
    prepared = prepare_image(rgb, engine.manifest.input.spec)
    images, sizes = pad_batch([prepared], engine.manifest.input.pad_divisor, batch_size=1)
    everything = engine.infer(images, sizes)
    scores = np.sort(everything["dets"][0][everything["labels"][0] >= 0, 4])[::-1]
    # the thresholds, and thresholds inside this random model's score range (ties included)
    thresholds = [0.05, 0.5, 0.9, float(scores[9]), float(scores[len(scores) // 2])]
    cases = [PredictOptions(score_threshold=t, max_detections=k) for t in thresholds for k in (1, 10, 100)]
    cases.append(PredictOptions(score_threshold=0.0, max_detections=3, classes=[engine.manifest.classes[5].name]))
    ((results, *_), _) = run_pipeline(engine, [rgb] * len(cases), PredictOptions(), per_request=cases)
    for options, result in zip(cases, results):
        keep = None if options.classes is None else {5}
        expected = postprocess_image(everything["dets"][0], everything["labels"][0], everything["masks"][0],
                                     prepared.scale_factor, prepared.orig_hw, options.score_threshold, 0.5,
                                     max_detections=options.max_detections, keep_classes=keep)
        np.testing.assert_array_equal(result.detections.labels, expected.labels)
        assert result.detections.rles == expected.rles, options
    assert sum(len(r.detections.labels) for r in results) > 20  # the cases return detections
