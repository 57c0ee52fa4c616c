"""TensorRT backend (NVIDIA GPUs): the exported ONNX built into a serialized engine plan.

Written against TensorRT 10's Python API (8.6 has every call used here) and never run in this
project: no machine it was developed on had a GPU or TensorRT. ``scripts/device_check_tensorrt.sh``
is the prepared first run; docs/backends.md lists what may need work.

Precisions: ``fp32``; ``fp16`` (``BuilderFlag.FP16``: TensorRT picks fp16 kernels where they are
faster and keeps the rest in fp32); ``int8`` (``BuilderFlag.INT8`` with an entropy calibrator fed
the real-image calibration feeds, fp16 allowed for the layers left unquantised).

The artifact holds ``model.plan`` (valid only for the TensorRT version and GPU model that built
it), ``timing.cache`` (kernel timings, reusable by later builds on the same GPU) and, for int8,
``calibration.cache`` (the activation scales, for inspection).

Device memory and copies go through cuda-python's runtime bindings (``cuda.bindings.runtime``, or
``cuda.cudart`` before cuda-python 12.6) when installed, else through torch CUDA tensors; the
engine's ``device_api`` says which.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from service.backends.base import BackendUnavailable, UnsupportedPrecision, canonical_precision
from service.manifest import Manifest

NAME = "tensorrt"
PRECISIONS = ("fp32", "fp16", "int8")
MODEL_FILE = "model.plan"
TIMING_CACHE_FILE = "timing.cache"
CALIBRATION_CACHE_FILE = "calibration.cache"
# A timing cache shared between builds (read if present, written after each build): the
# ``timing_cache`` option, else this environment variable. Tactic timing is most of a build's time.
TIMING_CACHE_ENV = "MASKRCNN_TRT_TIMING_CACHE"
WORKSPACE_BYTES = 4 << 30
INPUT_NAMES = ("images", "image_sizes")
OUTPUT_NAMES = ("dets", "labels", "masks")
OUTPUT_DTYPES = {"dets": np.float32, "labels": np.int64, "masks": np.float32}
# H and W range when no shape profile is given: the pad divisor up to the long resize edge (1333)
# rounded up to it; opt is the usual landscape COCO input, 800 x 1333 padded. Matches the manifest
# that build_tools writes.
DEFAULT_HW = {"min": (32, 32), "opt": (800, 1344), "max": (1344, 1344)}
# Batch range when the graph's batch is dynamic and no shape profile says otherwise.
DEFAULT_MAX_BATCH = 8


def _import_tensorrt():
    try:
        import tensorrt
    except (ImportError, OSError) as exc:  # OSError: the module is there but libnvinfer is not
        raise BackendUnavailable(
            f"tensorrt is not installed ({exc}); use NVIDIA's TensorRT container "
            "(nvcr.io/nvidia/tensorrt) or `pip install tensorrt` on a machine with a CUDA driver"
        ) from exc
    return tensorrt


class _CudaPython:
    """Device memory, copies and one stream through cuda-python's runtime API."""

    name = "cuda-python"

    def __init__(self) -> None:
        self._rt = _import_cudart()
        self.stream = int(self._call("cudaStreamCreate"))

    def _call(self, function: str, *args):
        err, *result = getattr(self._rt, function)(*args)
        if err != self._rt.cudaError_t.cudaSuccess:
            raise RuntimeError(f"CUDA {function} failed: {_cuda_error_text(self._rt, err)}")
        return result[0] if result else None

    @staticmethod
    def device_count() -> int:
        rt = _import_cudart()
        err, count = rt.cudaGetDeviceCount()
        if err != rt.cudaError_t.cudaSuccess:
            raise RuntimeError(_cuda_error_text(rt, err))
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


def _import_cudart():
    try:
        from cuda.bindings import runtime
    except ImportError:
        from cuda import cudart as runtime
    return runtime


def _cuda_error_text(rt, err) -> str:
    return f"{err.name}: {rt.cudaGetErrorString(err)[1].decode()}"


class _TorchCuda:
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


def _cuda_api() -> type[_CudaPython] | type[_TorchCuda]:
    try:
        _import_cudart()
        return _CudaPython
    except ImportError:
        pass
    try:
        import torch  # noqa: F401
    except ImportError as exc:
        raise BackendUnavailable(
            "tensorrt needs cuda-python (`pip install cuda-python`) or torch with CUDA to move data to the GPU"
        ) from exc
    return _TorchCuda


