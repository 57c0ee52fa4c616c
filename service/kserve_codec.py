"""The Open Inference Protocol (KServe v2) documents and tensor codec: what ``service.kserve``'s
routes read and write (see its docstring for the protocol as this server speaks it). No HTTP here.
"""

from __future__ import annotations

import binascii
import hashlib
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.responses import Response

from service.exceptions import BadRequest, describe_validation_errors
from service.manifest import ClassTable, Manifest
from service.pipeline import Inference
from service.request import PredictOptions, decode_base64, merge_options

HEADER_LENGTH = "Inference-Header-Content-Length"
BINARY = "application/octet-stream"
IMAGE, IMAGE_RGB = "image", "image_rgb"
OUTPUTS: dict[str, tuple[str, list[int]]] = {  # name -> (datatype, shape with -1 for N)
    "boxes": ("FP32", [-1, 4]),
    "scores": ("FP32", [-1]),
    "labels": ("INT64", [-1]),
    "classes": ("BYTES", [-1]),
    "masks": ("BYTES", [-1]),
    "image_index": ("INT64", [-1]),
}
OPTION_PARAMETERS = ("score_threshold", "max_detections", "classes")
# The protocol's own: binary_data_output is read; the others tritonclient may send change nothing here.
PROTOCOL_PARAMETERS = ("binary_data_output", "timeout", "priority", "sequence_id", "sequence_start", "sequence_end")


# --- the JSON documents -----------------------------------------------------------------------

