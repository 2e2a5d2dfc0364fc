"""FastAPI app: OpenAI-compatible completions and chat completions, models, health, metrics.

The pieces live beside this file: the edge checks (middleware.py), the error shape and its
handlers (errors.py), the state shared by the endpoints (context.py), the endpoints
(routes.py) and the response bodies and SSE streams (responses.py). Validation at the edge
(pydantic, SamplingParams) and in the engine (prompt too long, token ids) gives 400 for that
request only; the engine keeps serving the others.
"""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI

from novainfer.server.context import ServerContext, ServerSettings
from novainfer.server.engine_client import EngineClient
from novainfer.server.errors import install_error_handlers
from novainfer.server.metrics import Metrics
from novainfer.server.middleware import EdgeMiddleware
from novainfer.server.routes import router

__all__ = ["ServerSettings", "build_app"]


def build_app(engine: EngineClient, settings: ServerSettings, metrics: Metrics) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="novainfer", version="0.1.0", lifespan=lifespan)
    app.state.ctx = ServerContext(engine, settings, metrics)
    app.add_middleware(EdgeMiddleware, settings=settings, metrics=metrics)
    install_error_handlers(app, metrics)
    app.include_router(router)
    return app