def cuda_status() -> tuple[bool, str]:
    """(True, "") when a CUDA device is visible, else (False, why). Never raises."""
    try:
        api = _cuda_api()
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
        _import_tensorrt()
    except BackendUnavailable as exc:
        return False, str(exc)
    return cuda_status()


def builder_flags(precision: str) -> list[str]:
    """Names of the ``trt.BuilderFlag`` members a precision sets."""
    return {"fp32": [], "fp16": ["FP16"], "int8": ["FP16", "INT8"]}[precision]


def profile_shapes(
    input_shapes: Mapping[str, Sequence[int]],
    shape_profile: Mapping | None = None,
) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """(min, opt, max) shape of every graph input, for an optimisation profile.

    Args:
        input_shapes: the graph's input shapes in graph order, -1 for dynamic dimensions:
            ``images [B, 3, H, W]`` and ``image_sizes [B, 2]``.
        shape_profile: the manifest's ``shape_profile`` (``batch`` with ``size`` or
            ``min``/``opt``/``max``, ``min_hw``, ``opt_hw``, ``max_hw``), or None for the defaults:
            H and W from 32 to 1344, opt 800 x 1344, a dynamic batch from 1 to 8.

    Static dimensions keep their value; a dynamic dimension 0 takes the batch range, dynamic
    dimensions 2 and 3 of a 4-D input the H and W ranges.

    Raises:
        ValueError: a dynamic dimension this model does not have, a profile whose fixed batch
            differs from the graph's, or min > opt > max out of order.
    """
    profile = shape_profile or {}
    hw = {key: tuple(profile.get(f"{key}_hw", DEFAULT_HW[key])) for key in ("min", "opt", "max")}
    batch = profile.get("batch", {})
    fixed_batch = None if batch.get("mutable") or "size" not in batch else int(batch["size"])
    if fixed_batch is not None:
        batch_range = dict.fromkeys(("min", "opt", "max"), fixed_batch)
    else:
        batch_max = int(batch.get("max", DEFAULT_MAX_BATCH))
        batch_range = {"min": int(batch.get("min", 1)), "opt": int(batch.get("opt", batch_max)), "max": batch_max}
    shapes = {}
    for name, dims in input_shapes.items():
        dims = tuple(int(d) for d in dims)
        if dims and dims[0] >= 0 and fixed_batch not in (None, dims[0]):
            raise ValueError(f"the shape profile's batch {fixed_batch} differs from the graph's fixed batch {dims[0]}")
        per_key = []
        for key in ("min", "opt", "max"):
            shape = []
            for axis, d in enumerate(dims):
                if d >= 0:
                    shape.append(d)
                elif axis == 0:
                    shape.append(batch_range[key])
                elif len(dims) == 4 and axis in (2, 3):
                    shape.append(int(hw[key][axis - 2]))
                else:
                    raise ValueError(
                        f"input {name} {list(dims)}: dimension {axis} is dynamic; only batch, H and W may be")
            per_key.append(tuple(shape))
        low, opt, high = per_key
        if not all(a <= b <= c for a, b, c in zip(low, opt, high)):
            raise ValueError(f"input {name}: shape profile out of order, min {low} opt {opt} max {high}")
        shapes[name] = (low, opt, high)
    return shapes


def pad_to(array: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """``array`` padded at the end of every axis with zeros to ``shape`` (images bottom/right, as
    the host pads a batch; an ``image_sizes`` row of zeros for a batch slot added).

    Raises:
        ValueError: ``array`` is larger than ``shape`` on some axis.
    """
    if len(shape) != array.ndim or any(s > t for s, t in zip(array.shape, shape)):
        raise ValueError(f"cannot pad an array of shape {list(array.shape)} to {list(shape)}")
    return np.pad(array, [(0, t - s) for s, t in zip(array.shape, shape)])


class _DeviceBuffers:
    """Named device buffers that grow (never shrink) to the largest size asked of them."""

    def __init__(self, device: _CudaPython | _TorchCuda) -> None:
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


def _entropy_calibrator(trt, feeds: Iterable[dict[str, np.ndarray]], shapes: dict, dtypes: dict, cache_path: Path):
    """An ``IInt8EntropyCalibrator2`` serving ``feeds``, each padded to the calibration shapes."""
    device = _cuda_api()()
    buffers = _DeviceBuffers(device)

    class FeedCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self._feeds = iter(feeds)
            self.batches = 0

        def get_batch_size(self) -> int:
            return 1  # explicit-batch network: the batch is part of each input's shape

        def get_batch(self, names: list[str]):
            feed = next(self._feeds, None)
            if feed is None:
                return None
            for name in names:
                array = np.ascontiguousarray(pad_to(feed[name], shapes[name]), dtype=dtypes[name])
                device.upload(buffers.ensure(name, array.nbytes), array)
            device.sync()
            self.batches += 1
            return [buffers[name] for name in names]

        def read_calibration_cache(self):
            return None  # always calibrate on this build's images; the cache is written for inspection

        def write_calibration_cache(self, cache) -> None:
            cache_path.write_bytes(bytes(cache))

    return FeedCalibrator()


def _network_flags(trt) -> int:
    # TensorRT 10 networks are always explicit-batch; 8.x must be asked for it
    if int(trt.__version__.split(".")[0]) >= 10:
        return 0
    return 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)


