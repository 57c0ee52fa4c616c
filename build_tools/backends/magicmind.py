"""Cambricon MagicMind build (MLU): the exported ONNX built into a serialized ``model.mm``.

Written against Cambricon's published MagicMind Python API (``magicmind.python.runtime`` as the
vendor's public samples use it: Parser, Network, BuilderConfig, Calibrator, Builder, Model) and
never run in this project (the SDK ships only inside Cambricon's container images).

Precisions (MagicMind's ``precision_mode``): ``fp32`` (``force_float32``), ``fp16``
(``force_float16``), ``int8`` (``qint8_mixed_float16``: int8 convolutions and matrix products with
per-channel weights and symmetric activations calibrated on real images, the rest in fp16).

H and W are dynamic in every build (``graph_shape_mutable`` with a ``dim_range``): the host pads
each batch only to its own largest image, as for the other backends.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from build_tools.shapes import pad_to, profile_shapes
from service.backends.base import (
    INPUT_DTYPES,
    IMAGE_INPUTS,
    INPUT_NAMES,
    BuildFailed,
    check_precision,
    require_calibration,
)
from service.backends.magicmind import NAME, PRECISIONS, check_status, runtime_module
from service.manifest import ShapeProfile

MODEL_FILE = "model.mm"
PRECISION_MODES = {"fp32": "force_float32", "fp16": "force_float16", "int8": "qint8_mixed_float16"}


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
    shape_profile: ShapeProfile | None = None,
    archs: Sequence[str] | None = None,
) -> dict:
    """The ``BuilderConfig`` JSON (as a dict) of one build.

    Args:
        precision: ``fp32``, ``fp16`` or ``int8``.
        input_shapes: the graph's inputs in order with -1 for dynamic dimensions, as given to
            ``set_dimension`` (a fixed batch stays fixed).
        shape_profile: the manifest's shape profile, or None for the defaults of
            :func:`build_tools.shapes.profile_shapes` (H and W 32..1344).
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


def padded_feeds(calibration: Iterable[dict[str, np.ndarray]] | None) -> list[dict[str, np.ndarray]]:
    """The calibration feeds, every input padded to the largest shape among them, so that one
    ``get_shape()`` describes every sample a data interface serves.

    Raises:
        UnsupportedPrecision: no calibration, or no feed in it.
    """
    feeds = [{name: np.asarray(array) for name, array in feed.items()} for feed in require_calibration(calibration)]
    largest = {name: np.max([f[name].shape for f in feeds], axis=0) for name in feeds[0]}
    return [{name: pad_to(f[name], largest[name]) for name in feeds[0]} for f in feeds]


def _calibration_inputs(mm, feeds: list[dict[str, np.ndarray]]) -> list:
    """One ``CalibDataInterface`` per graph input, in input order, stepping through ``feeds`` in
    lockstep: the Calibrator takes one data interface per input, so ``image_sizes`` is served by
    its own interface that yields, at every step, the sizes belonging to the images of the same feed."""
    mm_types = {np.float32: mm.DataType.FLOAT32, np.int64: mm.DataType.INT64}

    class FeedInput(mm.CalibDataInterface):
        def __init__(self, name: str) -> None:
            super().__init__()
            self._name, self._dtype, self._type = name, INPUT_DTYPES[name], mm_types[INPUT_DTYPES[name]]
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

    return [FeedInput(name) for name in feeds[0]]


def compile(
    onnx_path: Path,
    out_dir: Path,
    precision: str,
    calibration: Iterable[dict[str, np.ndarray]] | None = None,
    *,
    shape_profile: ShapeProfile | None = None,
    archs: Sequence[str] | None = None,
) -> tuple[str, dict]:
    """Build ``model.mm`` from the ONNX export.

    Args:
        shape_profile: the manifest's; None for H and W 32..1344 at the graph's batch.
        archs: MLU architectures to compile for; None for the build machine's own.
    """
    precision = check_precision(NAME, PRECISIONS, precision)
    feeds = padded_feeds(calibration) if precision == "int8" else None
    mm = runtime_module()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shapes = onnx_input_shapes(onnx_path)
    if tuple(shapes) not in (INPUT_NAMES, IMAGE_INPUTS):
        raise BuildFailed(f"{onnx_path} has inputs {list(shapes)}, expected {list(INPUT_NAMES)}")
    config_dict = builder_config(precision, shapes, shape_profile, archs)

    network = mm.Network()
    check_status(mm.Parser(mm.ModelKind.kOnnx).parse(network, str(onnx_path)), f"parsing {onnx_path}", BuildFailed)
    for index, dims in enumerate(shapes.values()):
        network.get_input(index).set_dimension(mm.Dims(dims))
    config = mm.BuilderConfig()
    check_status(config.parse_from_string(json.dumps(config_dict)), "reading the builder config", BuildFailed)
    facts = {"graph": "MagicMind serialized model", "builder_config": config_dict}
    if feeds is not None:
        sources = _calibration_inputs(mm, feeds)  # held here until calibration is done
        calibrator = mm.Calibrator(sources)
        algorithm = mm.QuantizationAlgorithm.LINEAR_ALGORITHM
        check_status(calibrator.set_quantization_algorithm(algorithm), "choosing the quantisation algorithm",
                     BuildFailed)
        check_status(calibrator.calibrate(network, config), "int8 calibration", BuildFailed)
        facts.update(calibration_batches=len(feeds), quantization_algorithm="LINEAR_ALGORITHM")
    model = mm.Builder().build_model("maskrcnn", network, config)
    if model is None:
        raise BuildFailed(f"MagicMind could not build the {precision} model (its log above says why)")
    check_status(model.serialize_to_file(str(out_dir / MODEL_FILE)), "writing the model", BuildFailed)
    return MODEL_FILE, facts
