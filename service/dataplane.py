"""The Open Inference Protocol (KServe v2) as operations that know no transport: what the v2 REST
routes (``service.kserve``) and the v2 gRPC servicer (``service.grpc_server``) both call, so a
request takes the same admission, memory budget, deadline, pipeline and metrics whichever way it
came. A transport only reads its request into a :class:`~service.kserve_codec.ParsedInfer` and
writes the :class:`InferAnswer` in its own form.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from importlib.metadata import version as package_version
from typing import Any, TypeVar

from starlette.requests import Request

from service.exceptions import ModelNotFound
from service.kserve_codec import IMAGE, IMAGE_RGB, OUTPUTS, InferAnswer, ParsedInfer, output_tensors
from service.runtime import Runtime

EXTENSIONS = ["binary_tensor_data"]
A = TypeVar("A")


def check_model(runtime: Runtime, name: str, version: str | None) -> str:
    """The model's version, if ``name`` (and ``version``, when given) are this server's model.

    Raises:
        ModelNotFound: another name or version (404).
    """
    served = runtime.model_version
    if name != runtime.settings.model_name:
        raise ModelNotFound(f"unknown model {name!r}; this server serves {runtime.settings.model_name!r}")
    if version is not None and version != served:
        raise ModelNotFound(f"model {name!r} has no version {version!r}; it has {served!r}")
    return served


def server_metadata() -> dict[str, Any]:
    """The server's name, version and protocol extensions."""
    return {"name": "maskrcnn-serve", "version": package_version("maskrcnn-serve"), "extensions": EXTENSIONS}


def model_metadata(runtime: Runtime, name: str, version: str | None) -> dict[str, Any]:
    """The model's versions, platform (the engine's backend), inputs and outputs.

    Raises:
        ModelNotFound: another name or version.
    """
    served = check_model(runtime, name, version)
    return {
        "name": name,
        "versions": [served],
        "platform": runtime.pool.manifest.backend,
        "inputs": [{"name": IMAGE, "datatype": "BYTES", "shape": [-1]},
                   {"name": IMAGE_RGB, "datatype": "UINT8", "shape": [-1, -1, 3]}],
        "outputs": [{"name": n, "datatype": datatype, "shape": shape} for n, (datatype, shape) in OUTPUTS.items()],
    }


def model_ready(runtime: Runtime, name: str, version: str | None) -> None:
    """Return if the model is served and ready.

    Raises:
        ModelNotFound: another name or version; NotReady: warming up, shutting down or hung.
    """
    check_model(runtime, name, version)
    runtime.admission.require_ready()


async def infer(
    runtime: Runtime,
    request: Request,
    timeout_ms: float | None,
    name: str,
    version: str | None,
    read_request: Callable[[Request, int], Awaitable[ParsedInfer]],
    encode: Callable[[InferAnswer], A],
) -> A:
    """Admit the request, read it with ``read_request(request, max_body_bytes)``, run its images
    through the pipeline and return ``encode(answer)``, built while the request still holds its
    share of the memory budget. Admission (with the body's reading) and the answer's making are
    spans of the request's trace (``service.tracing``), as the pipeline's stages are.

    The model is checked after admission, so a refused request's body is drained like any other.

    Raises:
        ServiceError subclasses: ModelNotFound, what admission, ``read_request`` and the pipeline raise.
    """

    async def read_checked(request: Request, max_body_bytes: int) -> ParsedInfer:
        check_model(runtime, name, version)
        return await read_request(request, max_body_bytes)

    tracing = runtime.pipeline.tracing
    async with contextlib.AsyncExitStack() as admitted:
        with tracing.span("admission"):
            admission = await admitted.enter_async_context(runtime.admission.admit(request, timeout_ms, read_checked))
        parsed = admission.payload
        options = runtime.pipeline.resolve(parsed.options)
        tasks = [asyncio.ensure_future(runtime.pipeline.run(image, options, admission)) for image in parsed.images]
        try:
            results = await asyncio.gather(*tasks)
        finally:  # one image failed: withdraw the others
            for task in tasks:
                task.cancel()
        with tracing.span("encode"):
            tensors = output_tensors(results, runtime.pipeline.classes, list(parsed.outputs))
            return encode(InferAnswer(name, runtime.model_version, parsed.id, tensors, parsed.outputs))