def _set_timing_cache(config, shared: Path | None) -> None:
    blob = shared.read_bytes() if shared is not None and shared.is_file() else b""
    if not config.set_timing_cache(config.create_timing_cache(blob), False):
        # a cache from another GPU or TensorRT version is refused; start an empty one
        config.set_timing_cache(config.create_timing_cache(b""), False)


def compile(
    onnx_path: Path,
    out_dir: Path,
    precision: str,
    calibration: Iterable[dict[str, np.ndarray]] | None = None,
    **options,
) -> tuple[str, dict]:
    """Build ``model.plan`` from the ONNX export on this machine's GPU.

    Options: ``shape_profile`` (the manifest's, see :func:`profile_shapes`), ``workspace_bytes``
    (builder scratch memory, default 4 GiB), ``timing_cache`` (path of a shared timing cache;
    default ``$MASKRCNN_TRT_TIMING_CACHE``).
    """
    precision = canonical_precision(precision)
    if precision not in PRECISIONS:
        raise UnsupportedPrecision(f"tensorrt builds {', '.join(PRECISIONS)}, not {precision}")
    if precision == "int8" and calibration is None:
        raise UnsupportedPrecision("int8 needs calibration images (--calib-images DIR)")
    ok, reason = available()
    if not ok:
        raise BackendUnavailable(f"tensorrt cannot build here: {reason}")
    trt = _import_tensorrt()
    if precision == "int8" and not hasattr(trt, "IInt8EntropyCalibrator2"):
        raise UnsupportedPrecision(f"TensorRT {trt.__version__} has no calibrator API (implicit int8 was removed)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    logger = trt.Logger(trt.Logger.WARNING)
    trt.init_libnvinfer_plugins(logger, "")  # the ONNX parser maps RoiAlign to the ROIAlign_TRT plugin
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BackendUnavailable(f"TensorRT {trt.__version__} cannot parse {onnx_path}: {errors}")
    graph_inputs = [network.get_input(i) for i in range(network.num_inputs)]
    shapes = profile_shapes({t.name: tuple(t.shape) for t in graph_inputs}, options.get("shape_profile"))

    config = builder.create_builder_config()
    workspace = int(options.get("workspace_bytes", WORKSPACE_BYTES))
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
    profile = builder.create_optimization_profile()
    for t in graph_inputs:
        if -1 in tuple(t.shape):
            profile.set_shape(t.name, *shapes[t.name])
    config.add_optimization_profile(profile)
    for flag in builder_flags(precision):
        config.set_flag(getattr(trt.BuilderFlag, flag))
    calibrator = None
    if precision == "int8":
        # calibration runs at one shape (the calibration profile's opt): the profile's max, to
        # which every feed is padded, so portrait and landscape images both fit
        largest = {name: high for name, (_, _, high) in shapes.items()}
        calibration_profile = builder.create_optimization_profile()
        for t in graph_inputs:
            if -1 in tuple(t.shape):
                calibration_profile.set_shape(t.name, largest[t.name], largest[t.name], largest[t.name])
        config.set_calibration_profile(calibration_profile)
        dtypes = {t.name: np.dtype(trt.nptype(t.dtype)) for t in graph_inputs}
        calibrator = _entropy_calibrator(trt, calibration, largest, dtypes, out_dir / CALIBRATION_CACHE_FILE)
        config.int8_calibrator = calibrator
    shared_cache = options.get("timing_cache") or os.environ.get(TIMING_CACHE_ENV)
    shared_cache = Path(shared_cache) if shared_cache else None
    _set_timing_cache(config, shared_cache)

    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise BackendUnavailable(
            f"TensorRT {trt.__version__} could not build the {precision} engine (its log above says why)")
    (out_dir / MODEL_FILE).write_bytes(bytes(plan))
    timings = bytes(config.get_timing_cache().serialize())
    (out_dir / TIMING_CACHE_FILE).write_bytes(timings)
    if shared_cache is not None:
        shared_cache.parent.mkdir(parents=True, exist_ok=True)
        shared_cache.write_bytes(timings)

    facts = {
        "graph": "TensorRT engine plan (tied to this TensorRT version and GPU model)",
        "tensorrt": trt.__version__,
        "builder_flags": builder_flags(precision),
        "profile": {name: dict(zip(("min", "opt", "max"), map(list, ranges))) for name, ranges in shapes.items()},
        "workspace_bytes": workspace,
        "timing_cache": TIMING_CACHE_FILE,
    }
    if calibrator is not None:
        if calibrator.batches == 0:
            raise UnsupportedPrecision("int8 calibration got no images")
        facts.update(calibration_batches=calibrator.batches, calibration_cache=CALIBRATION_CACHE_FILE,
                     calibrator="IInt8EntropyCalibrator2")
    return MODEL_FILE, facts


def _output_allocator(trt, buffers: _DeviceBuffers):
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


class TensorRTEngine:
    """One deserialized engine and one execution context on CUDA device 0 (pick the GPU with
    ``CUDA_VISIBLE_DEVICES``); one worker drives it."""

    def __init__(self, plan_path: Path, manifest: Manifest):
        trt = _import_tensorrt()
        self.manifest = manifest
        self._logger = trt.Logger(trt.Logger.WARNING)  # must outlive the runtime
        trt.init_libnvinfer_plugins(self._logger, "")
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(plan_path.read_bytes())
        if self._engine is None:
            built = manifest.tools.get("backend", {}).get("tensorrt", "unknown")
            raise BackendUnavailable(
                f"TensorRT {trt.__version__} cannot load {plan_path} (built with TensorRT {built}); a plan "
                "loads only on the TensorRT version and GPU model that built it: rebuild it here with "
                "`maskrcnn-build compile EXPORT_DIR --backend tensorrt --out ...`"
            )
        self._context = self._engine.create_execution_context()
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        is_input = {n: self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        dtype = {n: np.dtype(trt.nptype(self._engine.get_tensor_dtype(n))) for n in names}
        if sorted(n for n in names if is_input[n]) != sorted(INPUT_NAMES) or \
                sorted(n for n in names if not is_input[n]) != sorted(OUTPUT_NAMES):
            raise BackendUnavailable(
                f"{plan_path} has tensors {names}, expected inputs {INPUT_NAMES} and outputs {OUTPUT_NAMES}")
        # TensorRT 8 turns int64 inputs into int32: feed each input in the engine's own dtype
        self._input_dtypes = {n: dtype[n] for n in INPUT_NAMES}
        self._output_dtypes = {n: dtype[n] for n in OUTPUT_NAMES}
        self._device = _cuda_api()()
        self.device_api = self._device.name
        self._buffers = _DeviceBuffers(self._device)
        self._allocator = _output_allocator(trt, self._buffers)
        for name in OUTPUT_NAMES:
            self._context.set_output_allocator(name, self._allocator)

    @property
    def batch_size(self) -> int | None:
        return self.manifest.batch_size

    def infer(self, images: np.ndarray, image_sizes: np.ndarray) -> dict[str, np.ndarray]:
        for name, array in zip(INPUT_NAMES, (images, image_sizes)):
            array = np.ascontiguousarray(array, dtype=self._input_dtypes[name])
            if not self._context.set_input_shape(name, array.shape):
                raise ValueError(f"input {name} of shape {list(array.shape)} is outside the engine's shape profile "
                                 f"{self.manifest.tools.get('backend', {}).get('profile', {}).get(name)}")
            ptr = self._buffers.ensure(name, array.nbytes)
            self._device.upload(ptr, array)
            self._context.set_tensor_address(name, ptr)
        if not self._context.execute_async_v3(self._device.stream):
            raise RuntimeError("TensorRT execution failed (its log above says why)")
        host = {
            name: np.empty(self._allocator.shapes.get(name) or tuple(self._context.get_tensor_shape(name)),
                           dtype=self._output_dtypes[name])
            for name in OUTPUT_NAMES
        }
        for name, array in host.items():
            self._device.download(array, self._buffers[name])
        self._device.sync()
        # labels may come back int32 (TensorRT's integer type before 10): the contract is int64
        return {name: array.astype(OUTPUT_DTYPES[name], copy=False) for name, array in host.items()}


def load(artifact_dir: Path, manifest: Manifest, threads: int | None = None) -> TensorRTEngine:
    """Open the plan; ``threads`` is ignored (the GPU does the work)."""
    return TensorRTEngine(Path(artifact_dir) / manifest.model_file, manifest)
