"""The FastAPI application of one node: OpenAI + Ollama routes, /health, /ready, /metrics.

All state lives in the app (app.state.scheduler); two apps in one process share nothing.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response

from rkllm_runtime.api import embeddings, ollama, ollama_admin, openai, responses
from rkllm_runtime.api.documented import RESPONSE_SHAPES, DocumentedApp
from rkllm_runtime.api.errors import EXCEPTION_HANDLERS, CatchAllMiddleware
from rkllm_runtime.api.node_shapes import NodeHealth, NodeReadiness
from rkllm_runtime.config import ServerConfig
from rkllm_runtime.engine import Engine, ModelParams
from rkllm_runtime.errors import RkllmError
from rkllm_runtime.library import load_library
from rkllm_runtime.metrics import CONTENT_TYPE, Metrics
from rkllm_runtime.registry import EngineFactory, ModelUnavailableError
from rkllm_runtime.scheduler import Scheduler
from rkllm_runtime.watchdog import RuntimeWatchdog, SystemdNotifier

log = logging.getLogger(__name__)


def library_engine_factory(library_path: str) -> EngineFactory:
    library = load_library(library_path)

    def create(params: ModelParams) -> Engine:
        return Engine(library, params)

    return create


def create_app(config: ServerConfig, engine_factory: EngineFactory | None = None) -> FastAPI:
    scheduler = Scheduler(config, engine_factory or library_engine_factory(config.library), Metrics(config))
    watchdog = RuntimeWatchdog(scheduler, SystemdNotifier(os.environ))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # Started first: systemd's watchdog counts from the service's start, model loading included.
        watching = asyncio.create_task(watchdog.run())
        try:
            await scheduler.load_pinned()
        except (ModelUnavailableError, RkllmError) as exc:
            log.error("a pinned model failed to load (/ready will say so and retry): %s", exc)
        yield
        watching.cancel()
        await scheduler.close()

    app = DocumentedApp(
        title="rkllm-runtime",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        # Request bodies: rkllm_runtime/api/body.py json_body; answers: rkllm_runtime/api/documented.py.
        openapi_url="/openapi.json",
        exception_handlers=EXCEPTION_HANDLERS,  # type: ignore[arg-type]
    )
    # The failing request's model is unknown here; the error-ratio alert only sums per board.
    app.add_middleware(CatchAllMiddleware, on_error=scheduler.metrics.rejected.labels("", "internal").inc)
    app.state.scheduler = scheduler
    app.state.watchdog = watchdog
    app.include_router(openai.router)
    app.include_router(responses.router)
    app.include_router(ollama.router)
    app.include_router(embeddings.router)
    app.include_router(ollama_admin.router)
    app.include_router(ollama_admin.root_router)

    @app.get("/health", response_model=None, responses=RESPONSE_SHAPES.answer(NodeHealth))
    async def health() -> NodeHealth:
        return {"status": "alive"}

    @app.get("/ready", response_model=None, responses=RESPONSE_SHAPES.answer(NodeReadiness))
    async def ready() -> JSONResponse:
        """Every pinned (and every loaded) model's handles answer without a conversation's cache being
        touched (Scheduler.probe); failures re-init."""
        names = {m.name for m in config.models if m.pinned} | {m.name for m in scheduler.loaded_models()}
        problems = {name: await scheduler.probe(name) for name in sorted(names)}
        failed = {name: problem for name, problem in problems.items() if problem}
        body: NodeReadiness = {
            "status": "not ready" if failed else "draining" if scheduler.draining() else "ready",
            "models": {name: problem or "ok" for name, problem in problems.items()},
        }
        return JSONResponse(body, status_code=200 if body["status"] == "ready" else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(scheduler.metrics.render(), media_type=CONTENT_TYPE)

    return app
