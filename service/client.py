"""A Python client of the service: ``/predict``, ``/render`` and the health probes, over httpx.

Imports neither torch nor an engine runtime (onnxruntime, ...): only httpx, numpy and tenacity;
pycocotools when a mask is decoded, Pillow when an array or a PIL image is sent. Install with
``pip install "maskrcnn-serve[client]"``::

    from service.client import Client

    with Client("http://127.0.0.1:8000", api_key=None, timeout=60) as client:
        found = client.predict("photo.jpg", score_threshold=0.5)   # path, bytes, numpy array or PIL image
        for box, name, score, mask in zip(found.boxes, found.class_names, found.scores, found.masks):
            print(name, score, box, mask.sum())                     # mask: bool [h, w], decoded on access
        png = client.render("photo.jpg")                            # the overlay picture, PNG bytes
        client.health()                                             # Health(live=True, ready=True, reason=None)

:class:`AsyncClient` has the same methods as coroutines. Answers 429 and 503 (the service's
"try again later": queue full, memory budget, not ready) and connection failures are retried by
:class:`RetryPolicy`, waiting what the answer's ``Retry-After`` says; any other error answer raises
:class:`AnswerError` at once.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from tenacity import AsyncRetrying, RetryCallState, Retrying, retry_if_exception, stop_after_attempt

RETRY_STATUSES = frozenset({429, 503})
TIMEOUT_HEADER = "X-Request-Timeout-Ms"  # the service's per-request deadline
MAX_TIMEOUT_MS = 3_600_000  # the largest deadline the service accepts
ImageInput = Any  # str | Path | bytes | numpy.ndarray | PIL.Image.Image


class AnswerError(Exception):
    """An error answer of the service: its HTTP ``status``, the error ``code`` and ``message``, and
    ``retry_after_s`` when the answer gave a Retry-After in seconds (429, 503)."""

    def __init__(self, status: int, code: str, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(f"HTTP {status} {code}: {message}")
        self.status, self.code, self.message, self.retry_after_s = status, code, message, retry_after_s

    @classmethod
    def from_response(cls, response: httpx.Response) -> AnswerError:
        """The error of an answer, from the service's error body (either of its two shapes)."""
        try:
            error = response.json()["error"]
            code, message = (error["code"], error["message"]) if isinstance(error, dict) else ("error", str(error))
        except (ValueError, KeyError, TypeError):
            code, message = "http_error", response.text[:200]
        retry_after = response.headers.get("Retry-After", "").strip()
        return cls(response.status_code, code, message, float(retry_after) if retry_after.isdigit() else None)


class UnknownImageType(ValueError):
    """Bytes that are not a JPEG, PNG, WebP or BMP file (the types the service accepts)."""


@dataclass(frozen=True)
class RetryPolicy:
    """Up to ``attempts`` tries of a request that failed with one of ``transport_errors`` (default:
    not connected) or was answered with one of ``statuses``; between tries the answer's Retry-After,
    else ``backoff_s * 2**(try - 1)``, at most ``max_delay_s`` seconds. ``RetryPolicy(attempts=1)``
    never retries (a load test counts the 503s)."""

    attempts: int = 5
    backoff_s: float = 0.5
    max_delay_s: float = 30.0
    statuses: frozenset[int] = RETRY_STATUSES
    transport_errors: tuple[type[Exception], ...] = (httpx.ConnectError,)

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"attempts must be >= 1, got {self.attempts}")

    def retryable(self, error: BaseException) -> bool:
        return isinstance(error, self.transport_errors) or (
            isinstance(error, AnswerError) and error.status in self.statuses)

    def delay_s(self, state: RetryCallState) -> float:
        """Seconds to wait after the failed try ``state.attempt_number``."""
        failure = state.outcome.exception() if state.outcome is not None else None
        asked = getattr(failure, "retry_after_s", None)
        delay = asked if asked is not None else self.backoff_s * 2 ** (state.attempt_number - 1)
        return min(delay, self.max_delay_s)

    def _options(self) -> dict[str, Any]:
        return {"stop": stop_after_attempt(self.attempts), "wait": self.delay_s, "reraise": True,
                "retry": retry_if_exception(self.retryable)}

    def retrying(self) -> Retrying:
        """``policy.retrying()(fn, *args)`` calls ``fn`` until it returns or fails for good."""
        return Retrying(**self._options())

    def async_retrying(self) -> AsyncRetrying:
        """As :meth:`retrying`, for a coroutine function: ``await policy.async_retrying()(fn, *args)``."""
        return AsyncRetrying(**self._options())


