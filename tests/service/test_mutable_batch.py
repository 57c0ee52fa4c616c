"""Mutable-batch (``--shape-mutable``) engines: one graph serving batches of 1..max.

The engine is the cached random-init R50-FPN at score threshold 0 (tests/conftest.py), so every
image yields the full 100 detections, ranked among many near-equal scores: any change in how a
batch is processed would show up as reordered or different rows.

"Same as batch 1" compares an image's rows in a batch with the image run alone *at the batch's
padded size*: the backbone sees the zero padding, so an image padded to a larger canvas is a
different input (eager PyTorch behaves the same way; the service batches images of one padded size).
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

import numpy as np
import pytest

from build_tools.pipeline import compile_step
from build_tools.reference import reference_for_manifest
from build_tools.images import list_images, read_rgb
from build_tools.verify import Tolerance, check_tolerance, verify
from service.backends import get_backend, load_engine
from service.batcher import Batcher
from service.engine_pool import EngineItem, EnginePool
from service.manifest import BatchProfile, Manifest
from service.preprocess import pad_batch, prepare_image
from service_images import gradient

pytestmark = pytest.mark.slow

# three photographs of different resized sizes (800x800, 800x1203, 800x1200): batches pad to 800x1216
PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png")
OUTPUTS = ("dets", "labels", "masks")


@pytest.fixture(scope="module")
def engine(engine_dir_mutable):
    return load_engine(engine_dir_mutable)


@pytest.fixture(scope="module")
def photo_paths(photos):
    paths = {p.name: p for p in list_images(photos)}
    return [paths[name] for name in PHOTOS]


@pytest.fixture(scope="module")
def prepared(engine, photo_paths):
    spec = engine.manifest.input.spec
    return [prepare_image(read_rgb(p), spec) for p in photo_paths]


def alone(engine, image, hw):
    """Outputs of ``image`` run as a batch of 1 padded to ``hw``."""
    images, sizes = pad_batch([image], engine.manifest.input.pad_divisor, min_hw=hw)
    return engine.infer(images, sizes)


def test_manifest_and_graph_declare_a_batch_of_1_to_max(engine_dir_mutable):
    import onnx

    manifest = Manifest.load(engine_dir_mutable)
    assert manifest.shape_profile.batch == BatchProfile(mutable=True, min=1, max=4)
    assert manifest.batch_size is None and manifest.max_batch_size == 4
    assert load_engine(engine_dir_mutable).batch_size is None
    graph = onnx.load(str(engine_dir_mutable / manifest.model_file), load_external_data=False).graph
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in [*graph.input, *graph.output]}
    assert dims["images"] == ["batch", 3, "height", "width"]
    assert dims["image_sizes"] == ["batch", 2]
    for name in OUTPUTS:
        assert dims[name][0] == "batch", dims
    assert {n.op_type for n in graph.node if n.op_type == "Loop"} == set(), "no per-image loop in the graph"


def test_each_image_of_a_batch_of_2_and_3_equals_the_image_alone(engine, prepared):
    divisor = engine.manifest.input.pad_divisor
    hw = pad_batch(prepared, divisor)[0].shape[2:]
    assert tuple(hw) == (800, 1216) == tuple(pad_batch(prepared[:2], divisor)[0].shape[2:])
    singles = [alone(engine, image, hw) for image in prepared]
    assert all((s["labels"][0] >= 0).sum() == 100 for s in singles)
    for n in (2, 3):
        images, sizes = pad_batch(prepared[:n], divisor)
        assert images.shape[0] == n
        batch = engine.infer(images, sizes)
        for name in OUTPUTS:
            assert batch[name].shape[0] == n
        for i in range(n):
            for name in OUTPUTS:
                np.testing.assert_array_equal(batch[name][i], singles[i][name][0], err_msg=f"{name}, image {i} of {n}")


class _BatchOf:
    """The mutable engine presented as a fixed batch of ``batch_size`` to ``verify``."""

    def __init__(self, engine, batch_size: int):
        self.engine, self.batch_size, self.manifest, self.threads = engine, batch_size, engine.manifest, engine.threads

    def infer(self, images, image_sizes, *mask_selection):
        assert images.shape[0] == self.batch_size
        return self.engine.infer(images, image_sizes, *mask_selection)


def test_a_batch_of_3_matches_eager_pytorch_at_fp32_tolerance(engine, photo_paths):
    """At half the service's input scale (the graph's H and W are dynamic): eager PyTorch on a batch
    of three 800x1216 inputs alone takes minutes on 2 busy cores."""
    manifest = engine.manifest
    reference = reference_for_manifest(manifest)
    spec = replace(manifest.input.spec, resize_scale=(667, 400))
    report = verify(reference.model, _BatchOf(engine, 3), photo_paths, spec, progress=False)
    assert report.reference_detections == 300 and report.engine_detections == 300
    assert report.box_match_rate >= 0.99 and report.label_agreement >= 0.99
    assert report.score_abs_diff_max < 1e-3
    assert not check_tolerance(report, Tolerance.for_precision("fp32")), report


def test_engine_pool_runs_a_partial_batch_without_padding_to_max(engine):
    calls = []

    class Recording:
        manifest, batch_size = engine.manifest, engine.batch_size

        def infer(self, images, image_sizes, *mask_selection):
            calls.append(images.shape)
            return engine.infer(images, image_sizes, *mask_selection)

    pool = EnginePool([Recording()])
    assert pool.batch_size is None
    assert pool.manifest.images_per_call(16) == 4, "capped at the manifest's max"
    assert pool.manifest.images_per_call(3) == 3
    # wide strips resize to 133x1333 (fast); both pad to 160x1344, so they batch together
    strips = [EngineItem(prepare_image(gradient(60, 600, seed=s), pool.input_spec)) for s in (1, 2)]
    assert pool.padded_hw(strips[0]) == pool.padded_hw(strips[1])

    async def main():
        async with Batcher(pool.infer, max_batch_size=pool.manifest.images_per_call(16), max_wait_s=0.5, max_queue_depth=8,
                           group_key=pool.padded_hw) as batcher:
            deadline = asyncio.get_running_loop().time() + 300
            return await asyncio.gather(*(batcher.submit(s, deadline) for s in strips))

    try:
        served = asyncio.run(main())
    finally:
        pool.close()
    assert calls == [(2, 3, 160, 1344)], "one call with the 2 real images, not padded to 4"
    assert [s.batch_size for s in served] == [2, 2]
    for strip, result in zip(strips, served):
        single = alone(engine, strip.image, (160, 1344))
        np.testing.assert_array_equal(result.value.dets, single["dets"][0])
        np.testing.assert_array_equal(result.value.labels, single["labels"][0])
        np.testing.assert_array_equal(result.value.masks, single["masks"][0])


openvino = get_backend("openvino")


@pytest.mark.skipif(not openvino.available()[0], reason=openvino.available()[1])
def test_openvino_runs_the_mutable_graph_at_batch_1_to_4(engine_dir_mutable, tmp_path):
    from conftest import cached_mutable_export

    manifest = compile_step(cached_mutable_export(4), tmp_path / "ov", backend="openvino", precision="fp32",
                            run_verify=False, progress=False)
    assert manifest.shape_profile.batch.mutable is True
    ov_engine = load_engine(tmp_path / "ov")
    spec = manifest.input.spec
    strips = [prepare_image(gradient(60, 600, seed=s), spec) for s in range(4)]
    singles = [alone(ov_engine, s, (160, 1344)) for s in strips]
    for n in (2, 4):
        images, sizes = pad_batch(strips[:n], spec.pad_divisor)
        out = ov_engine.infer(images, sizes)
        assert out["dets"].shape == (n, 100, 5) and out["masks"].shape == (n, 100, 28, 28)
        for i in range(n):
            for name in OUTPUTS:
                np.testing.assert_array_equal(out[name][i], singles[i][name][0], err_msg=f"{name}, image {i} of {n}")
