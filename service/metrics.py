"""Prometheus metrics of one app instance (own registry, so several apps can live in one process).

Besides the service's own series the registry carries prometheus_client's process collector
(``process_resident_memory_bytes``, CPU seconds, open file descriptors: what the load test and
dashboards read, also from inside a container or behind a load balancer) and platform collector
(``python_info``).
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from starlette.routing import Match, Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.stages import STAGES, StageSeconds

# Seconds: from sub-millisecond host stages to multi-second CPU inference.
STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128, 256)


class Metrics:
    """The service's metrics; ``render()`` is the /metrics body."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.requests = Counter(
            "maskrcnn_requests",
            "Requests by endpoint (HTTP route or gRPC method), status code (for gRPC, the HTTP status of the same "
            "error: 200 for OK) and protocol (http, grpc)", ["endpoint", "status", "protocol"],
            registry=self.registry,
        )
        self.stage_seconds = Histogram(
            "maskrcnn_stage_seconds",
            f"Latency of /predict per stage ({', '.join(STAGES)})",
            ["stage"], buckets=STAGE_BUCKETS, registry=self.registry,
        )
        self.batch_size = Histogram(
            "maskrcnn_batch_size", "Images per engine call", buckets=BATCH_BUCKETS, registry=self.registry
        )
        self.queue_depth = Gauge("maskrcnn_queue_depth", "Images waiting for an engine session", registry=self.registry)
        self.in_flight = Gauge("maskrcnn_requests_in_flight", "/predict requests being handled", registry=self.registry)
        self.engine = Info("maskrcnn_engine", "The loaded engine and how it is served", registry=self.registry)
        self.memory_in_flight = Gauge(
            "maskrcnn_memory_in_flight_bytes", "Bytes the requests being handled hold (bodies, pixels, tensors)",
            registry=self.registry,
        )
        self.memory_budget = Gauge(
            "maskrcnn_memory_budget_bytes", "The memory budget of the requests in flight", registry=self.registry
        )
        self.engine_replacements = Counter(
            "maskrcnn_engine_replacements", "Engine sessions opened to replace one that hung", registry=self.registry
        )
        self.shape_bucket_images = Counter(
            "maskrcnn_shape_bucket_images",
            "Images per compiled input shape that ran them: a static shape bucket (HxW) or the dynamic-shape fallback",
            ["bucket"], registry=self.registry,
        )
        self.worker_restarts = Counter(
            "maskrcnn_worker_restarts", "Batcher workers restarted after ending unexpectedly", registry=self.registry
        )
        self.slow_clients = Counter(
            "maskrcnn_slow_clients",
            "Requests answered 408 because their body paused too long (idle), arrived below the minimum rate (rate) "
            "or was still arriving at the request's deadline (deadline)", ["reason"], registry=self.registry,
        )

    def observe_stages(self, seconds: StageSeconds) -> None:
        for stage, value in seconds.items():
            self.stage_seconds.labels(stage).observe(value)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def route_template(scope: Scope, request: Scope) -> str:
    """The template of the route that served ``request`` (the scope as it arrived): FastAPI's routes
    record themselves in ``scope``; Starlette's own routes and mounts (``/openapi.json``, the docs'
    and page's static files, ``/page/{path}``) are found again by matching; "unmatched" for none (404)."""
    route = scope.get("route")
    if route is not None:
        return route.path
    for candidate in getattr(getattr(scope.get("app"), "router", None), "routes", ()):
        # FastAPI's included routers carry no path: their routes set scope["route"] themselves
        if hasattr(candidate, "path") and candidate.matches(request)[0] is Match.FULL:
            return candidate.path + ("/{path}" if isinstance(candidate, Mount) else "")
    return "unmatched"


class RequestCounter:
    """ASGI middleware counting every HTTP request by route template and final status code."""

    def __init__(self, app: ASGIApp, count: Callable[[str, int], None]) -> None:
        self.app = app
        self.count = count

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # an exception escaping the app becomes a 500 upstream
        # the routing fields as they arrive: routing rewrites root_path inside a mount
        request = {key: scope[key] for key in ("type", "path", "method") if key in scope}
        request["root_path"] = scope.get("root_path", "")

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            self.count(route_template(scope, request), status)
