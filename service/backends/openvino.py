"""OpenVINO backend (CPU): runs the IR that ``build_tools/backends/openvino.py`` builds.

Precisions: ``fp32``; ``bf16`` (the fp32 IR compiled with ``INFERENCE_PRECISION_HINT`` bf16, on
CPUs with AVX512_BF16 or AMX); ``int8`` (an NNCF-quantised IR). The artifact's facts name the
inference precision hint to compile with.

Shape buckets: besides the dynamic-shape model, the padded input sizes serving sees most (the
``shape_buckets`` option, e.g. ``opt``: the manifest's opt size and its transpose) are compiled as
static shapes at load time, run once there (first calls allocate), and serve those sizes; any other
size runs on the dynamic model. Measured on an AMX Xeon (2 cores), a static 800x1344 model was
7-9% faster than the dynamic one in fp32, bf16 and int8, and each holds its own memory (R50 fp32:
1.3 GiB RSS after one call at each orientation without buckets, 2.4 GiB with both), so none are
compiled unless asked.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from service.backends.base import OUTPUT_NAMES, BackendUnavailable, EngineBase, input_feed
from service.manifest import Manifest

NAME = "openvino"
PRECISIONS = ("fp32", "bf16", "int8")
# One worker drives one engine with one infer request, so LATENCY (one stream using all the
# threads) is the default; the service's OpenVINO settings choose others for other layouts.
DEFAULT_PERFORMANCE_HINT = "LATENCY"


# Names of the extra outputs a bf16 build adds (build_tools/backends/openvino.py).
PRECISION_ANCHOR_PREFIX = "precision_anchor_"


def available() -> tuple[bool, str]:
    try:
        import openvino  # noqa: F401
    except ImportError as exc:
        return False, f"openvino is not installed ({exc}); pip install openvino"
    return True, ""


def cpu_capabilities() -> list[str]:
    """The CPU plugin's ``OPTIMIZATION_CAPABILITIES`` here (e.g. ``FP32``, ``BF16``, ``INT8``)."""
    import openvino as ov

    return list(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def shape_buckets(spec: str, manifest: Manifest) -> list[tuple[int, int]]:
    """The ``(H, W)`` sizes of a ``shape_buckets`` option: ``opt`` (the manifest's ``opt_hw`` and its
    transpose), ``none``, or ``HxW,HxW,...``; none for a mutable-batch graph.

    Raises:
        ValueError: a size that is not a multiple of the pad divisor or lies outside the shape profile.
    """
    if spec == "none" or manifest.batch_size is None:
        return []
    profile = manifest.shape_profile
    if spec == "opt":
        h, w = profile.opt_hw
        sizes = [(h, w), (w, h)]
    else:
        sizes = [(int(h), int(w)) for h, w in re.findall(r"(\d+)x(\d+)", spec)]
    divisor = manifest.input.pad_divisor
    for h, w in sizes:
        inside = all(lo <= v <= hi for v, lo, hi in zip((h, w), profile.min_hw, profile.max_hw))
        if h % divisor or w % divisor or not inside:
            raise ValueError(f"shape bucket {h}x{w} must be a multiple of {divisor} within the engine's profile "
                             f"{profile.min_hw[0]}x{profile.min_hw[1]}..{profile.max_hw[0]}x{profile.max_hw[1]}")
    return list(dict.fromkeys(sizes))


class OpenVinoEngine(EngineBase):
    """A compiled dynamic-shape model, one static model per shape bucket, one infer request each;
    one worker drives it.

    Args:
        threads: ``INFERENCE_NUM_THREADS`` (None: OpenVINO's default, all cores).
        performance_hint: ``LATENCY``, ``THROUGHPUT`` or ``CUMULATIVE_THROUGHPUT``.
        streams: ``NUM_STREAMS`` (None: what the hint implies).
        buckets: padded ``(H, W)`` sizes to compile as static shapes (see :func:`shape_buckets`).
    """

    def __init__(self, model_path: Path, manifest: Manifest, threads: int | None = None,
                 performance_hint: str = DEFAULT_PERFORMANCE_HINT, streams: int | None = None,
                 buckets: Sequence[tuple[int, int]] = ()):
        import openvino as ov

        super().__init__(manifest, threads)
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": manifest.tools.backend["inference_precision_hint"],
                                  "PERFORMANCE_HINT": performance_hint}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        if streams is not None:
            config["NUM_STREAMS"] = streams
        core = ov.Core()
        self.compiled = core.compile_model(core.read_model(str(model_path)), "CPU", config)
        self.outputs = self._graph_outputs(self.compiled, model_path)
        self.request = self.compiled.create_infer_request()
        self._static: dict[tuple[int, int], tuple[Any, list]] = {}
        for h, w in buckets:
            model = core.read_model(str(model_path))
            feed = input_feed(np.zeros((self.batch_size, 3, h, w), np.float32),
                              np.full((self.batch_size, 2), (h, w)), names=manifest.input.names)
            model.reshape({port.get_any_name(): ov.PartialShape(list(feed[port.get_any_name()].shape))
                           for port in model.inputs})
            compiled = core.compile_model(model, "CPU", config)
            request = compiled.create_infer_request()
            request.infer(feed)  # the first call allocates and tunes: at load, not on a request
            self._static[(h, w)] = (request, self._graph_outputs(compiled, model_path))

    @staticmethod
    def _graph_outputs(compiled: Any, model_path: Path) -> list:
        # The graph's outputs come first; a bf16 build appends one-element precision anchors
        # (``PRECISION_ANCHOR_PREFIX``) that keep the RoI coordinates in fp32, read by nobody.
        outputs = list(compiled.outputs[:len(OUTPUT_NAMES)])
        extra = [port.get_any_name() for port in compiled.outputs[len(OUTPUT_NAMES):]]
        if len(outputs) != len(OUTPUT_NAMES) or not all(n.startswith(PRECISION_ANCHOR_PREFIX) for n in extra):
            raise BackendUnavailable(f"{model_path} has outputs {[p.get_any_name() for p in compiled.outputs]}, "
                                     f"expected {len(OUTPUT_NAMES)} ({', '.join(OUTPUT_NAMES)}) and precision anchors")
        return outputs

    @property
    def shape_buckets(self) -> list[tuple[int, int]]:
        return list(self._static)

    def _run(self, feed: dict[str, np.ndarray]) -> Sequence[np.ndarray]:
        hw = tuple(feed["images"].shape[2:])
        request, outputs = self._static.get(hw, (self.request, self.outputs))
        self.last_shape = f"{hw[0]}x{hw[1]}" if hw in self._static else "dynamic"
        # outputs keep the graph's order (the ONNX names do not always survive conversion); copies,
        # as the request reuses its output memory on the next call
        results = request.infer(feed)
        return [np.array(results[port]) for port in outputs]


def load(artifact_dir: Path, manifest: Manifest, threads: int | None = None,
         options: Mapping[str, Any] | None = None) -> OpenVinoEngine:
    """Open the IR for the CPU plugin; ``options``: ``performance_hint``, ``streams`` and
    ``shape_buckets`` (see :class:`OpenVinoEngine`, :func:`shape_buckets`; without the option,
    dynamic shapes only), the service's OpenVINO settings."""
    options = options or {}
    return OpenVinoEngine(Path(artifact_dir) / manifest.model_file, manifest, threads,
                          performance_hint=options.get("performance_hint") or DEFAULT_PERFORMANCE_HINT,
                          streams=options.get("streams"),
                          buckets=shape_buckets(options.get("shape_buckets") or "none", manifest))
