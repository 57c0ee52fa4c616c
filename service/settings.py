"""The service's one settings object: environment variables with the prefix ``MASKRCNN_``.

Validated once at start-up; the CLI (``maskrcnn-serve``) overrides fields from its flags.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.admission import default_budget_bytes
from service.backends import backend_names
from service.backends.base import cpu_cores
from service.manifest import MANIFEST_NAME


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MASKRCNN_", extra="forbid", frozen=True)

    engine_dir: Path | None = Field(
        None, description="Engine artifact folder (holds manifest.json); required unless an engine is injected."
    )
    host: str = Field("127.0.0.1", description="Interface to bind; 0.0.0.0 in containers.")
    port: int = Field(8000, ge=1, le=65535)
    workers: int = Field(1, ge=1, le=64, description="Engine sessions, each driven by its own worker thread.")
    threads: int | None = Field(
        None, ge=1, le=256, description="Intra-op threads per session; default: CPU cores / workers."
    )
    max_batch_size: int = Field(
        4, ge=1, le=256, description="Most images per engine call (a fixed-batch engine uses its own size)."
    )
    # 0: batches form only from images already queued while the engine is busy. Measured on the
    # 2-core CPU (scripts/bench/batch.py, mutable-batch engines): batch 2 and 4 give 0.93-1.04x the
    # throughput of batch 1 for every backend and precision, so waiting to fill a batch buys nothing
    # there and costs latency; raise it on hardware where batching pays (GPUs).
    max_wait_ms: float = Field(0.0, ge=0, le=10_000, description="How long a batch waits to fill after its first image.")
    max_queue_depth: int = Field(16, ge=1, le=100_000, description="Images waiting for an engine; beyond it, 503.")
    request_timeout_ms: float = Field(
        30_000, gt=0, le=3_600_000, description="Default deadline per request (header X-Request-Timeout-Ms overrides)."
    )
    max_bytes: int = Field(20 * 2**20, ge=1024, description="Largest encoded image, in bytes.")
    max_pixels: int = Field(40_000_000, ge=1, description="Largest image, in pixels (width x height), checked before decoding.")
    min_side: int = Field(8, ge=1, description="Smallest accepted image side, in pixels.")
    api_key: SecretStr | None = Field(
        None, description="When set, /predict, /render, /v1/models and the /v2 routes but /v2/health/* need it.")
    decode_jpeg_reduced: bool = Field(
        False,
        description="Decode a JPEG at least twice the engine's input size at 1/2, 1/4 or 1/8 scale (libjpeg DCT "
        "scaling): faster and smaller, slightly different pixels. Off: exact decoding.",
    )
    memory_budget_bytes: int | None = Field(
        None, ge=1 << 20,
        description="Bytes the requests in flight may hold (bodies, decoded pixels, tensors); beyond it, 503. "
        "Default: a quarter of the container's memory limit, 256 MiB to 2 GiB.",
    )
    max_drain_bytes: int = Field(
        256 * 2**20, ge=0,
        description="A request refused before its body is read has up to this much of the body read and dropped, "
        "so clients that send before reading get the error, not a reset.",
    )
    # Slow senders: without these a client that declares a body and sends it slowly, or not at
    # all, keeps its connection and request forever (uvicorn has no body timeout). The defaults
    # pass a real client on a slow link (50 kB/s is a 2 MB photo in 40 s).
    body_idle_timeout_s: float = Field(
        10.0, gt=0, le=3600,
        description="Longest pause while a request body arrives, in seconds; past it, 408 and the connection closed.",
    )
    body_min_rate_bytes_per_s: int = Field(
        50_000, ge=0,
        description="Slowest average rate a request body may arrive at once body_rate_grace_s have passed, in bytes "
        "per second; below it, 408 and the connection closed. 0: no minimum.",
    )
    body_rate_grace_s: float = Field(
        5.0, ge=0, le=3600, description="Seconds a request body may take before the minimum rate applies."
    )
    max_connections: int = Field(
        1000, ge=1,
        description="Open connections this process serves (maskrcnn-serve's uvicorn limit_concurrency); a request "
        "beyond them is answered 503 (too_many_connections, Retry-After) at once and its connection closed. Keep it "
        "below the open-file limit (ulimit -n).",
    )
    engine_timeout_s: float = Field(
        120.0, gt=0, le=3600, description="Longest one engine call may take; past it, 504 and the session is replaced."
    )
    host_nice: int = Field(
        5, ge=0, le=19,
        description="Niceness of the threads that decode, preprocess and postprocess, so that on a small CPU they "
        "yield the cores to the engine's threads; 0: the same priority.",
    )
    grace_period_s: float = Field(30.0, ge=0, le=3600, description="On SIGTERM, time to finish in-flight requests.")
    retry_after_s: int = Field(1, ge=1, le=3600, description="Retry-After of 503 answers, in seconds.")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    model_name: str = Field(
        "maskrcnn", pattern=r"^[A-Za-z0-9_.-]{1,64}$",
        description="The model's name on the KServe v2 routes (/v2/models/NAME/...).",
    )
    grpc_port: int | None = Field(
        None, ge=0, le=65535,
        description="Port of the KServe v2 protocol over gRPC (inference.GRPCInferenceService, Triton's 8001), on "
        "--host, in the same process; 0: any free port; unset: no gRPC.",
    )
    # gRPC's own default receive limit is 4 MiB, below one photo's pixels; ours are set explicitly.
    grpc_max_receive_bytes: int | None = Field(
        None, ge=4 * 2**20,
        description="Largest gRPC request message; default: the REST body limit (max_bytes as base64 plus 64 KiB).",
    )
    grpc_max_send_bytes: int = Field(
        64 * 2**20, ge=4 * 2**20, description="Largest gRPC answer message (the detections of every request image)."
    )
    otlp_endpoint: str | None = Field(
        None, pattern=r"^https?://\S+$",
        description="OpenTelemetry traces of every request go to this OTLP/gRPC collector (e.g. "
        "http://otel-collector:4317); unset: no traces.",
    )
    trace_sampling_ratio: float = Field(
        1.0, ge=0.0, le=1.0,
        description="Share of new traces recorded when traces are on; a caller's traceparent decision is followed.",
    )
    # Backend options: fields named <backend>_<option> reach that backend's load() as options.
    # One worker drives one engine with one infer request, so LATENCY (one stream using all the
    # session's threads) is the default; THROUGHPUT/streams suit several requests per engine.
    openvino_performance_hint: Literal["LATENCY", "THROUGHPUT", "CUMULATIVE_THROUGHPUT"] = Field(
        "LATENCY", description="OpenVINO engines: the CPU plugin's PERFORMANCE_HINT."
    )
    openvino_streams: int | None = Field(
        None, ge=1, le=256, description="OpenVINO engines: NUM_STREAMS; default: what the hint chooses."
    )
    openvino_shape_buckets: str = Field(
        "none", pattern=r"^(opt|none|auto(:\d+)?|\d+x\d+(,\d+x\d+)*)$",
        description="OpenVINO engines of a fixed batch: padded input sizes (HxW, comma-separated) compiled as static "
        "shapes at start-up and served by them; other sizes run on the dynamic-shape model. 'opt': the "
        "manifest's opt_hw and its transpose (800x1344,1344x800 for COCO settings); 'auto' or 'auto:N': learned "
        "while serving, a padded size that has run 3 times on the dynamic model is compiled in the background "
        "(at most N, default 2, while the memory left to the process holds one); 'none': dynamic only. Each "
        "bucket is 6 to 17 percent faster at its size and holds its own memory (about 0.6 GiB each for R50 fp32).",
    )

    @field_validator("engine_dir")
    @classmethod
    def _is_artifact(cls, value: Path | None) -> Path | None:
        if value is not None and not (value / MANIFEST_NAME).is_file():
            raise ValueError(f"{value} is not an engine artifact folder ({MANIFEST_NAME} not found)")
        return value

    @property
    def threads_per_session(self) -> int:
        """Intra-op threads for each engine session: the setting, or the cores shared evenly."""
        return self.threads or max(1, cpu_cores() // self.workers)

    def backend_options(self) -> dict[str, dict[str, Any]]:
        """Per backend, the options of its engines: the ``<backend>_<option>`` fields, prefix removed."""
        return {
            backend: {name[len(backend) + 1:]: getattr(self, name)
                      for name in type(self).model_fields if name.startswith(backend + "_")}
            for backend in backend_names()
        }

    @property
    def memory_budget(self) -> int:
        """The memory budget in bytes: the setting, or the default that follows the container's limit."""
        return self.memory_budget_bytes or default_budget_bytes()

    @property
    def max_body_bytes(self) -> int:
        """Largest request body: an image of max_bytes sent as base64 JSON, plus room for the other fields."""
        return self.max_bytes * 4 // 3 + 64 * 1024

    @property
    def grpc_receive_limit(self) -> int:
        """Largest gRPC request message: the setting, or the REST body limit."""
        return self.grpc_max_receive_bytes or self.max_body_bytes
