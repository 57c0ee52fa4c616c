"""Where an engine's time goes: per-part times from each backend's own profiler, and a roofline line.

For each engine artifact (``--engines DIR ...``) and, with ``--eager``, the eager PyTorch model the
first engine was built from (``scripts.tools.eager.eager_reference``), one synthetic photo
(``scripts.tools.perf.synthetic_batch``, 800x1344 by default, not resized) is run ``--runs`` times
under the backend's profiler, engines taking turns call by call; the run with the median profiled
total is reported. Profilers: ONNX Runtime session profiling (``enable_profiling``, its JSON
trace), OpenVINO per-node performance counters (``PERF_COUNT``, ``profiling_info``),
``torch.profiler`` for eager. Each engine is profiled in a twin session opened with the settings
the service's own engine reads back (``load_engine``), plus profiling.

Parts: backbone, FPN, RPN head, proposals (anchors, decoding, top-k, NMS), RoIAlign (level mapping,
pooling, reordering), box head, detections (box decoding, NMS, output rows), mask head, everything
else. A runtime node is mapped to a part through the graph it came from: module scopes in ONNX node
names (``/backbone/body/...``, ``/mask_head/...``), RoIAlign nodes and the nodes whose results feed
only RoIAlign, and, for the exporter's unscoped nodes, the heads upstream of them (proposals after
the RPN head, detections after the box head) or the nodes they feed.
A runtime node (of the graph as the runtime executes it: ONNX Runtime's optimised model, OpenVINO's
runtime model) takes the part of a graph node or tensor its name contains or it was fused from,
else, when the runtime inserted it (reorders, split-off constants), the part of its neighbours;
what is still unmapped is listed under "everything else" by name. Eager ops are mapped by labelled
calls of the model's stages (``torch.profiler.record_function``).

Roofline: FLOPs of every Conv/ConvTranspose/Gemm/MatMul at the shapes ONNX Runtime reports when it
runs the graph on the same input (an ONNX Runtime engine of the run, else ``--onnx FILE``), divided
by the engine's time in its convolutions and fully connected layers, against a matmul peak
measured in the same run: torch.matmul of ``--peak-size``^3 in fp32 and bf16, for int8 the marginal
rate of a chain of OpenVINO int8 FullyConnected layers (FakeQuantize-d activations, int8 weights:
AMX/VNNI where the CPU has them). The five most expensive op types that are not convolutions or matmuls close each table.

    python -m scripts.bench.profile --engines artifacts/r50/openvino-bf16 artifacts/r50/onnxruntime-fp32 \\
        --eager --json profile.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from build_tools.backend_choice import cpu_facts, describe_cpu
from build_tools.timing import time_calls
from scripts.tools.perf import PerfError, batch_size_for, input_hw_for, synthetic_batch
from service.backends import load_engine
from service.backends.base import input_feed
from service.manifest import Manifest, ManifestError

PARTS = {
    "backbone": "backbone",
    "fpn": "FPN",
    "rpn_head": "RPN head",
    "proposals": "proposals: decode, top-k, NMS",
    "roi_align": "RoIAlign",
    "box_head": "box head",
    "detections": "detections: decode, NMS, rows",
    "mask_head": "mask head",
    "other": "everything else",
}
# A node's module scope (the segments of its ONNX name before the op) -> part; the first rule whose
# segment the scope holds wins, so the specific ones come first. Both the exporter's flat scopes
# (``/head/...`` for ``rpn.head`` called from ``rpn.propose``) and full paths (``/rpn/head/...``) match.
SCOPE_RULES = (
    ("fpn", "fpn"), ("body", "backbone"), ("backbone", "backbone"),
    ("mask_head", "mask_head"), ("mask_predictor", "mask_head"),
    ("box_head", "box_head"), ("box_predictor", "box_head"),
    ("box_roi_pool", "roi_align"), ("mask_roi_pool", "roi_align"),
    ("head", "rpn_head"), ("anchor_generator", "proposals"), ("rpn", "proposals"), ("roi_heads", "detections"),
)
# The part of an unscoped node downstream of a head, the later head first.
HEAD_DOWNSTREAM = {"mask_head": "detections", "box_head": "detections", "rpn_head": "proposals"}
ROI_ALIGN_OPS = {"RoiAlign", "ROIAlign"}
# Op types that are convolutions or matmuls, per profiler (OpenVINO's without the exec type).
ARITHMETIC_OPS = {
    "onnxruntime": {"Conv", "FusedConv", "ConvTranspose", "Gemm", "FusedGemm", "MatMul", "FusedMatMul", "QLinearConv",
                    "ConvInteger", "QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat", "QGemm"},
    "openvino": {"Convolution", "GroupConvolution", "ConvolutionBackpropData", "GroupConvolutionBackpropData",
                 "FullyConnected", "MatMul", "Deconvolution"},
    "eager": {"aten::conv2d", "aten::conv_transpose2d", "aten::linear", "aten::addmm", "aten::mm", "aten::matmul"},
}
# ONNX Runtime's input index of the weight of each conv-like op (FLOP counting).
CONV_WEIGHT_INPUT = {"Conv": 1, "FusedConv": 1, "ConvInteger": 1, "QLinearConv": 3}
GAP = "(runtime, between nodes)"


class ProfileError(Exception):
    """A profile that cannot be taken as asked (the CLI reports it as a usage error, status 2)."""


# --- graph: which part each node and tensor belongs to ------------------------------------------

@dataclass(frozen=True)
class GraphNode:
    """One node of a graph in trace order: its name, op type, tensor names in and out and, in a
    runtime's executed graph, the names of the graph nodes it was made from."""

    name: str
    op: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    originals: tuple[str, ...] = ()


