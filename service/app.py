"""The FastAPI application: ``create_app(settings, engine=None)`` wires the request path together.

Start-up loads the engine pool (an injected engine makes a pool of one session), starts the
batcher and warms every session up in the background; /readyz turns 200 when that is done. With
``settings.grpc_port`` set, the KServe v2 gRPC service (``service.grpc_server``) runs beside the
HTTP routes in the same event loop, over the same runtime.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from importlib.metadata import version

import numpy as np
from fastapi import FastAPI
from opentelemetry.sdk.trace import TracerProvider
from fastapi_offline import FastAPIOffline
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import grpc_server, kserve, kserve_codec

from service.admission import AdmissionControl, MemoryBudget
from service.backends import Engine
from service.engine_pool import EngineItem, EnginePool
from service.errors import install_error_handlers
from service.metrics import Metrics, RequestCounter
from service.pipeline import Pipeline
from service.preprocess import prepare_image
from service.response import OrjsonResponse
from service.routes import API_KEY_GUARD, DOCS_ASSETS, PAGE_DIR, api, page, probes
from service.runtime import Runtime
from service.settings import Settings
from service.tracing import Tracing

log = logging.getLogger(__name__)
# A photo-sized noise image: warm-up should take the paths real images take (many proposals).
WARM_UP_HW = (480, 640)


def create_app(
    settings: Settings, engine: Engine | None = None, engine_factory: Callable[[], Engine] | None = None,
    tracer_provider: TracerProvider | None = None,
) -> FastAPI:
    """The service app. By default the pool opens ``settings.workers`` sessions on
    ``settings.engine_dir``; ``engine`` (already loaded) makes a pool of that one session, which is
    not replaced if it hangs; ``engine_factory`` opens every session, replacements included.
    Request traces go to ``tracer_provider``, by default to ``settings.otlp_endpoint`` when set
    (``service.tracing``).

    Raises:
        ValueError: none of the three, both injections, or an injected engine with
            ``settings.workers != 1``.
    """
    if engine is None and engine_factory is None and settings.engine_dir is None:
        raise ValueError("settings.engine_dir (MASKRCNN_ENGINE_DIR) is required when no engine is injected")
    if engine is not None and engine_factory is not None:
        raise ValueError("inject an engine or an engine factory, not both")
    if engine is not None and settings.workers != 1:
        raise ValueError(f"an injected engine is one session; settings.workers must be 1, got {settings.workers}")
    metrics = Metrics()
    tracing = Tracing(tracer_provider) if tracer_provider is not None else Tracing.from_settings(settings)

    def open_pool() -> EnginePool:
        options = {"engine_timeout_s": settings.engine_timeout_s,
                   "on_replace": lambda why: metrics.engine_replacements.inc(),
                   "on_call": lambda shape, images: metrics.shape_bucket_images.labels(shape).inc(images)}
        if engine is not None:
            return EnginePool([engine], **options)
        if engine_factory is not None:
            return EnginePool([engine_factory() for _ in range(settings.workers)], factory=engine_factory, **options)
        return EnginePool.load(settings.engine_dir, settings.workers, settings.threads_per_session,
                               settings.backend_options(), **options)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pool = await run_in_threadpool(open_pool)
        pipeline = Pipeline(settings, pool, metrics, tracing)
        _log_engine(pool, pipeline.max_batch_size, settings)
        budget = MemoryBudget(settings.memory_budget, settings.retry_after_s)
        admission = AdmissionControl(settings, budget, pipeline.batcher, lambda: pool.serving, metrics.in_flight,
                                     metrics.slow_clients)
        manifest = pool.manifest
        metrics.queue_depth.set_function(lambda: pipeline.batcher.depth)
        metrics.engine.info({
            "backend": manifest.backend,
            "precision": manifest.precision,
            "origin": manifest.origin,
            "graph_batch": str(pool.batch_size or "mutable"),
            "max_batch_size": str(pipeline.max_batch_size),
            "sessions": str(pool.size),
            "threads_per_session": str(settings.threads_per_session),
            "shape_buckets": ",".join([*(f"{h}x{w}" for h, w in pool.shape_buckets),
                                       *([f"auto:{pool.auto_buckets}"] if pool.auto_buckets else [])]) or "none",
        })
        metrics.memory_in_flight.set_function(lambda: budget.in_use_bytes)
        metrics.memory_budget.set(budget.limit_bytes)
        runtime = Runtime(settings, pipeline, admission, metrics, kserve_codec.model_version(manifest))
        app.state.runtime = runtime
        async with pipeline:
            warm_up = asyncio.create_task(_warm_up(runtime))
            try:
                async with grpc_server.serving(runtime) as grpc_port:
                    app.state.grpc_port = grpc_port  # the bound port (settings.grpc_port 0 picks one), or None
                    yield
            finally:
                admission.not_ready_reason = "the service is shutting down"
                warm_up.cancel()
        pool.close()
        tracing.close()

    # FastAPIOffline: /docs (Swagger UI) and /redoc with their scripts and styles served by the app
    # from the fastapi-offline package, not a CDN, so they work on a machine without internet.
    app = FastAPIOffline(
        static_url=DOCS_ASSETS,
        title="maskrcnn-serve",
        version=version("maskrcnn-serve"),
        description="Mask R-CNN instance segmentation over HTTP; GET /v1/models names the model and its classes.",
        lifespan=lifespan,
        default_response_class=OrjsonResponse,
        # no online spec validator: Swagger UI would otherwise ask validator.swagger.io about our spec
        swagger_ui_parameters={"validatorUrl": None},
    )
    app.state.settings = settings
    install_error_handlers(app)
    app.add_middleware(RequestCounter, count=lambda endpoint, status: metrics.requests.labels(endpoint, str(status), "http").inc())
    app.include_router(api, **(API_KEY_GUARD if settings.api_key is not None else {}))
    app.include_router(probes)
    app.include_router(kserve.api, **(kserve.PROTOCOL_KEY_GUARD if settings.api_key is not None else {}))
    app.include_router(kserve.probes)
    app.include_router(page)
    app.mount("/page", StaticFiles(directory=PAGE_DIR), name="page")
    app.add_middleware(PageHeaders)
    _document_limits(app, settings)
    tracing.instrument(app)
    return app


class PageHeaders:
    """ASGI middleware: the browser page's responses (``/`` and ``/page/...``) carry :data:`PAGE_HEADERS`.

    The page holds an API key field: its scripts and styles come from this server only (none inline),
    nothing it loads comes from elsewhere, and no other site may frame it (clickjacking). Only the
    page: Swagger UI at /docs runs an inline script."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not (scope["path"] == "/" or scope["path"].startswith("/page/")):
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message).update(PAGE_HEADERS)
            await send(message)

        await self.app(scope, receive, send_with_headers)


