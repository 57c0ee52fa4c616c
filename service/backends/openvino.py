"""OpenVINO backend (CPU): runs the IR that ``build_tools/backends/openvino.py`` builds.

Precisions: ``fp32``; ``bf16`` (the fp32 IR compiled with ``INFERENCE_PRECISION_HINT`` bf16, on
CPUs with AVX512_BF16 or AMX); ``int8`` (an NNCF-quantised IR). The artifact's facts name the
inference precision hint to compile with.

Shape buckets: besides the dynamic-shape model, the padded input sizes serving sees most (the
``shape_buckets`` option, e.g. ``opt``: the manifest's opt size and its transpose) are compiled as
static shapes at load time, run once there (first calls allocate), and serve those sizes; any other
size runs on the dynamic model. Measured on an AMX Xeon (2 cores), a static 800x1344 model was
6-17% faster than the dynamic one in fp32, bf16 and int8, and each holds its own memory (R50 fp32:
1.3 GiB RSS after one call at each orientation without buckets, 2.4 GiB with both), so none are
compiled unless asked. ``auto[:N]`` learns them instead: a padded size that has run
``AUTO_AFTER`` times on the dynamic model is compiled as a bucket in a background thread (at most N,
default 2, and only while the memory left to the process, cgroup limits included, holds
``AUTO_MEMORY_FACTOR`` times the weights' size plus ``AUTO_HEADROOM_BYTES``); calls at that size
run dynamic until it is ready. The compilation shares the cores with serving for a few seconds.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from service.backends.base import OUTPUT_NAMES, BackendUnavailable, EngineBase, available_memory_bytes, input_feed
from service.manifest import Manifest

log = logging.getLogger(__name__)

NAME = "openvino"
PRECISIONS = ("fp32", "bf16", "int8")
# One worker drives one engine with one infer request, so LATENCY (one stream using all the
# threads) is the default; the service's OpenVINO settings choose others for other layouts.
DEFAULT_PERFORMANCE_HINT = "LATENCY"


# ``auto`` shape buckets: calls at one padded size on the dynamic model before it is compiled as a
# bucket; how many buckets by default; the memory a bucket may take, as a multiple of the IR's
# weights file (R50 fp32: 0.17 GB of weights, about 0.6 GiB more RSS per bucket) and what must stay
# free beside it.
AUTO_AFTER = 3
AUTO_DEFAULT_MAX = 2
AUTO_MEMORY_FACTOR = 4
AUTO_HEADROOM_BYTES = 512 * 2**20
_AUTO = re.compile(r"^auto(?::(\d+))?$")

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


def auto_buckets(spec: str, manifest: Manifest) -> int:
    """How many buckets a ``shape_buckets`` option of ``auto[:N]`` lets serving compile (N, default
    ``AUTO_DEFAULT_MAX``); 0 for any other option and for a mutable-batch graph."""
    match = _AUTO.match(spec)
    if not match or manifest.batch_size is None:
        return 0
    return int(match[1]) if match[1] else AUTO_DEFAULT_MAX


def shape_buckets(spec: str, manifest: Manifest) -> list[tuple[int, int]]:
    """The ``(H, W)`` sizes of a ``shape_buckets`` option: ``opt`` (the manifest's ``opt_hw`` and its
    transpose), ``none``, or ``HxW,HxW,...``; none for a mutable-batch graph and for ``auto[:N]``
    (compiled while serving, see :func:`auto_buckets`).

    Raises:
        ValueError: a size that is not a multiple of the pad divisor or lies outside the shape profile.
    """
    if spec == "none" or _AUTO.match(spec) or manifest.batch_size is None:
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
        auto_buckets: how many more buckets to compile while serving, for the padded sizes that
            have run ``AUTO_AFTER`` times on the dynamic model (see :func:`auto_buckets`).
        auto_min_free_bytes: the memory left to the process an automatic bucket needs (None: its
            weights file times ``AUTO_MEMORY_FACTOR`` plus ``AUTO_HEADROOM_BYTES``).
    """

    def __init__(self, model_path: Path, manifest: Manifest, threads: int | None = None,
                 performance_hint: str = DEFAULT_PERFORMANCE_HINT, streams: int | None = None,
                 buckets: Sequence[tuple[int, int]] = (), auto_buckets: int = 0,
                 auto_min_free_bytes: int | None = None):
        import openvino as ov

        super().__init__(manifest, threads)
        self._config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": manifest.tools.backend["inference_precision_hint"],
                                        "PERFORMANCE_HINT": performance_hint}
        if threads:
            self._config["INFERENCE_NUM_THREADS"] = threads
        if streams is not None:
            self._config["NUM_STREAMS"] = streams
        self._model_path = model_path
        self._core = ov.Core()
        self.compiled = self._core.compile_model(self._core.read_model(str(model_path)), "CPU", self._config)
        self.outputs = self._graph_outputs(self.compiled, model_path)
        self.request = self.compiled.create_infer_request()
        self._static: dict[tuple[int, int], tuple[Any, list]] = {}
        for hw in buckets:
            self._static[hw] = self._compile_bucket(hw)
        self.auto_buckets = auto_buckets
        if auto_min_free_bytes is None:
            weights = model_path.with_suffix(".bin")
            auto_min_free_bytes = AUTO_MEMORY_FACTOR * (weights.stat().st_size if weights.is_file() else 0) \
                + AUTO_HEADROOM_BYTES
        self._auto_min_free_bytes = auto_min_free_bytes
        self._dynamic_calls: Counter[tuple[int, int]] = Counter()
        self._tried: set[tuple[int, int]] = set()  # automatic buckets started: compiling, compiled or failed
        self._compiling: dict[tuple[int, int], threading.Thread] = {}

    def _compile_bucket(self, hw: tuple[int, int]) -> tuple[Any, list]:
        """A static model of ``hw``, compiled and run once (the first call allocates and tunes)."""
        import openvino as ov

        h, w = hw
        model = self._core.read_model(str(self._model_path))
        feed = input_feed(np.zeros((self.batch_size, 3, h, w), np.float32),
                          np.full((self.batch_size, 2), (h, w)), names=self.manifest.input.names)
        model.reshape({port.get_any_name(): ov.PartialShape(list(feed[port.get_any_name()].shape))
                       for port in model.inputs})
        compiled = self._core.compile_model(model, "CPU", self._config)
        request = compiled.create_infer_request()
        request.infer(feed)
        return request, self._graph_outputs(compiled, self._model_path)

    def _learn(self, hw: tuple[int, int]) -> None:
        """Count a dynamic call at ``hw``; start compiling its bucket once it is due and allowed."""
        if len(self._tried) >= self.auto_buckets or hw in self._tried:
            return  # nothing more to learn: the counter stops growing with the sizes clients send
        self._dynamic_calls[hw] += 1
        if self._dynamic_calls[hw] < AUTO_AFTER:
            return
        free = available_memory_bytes()
        if free is not None and free < self._auto_min_free_bytes:
            log.warning("not compiling a %dx%d shape bucket: %.0f MiB left to the process, %.0f MiB needed; "
                        "automatic buckets stop here", *hw, free / 2**20, self._auto_min_free_bytes / 2**20)
            self.auto_buckets = len(self._tried)
            return
        self._tried.add(hw)
        thread = threading.Thread(target=self._compile_in_background, args=(hw,), daemon=True,
                                  name=f"openvino-bucket-{hw[0]}x{hw[1]}")
        self._compiling[hw] = thread
        thread.start()

    def _compile_in_background(self, hw: tuple[int, int]) -> None:
        start = time.perf_counter()
        try:
            self._static[hw] = self._compile_bucket(hw)
        except Exception:  # the dynamic model keeps serving the size
            log.exception("compiling the %dx%d shape bucket failed; that size stays dynamic", *hw)
        else:
            log.info("shape bucket %dx%d compiled after %d dynamic calls at that size (%.1f s)",
                     *hw, self._dynamic_calls[hw], time.perf_counter() - start)
        finally:
            del self._compiling[hw]

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
        """The padded sizes that run as static shapes now (automatic ones once compiled)."""
        return list(self._static)

    def wait_for_buckets(self, timeout_s: float | None = None) -> None:
        """Wait until no automatic bucket is compiling (a load test's or a test's barrier)."""
        for thread in list(self._compiling.values()):
            thread.join(timeout_s)

    def _run(self, feed: dict[str, np.ndarray]) -> Sequence[np.ndarray]:
        hw = tuple(feed["images"].shape[2:])
        bucket = self._static.get(hw)
        if bucket is None and self.auto_buckets:
            self._learn(hw)
        request, outputs = bucket or (self.request, self.outputs)
        self.last_shape = f"{hw[0]}x{hw[1]}" if bucket else "dynamic"
        # outputs keep the graph's order (the ONNX names do not always survive conversion); copies,
        # as the request reuses its output memory on the next call
        results = request.infer(feed)
        return [np.array(results[port]) for port in outputs]


def load(artifact_dir: Path, manifest: Manifest, threads: int | None = None,
         options: Mapping[str, Any] | None = None) -> OpenVinoEngine:
    """Open the IR for the CPU plugin; ``options``: ``performance_hint``, ``streams`` and
    ``shape_buckets`` (see :class:`OpenVinoEngine`, :func:`shape_buckets`, :func:`auto_buckets`;
    without the option, dynamic shapes only), the service's OpenVINO settings."""
    options = options or {}
    spec = options.get("shape_buckets") or "none"
    return OpenVinoEngine(Path(artifact_dir) / manifest.model_file, manifest, threads,
                          performance_hint=options.get("performance_hint") or DEFAULT_PERFORMANCE_HINT,
                          streams=options.get("streams"),
                          buckets=shape_buckets(spec, manifest), auto_buckets=auto_buckets(spec, manifest))
