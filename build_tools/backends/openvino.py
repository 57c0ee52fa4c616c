"""OpenVINO build (CPU): the exported ONNX converted to an IR.

``fp32``: converted as is. ``bf16``: the fp32 IR run with OpenVINO's ``INFERENCE_PRECISION_HINT``
bf16 (CPUs with AVX512_BF16 or AMX; refused elsewhere), with fp32 kept where coordinates are
computed: the CPU plugin runs every convolution and fully connected layer at the hint's precision
and, without help, also the nodes between them, which put the RoI coordinates and the RoI level
mapping in bf16 (measured on the runtime model; a bf16 coordinate near 1000 px has an 8 px step).
The plugin keeps in fp32 every node on a path from a model output back to the nearest convolution
or FC (the graph's tail), so the build appends one-element outputs (``precision_anchor_<i>``, read
by nobody) that make the coordinate chain part of that tail: by default the first value of each
RoIAlign's RoI boxes and batch indices, so RoIAlign itself samples the bf16 features in bf16 (its
kernel reads the boxes as fp32 whatever its precision); ``roi_align_precision="fp32"`` anchors
RoIAlign's result instead, which keeps RoIAlign fp32 too. The layers whose outputs are read as
numbers (``precision_scopes.FP32_LAYERS``: the RPN's and the box predictor's logits and deltas, the
mask logits) are marked ``precise`` in the IR, which the plugin honours per node, so they stay fp32
(``predictor_precision="bf16"`` leaves them to the hint). Measured at 800x1344 on 2 AMX cores,
the RoIAlign op: bf16 0.13-0.14 s, fp32 0.14-0.24 s, fp32 with the features widened by the plugin
(no explicit Convert) 0.95-1.4 s; against that last, proposals bit-identical and every detection
matched on six photos. Per-node ``disable_fp16_compression`` marks and memory-format hints set from
Python are not honoured by this plugin (measured: the same nodes stay bf16, the same layouts).
``int8``: NNCF post-training quantisation calibrated on real images of the
layers in ``build_tools.precision_scopes``' compute scopes only (every other node in NNCF's ignored
scope; nodes judged by their exported name, which the mask head's transposed convolution keeps
only on its bias Add), per-channel symmetric weights, run at fp32 inference precision elsewhere.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from build_tools import precision_scopes
from service.backends.base import (
    UnsupportedPrecision,
    check_precision,
    require_calibration,
)
from service.backends.openvino import (
    NAME,
    PRECISION_ANCHOR_PREFIX,
    PRECISIONS,
    cpu_capabilities,
)
from service.manifest import ShapeProfile

MODEL_FILE = "model.xml"
# The inference precision each artifact precision runs at (the runtime reads it from the facts).
_HINT = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}
ROI_ALIGN_PRECISIONS = ("bf16", "fp32")
PREDICTOR_PRECISIONS = ("fp32", "bf16")
# int8 activations: NNCF's MIXED preset (asymmetric activations, a zero point each: the default, as
# the activations after ReLU-free adds, the FPN sums, are not centred on zero) or PERFORMANCE
# (symmetric: signed int8 where a tensor has negative values, no zero point). Symmetric stays an
# option: no faster (AMX Xeon, 2 threads, 25 interleaved calls at 800x1088 on a quiet machine:
# 0.401 s vs 0.399 s) and its AP interval is wider (the README's fidelity table).
ACTIVATION_PRESETS = {"asymmetric": "MIXED", "symmetric": "PERFORMANCE"}
# OpenVINO's DisablePrecisionConversion runtime attribute as the IR text spells it.
_PRECISE = "precise"
# RoIAlign's inputs that carry coordinates: the RoI boxes and the batch index of each RoI.
_COORDINATE_INPUTS = (1, 2)


def compile(
    onnx_path: Path,
    out_dir: Path,
    precision: str,
    calibration: Iterable[dict[str, np.ndarray]] | None = None,
    *,
    shape_profile: ShapeProfile | None = None,
    roi_align_precision: str = "bf16",
    predictor_precision: str = "fp32",
    activations: str = "asymmetric",
) -> tuple[str, dict]:
    """``model.xml`` (+ ``model.bin``) in ``out_dir``. ``shape_profile`` is not needed: the IR keeps
    the graph's dynamic axes. ``roi_align_precision`` (bf16 builds): the precision RoIAlign samples
    the features at, ``bf16`` (default) or ``fp32``; its coordinates are fp32 either way.
    ``predictor_precision`` (bf16 builds): the precision of ``precision_scopes.FP32_LAYERS`` (the
    layers whose outputs are read as numbers: RPN and box-predictor logits and deltas, mask logits),
    ``fp32`` (default) or ``bf16``. ``activations`` (int8 builds): ``asymmetric`` (default; a zero
    point per quantised activation) or ``symmetric``."""
    if activations not in ACTIVATION_PRESETS:
        raise ValueError(f"activations must be one of {tuple(ACTIVATION_PRESETS)}, got {activations!r}")
    if roi_align_precision not in ROI_ALIGN_PRECISIONS:
        raise ValueError(f"roi_align_precision must be one of {ROI_ALIGN_PRECISIONS}, got {roi_align_precision!r}")
    if predictor_precision not in PREDICTOR_PRECISIONS:
        raise ValueError(f"predictor_precision must be one of {PREDICTOR_PRECISIONS}, got {predictor_precision!r}")
    precision = check_precision(NAME, PRECISIONS, precision)
    feeds = require_calibration(calibration) if precision == "int8" else None
    import openvino as ov

    if precision == "bf16" and "BF16" not in cpu_capabilities():
        raise UnsupportedPrecision("bf16 needs a CPU with AVX512_BF16 or AMX; this one has neither")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = ov.convert_model(str(onnx_path))
    facts = {"inference_precision_hint": _HINT[precision], "openvino": ov.get_version()}
    if feeds is not None:
        import nncf

        ignored = [op.get_friendly_name() for op in model.get_ordered_ops()
                   if not precision_scopes.reduced_precision_allowed(onnx_name(op))]
        model = nncf.quantize(
            model,
            nncf.Dataset(feeds),
            subset_size=len(feeds),
            # symmetric weights; activations per ``activations``
            preset=getattr(nncf.QuantizationPreset, ACTIVATION_PRESETS[activations]),
            ignored_scope=nncf.IgnoredScope(names=ignored, validate=False),
        )
        facts.update({"graph": "NNCF post-training int8", "calibration_images": len(feeds), "nncf": nncf.__version__,
                      "activations": activations,
                      **precision_scopes.summary(), "fp32_ignored_nodes": len(ignored)})
    else:
        facts["graph"] = "exported ONNX converted to IR, fp32 weights"
    if precision == "bf16":
        facts["roi_align_precision"] = roi_align_precision
        facts["precision_anchors"] = add_precision_anchors(model, roi_align_precision)
        facts["predictor_precision"] = predictor_precision
    predictors: set[str] = set()
    if precision == "bf16" and predictor_precision == "fp32":
        bias_in_weights(model, precision_scopes.FP32_LAYERS)
        predictors = {op.get_friendly_name() for op in model.get_ordered_ops()
                      if onnx_name(op).startswith(precision_scopes.FP32_LAYERS)}
    ov.save_model(model, str(out_dir / MODEL_FILE), compress_to_fp16=False)
    if predictors:
        facts["fp32_predictor_nodes"] = mark_precise(out_dir / MODEL_FILE, predictors)
    return MODEL_FILE, facts


def onnx_name(op) -> str:
    """The exported graph's name of IR node ``op``: the converter names an ONNX ConvTranspose's
    ConvolutionBackpropData ``ConvolutionBackpropData_<n>`` and gives the ONNX name to the bias
    Add after it."""
    if op.get_type_name() == "ConvolutionBackpropData":
        consumers = [t.get_node() for t in op.output(0).get_target_inputs()]
        if len(consumers) == 1 and consumers[0].get_type_name() == "Add":
            return consumers[0].get_friendly_name()
    return op.get_friendly_name()


def bias_in_weights(model, scopes: tuple[str, ...]) -> int:
    """Rewrite each fully connected layer of ``model`` named under ``scopes`` (a MatMul with constant
    weights ``[O, K]``, transposed, followed by an Add of a constant bias) as one MatMul of the input
    with a column of ones appended and the bias appended to the weights, ``[O, K + 1]``: the same
    numbers, but no bias for the CPU plugin to fuse, whose fusion makes a new node without the
    ``precise`` mark (measured: the box predictor's FCs ran bf16 despite it). Returns the number
    rewritten."""
    from openvino import opset13 as ops

    rewritten = 0
    for add in model.get_ordered_ops():
        if add.get_type_name() != "Add" or not add.get_friendly_name().startswith(scopes):
            continue
        matmul, bias = (add.input(i).get_source_output().get_node() for i in (0, 1))
        if matmul.get_type_name() != "MatMul" or bias.get_type_name() != "Constant":
            continue
        weights = matmul.input(1).get_source_output().get_node()
        attrs = matmul.get_attributes()
        if weights.get_type_name() != "Constant" or attrs["transpose_a"] or not attrs["transpose_b"]:
            continue
        w, b = weights.get_data(), bias.get_data().reshape(-1)
        if w.ndim != 2 or b.shape != (w.shape[0],) or len(matmul.output(0).get_target_inputs()) != 1:
            continue
        x = matmul.input(0).get_source_output()
        ones = ops.pad(x, np.array([0, 0], np.int64), np.array([0, 1], np.int64), "constant",
                       np.array(1.0, np.float32), name=f"{add.get_friendly_name()}/ones")
        fused = ops.matmul(ones, ops.constant(np.concatenate([w, b[:, None]], axis=1).astype(np.float32)),
                           False, True, name=add.get_friendly_name())
        for target in add.output(0).get_target_inputs():
            target.replace_source_output(fused.output(0))
        fused.output(0).get_tensor().set_names(add.output(0).get_tensor().get_names())
        rewritten += 1
    return rewritten


def mark_precise(xml_path: Path, names: set[str]) -> int:
    """Give the IR layers of ``xml_path`` named in ``names`` OpenVINO's ``precise`` runtime attribute
    (DisablePrecisionConversion), with which the CPU plugin runs a node at its IR precision (fp32)
    whatever the inference precision hint. Written into the IR text because a node's rt_info set from
    Python holds only strings, which the plugin does not read as the attribute; ``read_model`` turns
    the text into the attribute. Returns the number of layers marked.

    Raises:
        BuildError: OpenVINO did not read the marks back (an IR format change).
    """
    import xml.etree.ElementTree as ElementTree

    import openvino as ov

    from build_tools.errors import BuildError

    tree = ElementTree.parse(xml_path)
    marked = 0
    for layer in tree.getroot().iter("layer"):
        if layer.get("name") not in names:
            continue
        rt_info = layer.find("rt_info")
        if rt_info is None:
            data = layer.find("data")
            rt_info = ElementTree.Element("rt_info")
            layer.insert(list(layer).index(data) + 1 if data is not None else 0, rt_info)
        ElementTree.SubElement(rt_info, "attribute", name=_PRECISE, version="0")
        marked += 1
    tree.write(xml_path, encoding="utf-8", xml_declaration=True)
    read_back = sum(any(key.startswith("DisablePrecisionConversion") for key in op.get_rt_info())
                    for op in ov.Core().read_model(str(xml_path)).get_ordered_ops())
    if read_back != marked:
        raise BuildError(f"OpenVINO {ov.get_version()} read {read_back} of the {marked} fp32 marks written into "
                         f"{xml_path.name}: build with predictor_precision=bf16 or another OpenVINO")
    return marked


def add_precision_anchors(model, roi_align_precision: str) -> int:
    """Append to ``model`` one-element outputs named ``precision_anchor_<i>`` that put the tensors
    they slice on the graph's tail, which the CPU plugin keeps at fp32 whatever the inference
    precision (back to the nearest convolution or FC): for each RoIAlign, the first RoI box and batch
    index (``roi_align_precision="bf16"``: the coordinate chain fp32, RoIAlign at the hint's
    precision) or the first value of its result (``"fp32"``: RoIAlign fp32 as well; its features
    are then widened by an explicit bf16 -> f32 Convert, without which the plugin widens them into a
    planar layout where its RoIAlign kernel is 7x slower). Returns the number added."""
    from openvino import opset13 as ops

    anchors = []
    for op in model.get_ordered_ops():
        if op.get_type_name() != "ROIAlign":
            continue
        if roi_align_precision == "fp32":
            features = op.input(0).get_source_output()
            op.input(0).replace_source_output(ops.convert(ops.convert(features, "bf16"), "f32").output(0))
            anchored = [op.output(0)]
        else:
            anchored = [op.input(i).get_source_output() for i in _COORDINATE_INPUTS]
        for tensor in anchored:
            rank = tensor.get_partial_shape().rank.get_length()
            first = ops.slice(tensor, np.zeros(rank, np.int64), np.ones(rank, np.int64), np.ones(rank, np.int64))
            first.output(0).get_tensor().set_names({f"{PRECISION_ANCHOR_PREFIX}{len(anchors)}"})
            anchors.append(ops.result(first))
    model.add_results(anchors)
    return len(anchors)
