"""Cambricon MagicMind backend (MLU): the exported ONNX built into a serialized ``model.mm``.

Written against Cambricon's published MagicMind Python API (``magicmind.python.runtime`` as the
vendor's public samples use it: Parser, Network, BuilderConfig, Calibrator, Builder, Model,
IEngine, IContext) and never run in this project: the SDK ships only inside Cambricon's container
images and no MLU was available. docs/backends.md lists what to check on a first run.

Precisions (MagicMind's ``precision_mode``): ``fp32`` (``force_float32``), ``fp16``
(``force_float16``), ``int8`` (``qint8_mixed_float16``: int8 convolutions and matrix products with
per-channel weights and symmetric activations calibrated on real images, the rest in fp16).

H and W are dynamic in every build (``graph_shape_mutable`` with a ``dim_range``): the host pads
each batch only to its own largest image, as for the other backends.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from service.backends.base import BackendUnavailable, UnsupportedPrecision, canonical_precision
from service.backends.tensorrt import pad_to, profile_shapes
from service.manifest import Manifest

NAME = "magicmind"
PRECISIONS = ("fp32", "fp16", "int8")
MODEL_FILE = "model.mm"
PRECISION_MODES = {"fp32": "force_float32", "fp16": "force_float16", "int8": "qint8_mixed_float16"}
INPUT_NAMES = ("images", "image_sizes")
OUTPUT_NAMES = ("dets", "labels", "masks")
OUTPUT_DTYPES = {"dets": np.float32, "labels": np.int64, "masks": np.float32}


def _runtime_module():
    """``magicmind.python.runtime``, imported only when a MagicMind build or engine is asked for."""
    try:
        return importlib.import_module("magicmind.python.runtime")
    except (ImportError, OSError) as exc:  # OSError: the module is there but its libraries are not
        raise BackendUnavailable(
            f"magicmind is not installed ({exc}); the MagicMind SDK ships only inside Cambricon's "
            "container images (no package registry has it): build and serve in the MLU image, see docker/README.md"
        ) from exc


def available() -> tuple[bool, str]:
    try:
        mm = _runtime_module()
    except BackendUnavailable as exc:
        return False, str(exc)
    try:
        count = mm.System().device_count()
    except Exception as exc:  # a driver problem can surface as any exception type from the SDK
        return False, f"MagicMind cannot list MLU devices ({exc})"
    if count < 1:
        return False, "no MLU device visible (check /dev/cambricon_dev*, the driver and MLU_VISIBLE_DEVICES)"
    return True, ""


def _check(status, action: str) -> None:
    """Raise when a MagicMind call returned a failed ``mm.Status`` (calls that return nothing pass)."""
    if status is not None and not status.ok():
        raise BackendUnavailable(f"MagicMind {action} failed: {status}")


def onnx_input_shapes(onnx_path: str | Path) -> dict[str, tuple[int, ...]]:
    """The ONNX graph's inputs in order, ``{name: shape}`` with -1 for symbolic dimensions."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    initializers = {t.name for t in model.graph.initializer}
    return {
        i.name: tuple(d.dim_value if d.HasField("dim_value") else -1 for d in i.type.tensor_type.shape.dim)
        for i in model.graph.input
        if i.name not in initializers
    }


def builder_config(
    precision: str,
    input_shapes: Mapping[str, Sequence[int]],
    shape_profile: Mapping | None = None,
    archs: Sequence[str] | None = None,
) -> dict:
    """The ``BuilderConfig`` JSON (as a dict) of one build.

    Args:
        precision: ``fp32``, ``fp16`` or ``int8``.
        input_shapes: the graph's inputs in order with -1 for dynamic dimensions, as given to
            ``set_dimension`` (a fixed batch stays fixed).
        shape_profile: the manifest's shape profile, or None for the defaults of
            :func:`service.backends.tensorrt.profile_shapes` (H and W 32..1344).
        archs: MLU architectures to compile for (e.g. ``["mtp_372"]``); None for the build
            machine's own.
    """
    precision_config = {"precision_mode": PRECISION_MODES[precision]}
    if precision == "int8":
        precision_config.update(activation_quant_algo="symmetric", weight_quant_granularity="per_axis")
    config: dict = {"precision_config": precision_config}
    ranges = profile_shapes(input_shapes, shape_profile)
    dynamic = [i for i, dims in enumerate(input_shapes.values()) if -1 in tuple(dims)]
    config["graph_shape_mutable"] = bool(dynamic)
    if dynamic:
        # keyed by input index; min and max only (MagicMind takes no opt shape)
        config["dim_range"] = {
            str(i): {"min": list(low), "max": list(high)}
            for i, (low, _, high) in enumerate(ranges.values()) if i in dynamic
        }
    if archs:
        config["archs"] = list(archs)
    return config


