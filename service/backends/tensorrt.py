"""TensorRT backend (NVIDIA GPUs): runs the serialized engine plan that
``build_tools/backends/tensorrt.py`` builds from the exported ONNX.

Written against TensorRT 10's Python API (8.6 has every call used here); ``scripts/device_check_tensorrt.sh``
is the prepared first run on a GPU machine; docs/backends.md lists what may need work.

Precisions: ``fp32``, ``fp16``, ``int8``. A plan is valid only for the TensorRT version and GPU model
that built it.

Device memory and copies go through cuda-python's runtime bindings (``cuda.bindings.runtime``, or
``cuda.cudart`` before cuda-python 12.6) when installed, else through torch CUDA tensors; the
engine's ``device_api`` says which. The build module uses the same helpers for its calibrator.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from service.backends.base import (
    OUTPUT_NAMES,
    BackendUnavailable,
    EngineBase,
)
from service.manifest import Manifest

NAME = "tensorrt"
PRECISIONS = ("fp32", "fp16", "int8")


def import_tensorrt():
    try:
        import tensorrt
    except (ImportError, OSError) as exc:  # OSError: the module is there but libnvinfer is not
        raise BackendUnavailable(
            f"tensorrt is not installed ({exc}); use NVIDIA's TensorRT container "
            "(nvcr.io/nvidia/tensorrt) or `pip install tensorrt` on a machine with a CUDA driver"
        ) from exc
    return tensorrt


class CudaPython:
    """Device memory, copies and one stream through cuda-python's runtime API."""

    name = "cuda-python"

    def __init__(self) -> None:
        self._rt = import_cudart()
        self.stream = int(self._call("cudaStreamCreate"))

    def _call(self, function: str, *args):
        err, *result = getattr(self._rt, function)(*args)
        if err != self._rt.cudaError_t.cudaSuccess:
            raise RuntimeError(f"CUDA {function} failed: {cuda_error_text(self._rt, err)}")
        return result[0] if result else None

    @staticmethod
    def device_count() -> int:
        rt = import_cudart()
        err, count = rt.cudaGetDeviceCount()
        if err != rt.cudaError_t.cudaSuccess:
            raise RuntimeError(cuda_error_text(rt, err))
        return count

    def alloc(self, nbytes: int) -> int:
        return int(self._call("cudaMalloc", nbytes))

    def free(self, ptr: int) -> None:
        self._call("cudaFree", ptr)

    def upload(self, ptr: int, array: np.ndarray) -> None:
        kind = self._rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._call("cudaMemcpyAsync", ptr, array.ctypes.data, array.nbytes, kind, self.stream)

    def download(self, array: np.ndarray, ptr: int) -> None:
        kind = self._rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._call("cudaMemcpyAsync", array.ctypes.data, ptr, array.nbytes, kind, self.stream)

    def sync(self) -> None:
        self._call("cudaStreamSynchronize", self.stream)


def import_cudart():
    try:
        from cuda.bindings import runtime
    except ImportError:
        from cuda import cudart as runtime
    return runtime


def cuda_error_text(rt, err) -> str:
    return f"{err.name}: {rt.cudaGetErrorString(err)[1].decode()}"


class TorchCuda:
    """The same operations on torch CUDA tensors (for environments with torch but no cuda-python)."""

    name = "torch"

    def __init__(self) -> None:
        import torch

        self._torch = torch
        self._stream = torch.cuda.Stream()
        self.stream = self._stream.cuda_stream
        self._tensors: dict[int, object] = {}  # pointer -> the tensor that owns it

    @staticmethod
    def device_count() -> int:
        import torch

        return torch.cuda.device_count()

    def alloc(self, nbytes: int) -> int:
        tensor = self._torch.empty(nbytes, dtype=self._torch.uint8, device="cuda")
        self._tensors[tensor.data_ptr()] = tensor
        return tensor.data_ptr()

    def free(self, ptr: int) -> None:
        del self._tensors[ptr]

    def upload(self, ptr: int, array: np.ndarray) -> None:
        with self._torch.cuda.stream(self._stream):
            self._tensors[ptr][: array.nbytes].copy_(self._torch.from_numpy(array.reshape(-1).view(np.uint8)))

    def download(self, array: np.ndarray, ptr: int) -> None:
        with self._torch.cuda.stream(self._stream):
            array.reshape(-1).view(np.uint8)[:] = self._tensors[ptr][: array.nbytes].cpu().numpy()

    def sync(self) -> None:
        self._stream.synchronize()


def cuda_api() -> type[CudaPython | TorchCuda]:
    try:
        import_cudart()
        return CudaPython
    except ImportError:
        pass
    try:
        import torch  # noqa: F401
    except ImportError as exc:
        raise BackendUnavailable(
            "tensorrt needs cuda-python (`pip install cuda-python`) or torch with CUDA to move data to the GPU"
        ) from exc
    return TorchCuda


def cuda_status() -> tuple[bool, str]:
    """(True, "") when a CUDA device is visible, else (False, why). Never raises."""
    try:
        api = cuda_api()
        count = api.device_count()
    except BackendUnavailable as exc:
        return False, str(exc)
    except Exception as exc:  # a missing or mismatched driver surfaces as many exception types
        return False, f"no usable CUDA driver ({exc})"
    if count < 1:
        return False, "no CUDA device visible (check the driver, CUDA_VISIBLE_DEVICES, `docker run --gpus`)"
    return True, ""