PAGE_HEADERS = {
    # img-src blob: the page shows the picked file through an object URL
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob:; "
                               "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",  # frame-ancestors for browsers older than CSP 2
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def _log_engine(pool: EnginePool, max_batch_size: int, settings: Settings) -> None:
    """Say at start-up which model is served, and what a newcomer would otherwise find out later."""
    manifest = pool.manifest
    checkpoint = manifest.checkpoint
    weights = (f"random weights (seed {checkpoint.random_init_seed})" if checkpoint.format == "random-init"
               else f"{checkpoint.source or 'an unnamed checkpoint'} ({checkpoint.format})")
    log.info("serving %s %s %s engine of %s: origin %s, %d classes, %d session(s) x %d thread(s)",
             settings.engine_dir or "an injected", manifest.backend, manifest.precision, weights, manifest.origin,
             len(manifest.classes), pool.size, settings.threads_per_session)
    if checkpoint.format == "random-init":
        log.warning("this engine has random weights: its detections mean nothing (scores stay low, so a "
                    "score_threshold of 0.5 returns none); build one from a checkpoint for real answers")
    if max_batch_size < settings.max_batch_size:
        log.info("--max-batch-size %d: this engine takes at most %d image(s) per call (%s), so batches hold %d",
                 settings.max_batch_size, max_batch_size,
                 "a fixed-batch graph" if pool.batch_size else "its mutable batch's max", max_batch_size)


async def _warm_up(runtime: Runtime) -> None:
    """Run one full batch on every session, then declare the runtime ready."""
    noise = np.random.default_rng(0).integers(0, 256, (*WARM_UP_HW, 3), dtype=np.uint8)
    try:
        image = EngineItem(prepare_image(noise, runtime.pool.input_spec))
        started = asyncio.get_running_loop().time()
        await runtime.pool.warm_up(image)
        # seeds the batcher's service-time estimate (deadline-aware admission) with one session's call
        runtime.pipeline.batcher.observe_run((asyncio.get_running_loop().time() - started) / runtime.pool.size)
    except Exception as exc:
        log.exception("engine warm-up failed")
        runtime.admission.not_ready_reason = f"the engine failed its warm-up: {type(exc).__name__}: {exc}"
        return
    runtime.admission.not_ready_reason = None
    log.info("engine warmed up on %d session(s); ready", runtime.pool.size)


def _document_limits(app: FastAPI, settings: Settings) -> None:
    """State this server's image limits in the OpenAPI description of /predict's body."""
    default_openapi = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = default_openapi()
            body = schema["paths"]["/predict"]["post"]["requestBody"]
            body["description"] += (
                f" Each image side must be at least {settings.min_side} pixels; at most {settings.max_pixels} pixels "
                f"and {settings.max_bytes} bytes per image."
            )
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