def padded_feeds(calibration: Iterable[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """The calibration feeds, every input padded to the largest shape among them, so that one
    ``get_shape()`` describes every sample a data interface serves."""
    feeds = [{name: np.asarray(feed[name]) for name in INPUT_NAMES} for feed in calibration]
    if not feeds:
        raise UnsupportedPrecision("int8 calibration got no images")
    largest = {name: np.max([f[name].shape for f in feeds], axis=0) for name in INPUT_NAMES}
    return [{name: pad_to(f[name], largest[name]) for name in INPUT_NAMES} for f in feeds]


def _calibration_inputs(mm, feeds: list[dict[str, np.ndarray]]) -> list:
    """One ``CalibDataInterface`` per graph input, in input order, stepping through ``feeds`` in
    lockstep: the Calibrator takes one data interface per input, so ``image_sizes`` is served by
    its own interface that yields, at every step, the sizes belonging to the images of the same feed."""

    class FeedInput(mm.CalibDataInterface):
        def __init__(self, name: str, dtype: np.dtype, mm_type) -> None:
            super().__init__()
            self._name, self._dtype, self._type = name, dtype, mm_type
            self._index = -1

        def get_shape(self):
            return mm.Dims(tuple(feeds[0][self._name].shape))  # every feed has this shape

        def get_data_type(self):
            return self._type

        def get_sample(self):
            return np.ascontiguousarray(feeds[self._index][self._name], dtype=self._dtype)

        def next(self):
            if self._index + 1 >= len(feeds):
                return mm.Status(mm.Code.OUT_OF_RANGE, "no more calibration feeds")
            self._index += 1
            return mm.Status.OK()

        def reset(self):
            self._index = -1
            return mm.Status.OK()

    return [FeedInput("images", np.float32, mm.DataType.FLOAT32), FeedInput("image_sizes", np.int64, mm.DataType.INT64)]


def compile(
    onnx_path: Path,
    out_dir: Path,
    precision: str,
    calibration: Iterable[dict[str, np.ndarray]] | None = None,
    **options,
) -> tuple[str, dict]:
    """Build ``model.mm`` from the ONNX export.

    Options: ``shape_profile`` (the manifest's; default H and W 32..1344, the graph's batch),
    ``archs`` (MLU architectures to compile for).
    """
    precision = canonical_precision(precision)
    if precision not in PRECISIONS:
        raise UnsupportedPrecision(f"magicmind builds {', '.join(PRECISIONS)}, not {precision}")
    if precision == "int8" and calibration is None:
        raise UnsupportedPrecision("int8 needs calibration images (--calib-images DIR)")
    mm = _runtime_module()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shapes = onnx_input_shapes(onnx_path)
    if tuple(shapes) != INPUT_NAMES:
        raise BackendUnavailable(f"{onnx_path} has inputs {list(shapes)}, expected {list(INPUT_NAMES)}")
    config_dict = builder_config(precision, shapes, options.get("shape_profile"), options.get("archs"))

    network = mm.Network()
    _check(mm.Parser(mm.ModelKind.kOnnx).parse(network, str(onnx_path)), f"parsing {onnx_path}")
    for index, dims in enumerate(shapes.values()):
        network.get_input(index).set_dimension(mm.Dims(dims))
    config = mm.BuilderConfig()
    _check(config.parse_from_string(json.dumps(config_dict)), "reading the builder config")
    facts = {"graph": "MagicMind serialized model", "builder_config": config_dict}
    if precision == "int8":
        feeds = padded_feeds(calibration)
        sources = _calibration_inputs(mm, feeds)  # held here until calibration is done
        calibrator = mm.Calibrator(sources)
        algorithm = mm.QuantizationAlgorithm.LINEAR_ALGORITHM
        _check(calibrator.set_quantization_algorithm(algorithm), "choosing the quantisation algorithm")
        _check(calibrator.calibrate(network, config), "int8 calibration")
        facts.update(calibration_batches=len(feeds), quantization_algorithm="LINEAR_ALGORITHM")
    model = mm.Builder().build_model("maskrcnn", network, config)
    if model is None:
        raise BackendUnavailable(f"MagicMind could not build the {precision} model (its log above says why)")
    _check(model.serialize_to_file(str(out_dir / MODEL_FILE)), "writing the model")
    return MODEL_FILE, facts


class MagicMindEngine:
    """One model, engine, context and queue on MLU 0 (pick the card with ``MLU_VISIBLE_DEVICES``);
    one worker drives it. Written against the published API, never run here."""

    def __init__(self, model_path: Path, manifest: Manifest):
        mm = _runtime_module()
        self.manifest = manifest
        self._device = mm.Device()
        self._device.id = 0
        self._device.active()
        self._model = mm.Model()
        _check(self._model.deserialize_from_file(str(model_path)), f"loading {model_path}")
        if (self._model.get_input_num(), self._model.get_output_num()) != (len(INPUT_NAMES), len(OUTPUT_NAMES)):
            raise BackendUnavailable(f"{model_path} has {self._model.get_input_num()} inputs and "
                                     f"{self._model.get_output_num()} outputs, expected 2 and 3")
        engine_config = mm.Model.EngineConfig()
        engine_config.device_type = "MLU"
        self._engine = self._model.create_i_engine(engine_config)
        if self._engine is None:
            raise BackendUnavailable(f"MagicMind could not create an MLU engine for {model_path}")
        self._context = self._engine.create_i_context()
        self._queue = self._device.create_queue()

    @property
    def batch_size(self) -> int | None:
        return self.manifest.batch_size

    def infer(self, images: np.ndarray, image_sizes: np.ndarray) -> dict[str, np.ndarray]:
        # the pool's worker thread is not the thread that loaded the engine: bind the MLU to it
        self._device.active()
        inputs = self._context.create_inputs()
        arrays = (np.ascontiguousarray(images, dtype=np.float32), np.ascontiguousarray(image_sizes, dtype=np.int64))
        for tensor, array in zip(inputs, arrays):
            tensor.from_numpy(array)
            tensor.to(self._device)
        outputs = []
        _check(self._context.enqueue(inputs, outputs, self._queue), "enqueue")
        _check(self._queue.sync(), "queue sync")
        # outputs come in the graph's order; MLU integer outputs may be int32: the contract is int64
        return {name: t.asnumpy().astype(OUTPUT_DTYPES[name], copy=False) for name, t in zip(OUTPUT_NAMES, outputs)}


def load(artifact_dir: Path, manifest: Manifest, threads: int | None = None) -> MagicMindEngine:
    """Open ``model.mm`` on the MLU; ``threads`` is ignored (the MLU does the work)."""
    return MagicMindEngine(Path(artifact_dir) / manifest.model_file, manifest)