class Masks(Sequence[np.ndarray]):
    """The instance masks of one image, each decoded from COCO RLE when it is read: ``masks[i]`` is
    bool ``[h, w]``; ``np.asarray(masks)`` decodes them all, bool ``[K, h, w]``."""

    def __init__(self, rles: Sequence[dict[str, Any]], image_hw: tuple[int, int]) -> None:
        self._rles = rles
        self._image_hw = image_hw

    def __len__(self) -> int:
        return len(self._rles)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return Masks(self._rles[index], self._image_hw)
        from pycocotools import mask as coco_mask

        rle = self._rles[index]
        return coco_mask.decode({"size": list(rle["size"]), "counts": rle["counts"]}).astype(bool)

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self[i] for i in range(len(self)))

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        stacked = np.stack(list(self)) if len(self) else np.zeros((0, *self._image_hw), dtype=bool)
        return stacked if dtype is None else stacked.astype(dtype)


@dataclass(frozen=True)
class Detections:
    """One image's detections, best first.

    Attributes:
        boxes: float32 ``[K, 4]``, ``x1, y1, x2, y2`` in the original image's pixels.
        scores: float32 ``[K]``.
        class_ids: int64 ``[K]``, category ids (COCO's for COCO models).
        class_names: K class names.
        rles: K COCO RLEs ``{"size": [h, w], "counts": str}``, or None when asked without masks.
        image_hw: ``(h, w)`` of the image, pixels (after its EXIF orientation).
        timings_ms: milliseconds per service stage.
    """

    boxes: np.ndarray
    scores: np.ndarray
    class_ids: np.ndarray
    class_names: tuple[str, ...]
    rles: tuple[dict[str, Any], ...] | None
    image_hw: tuple[int, int]
    timings_ms: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_predict(cls, body: dict[str, Any]) -> Detections:
        """From a ``/predict`` answer of the native form."""
        found = body["detections"]
        return cls(
            boxes=np.array([d["bbox"] for d in found], dtype=np.float32).reshape(-1, 4),
            scores=np.array([d["score"] for d in found], dtype=np.float32),
            class_ids=np.array([d["category_id"] for d in found], dtype=np.int64),
            class_names=tuple(d["category_name"] for d in found),
            rles=tuple(d["segmentation"] for d in found) if all("segmentation" in d for d in found) else None,
            image_hw=(body["image"]["height"], body["image"]["width"]),
            timings_ms=body.get("timings_ms", {}),
        )

    def __len__(self) -> int:
        return len(self.scores)

    @property
    def masks(self) -> Masks:
        """The masks, decoded on access (empty when asked without masks)."""
        return Masks(self.rles or (), self.image_hw)

    def to_coco(self, image_id: int) -> list[dict[str, Any]]:
        """COCO results-file entries (``bbox`` as ``[x, y, w, h]``) of these detections for ``image_id``."""
        entries = []
        for i, (x1, y1, x2, y2) in enumerate(self.boxes.tolist()):
            entry: dict[str, Any] = {"image_id": image_id, "category_id": int(self.class_ids[i]),
                                     "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(self.scores[i])}
            if self.rles is not None:
                entry["segmentation"] = self.rles[i]
            entries.append(entry)
        return entries


@dataclass(frozen=True)
class Health:
    """``live``: the process answers; ``ready``: it serves inference; ``reason``: why not, if not."""

    live: bool
    ready: bool
    reason: str | None = None


def image_content_type(data: bytes) -> str | None:
    """The Content-Type the service accepts for these image bytes, from their signature; None if unknown."""
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data.startswith(b"BM"):
        return "image/bmp"
    return None


def encoded_image(image: ImageInput) -> tuple[bytes, str]:
    """``(bytes, Content-Type)`` of an image given as a path, encoded bytes, a uint8 ``[h, w, 3]``
    RGB (or ``[h, w]`` gray) numpy array, or a PIL image (arrays and PIL images are sent as PNG).

    Raises:
        UnknownImageType: bytes or a file that are not JPEG, PNG, WebP or BMP.
        TypeError: anything else.
    """
    if isinstance(image, (str, Path)):
        image = Path(image).read_bytes()
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        content_type = image_content_type(data)
        if content_type is None:
            raise UnknownImageType("not a JPEG, PNG, WebP or BMP file")
        return data, content_type
    if isinstance(image, np.ndarray) or hasattr(image, "save"):
        from PIL import Image

        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
                raise TypeError(f"an image array must be uint8 [h, w, 3] RGB or [h, w] gray, got {image.dtype} "
                                f"{list(image.shape)}")
            image = Image.fromarray(image)
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        return buffer.getvalue(), "image/png"
    raise TypeError(f"cannot send a {type(image).__name__} as an image: give a path, bytes, a numpy array or a PIL image")


class _Requests:
    """What both clients share: the base URL and headers, request building, answer checking."""

    def __init__(self, url: str, api_key: str | None, timeout: float, retry: RetryPolicy) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.retry = retry
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def _image_request(self, image: ImageInput, options: dict[str, Any]) -> dict[str, Any]:
        """Keyword arguments of ``httpx.post`` for one image and /predict's options (None: the service's default)."""
        content, content_type = encoded_image(image)
        params: dict[str, Any] = {}
        for name, value in options.items():
            if value is None:
                continue
            if name == "classes":
                value = ",".join(map(str, value))
            elif isinstance(value, bool):
                value = str(value).lower()
            params[name] = value
        deadline_ms = str(min(int(self.timeout * 1000), MAX_TIMEOUT_MS))
        return {"content": content, "params": params,
                "headers": {"Content-Type": content_type, TIMEOUT_HEADER: deadline_ms}}

    @staticmethod
    def _checked(response: httpx.Response) -> httpx.Response:
        if response.status_code != 200:
            raise AnswerError.from_response(response)
        return response

    @staticmethod
    def _health(live: httpx.Response, ready: httpx.Response | None) -> Health:
        if live.status_code != 200:
            return Health(False, False, str(AnswerError.from_response(live)))
        if ready is None or ready.status_code != 200:
            return Health(True, False, None if ready is None else str(AnswerError.from_response(ready)))
        return Health(True, True)


def _options(score_threshold: float | None, max_detections: int | None, classes: Sequence[str | int] | None,
             masks: bool) -> dict[str, Any]:
    return {"score_threshold": score_threshold, "max_detections": max_detections, "classes": classes, "masks": masks}


class Client(_Requests):
    """A blocking client. ``timeout`` (seconds) bounds each request and is sent as its deadline.

    ``predict`` and ``render`` take the image and /predict's options: ``score_threshold``,
    ``max_detections``, ``classes`` (names or category ids), ``masks``.

    Raises (``predict``, ``render``): :class:`AnswerError` (for a retried status, once the retries
    are spent), ``httpx.TransportError``, :class:`UnknownImageType`.
    """

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 60.0,
                 retry: RetryPolicy = RetryPolicy()) -> None:
        super().__init__(url, api_key, timeout, retry)
        self._http = httpx.Client(base_url=self.url, headers=self.headers, timeout=timeout)

    def predict(self, image: ImageInput, *, score_threshold: float | None = None, max_detections: int | None = None,
                classes: Sequence[str | int] | None = None, masks: bool = True) -> Detections:
        options = _options(score_threshold, max_detections, classes, masks)
        return Detections.from_predict(self._post("/predict", image, options).json())

    def render(self, image: ImageInput, *, score_threshold: float | None = None, max_detections: int | None = None,
               classes: Sequence[str | int] | None = None, masks: bool = True) -> bytes:
        """The overlay picture (PNG bytes)."""
        return self._post("/render", image, _options(score_threshold, max_detections, classes, masks)).content

    def health(self) -> Health:
        """Liveness and readiness (never retried; a refused connection is ``live=False``)."""
        try:
            live = self._http.get("/healthz")
            return self._health(live, self._http.get("/readyz") if live.status_code == 200 else None)
        except httpx.TransportError as error:
            return Health(False, False, f"{type(error).__name__}: {error}")

    def _post(self, path: str, image: ImageInput, options: dict[str, Any]) -> httpx.Response:
        request = self._image_request(image, options)
        return self.retry.retrying()(lambda: self._checked(self._http.post(path, **request)))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncClient(_Requests):
    """As :class:`Client`, with coroutine methods, for many requests in flight at once."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 60.0,
                 retry: RetryPolicy = RetryPolicy(), limits: httpx.Limits | None = None) -> None:
        super().__init__(url, api_key, timeout, retry)
        self._http = httpx.AsyncClient(base_url=self.url, headers=self.headers, timeout=timeout,
                                       limits=limits or httpx.Limits())

    async def predict(self, image: ImageInput, *, score_threshold: float | None = None,
                      max_detections: int | None = None, classes: Sequence[str | int] | None = None,
                      masks: bool = True) -> Detections:
        options = _options(score_threshold, max_detections, classes, masks)
        return Detections.from_predict((await self._post("/predict", image, options)).json())

    async def render(self, image: ImageInput, *, score_threshold: float | None = None,
                     max_detections: int | None = None, classes: Sequence[str | int] | None = None,
                     masks: bool = True) -> bytes:
        return (await self._post("/render", image, _options(score_threshold, max_detections, classes, masks))).content

    async def health(self) -> Health:
        try:
            live = await self._http.get("/healthz")
            return self._health(live, await self._http.get("/readyz") if live.status_code == 200 else None)
        except httpx.TransportError as error:
            return Health(False, False, f"{type(error).__name__}: {error}")

    async def _post(self, path: str, image: ImageInput, options: dict[str, Any]) -> httpx.Response:
        request = self._image_request(image, options)

        async def attempt() -> httpx.Response:
            return self._checked(await self._http.post(path, **request))

        return await self.retry.async_retrying()(attempt)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