def available() -> tuple[bool, str]:
    try:
        import_tensorrt()
    except BackendUnavailable as exc:
        return False, str(exc)
    return cuda_status()


class DeviceBuffers:
    """Named device buffers that grow (never shrink) to the largest size asked of them."""

    def __init__(self, device: CudaPython | TorchCuda) -> None:
        self._device = device
        self._ptr: dict[str, int] = {}
        self._size: dict[str, int] = {}

    def ensure(self, name: str, nbytes: int) -> int:
        if self._size.get(name, -1) < nbytes:
            if name in self._ptr:
                self._device.free(self._ptr[name])  # safe: every call ends with a stream sync
            self._ptr[name] = self._device.alloc(max(nbytes, 1))
            self._size[name] = nbytes
        return self._ptr[name]

    def __getitem__(self, name: str) -> int:
        return self._ptr[name]


def _output_allocator(trt, buffers: DeviceBuffers):
    """An ``IOutputAllocator`` placing outputs in ``buffers`` and recording their shapes.

    The parsed graph pads detections to N with a Concat after NonZero, so TensorRT knows the
    output shapes only while it executes; it asks this object for memory then.
    """

    class OutputAllocator(trt.IOutputAllocator):
        def __init__(self) -> None:
            trt.IOutputAllocator.__init__(self)
            self.shapes: dict[str, tuple[int, ...]] = {}

        def reallocate_output(self, tensor_name, memory, size, alignment):
            return buffers.ensure(tensor_name, size)

        def reallocate_output_async(self, tensor_name, memory, size, alignment, stream):
            return self.reallocate_output(tensor_name, memory, size, alignment)

        def notify_shape(self, tensor_name, shape):
            self.shapes[tensor_name] = tuple(shape)

    return OutputAllocator()


class TensorRTEngine(EngineBase):
    """One deserialized engine and one execution context on CUDA device 0 (pick the GPU with
    ``CUDA_VISIBLE_DEVICES``); one worker drives it."""

    def __init__(self, plan_path: Path, manifest: Manifest):
        trt = import_tensorrt()
        super().__init__(manifest)
        self._logger = trt.Logger(trt.Logger.WARNING)  # must outlive the runtime
        trt.init_libnvinfer_plugins(self._logger, "")
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(plan_path.read_bytes())
        if self._engine is None:
            built = manifest.tools.backend.get("tensorrt", "unknown")
            raise BackendUnavailable(
                f"TensorRT {trt.__version__} cannot load {plan_path} (built with TensorRT {built}); a plan "
                "loads only on the TensorRT version and GPU model that built it: rebuild it here with "
                "`maskrcnn-build compile EXPORT_DIR --backend tensorrt --out ...`"
            )
        self._context = self._engine.create_execution_context()
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        is_input = {n: self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        dtype = {n: np.dtype(trt.nptype(self._engine.get_tensor_dtype(n))) for n in names}
        inputs = manifest.input.names
        if sorted(n for n in names if is_input[n]) != sorted(inputs) or \
                sorted(n for n in names if not is_input[n]) != sorted(OUTPUT_NAMES):
            raise BackendUnavailable(
                f"{plan_path} has tensors {names}, expected inputs {inputs} and outputs {OUTPUT_NAMES}")
        # TensorRT 8 turns int64 inputs into int32: feed each input in the engine's own dtype
        self._input_dtypes = {n: dtype[n] for n in inputs}
        self._output_dtypes = {n: dtype[n] for n in OUTPUT_NAMES}
        self._device = cuda_api()()
        self.device_api = self._device.name
        self._buffers = DeviceBuffers(self._device)
        self._allocator = _output_allocator(trt, self._buffers)
        for name in OUTPUT_NAMES:
            self._context.set_output_allocator(name, self._allocator)

    def _run(self, feed: dict[str, np.ndarray]) -> Sequence[np.ndarray]:
        for name, array in feed.items():
            array = np.ascontiguousarray(array, dtype=self._input_dtypes[name])
            if not self._context.set_input_shape(name, array.shape):
                profile = self.manifest.tools.backend["profile"][name]
                raise ValueError(f"input {name} of shape {list(array.shape)} is outside the engine's shape "
                                 f"profile {profile}")
            ptr = self._buffers.ensure(name, array.nbytes)
            self._device.upload(ptr, array)
            self._context.set_tensor_address(name, ptr)
        if not self._context.execute_async_v3(self._device.stream):
            raise RuntimeError("TensorRT execution failed (its log above says why)")
        host = [np.empty(self._allocator.shapes.get(name) or tuple(self._context.get_tensor_shape(name)),
                         dtype=self._output_dtypes[name]) for name in OUTPUT_NAMES]
        for name, array in zip(OUTPUT_NAMES, host):
            self._device.download(array, self._buffers[name])
        self._device.sync()
        return host


def load(artifact_dir: Path, manifest: Manifest, threads: int | None = None,
         options: Mapping[str, Any] | None = None) -> TensorRTEngine:
    """Open the plan; ``threads`` is ignored (the GPU does the work) and TensorRT takes no ``options``."""
    return TensorRTEngine(Path(artifact_dir) / manifest.model_file, manifest)
