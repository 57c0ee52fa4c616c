"""EnginePool with a real exported engine: failures become InferenceFailed and the session lives on."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from service.backends import load_engine
from service.batcher import Batcher
from service.engine_pool import EngineItem, EnginePool
from service.exceptions import InferenceFailed
from service.preprocess import PreparedImage, prepare_image
from service_images import gradient

pytestmark = pytest.mark.slow


def test_a_failing_batch_reaches_every_caller_and_the_session_lives(engine_dir_b2):
    pool = EnginePool([load_engine(engine_dir_b2)])
    image = prepare_image(gradient(seed=8), pool.input_spec)
    good = EngineItem(image)
    # Claims the good image's size but holds a smaller tensor: the batch cannot be assembled.
    broken = EngineItem(PreparedImage(np.zeros((3, 32, 32), np.float32), image.orig_hw, image.resized_hw,
                                      image.scale_factor))

    async def main():
        async with Batcher(pool.infer, max_batch_size=2, max_wait_s=0.2, max_queue_depth=4, group_key=pool.padded_hw) as batcher:
            deadline = asyncio.get_running_loop().time() + 300
            failed = await asyncio.gather(batcher.submit(good, deadline), batcher.submit(broken, deadline),
                                          return_exceptions=True)
            served = await batcher.submit(good, deadline)
        return failed, served

    try:
        failed, served = asyncio.run(main())
    finally:
        pool.close()
    assert len(failed) == 2 and all(isinstance(e, InferenceFailed) for e in failed)
    assert "batch of 2" in failed[0].message
    assert served.batch_size == 1
    assert served.value.dets.shape == (100, 5) and served.value.masks.shape == (100, 28, 28)
