"""Request: the body forms /predict accepts, the body size limit, and the prediction options (as
sent, :class:`PredictOptions`, and resolved against the manifest, :class:`RequestOptions`).

Three body forms carry one image:

- ``multipart/form-data``: a file field ``image``; option fields may sit beside it;
- ``application/json``: ``{"image": "<base64>", ...options}`` (a ``data:`` URL prefix is allowed);
- a raw image body with ``Content-Type: image/jpeg | image/png | image/webp | image/bmp``.

Options may also be query parameters; a field given in the body wins over the query.

A request refused before its body is read (413, 415, 503) first has the rest of its body read and
dropped, up to a bound (:func:`discard_body`): clients that send the whole body before reading
(urllib, requests, httpx) would otherwise see the connection reset instead of the error.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request

from service.exceptions import (
    BadRequest,
    ClientDisconnected,
    InvalidImage,
    InvalidParameters,
    PayloadTooLarge,
    UnsupportedMediaType,
    describe_validation_errors,
)
from service.manifest import ClassTable, PostprocessSection
from service.postprocess import PasteRule
from service.response import ResponseFormat

MULTIPART = "multipart/form-data"
JSON = "application/json"
RAW_IMAGE_TYPES = ("image/jpeg", "image/png", "image/webp", "image/bmp")
IMAGE_FIELD = "image"


class PredictOptions(BaseModel):
    """How to answer a /predict request."""

    model_config = ConfigDict(extra="forbid")

    score_threshold: float | None = Field(
        None, ge=0.0, le=1.0, allow_inf_nan=False,
        description="Keep detections scoring at least this; default: the engine manifest's (0.05).",
    )
    max_detections: int | None = Field(
        None, ge=1, description="Most detections returned; default and upper bound: the manifest's (100)."
    )
    classes: list[str] | None = Field(
        None,
        description="Keep only these classes: class names or category ids (GET /v1/models lists them); repeat the field or separate with commas.",
    )
    format: ResponseFormat = Field(
        "native",
        description="native: {detections, image, timings_ms} with bbox [x1,y1,x2,y2]; "
        "coco: a list of COCO results-file entries with bbox [x,y,w,h].",
    )
    masks: bool = Field(True, description="Include each detection's segmentation (COCO RLE).")
    image_id: int | None = Field(None, description="COCO image id copied into format=coco entries.")

    @field_validator("classes", mode="before")
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        if value is None:
            return None
        values = value if isinstance(value, list) else [value]
        return [part.strip() for v in values for part in str(v).split(",") if part.strip()]


class PredictJSON(PredictOptions):
    """The ``application/json`` body of /predict."""

    image: str = Field(description="The encoded image (JPEG, PNG, WebP or BMP) in base64, optionally as a data: URL.")


class RequestOptions(BaseModel):
    """One request's options resolved once against the engine's manifest; every stage reads this.

    Attributes:
        score_threshold: keep detections scoring at least this.
        mask_threshold: a pasted mask pixel is set at this probability (the manifest's).
        max_detections: keep at most this many, best first (<= the manifest's).
        keep_classes: label indices to keep, or None for all.
        with_masks: paste and encode each detection's mask.
        paste: the checkpoint origin's box rescale and mask paste (the manifest's).
        format: the answer's form; ``image_id``: copied into ``format=coco`` entries.
    """

    model_config = ConfigDict(frozen=True)

    score_threshold: float
    mask_threshold: float
    max_detections: int
    keep_classes: frozenset[int] | None
    with_masks: bool
    paste: PasteRule
    format: ResponseFormat
    image_id: int | None


def resolve_options(options: PredictOptions, postprocess: PostprocessSection, classes: ClassTable) -> RequestOptions:
    """``options`` with the manifest's defaults filled in and the class names turned into labels.

    Raises:
        InvalidParameters: more detections than the engine makes, or an unknown class (422).
    """
    if options.max_detections is not None and options.max_detections > postprocess.max_detections:
        raise InvalidParameters(f"max_detections is at most {postprocess.max_detections} for this engine")
    return RequestOptions(
        score_threshold=postprocess.score_threshold if options.score_threshold is None else options.score_threshold,
        mask_threshold=postprocess.mask_threshold,
        max_detections=options.max_detections or postprocess.max_detections,
        keep_classes=classes.indices(options.classes) if options.classes else None,
        with_masks=options.masks,
        paste=postprocess.paste,
        format=options.format,
        image_id=options.image_id,
    )


def decode_base64(text: str) -> bytes:
    """The bytes of base64 ``text`` (whitespace ignored; a ``data:...,`` URL prefix allowed), as both
    /predict's JSON body and the v2 protocol's JSON tensors carry images.

    Raises:
        binascii.Error, ValueError: not base64; the caller names the field.
    """
    if text.startswith("data:"):
        text = text.partition(",")[2]
    return base64.b64decode("".join(text.split()), validate=True)


@dataclass(frozen=True)
class Payload:
    """The image bytes of one request and the option fields its body carried."""

    image: bytes
    options: dict[str, Any]


def merge_options(query: PredictOptions, body_options: dict[str, Any]) -> PredictOptions:
    """Query options overridden by body options, validated together."""
    try:
        return PredictOptions.model_validate({**query.model_dump(exclude_unset=True), **body_options})
    except ValidationError as exc:
        raise InvalidParameters(describe_validation_errors(exc.errors())) from None


def body_bytes_to_hold(request: Request, max_body_bytes: int) -> int:
    """Memory the body will hold once read: its declared length (at most the limit; the limit when
    undeclared) twice (the chunks and their join), three times for JSON and multipart, whose image
    is copied out of the body."""
    declared = request.headers.get("content-length", "")
    size = min(int(declared), max_body_bytes) if declared.isdigit() else max_body_bytes
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    return (2 if media_type in RAW_IMAGE_TYPES else 3) * size


async def discard_body(request: Request, limit_bytes: int, timeout_s: float = 10.0) -> None:
    """Read and drop what the client still sends of the body: at most ``limit_bytes`` and
    ``timeout_s`` seconds. Nothing is read from a client waiting for ``100 Continue`` (curl for
    large bodies): it has not sent the body and reads the answer first."""
    if request.headers.get("expect", "").lower() == "100-continue" and not getattr(request.state, "body_started", False):
        return
    if getattr(request.state, "body_done", False):
        return
    dropped = 0

    async def drain() -> None:
        nonlocal dropped
        while dropped <= limit_bytes:
            message = await request.receive()
            if message["type"] != "http.request":
                return
            dropped += len(message.get("body", b""))
            if not message.get("more_body", False):
                return

    with contextlib.suppress(asyncio.TimeoutError, ClientDisconnect, OSError):
        await asyncio.wait_for(drain(), timeout_s)
    request.state.body_done = True


async def read_payload(request: Request, max_body_bytes: int) -> Payload:
    """Read the body (at most ``max_body_bytes``) and take the image and option fields from it.

    Raises:
        UnsupportedMediaType: a Content-Type other than the three forms.
        PayloadTooLarge: the body is longer than ``max_body_bytes``.
        BadRequest: malformed JSON or multipart; InvalidImage: broken base64.
        InvalidParameters: a missing image field or a bad option field.
        ClientDisconnected: the client left while sending.
    """
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type not in (MULTIPART, JSON, *RAW_IMAGE_TYPES):
        raise UnsupportedMediaType(
            f"Content-Type {media_type or '(none)'!r} is not accepted; send {MULTIPART} with a file field "
            f"{IMAGE_FIELD!r}, {JSON} with base64 in {IMAGE_FIELD!r}, or a raw {', '.join(RAW_IMAGE_TYPES)} body"
        )
    body = await read_body(request, max_body_bytes)
    if media_type == MULTIPART:
        return await _from_multipart(request, body)
    if media_type == JSON:
        return _from_json(body)
    return Payload(body, {})


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, at most ``limit`` bytes (a declared longer one is refused before reading).

    Raises:
        PayloadTooLarge: longer than ``limit``.
        ClientDisconnected: the client left while sending.
    """
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the request body is {declared} bytes; the limit is {limit}")
    chunks, size = [], 0
    request.state.body_started = True
    try:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnect()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"the request body exceeds the limit of {limit} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
    except ClientDisconnect:
        raise ClientDisconnected("the client closed the connection while sending the body") from None
    request.state.body_done = True
    return b"".join(chunks)


async def _from_multipart(request: Request, body: bytes) -> Payload:
    async def replay() -> AsyncIterator[bytes]:
        yield body

    parser = MultiPartParser(request.headers, replay(), max_files=1, max_fields=16, max_part_size=64 * 1024)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise BadRequest(f"malformed multipart body: {exc.message}") from None
    try:
        image = None
        options: dict[str, Any] = {}
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                if name != IMAGE_FIELD:
                    raise InvalidParameters(f"unexpected file field {name!r}; send the image as {IMAGE_FIELD!r}")
                image = await value.read()
            elif name == "classes":
                options.setdefault(name, []).append(value)
            else:
                options[name] = value
    finally:
        await form.close()
    if image is None:
        raise InvalidParameters(f"the multipart body has no file field {IMAGE_FIELD!r}")
    return Payload(image, options)


def _from_json(body: bytes) -> Payload:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"the body is not valid JSON: {exc}") from None
    try:
        request = PredictJSON.model_validate(data)
    except ValidationError as exc:
        raise InvalidParameters(describe_validation_errors(exc.errors())) from None
    try:
        image = decode_base64(request.image)
    except (binascii.Error, ValueError) as exc:
        raise InvalidImage(f"field {IMAGE_FIELD!r} is not valid base64: {exc}") from None
    return Payload(image, request.model_dump(exclude_unset=True, exclude={IMAGE_FIELD}))


def request_body_openapi() -> dict[str, Any]:
    """The OpenAPI ``requestBody`` of /predict, generated from the same models that parse it."""
    options = PredictOptions.model_json_schema()["properties"]
    binary = {"type": "string", "format": "binary"}
    multipart = {
        "type": "object",
        "required": [IMAGE_FIELD],
        "properties": {IMAGE_FIELD: {**binary, "description": "The image file."}, **options},
    }
    return {
        "required": True,
        "description": "One image: multipart upload, base64 JSON, or a raw image body.",
        "content": {
            MULTIPART: {"schema": multipart},
            JSON: {"schema": PredictJSON.model_json_schema()},
            **{media_type: {"schema": binary} for media_type in RAW_IMAGE_TYPES},
        },
    }
