"""TensorRT build (NVIDIA GPUs): the exported ONNX built into a serialized engine plan on this
machine's GPU.

Written against TensorRT 10's Python API (8.6 has every call used here). Precisions: ``fp32``;
``fp16`` (``BuilderFlag.FP16``: TensorRT picks fp16 kernels where they are faster and keeps the
rest in fp32); ``int8`` (``BuilderFlag.INT8`` with an entropy calibrator fed the real-image
calibration feeds, fp16 allowed for the layers left unquantised).

The artifact holds ``model.plan`` (valid only for the TensorRT version and GPU model that built
it), ``timing.cache`` (kernel timings, reusable by later builds on the same GPU) and, for int8,
``calibration.cache`` (the activation scales, for inspection).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from build_tools.shapes import pad_to, profile_shapes
from service.backends.base import (
    BackendUnavailable,
    BuildFailed,
    UnsupportedPrecision,
    check_precision,
    require_calibration,
)
from service.backends.tensorrt import (
    NAME,
    PRECISIONS,
    DeviceBuffers,
    available,
    cuda_api,
    import_tensorrt,
)
from service.manifest import ShapeProfile

MODEL_FILE = "model.plan"
TIMING_CACHE_FILE = "timing.cache"
CALIBRATION_CACHE_FILE = "calibration.cache"
WORKSPACE_BYTES = 4 << 30


def builder_flags(precision: str) -> list[str]:
    """Names of the ``trt.BuilderFlag`` members a precision sets."""
    return {"fp32": [], "fp16": ["FP16"], "int8": ["FP16", "INT8"]}[precision]


def _entropy_calibrator(trt, feeds: list[dict[str, np.ndarray]], shapes: dict, dtypes: dict, cache_path: Path):
    """An ``IInt8EntropyCalibrator2`` serving ``feeds``, each padded to the calibration shapes."""
    device = cuda_api()()
    buffers = DeviceBuffers(device)

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
    *,
    shape_profile: ShapeProfile | None = None,
    workspace_bytes: int = WORKSPACE_BYTES,
    timing_cache: str | Path | None = None,
) -> tuple[str, dict]:
    """Build ``model.plan`` from the ONNX export on this machine's GPU.

    Args:
        shape_profile: the manifest's (see ``build_tools.shapes.profile_shapes``); None for
            its defaults.
        workspace_bytes: builder scratch memory (default 4 GiB).
        timing_cache: a timing cache shared between builds (``maskrcnn-build
            --tensorrt-timing-cache``): read when present, rewritten after the build.
    """
    precision = check_precision(NAME, PRECISIONS, precision)
    feeds = require_calibration(calibration) if precision == "int8" else None
    ok, reason = available()
    if not ok:
        raise BackendUnavailable(f"tensorrt cannot build here: {reason}")
    trt = import_tensorrt()
    if feeds is not None and not hasattr(trt, "IInt8EntropyCalibrator2"):
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
        raise BuildFailed(f"TensorRT {trt.__version__} cannot parse {onnx_path}: {errors}")
    graph_inputs = [network.get_input(i) for i in range(network.num_inputs)]
    shapes = profile_shapes({t.name: tuple(t.shape) for t in graph_inputs}, shape_profile)

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    profile = builder.create_optimization_profile()
    for t in graph_inputs:
        if -1 in tuple(t.shape):
            profile.set_shape(t.name, *shapes[t.name])
    config.add_optimization_profile(profile)
    for flag in builder_flags(precision):
        config.set_flag(getattr(trt.BuilderFlag, flag))
    calibrator = None
    if feeds is not None:
        # calibration runs at one shape (the calibration profile's opt): the profile's max, to
        # which every feed is padded, so portrait and landscape images both fit
        largest = {name: high for name, (_, _, high) in shapes.items()}
        calibration_profile = builder.create_optimization_profile()
        for t in graph_inputs:
            if -1 in tuple(t.shape):
                calibration_profile.set_shape(t.name, largest[t.name], largest[t.name], largest[t.name])
        config.set_calibration_profile(calibration_profile)
        dtypes = {t.name: np.dtype(trt.nptype(t.dtype)) for t in graph_inputs}
        calibrator = _entropy_calibrator(trt, feeds, largest, dtypes, out_dir / CALIBRATION_CACHE_FILE)
        config.int8_calibrator = calibrator
    shared_cache = Path(timing_cache) if timing_cache else None
    _set_timing_cache(config, shared_cache)

    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise BuildFailed(f"TensorRT {trt.__version__} could not build the {precision} engine (its log above says why)")
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
        "workspace_bytes": int(workspace_bytes),
        "timing_cache": TIMING_CACHE_FILE,
    }
    if calibrator is not None:
        facts.update(calibration_batches=calibrator.batches, calibration_cache=CALIBRATION_CACHE_FILE,
                     calibrator="IInt8EntropyCalibrator2")
    return MODEL_FILE, facts
