"""``service.client`` against a live server (real engine), and its import and retry contracts."""

from __future__ import annotations

import asyncio
import io
import subprocess
import sys
import time
import tomllib
from importlib import metadata
from pathlib import Path

import httpx
import numpy as np
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from PIL import Image
from pycocotools import mask as coco_mask
from tenacity import RetryCallState, Retrying

from scripts.tools.service_process import serving
from service.backends import load_engine
from service.client import AnswerError, AsyncClient, Client, Health, RetryPolicy, UnknownImageType, encoded_image
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def test_importing_the_client_loads_no_torch_and_no_engine_runtime():
    code = ("import sys, service.client; "
            "print(sorted(m for m in ('torch', 'onnxruntime', 'openvino', 'tensorrt') if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "[]"


def _client_extra_modules() -> set[str]:
    """Top-level modules of the ``client`` extra's distributions and everything they require."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    todo = [Requirement(r).name for r in project["optional-dependencies"]["client"]]
    names: set[str] = set()
    while todo:
        name = canonicalize_name(todo.pop())
        if name in names:
            continue
        names.add(name)
        for requirement in map(Requirement, metadata.requires(name) or ()):
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return {module for module, dists in metadata.packages_distributions().items()
            if any(canonicalize_name(d) in names for d in dists)}


# Where only the client extra is installed, any other import fails: this finder makes it so.
ONLY_CLIENT_EXTRA = """
import sys
class Refuse:
    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top not in ALLOWED and top not in sys.stdlib_module_names:
            raise ImportError(f"{name} is not installed with the client extra")
sys.meta_path.insert(0, Refuse())
"""


def test_the_client_runs_with_only_its_extra_installed():
    """The README's light install (the client extra's packages and the package without its
    dependencies): importing, sending an array, decoding a mask and a request all work."""
    allowed = _client_extra_modules() | {"service"}
    code = f"ALLOWED = {sorted(allowed)!r}" + ONLY_CLIENT_EXTRA + """
import numpy as np
from service.client import Client, Detections, encoded_image
assert encoded_image(np.zeros((4, 6, 3), np.uint8))[1] == "image/png"
found = Detections.from_predict({"detections": [{"bbox": [0, 0, 2, 2], "score": 0.9, "category_id": 1,
    "category_name": "person", "segmentation": {"size": [4, 6], "counts": "04000"}}],
    "image": {"height": 4, "width": 6}})
assert found.masks[0].shape == (4, 6)
with Client("http://127.0.0.1:9", timeout=2) as client:
    assert not client.health().live
print(sorted(m for m in ("fastapi", "starlette", "uvicorn", "pydantic", "cv2", "onnxruntime") if m in sys.modules))
"""
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


def _failed_state(error: BaseException, attempt: int) -> RetryCallState:
    state = RetryCallState(Retrying(), None, (), {})
    state.attempt_number = attempt
    state.set_exception((type(error), error, None))
    return state


def test_retry_policy_waits_what_retry_after_says_else_backs_off():
    policy = RetryPolicy(attempts=3, backoff_s=0.5, max_delay_s=10)
    assert policy.delay_s(_failed_state(AnswerError(503, "overloaded", "full", retry_after_s=4.0), 1)) == 4.0
    assert policy.delay_s(_failed_state(AnswerError(503, "overloaded", "full", retry_after_s=60.0), 1)) == 10
    assert policy.delay_s(_failed_state(httpx.ConnectError("refused"), 3)) == 2.0
    assert policy.retryable(AnswerError(429, "slow_down", "")) and policy.retryable(httpx.ConnectError("refused"))
    assert not policy.retryable(AnswerError(422, "invalid_parameters", ""))
    with pytest.raises(ValueError):
        RetryPolicy(attempts=0)


def test_images_are_sent_as_given_or_as_png(photos):
    data = (photos / "astronaut.png").read_bytes()
    assert encoded_image(photos / "astronaut.png") == (data, "image/png")
    rgb = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    for image in (rgb, Image.fromarray(rgb)):
        png, content_type = encoded_image(image)
        assert content_type == "image/png"
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png))), rgb)
    with pytest.raises(UnknownImageType):
        encoded_image(b"GIF89a...")
    with pytest.raises(TypeError):
        encoded_image(rgb.astype(np.float32))


@pytest.mark.slow
def test_predict_render_and_health_against_a_live_server(engine_dir, photos):
    path = photos / "astronaut.png"
    with serving(Settings(request_timeout_ms=120_000), load_engine(engine_dir)) as server, \
            Client(server.url, timeout=120) as client:
        assert client.health() == Health(live=True, ready=True)
        found = client.predict(path, max_detections=3, classes=["bear", "1"])
        raw = server.post(path.read_bytes(), "image/png", params={"max_detections": 3, "classes": "bear,1"}).json()
        assert len(found) == len(raw["detections"]) > 0 and found.image_hw == (512, 512)
        assert found.boxes.dtype == np.float32 and found.boxes.shape == (len(found), 4)
        np.testing.assert_array_equal(found.boxes, np.array([d["bbox"] for d in raw["detections"]], np.float32))
        assert found.class_names == tuple(d["category_name"] for d in raw["detections"])
        assert set(found.class_names) <= {"bear", "person"} and found.class_ids.dtype == np.int64
        mask = found.masks[0]
        assert mask.dtype == bool and mask.shape == (512, 512)
        np.testing.assert_array_equal(mask, coco_mask.decode(raw["detections"][0]["segmentation"]).astype(bool))
        assert np.asarray(found.masks).shape == (len(found), 512, 512)
        entry = found.to_coco(image_id=5)[0]
        x1, y1, x2, y2 = raw["detections"][0]["bbox"]
        assert entry["image_id"] == 5 and entry["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1])

        png = client.render(Image.open(path), max_detections=3)
        assert Image.open(io.BytesIO(png)).size == (512, 512)

        with pytest.raises(AnswerError) as refused:  # not retried: a 4xx is final
            client.predict(path, score_threshold=2.0)
        assert refused.value.status == 422 and refused.value.code == "invalid_parameters"
    with Client(server.url) as gone:
        assert gone.health().live is False  # the server has stopped


@pytest.mark.slow
def test_async_client_retries_until_the_server_is_ready(engine_dir, photos):
    """While the engine warms up /predict answers 503 with Retry-After: 1; the client waits and retries."""
    image = (photos / "astronaut.png").read_bytes()

    async def predict_early(url: str) -> tuple[Health, int, float]:
        async with AsyncClient(url, timeout=120, retry=RetryPolicy(attempts=120, backoff_s=0.01)) as client:
            health = await client.health()
            started = time.monotonic()
            found = await client.predict(image, max_detections=2, masks=False)
            return health, len(found), time.monotonic() - started

    with serving(Settings(request_timeout_ms=120_000, retry_after_s=1), load_engine(engine_dir), ready=False) as live:
        health, count, waited_s = asyncio.run(predict_early(live.url))
        refused = live.metric("maskrcnn_requests_total", endpoint="/predict", status="503")
    if health.ready:
        pytest.skip("the engine warmed up before the first request; nothing was retried")
    assert health.live and "warming up" in health.reason
    assert count == 2 and refused >= 1
    assert waited_s >= refused * 0.9  # each retry waited the Retry-After second, not the 10 ms backoff