def onnx_graph(path: Path) -> list[GraphNode]:
    """The nodes of an ONNX file, in the file's (the exporter's trace) order."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return [GraphNode(n.name, n.op_type, tuple(n.input), tuple(n.output)) for n in model.graph.node]


def openvino_graph(model: Any) -> list[GraphNode]:
    """The ops of an OpenVINO model (``ov.Model``, or a compiled model's runtime model, whose ops
    carry ``originalLayersNames``) in topological order; tensors named by producer and port."""
    def tensor(port: Any) -> str:
        return f"{port.get_node().get_friendly_name()}:{port.get_index()}"

    def originals(op: Any) -> tuple[str, ...]:
        info = op.get_rt_info()
        return tuple(info["originalLayersNames"].astype(str).split(",")) if "originalLayersNames" in info else ()

    return [GraphNode(op.get_friendly_name(), op.get_type_name(),
                      tuple(tensor(i.get_source_output()) for i in op.inputs()),
                      tuple(tensor(o) for o in op.outputs()), originals(op))
            for op in model.get_ordered_ops()]


def scope_part(name: str) -> str | None:
    """The part named by the module scope of ``name`` (``/backbone/body/layer1/.../Conv``), if any."""
    segments = name.split("/")[1:-1]
    for segment, part in SCOPE_RULES:
        if segment in segments:
            return part
    return None


def graph_parts(nodes: Sequence[GraphNode]) -> dict[str, str]:
    """Part of every node name and every tensor name (its producer's part) of a graph whose nodes
    come in topological order (the ONNX exporter's trace order, OpenVINO's ordered ops).

    Scoped nodes take their scope's part. RoIAlign nodes, the node downstream of them (not through a
    head) whose result a box or mask head consumes (the pool's last), and every node whose results
    feed only RoIAlign nodes (the level mapping, per-level indices, the RoIs) are RoIAlign. An
    unscoped node between nodes of one part (fed by and feeding only that part: an op a converter
    split off, like OpenVINO's ``ConvolutionBackpropData_<n>`` of the mask head's ConvTranspose)
    takes that part. Any other unscoped node is a detection step when the box or mask head is upstream of it, a proposal
    step when only the RPN head is (``HEAD_DOWNSTREAM``), else takes the part of the nodes it feeds
    when they agree (shape arithmetic), else everything else.
    """
    part: dict[str, str] = {}
    producers: dict[str, GraphNode] = {t: n for n in nodes for t in n.outputs}
    consumers: dict[str, list[GraphNode]] = defaultdict(list)
    for node in nodes:
        part_of_scope = scope_part(node.name)
        if part_of_scope:
            part[node.name] = part_of_scope
        elif node.op in ROI_ALIGN_OPS:
            part[node.name] = "roi_align"
        for t in node.inputs:
            consumers[t].append(node)

    def users(node: GraphNode) -> list[GraphNode]:
        return [u for t in node.outputs for u in consumers.get(t, ())]

    pooled = {n.name for n in nodes if n.op in ROI_ALIGN_OPS}  # downstream of RoIAlign, not through a head
    heads_upstream: dict[str, set[str]] = {}
    for node in nodes:
        feeders = [producers[t] for t in node.inputs if t in producers]
        if any(f.name in pooled for f in feeders) and node.name not in part:
            pooled.add(node.name)
        heads_upstream[node.name] = set().union(
            *(heads_upstream[f.name] | ({part.get(f.name)} & set(HEAD_DOWNSTREAM)) for f in feeders))
        if part.get(node.name) in ("box_head", "mask_head"):
            for f in feeders:
                if f.name in pooled and f.name not in part:
                    part[f.name] = "roi_align"
    for node in reversed(nodes):
        if node.name not in part and users(node) and all(part.get(u.name) == "roi_align" for u in users(node)):
            part[node.name] = "roi_align"
    for node in nodes:  # between two nodes of one part (a conversion's own op inside a head)
        feeder_parts = {part.get(producers[t].name) for t in node.inputs if t in producers} - {None}
        if node.name not in part and len(feeder_parts) == 1 and feeder_parts == {part.get(u.name) for u in users(node)}:
            part[node.name] = feeder_parts.pop()
    for node in nodes:
        if node.name not in part:
            downstream_of = [HEAD_DOWNSTREAM[h] for h in HEAD_DOWNSTREAM if h in heads_upstream[node.name]]
            if downstream_of:
                part[node.name] = downstream_of[0]
    for node in reversed(nodes):
        if node.name not in part:
            agreed = {part.get(u.name) for u in users(node)}
            part[node.name] = agreed.pop() if len(agreed) == 1 and None not in agreed else "other"
    for node in nodes:
        for t in node.outputs:
            part.setdefault(t, part[node.name])
    return part


def resolve_part(runtime_name: str, parts: Mapping[str, str]) -> str | None:
    """The part of a runtime node: its name, or the longest piece of it cut at ``_`` or ``/`` that
    names a graph node or tensor (``/x/Relu_output_0_nchwc`` -> ``/x/Relu_output_0``), tried on the
    whole name and then on each ``/...`` tail after an ``_`` (``images_abcd_acdb_/x/Conv``, an
    inserted reorder, -> ``/x/Conv``); else its module scope; None when nothing matches."""
    starts = [0] + [i for i in range(1, len(runtime_name)) if runtime_name[i] == "/" and runtime_name[i - 1] == "_"]
    for start in starts:
        candidate = runtime_name[start:]
        while candidate:
            if candidate in parts:
                return parts[candidate]
            cut = max(candidate.rfind("_"), candidate.rfind("/"))
            candidate = candidate[:cut] if cut > 0 else ""
    return scope_part(runtime_name)


def runtime_parts(runtime: Sequence[GraphNode], parts: Mapping[str, str]) -> dict[str, tuple[str, str]]:
    """``(part, how)`` of each node of a runtime's executed graph. ``how`` is ``name`` (its name or
    a graph node it was made from resolves, :func:`resolve_part`), ``neighbour`` (a node the
    runtime inserted, a reorder or a split-off constant, takes the part of the nodes it feeds
    when they agree, else of the nodes that feed it) or ``none`` (everything else)."""
    found: dict[str, tuple[str, str]] = {}
    for node in runtime:
        part = next(filter(None, (resolve_part(n, parts) for n in (node.name, *node.originals))), None)
        if part:
            found[node.name] = (part, "name")
    producer = {t: n for n in runtime for t in n.outputs}
    users: dict[str, list[GraphNode]] = defaultdict(list)
    for node in runtime:
        for t in node.inputs:
            users[t].append(node)
    neighbours = (
        (reversed(runtime), lambda n: [u for t in n.outputs for u in users.get(t, ())]),
        (runtime, lambda n: [producer[t] for t in n.inputs if t in producer]),
    )
    for order, adjacent in neighbours:
        for node in order:
            if node.name in found:
                continue
            known = {found[a.name][0] for a in adjacent(node) if a.name in found}
            if len(known) == 1:
                found[node.name] = (known.pop(), "neighbour")
    return {n.name: found.get(n.name, ("other", "none")) for n in runtime}


# --- one profiled run ---------------------------------------------------------------------------

@dataclass(frozen=True)
class NodeTime:
    """One runtime node (eager: one top-level op call) of a profiled run; ``how`` it was given its
    part (see :func:`runtime_parts`; eager: ``name`` for a labelled stage's op)."""

    name: str
    op: str
    seconds: float
    part: str
    arithmetic: bool
    how: str = "name"


@dataclass
class RunProfile:
    """One profiled call: the profiler's own total (ONNX Runtime: its ``model_run`` event;
    OpenVINO: the sum of its node counters; eager: the labelled call), the wall time of the call,
    the nodes, and per node name the FLOPs of the convolutions and matmuls (ONNX Runtime only)."""

    total_s: float
    wall_s: float
    nodes: list[NodeTime]
    flops: dict[str, int] = field(default_factory=dict)


class OnnxRuntimeProfiler:
    """An ONNX Runtime session of ``model_path`` with session profiling on; each call's nodes are
    read from the trace when the session ends. :meth:`of_engine` opens the twin of the service's
    session (its own ``SessionOptions`` and providers, read back)."""

    kind = "onnxruntime"

    def __init__(self, model_path: Path, options: Any, providers: Sequence[str], trace_dir: Path):
        import onnxruntime as ort

        folder = Path(tempfile.mkdtemp(dir=trace_dir))
        options.enable_profiling = True
        options.profile_file_prefix = str(folder / "ort")
        # the graph as the session runs it (fused, NCHWc reorders inserted): its nodes are the trace's
        options.optimized_model_filepath = str(folder / "optimized.onnx")
        self.session = ort.InferenceSession(str(model_path), options, providers=list(providers))
        self.parts = runtime_parts(onnx_graph(folder / "optimized.onnx"), graph_parts(onnx_graph(model_path)))
        self.walls: list[float] = []

    @classmethod
    def of_engine(cls, engine_dir: Path, manifest: Manifest, threads: int | None,
                  trace_dir: Path) -> OnnxRuntimeProfiler:
        session = load_engine(engine_dir, threads=threads).session
        return cls(engine_dir / manifest.model_file, session.get_session_options(), session.get_providers(),
                   trace_dir)

    def __call__(self, feed: dict[str, np.ndarray]) -> None:
        started = time.perf_counter()
        self.session.run(None, feed)
        self.walls.append(time.perf_counter() - started)

    def runs(self) -> list[RunProfile]:
        events = json.loads(Path(self.session.end_profiling()).read_text())
        calls = [e for e in events if e.get("name") == "model_run"]
        return [self._run(call, events, wall) for call, wall in zip(calls, self.walls)]

    def _run(self, call: dict, events: list[dict], wall: float) -> RunProfile:
        start, end = call["ts"], call["ts"] + call["dur"]
        arithmetic = ARITHMETIC_OPS[self.kind]
        nodes, flops = [], {}
        for e in events:
            if e.get("cat") != "Node" or not start <= e["ts"] <= end or not e["name"].endswith("_kernel_time"):
                continue
            name, op = e["name"].removesuffix("_kernel_time"), e["args"]["op_name"]
            part, how = self.parts.get(name, ("other", "none"))
            nodes.append(NodeTime(name, op, e["dur"] / 1e6, part, op in arithmetic, how))
            if op in arithmetic:
                flops[name] = node_flops(op, e["args"])
        total = call["dur"] / 1e6
        nodes.append(NodeTime(GAP, GAP, total - sum(n.seconds for n in nodes), "other", False, "none"))
        return RunProfile(total, wall, nodes, flops)


def node_flops(op: str, args: Mapping[str, Any]) -> int:
    """Multiply-adds x 2 of one ONNX Runtime conv/matmul node from the shapes its trace event
    records (``input_type_shape``, ``output_type_shape``: lists of ``{dtype: shape}``)."""
    shapes_in = [next(iter(s.values())) for s in args["input_type_shape"]]
    out = next(iter(args["output_type_shape"][0].values()))
    outputs = int(np.prod(out))
    if op in CONV_WEIGHT_INPUT:  # weight [Cout, Cin/groups, kh, kw]
        return 2 * outputs * int(np.prod(shapes_in[CONV_WEIGHT_INPUT[op]][1:]))
    if op == "ConvTranspose":  # weight [Cin, Cout/groups, kh, kw]: every input value meets Cout/g x kh x kw weights
        return 2 * int(np.prod(shapes_in[0])) * int(np.prod(shapes_in[1][1:]))
    if op in ("Gemm", "FusedGemm", "QGemm"):  # A holds M x K values, whichever way it is transposed
        return 2 * outputs * int(np.prod(shapes_in[0])) // out[0]
    return 2 * outputs * shapes_in[0][-1]  # MatMul family: [..., M, K] x [K, N]


class OpenVinoProfiler:
    """A twin of the service's OpenVINO compiled model (same IR, its precision hint, performance
    hint, threads and streams read back) with ``PERF_COUNT``; each call's node counters are kept."""

    kind = "openvino"
    COPIED = ("INFERENCE_PRECISION_HINT", "PERFORMANCE_HINT", "INFERENCE_NUM_THREADS", "NUM_STREAMS")

    def __init__(self, engine_dir: Path, manifest: Manifest, threads: int | None, trace_dir: Path):
        import openvino as ov

        engine = load_engine(engine_dir, threads=threads)
        config = {key: engine.compiled.get_property(key) for key in self.COPIED}
        del engine
        core = ov.Core()
        model = core.read_model(str(engine_dir / manifest.model_file))
        parts = graph_parts(openvino_graph(model))
        compiled = core.compile_model(model, "CPU", {**config, "PERF_COUNT": True})
        self.parts = runtime_parts(openvino_graph(compiled.get_runtime_model()), parts)
        self.request = compiled.create_infer_request()
        self._runs: list[RunProfile] = []

    def __call__(self, feed: dict[str, np.ndarray]) -> None:
        started = time.perf_counter()
        self.request.infer(feed)
        wall = time.perf_counter() - started
        arithmetic = ARITHMETIC_OPS[self.kind]
        nodes = []
        for info in self.request.profiling_info:
            seconds = info.real_time.total_seconds()
            if seconds <= 0:
                continue
            part, how = self.parts.get(info.node_name, ("other", "none"))
            nodes.append(NodeTime(info.node_name, f"{info.node_type}/{info.exec_type}", seconds, part,
                                  info.node_type in arithmetic, how))
        self._runs.append(RunProfile(sum(n.seconds for n in nodes), wall, nodes))

    def runs(self) -> list[RunProfile]:
        return self._runs


# Labelled calls of the eager model: (module path, method, part). The innermost label holds an op.
EAGER_STAGES = (
    ("backbone.body", "forward", "backbone"), ("backbone.fpn", "forward", "fpn"),
    ("rpn", "propose", "proposals"), ("rpn.head", "forward", "rpn_head"),
    ("roi_heads", "detect_padded", "detections"),
    ("roi_heads.box_roi_pool", "pool", "roi_align"), ("roi_heads.mask_roi_pool", "pool", "roi_align"),
    ("roi_heads.box_head", "forward", "box_head"), ("roi_heads.box_predictor", "forward", "box_head"),
    ("roi_heads.mask_head", "forward", "mask_head"), ("roi_heads.mask_predictor", "forward", "mask_head"),
)
LABEL = "part:"
ROOT = "profile:call"


class EagerProfiler:
    """The eager model an engine was built from, its stages' calls labelled for torch.profiler
    (instance attributes shadowing the methods of this one model object)."""

    kind = "eager"

    def __init__(self, manifest: Manifest, threads: int | None):
        import torch

        from scripts.tools.eager import eager_reference

        self.model = eager_reference(manifest)
        for path, method, part in EAGER_STAGES:
            module = self.model.get_submodule(path)
            setattr(module, method, self._labelled(getattr(module, method), part))
        self.threads = threads or torch.get_num_threads()
        self._runs: list[RunProfile] = []

    @staticmethod
    def _labelled(call: Callable, part: str) -> Callable:
        from torch.profiler import record_function

        def labelled(*args, **kwargs):
            with record_function(LABEL + part):
                return call(*args, **kwargs)
        return labelled

    def __call__(self, feed: dict[str, np.ndarray]) -> None:
        from torch.profiler import ProfilerActivity, profile, record_function

        from build_tools.reference import run_eager, torch_threads

        with torch_threads(self.threads), profile(activities=[ProfilerActivity.CPU]) as prof:
            started = time.perf_counter()
            with record_function(ROOT):
                run_eager(self.model, feed["images"], feed["image_sizes"])
            wall = time.perf_counter() - started
        self._runs.append(self._run(prof.events(), wall))

    def _run(self, events: Iterable[Any], wall: float) -> RunProfile:
        """Self time of every event inside the profiled call, by (innermost label, outermost op
        below it): the op called from Python, e.g. ``aten::conv2d`` for its ``mkldnn_convolution``."""
        arithmetic = ARITHMETIC_OPS[self.kind]
        times: dict[tuple[str, str], float] = defaultdict(float)
        total = 0.0
        for event in events:
            chain = [event]  # the event and its ancestors up to the root call
            while chain[-1] is not None and chain[-1].name != ROOT:
                chain.append(chain[-1].cpu_parent)
            if chain[-1] is None:
                continue  # outside the profiled call
            chain.pop()
            if not chain:  # the root call itself
                total = event.cpu_time_total / 1e6
                part, op = "other", "(python, outside the stages)"
            else:
                cut = next((i for i, e in enumerate(chain) if e.name.startswith(LABEL)), len(chain))
                part = chain[cut].name.removeprefix(LABEL) if cut < len(chain) else "other"
                op = chain[cut - 1].name if cut else "(python, in the stage)"
            times[(part, op)] += event.self_cpu_time_total / 1e6
        nodes = [NodeTime(op, op, s, part, op in arithmetic, "name" if part != "other" else "none")
                 for (part, op), s in times.items()]
        return RunProfile(total, wall, nodes)

    def runs(self) -> list[RunProfile]:
        return self._runs


# --- matmul peaks -------------------------------------------------------------------------------

def matmul_peaks(size: int, precisions: Iterable[str], iterations: int = 10) -> dict[str, dict[str, Any]]:
    """TFLOP/s of a ``size``^3 matmul per precision (best of ``iterations`` timed calls after one
    warm-up, the precisions taking turns; on a shared machine three calls gave bf16 peaks from 0.67 to
    1.70 TFLOP/s in consecutive processes, ten give the quiet moments a chance): ``{precision:
    {"tflops", "how"}}``. fp32 and bf16 run torch.matmul. int8 runs OpenVINO FullyConnected layers
    with int8 weights (torch._int_mm on CPU does not reach the AMX int8 rate), chained with a
    FakeQuantize before each, which the plugin folds into the previous layer as a requantisation:
    the rate is the marginal one, the FLOPs the longer chain adds over the shorter one per second
    it adds, because the first FakeQuantize of an f32 input and the f32 result are a fixed cost that
    one layer alone does not amortise (measured on an AMX Xeon: 1.67 TOPS for one 4096^3 layer,
    2.86 for a chain of 8, 3.18 for 16, about 3.6 marginal)."""
    import torch

    runners: dict[str, Callable[[], Any]] = {}
    how: dict[str, str] = {}
    for precision in dict.fromkeys(precisions):
        if precision in ("fp32", "bf16"):
            dtype = torch.float32 if precision == "fp32" else torch.bfloat16
            a = torch.randn(size, size).to(dtype)
            runners[precision] = lambda a=a: torch.matmul(a, a)
            how[precision] = f"torch.matmul {size}^3 {precision} ({torch.get_num_threads()} threads)"
        elif precision == "int8":
            for layers in INT8_CHAINS:
                request, feed = _openvino_int8_chain(size, layers)
                runners[f"int8x{layers}"] = lambda request=request, feed=feed: request.infer(feed)
            short, long = INT8_CHAINS
            how[precision] = (f"OpenVINO int8 FullyConnected {size}^3, marginal rate of a chain of {long} over "
                              f"{short} (FakeQuantize-d activations, int8 weights)")
    seconds = {name: min(s) for name, s in time_calls(runners, iterations, warmup=1, alternate=True).items()}
    peaks = {p: {"tflops": 2 * size**3 / seconds[p] / 1e12, "how": how[p]} for p in how if p != "int8"}
    if "int8" in how:
        short, long = INT8_CHAINS
        added = seconds[f"int8x{long}"] - seconds[f"int8x{short}"]
        if added <= 0:  # noise larger than the work the longer chain adds: fall back to its whole rate
            added, short = seconds[f"int8x{long}"], 0
        peaks["int8"] = {"tflops": 2 * size**3 * (long - short) / added / 1e12, "how": how["int8"]}
    return peaks


# FullyConnected layers in the int8 chains whose time difference gives the int8 peak.
INT8_CHAINS = (4, 12)


def _openvino_int8_chain(size: int, layers: int) -> tuple[Any, dict[int, np.ndarray]]:
    import openvino as ov
    import openvino.opset13 as ops

    rng = np.random.default_rng(0)
    x = ops.parameter([size, size], np.float32)
    low, high = np.float32(-4), np.float32(4)
    y = x
    for _ in range(layers):
        weights = ops.constant(rng.integers(-127, 128, (size, size), dtype=np.int8))
        # scaled so that each layer's output stays inside the next FakeQuantize's range
        scale = ops.constant(np.full((size, 1), 1 / (32 * 64), np.float32))
        y = ops.matmul(ops.fake_quantize(y, low, high, low, high, 256),
                       ops.multiply(ops.convert(weights, np.float32), scale), False, True)
    compiled = ov.Core().compile_model(ov.Model([y], [x]), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return compiled.create_infer_request(), {0: rng.standard_normal((size, size)).astype(np.float32)}


# --- the report ---------------------------------------------------------------------------------

def summarise(run: RunProfile, flops: int | None, peak: Mapping[str, Any] | None) -> dict[str, Any]:
    """Per-part seconds and shares, seconds per op type within each part, unmapped names, conv/FC
    time and achieved rate, top five non-arithmetic op types of one profiled run."""
    parts = {p: 0.0 for p in PARTS}
    by_op: dict[str, float] = defaultdict(float)
    ops_by_part: dict[str, dict[str, float]] = {p: defaultdict(float) for p in PARTS}
    unmapped: dict[str, list[float]] = defaultdict(list)  # op -> seconds of each unmapped node
    unmapped_names: list[str] = []
    by_neighbour: dict[str, str] = {}
    arithmetic_s = 0.0
    for node in run.nodes:
        parts[node.part] += node.seconds
        ops_by_part[node.part][node.op] += node.seconds
        if node.arithmetic:
            arithmetic_s += node.seconds
        elif node.op != GAP:
            by_op[node.op] += node.seconds
        if node.how == "none":
            unmapped[node.op].append(node.seconds)
            unmapped_names.append(node.name)
        elif node.how == "neighbour":
            by_neighbour[node.name] = node.part
    total = run.total_s
    top = sorted(by_op.items(), key=lambda kv: -kv[1])[:5]
    roofline = None
    if flops and arithmetic_s > 0:
        achieved = flops / arithmetic_s / 1e12
        roofline = {"gflop": flops / 1e9, "tflops": achieved}
        if peak:
            roofline.update(peak_tflops=peak["tflops"], peak_how=peak["how"], of_peak=achieved / peak["tflops"],
                            floor_s=flops / peak["tflops"] / 1e12)
    return {
        "total_s": total, "wall_s": run.wall_s,
        "parts_s": parts, "parts_share": {p: s / total for p, s in parts.items()},
        "ops_by_part_s": {p: dict(sorted(ops.items(), key=lambda kv: -kv[1])) for p, ops in ops_by_part.items()},
        "unmapped_names": unmapped_names,
        "by_neighbour": by_neighbour,
        "by_neighbour_s": sum(n.seconds for n in run.nodes if n.how == "neighbour"),
        "unmapped_by_op": {op: {"nodes": len(s), "s": sum(s)}
                           for op, s in sorted(unmapped.items(), key=lambda kv: -sum(kv[1]))},
        "arithmetic_s": arithmetic_s, "arithmetic_share": arithmetic_s / total,
        "non_arithmetic_share": 1 - arithmetic_s / total,
        "top_non_arithmetic": [{"op": op, "s": s, "share": s / total} for op, s in top],
        "roofline": roofline,
    }


def profile(engine_dirs: Sequence[Path], *, eager: bool = False, height: int = 800, width: int = 1344,
            runs: int = 3, threads: int | None = None, onnx: Path | None = None,
            peak_size: int = 4096) -> dict[str, Any]:
    """Profile each engine (and with ``eager`` the first engine's eager model) on one synthetic photo.

    Returns the report ``--json`` writes: ``cpu``, ``input_shape`` ``[B,3,H,W]``, ``runs``, ``peaks``
    (per precision: ``tflops``, ``how``), ``flops`` (conv/FC FLOPs of the graph at this input and
    where they were counted), and ``engines``: per engine ``name``, ``kind``, ``precision`` and
    :func:`summarise` of its median run (seconds; shares of the profiled total).

    Raises:
        ProfileError: no engine, or a backend without a profiler here.
        scripts.tools.perf.PerfError: an input size an engine cannot run.
        service.manifest.ManifestError: a folder that is not an engine artifact.
    """
    if not engine_dirs:
        raise ProfileError("give at least one engine folder (--engines); --eager profiles the first one's eager model")
    if runs < 1:
        raise ProfileError(f"--runs must be >= 1, got {runs}")
    manifests = {d: Manifest.load(d) for d in engine_dirs}
    first = manifests[engine_dirs[0]]
    hw = input_hw_for(first, height, width)
    images, sizes = synthetic_batch(first.input.spec, batch_size_for(first, None), hw, first.shape_profile.min_hw)
    with tempfile.TemporaryDirectory(prefix="maskrcnn-profile-") as tmp:
        profilers: dict[str, Any] = {}
        precisions: dict[str, str] = {}
        # each graph is fed the inputs it names (artifacts built before the mask selection take two)
        feeds: dict[str, dict[str, np.ndarray]] = {}
        for d, manifest in manifests.items():
            input_hw_for(manifest, *hw)
            name = f"{manifest.backend} {manifest.precision} ({d})"
            profilers[name] = _profiler(d, manifest, threads, Path(tmp))
            precisions[name] = manifest.precision
            feeds[name] = input_feed(images, sizes, names=manifest.input.names)
        if eager:
            profilers["eager"] = EagerProfiler(first, threads)
            precisions["eager"] = "fp32"
            feeds["eager"] = input_feed(images, sizes, names=first.input.names)
        time_calls({n: (lambda p=p, f=feeds[n]: p(f)) for n, p in profilers.items()}, runs, warmup=1, alternate=True)
        peaks = matmul_peaks(peak_size, precisions.values())
        medians = {n: _median_run(p.runs()[1:]) for n, p in profilers.items()}
        flop_source = next((n for n in sorted(profilers, key=lambda n: precisions[n] != "fp32")
                            if profilers[n].kind == "onnxruntime"), None)
        flop_nodes = medians[flop_source].flops if flop_source else {}
        if flop_source is None and onnx is not None:
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = threads or 0
            counter = OnnxRuntimeProfiler(Path(onnx), options, ["CPUExecutionProvider"], Path(tmp))
            counter(input_feed(images, sizes, names=[i.name for i in counter.session.get_inputs()]))
            flop_source, flop_nodes = f"onnxruntime fp32 ({onnx})", counter.runs()[0].flops
    flops = sum(flop_nodes.values()) or None
    report_engines = []
    for n, p in profilers.items():
        summary = summarise(medians[n], flops, peaks.get(precisions[n]))
        report_engines.append({"name": n, "kind": p.kind, "precision": precisions[n], **summary})
    return {
        "cpu": describe_cpu(cpu_facts()), "input_shape": list(images.shape), "runs": runs, "threads": threads,
        "peaks": peaks,
        "flops": {"total": flops, "counted_on": flop_source, "nodes": flop_nodes},
        "engines": report_engines,
    }


def _profiler(engine_dir: Path, manifest: Manifest, threads: int | None, trace_dir: Path) -> Any:
    kinds = {"onnxruntime": OnnxRuntimeProfiler.of_engine, "openvino": OpenVinoProfiler}
    if manifest.backend not in kinds:
        raise ProfileError(f"{engine_dir}: no profiler for backend {manifest.backend!r} (profiled: {', '.join(kinds)})")
    return kinds[manifest.backend](engine_dir, manifest, threads, trace_dir)


def _median_run(runs: Sequence[RunProfile]) -> RunProfile:
    """The run whose profiled total is the median (the lower one of an even count)."""
    ordered = sorted(runs, key=lambda r: r.total_s)
    return ordered[(len(ordered) - 1) // 2]


def format_report(report: Mapping[str, Any]) -> str:
    b, _, h, w = report["input_shape"]
    lines = [f"CPU: {report['cpu']}", f"input {b}x3x{h}x{w}; median of {report['runs']} profiled runs per engine, "
             f"engines taking turns"]
    for precision, peak in report["peaks"].items():
        lines.append(f"matmul peak {precision}: {peak['tflops']:.3f} TFLOP/s ({peak['how']})")
    flops = report["flops"]
    if flops["total"]:
        lines.append(f"conv/FC FLOPs at this input: {flops['total'] / 1e9:.1f} GFLOP "
                     f"(shapes from {flops['counted_on']})")
    else:
        lines.append("conv/FC FLOPs: not counted (no ONNX Runtime engine in the run; give --onnx EXPORT/model.onnx)")
    for engine in report["engines"]:
        lines += ["", f"== {engine['name']}", f"{'part':32} {'s':>8} {'share':>7}"]
        for part, label in PARTS.items():
            lines.append(f"{label:32} {engine['parts_s'][part]:8.3f} {engine['parts_share'][part]:7.1%}")
        lines.append(f"{'total (profiler)':32} {engine['total_s']:8.3f} {1:7.1%}   wall {engine['wall_s']:.3f} s")
        if engine["total_s"] > engine["wall_s"] * 1.02:
            overlap = engine["total_s"] / engine["wall_s"]
            lines.append(f"  the node times add up to {overlap:.0%} of the call's wall time: the profiler's node "
                         "intervals overlap (shares are of their sum)")
        if engine["unmapped_by_op"]:
            ops = ", ".join(f"{op} ({u['nodes']}) {u['s'] * 1000:.1f} ms"
                            for op, u in engine["unmapped_by_op"].items())
            lines.append(f"  everything else, by op (nodes): {ops}")
            lines.append(f"  its names: {', '.join(engine['unmapped_names'])}")
        if engine["by_neighbour"]:
            lines.append(f"  runtime-inserted nodes given their neighbours' part: {len(engine['by_neighbour'])}, "
                         f"{engine['by_neighbour_s']:.3f} s (names in --json)")
        roofline = engine["roofline"]
        line = f"conv/FC: {engine['arithmetic_s']:.3f} s ({engine['arithmetic_share']:.1%})"
        if roofline:
            line += f", {roofline['gflop']:.1f} GFLOP -> {roofline['tflops']:.3f} TFLOP/s"
            if "peak_tflops" in roofline:
                line += (f" = {roofline['of_peak']:.1%} of the {engine['precision']} matmul peak "
                         f"{roofline['peak_tflops']:.3f}; all conv/FC FLOPs at peak: {roofline['floor_s']:.3f} s")
        lines.append(line)
        lines.append("top non-conv/matmul ops: " + ", ".join(
            f"{t['op']} {t['s']:.3f} s ({t['share']:.1%})" for t in engine["top_non_arithmetic"]))
    lines += ["", f"{'engine':60} {'total s':>8} {'conv/FC s':>9} {'TFLOP/s':>8} {'of peak':>8} {'non-arith':>9}"]
    for engine in report["engines"]:
        r = engine["roofline"] or {}
        lines.append(f"{engine['name'][:60]:60} {engine['total_s']:8.3f} {engine['arithmetic_s']:9.3f} "
                     f"{r.get('tflops', float('nan')):8.3f} {r.get('of_peak', float('nan')):8.1%} "
                     f"{engine['non_arithmetic_share']:9.1%}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.bench.profile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", type=Path, nargs="+", required=True, help="engine artifact folders")
    parser.add_argument("--eager", action="store_true", help="also profile the first engine's eager PyTorch model")
    parser.add_argument("--height", type=int, default=800, help="input height in pixels (default 800)")
    parser.add_argument("--width", type=int, default=1344, help="input width in pixels (default 1344)")
    parser.add_argument("--runs", type=int, default=3, help="profiled calls per engine after one warm-up (default 3)")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads of every engine and of torch (default: each one's own)")
    parser.add_argument("--onnx", type=Path, default=None,
                        help="ONNX file whose conv/FC FLOPs are counted when no ONNX Runtime engine is profiled")
    parser.add_argument("--peak-size", type=int, default=4096,
                        help="side of the matmul that measures the peak (default 4096)")
    parser.add_argument("--json", type=Path, default=None, help="write the report here")
    args = parser.parse_args(argv)
    try:
        report = profile(args.engines, eager=args.eager, height=args.height, width=args.width, runs=args.runs,
                         threads=args.threads, onnx=args.onnx, peak_size=args.peak_size)
    except (ProfileError, PerfError, ManifestError) as error:
        parser.error(str(error))
    print(format_report(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