class _Document(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TensorMetadata(_Document):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1 marks a dimension of any size")


class ServerMetadata(_Document):
    name: str
    version: str
    extensions: list[str]


class ModelMetadata(_Document):
    name: str
    versions: list[str]
    platform: str = Field(description="the engine's backend, e.g. onnxruntime")
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class Readiness(_Document):
    ready: bool


class Liveness(_Document):
    live: bool


class RequestInput(_Document):
    name: str
    datatype: str
    shape: list[int]
    parameters: dict[str, Any] = Field(default_factory=dict)
    data: list[Any] | None = None


class RequestOutput(_Document):
    name: str
    parameters: dict[str, Any] = Field(default_factory=dict)


class InferRequest(_Document):
    id: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    inputs: list[RequestInput] = Field(min_length=1)
    outputs: list[RequestOutput] | None = None


class ResponseOutput(_Document):
    name: str
    datatype: str
    shape: list[int]
    parameters: dict[str, Any] | None = Field(None, description="binary_data_size, for an output sent as binary")
    data: list[Any] | None = Field(None, description="the values, row-major, in the JSON form")


class InferResponse(_Document):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[ResponseOutput]


def model_version(manifest: Manifest) -> str:
    """The model's version: first 12 hex digits of the SHA-256 of the manifest's canonical JSON."""
    canonical = orjson.dumps(manifest.to_dict(), option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(canonical).hexdigest()[:12]


# --- the tensor codec -------------------------------------------------------------------------

@dataclass(frozen=True)
class ParsedInfer:
    """A parsed infer request: the one input's values, the options, and the outputs to send.

    ``images``: B encoded images, or one uint8 ``[H, W, 3]`` RGB array. ``outputs``: output name ->
    whether it is sent as binary data, in answer order.
    """

    id: str | None
    images: list[bytes] | list[np.ndarray]
    options: PredictOptions
    outputs: dict[str, bool]


@dataclass(frozen=True)
class InferAnswer:
    """The answer to an infer request: the model's name and version, the request's id (or None),
    the output tensors in answer order (:func:`output_tensors`), and per output
    whether the request asked for it as binary data (REST's extension; gRPC always sends raw)."""

    model_name: str
    model_version: str
    id: str | None
    tensors: dict[str, np.ndarray]
    binary: dict[str, bool]


def parse_infer_request(body: bytes, header_length: str | None, max_images: int) -> ParsedInfer:
    """The infer request in ``body`` (a JSON document, or with ``header_length``, a JSON header of
    that many bytes followed by the inputs' binary data).

    Raises:
        BadRequest: malformed JSON or binary data, an unknown input, output or parameter, a wrong
            datatype or shape, more than ``max_images`` images.
        InvalidParameters: a bad option value (rendered as 400 under /v2).
    """
    header, binary = _split_body(body, header_length)
    try:
        request = InferRequest.model_validate(orjson.loads(header))
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"the inference request is not valid JSON: {exc}") from None
    except ValidationError as exc:
        raise BadRequest(f"malformed inference request: {describe_validation_errors(exc.errors())}") from None
    return read_infer_request(request, binary, max_images)


def read_infer_request(request: InferRequest, binary: memoryview, max_images: int) -> ParsedInfer:
    """The parsed form of ``request`` whose input, when it has ``parameters.binary_data_size``, holds
    its values in ``binary`` (the REST binary extension's bytes after the JSON header, or gRPC's
    ``raw_input_contents``).

    Raises:
        BadRequest, InvalidParameters: as :func:`parse_infer_request`.
    """
    unknown = [name for name in request.parameters if name not in (*OPTION_PARAMETERS, *PROTOCOL_PARAMETERS)]
    if unknown:
        raise BadRequest(f"unknown request parameters {unknown}; this model takes {list(OPTION_PARAMETERS)}")
    if len(request.inputs) != 1 or request.inputs[0].name not in (IMAGE, IMAGE_RGB):
        raise BadRequest(f"send exactly one input: {IMAGE!r} (BYTES [B], encoded images) or {IMAGE_RGB!r} "
                         f"(UINT8 [H, W, 3], RGB pixels); got {[i.name for i in request.inputs]}")
    tensor = _input_values(request.inputs[0], binary)
    if request.inputs[0].name == IMAGE:
        images: list[bytes] | list[np.ndarray] = _encoded_images(tensor, request.inputs[0].parameters)
        if len(images) > max_images:
            raise BadRequest(f"{len(images)} images in one request; at most {max_images} (MASKRCNN_MAX_QUEUE_DEPTH)")
    else:
        images = [tensor]
    outputs = _requested_outputs(request)
    options = {name: request.parameters[name] for name in OPTION_PARAMETERS if name in request.parameters}
    options["masks"] = "masks" in outputs
    return ParsedInfer(request.id, images, merge_options(PredictOptions(), options), outputs)


def _split_body(body: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    if header_length is None:
        return body, memoryview(b"")
    if not header_length.isdigit() or int(header_length) > len(body):
        raise BadRequest(f"{HEADER_LENGTH} is {header_length!r}; the body is {len(body)} bytes")
    view = memoryview(body)
    return body[: int(header_length)], view[int(header_length):]


def _input_values(tensor: RequestInput, binary: memoryview) -> np.ndarray:
    """The input's values with its shape: an object array of bytes for BYTES, else the numpy type."""
    expected = "BYTES" if tensor.name == IMAGE else "UINT8"
    if tensor.datatype != expected:
        raise BadRequest(f"input {tensor.name!r} must have datatype {expected}, got {tensor.datatype!r}")
    if any(d < 0 for d in tensor.shape):
        raise BadRequest(f"input {tensor.name!r} has a negative dimension in shape {tensor.shape}")
    if tensor.name == IMAGE and len(tensor.shape) != 1:
        raise BadRequest(f"input {IMAGE!r} must have shape [B] (one element per image), got {tensor.shape}")
    if tensor.name == IMAGE_RGB and (len(tensor.shape) != 3 or tensor.shape[2] != 3):
        raise BadRequest(f"input {IMAGE_RGB!r} must have shape [H, W, 3], got {tensor.shape}")
    count = int(np.prod(tensor.shape))
    size = tensor.parameters.get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or size < 0 or size > len(binary):
            raise BadRequest(f"input {tensor.name!r}: binary_data_size {size!r} does not fit the "
                             f"{len(binary)} bytes after the JSON header")
        if size != len(binary):
            raise BadRequest(f"input {tensor.name!r}: binary_data_size is {size}; {len(binary)} bytes follow the header")
        values = _bytes_elements(binary) if expected == "BYTES" else np.frombuffer(binary, dtype=np.uint8)
    elif tensor.data is None:
        raise BadRequest(f"input {tensor.name!r} has neither data nor parameters.binary_data_size")
    else:
        values = _json_elements(tensor.data, expected)
    if values.size != count:
        raise BadRequest(f"input {tensor.name!r} has {values.size} elements; shape {tensor.shape} needs {count}")
    return values.reshape(tensor.shape)


def _bytes_elements(data: memoryview) -> np.ndarray:
    """A binary BYTES tensor: elements of a 4-byte little-endian length and that many bytes."""
    elements, offset = [], 0
    while offset < len(data):
        if offset + 4 > len(data):
            raise BadRequest("binary BYTES data ends inside an element's 4-byte length")
        (length,) = struct.unpack_from("<I", data, offset)
        offset += 4
        if offset + length > len(data):
            raise BadRequest(f"binary BYTES data ends inside an element of {length} bytes")
        elements.append(bytes(data[offset:offset + length]))
        offset += length
    array = np.empty(len(elements), dtype=object)
    array[:] = elements
    return array


def _json_elements(data: list[Any], datatype: str) -> np.ndarray:
    """The values of a JSON tensor (flat or nested, row-major) as a flat array."""
    try:
        if datatype == "BYTES":
            flat = np.array(data, dtype=object).ravel()
            if not all(isinstance(v, str) for v in flat):
                raise ValueError("BYTES elements must be strings")
            return flat
        values = np.array(data).ravel()
        if values.size and (values.dtype.kind not in "iu" or values.min() < 0 or values.max() > 255):
            raise ValueError("UINT8 elements must be integers from 0 to 255")
        return values.astype(np.uint8)
    except (ValueError, TypeError, OverflowError) as exc:
        raise BadRequest(f"input data of datatype {datatype}: {exc}") from None


def _encoded_images(values: np.ndarray, parameters: dict[str, Any]) -> list[bytes]:
    if "binary_data_size" in parameters:
        return list(values)
    images = []
    for i, text in enumerate(values):
        try:
            images.append(decode_base64(text))
        except (binascii.Error, ValueError) as exc:
            raise BadRequest(f"input {IMAGE!r} element {i} is not base64 (in the JSON form each image is "
                             f"base64; send binary data for raw bytes): {exc}") from None
    return images


def _requested_outputs(request: InferRequest) -> dict[str, bool]:
    all_binary = request.parameters.get("binary_data_output", False)
    if not isinstance(all_binary, bool):
        raise BadRequest(f"parameter binary_data_output must be a boolean, got {all_binary!r}")
    if request.outputs is None:
        return dict.fromkeys(OUTPUTS, all_binary)
    outputs = {}
    for output in request.outputs:
        if output.name not in OUTPUTS:
            raise BadRequest(f"unknown output {output.name!r}; this model has {list(OUTPUTS)}")
        binary = output.parameters.get("binary_data", all_binary)
        if not isinstance(binary, bool):
            raise BadRequest(f"output {output.name!r}: binary_data must be a boolean, got {binary!r}")
        outputs[output.name] = binary
    return outputs


def output_tensors(results: list[Inference], classes: ClassTable, names: list[str]) -> dict[str, np.ndarray]:
    """The outputs ``names`` of the images' detections, concatenated in image order (module docstring)."""
    detections = [r.detections for r in results]
    category_ids, class_names = classes.categories(np.concatenate([d.labels for d in detections]).astype(np.int64).tolist())
    columns = {
        "boxes": lambda: np.concatenate([d.boxes for d in detections]).astype(np.float32).reshape(-1, 4),
        "scores": lambda: np.concatenate([d.scores for d in detections]).astype(np.float32),
        "labels": lambda: np.array(category_ids, dtype=np.int64),
        "classes": lambda: _object_array([name.encode() for name in class_names]),
        "masks": lambda: _object_array([orjson.dumps(rle) for d in detections for rle in d.rles or ()]),
        "image_index": lambda: np.repeat(np.arange(len(detections), dtype=np.int64), [len(d.labels) for d in detections]),
    }
    return {name: columns[name]() for name in names}


def tensor_bytes(datatype: str, values: np.ndarray) -> bytes:
    """``values`` in the protocol's binary form: row-major little-endian numbers, or for BYTES each
    element as a 4-byte little-endian length then its bytes."""
    if datatype == "BYTES":
        return b"".join(struct.pack("<I", len(v)) + v for v in values.ravel())
    return values.astype(values.dtype.newbyteorder("<"), copy=False).tobytes()


def _object_array(elements: list[bytes]) -> np.ndarray:
    array = np.empty(len(elements), dtype=object)
    array[:] = elements
    return array


def encode_infer_response(answer: InferAnswer) -> Response:
    """The answer over REST: JSON, or with any binary output, the JSON header then the binary data."""
    document = {"model_name": answer.model_name, "model_version": answer.model_version,
                **({"id": answer.id} if answer.id is not None else {})}
    outputs, blobs = [], []
    for name, values in answer.tensors.items():
        datatype = OUTPUTS[name][0]
        output: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(values.shape)}
        if answer.binary[name]:
            blob = tensor_bytes(datatype, values)
            output["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            output["data"] = ([v.decode() for v in values.ravel()] if datatype == "BYTES" else values.ravel().tolist())
        outputs.append(output)
    header = orjson.dumps({**document, "outputs": outputs})
    if not blobs:
        return Response(header, media_type="application/json")
    return Response(b"".join([header, *blobs]), media_type=BINARY, headers={HEADER_LENGTH: str(len(header))})
