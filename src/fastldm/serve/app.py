"""`create_app(settings)`: the FastAPI application of `fastldm serve`, with all of its state in one `ServeContext`
(no module globals), so tests can run several apps in one process.

The app talks to its scheduler through the methods of scheduler.Scheduler that the routers call (submit, check,
cancel, interrupt, skip, current, eta, queued, running, load, loaded, model_hashes, close, and its `catalog` and
`metrics`). By default that is a Scheduler in this process; `fastldm serve --ray` passes a RemoteScheduler
(remote_scheduler.py), whose jobs run in model workers elsewhere (ray_app.py).

Routes: the page at / (static files under /static), the A1111 API under /sdapi/v1 (a1111.py), the OpenAI images
API under /v1 (openai_api.py), the async jobs API under /fastldm/v1 (jobs_api.py), /healthz, /metrics, and the
OpenAPI docs at /docs.

Errors. A user-fixable error (fastldm.errors: a bad field, an unknown model, a full queue) is answered with its
`http_status` and a JSON reason, and the server goes on; anything else is a 500 with a JSON body, logged with its
traceback. Bodies are shaped as each API's clients expect: A1111 `{"error", "detail", "body", "errors"}`,
everything else OpenAI's `{"error": {"message", "type", "param", "code"}}`; `param` names the field as that API
calls it (`cfg_scale` for A1111, `size` for OpenAI's width and height). A full queue adds `Retry-After`, a
missing API key `WWW-Authenticate: Basic`. Request bodies are capped (`max_body_bytes`, security.py): 413.
"""
from __future__ import annotations

import logging
import re
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from .. import __version__
from ..errors import FastLDMError, QueueFull, RequestError, Unauthorized
from .catalog import ModelCatalog
from .jobs import JobStore
from .metrics import Metrics
from .scheduler import Scheduler
from .security import BodyLimit, require_key
from .settings import Settings

log = logging.getLogger("fastldm.serve")
WEB = Path(__file__).resolve().parent.parent / "assets" / "web"


@dataclass
class ServeContext:
    """One server's state: what the routers and the scheduler share."""
    settings: Settings
    catalog: ModelCatalog
    metrics: Metrics
    scheduler: Scheduler      # or a RemoteScheduler
    store: JobStore
    a1111_model: str          # A1111's current model (POST /sdapi/v1/options sd_model_checkpoint)


class Health(BaseModel):
    status: str
    version: str
    models_loaded: list[str]
    queued: int
    running: int


def create_app(settings: Settings | None = None, load: Callable | None = None, scheduler=None) -> FastAPI:
    """The server's app (default settings: Settings()). `load(path, device=, dtype=)` loads a listed model
    (default `fastldm.load`); `scheduler`: the jobs' scheduler (default: a Scheduler in this process, with `load`),
    whose catalog and metrics the app shares."""
    settings = settings or Settings()
    from . import a1111, jobs_api, openai_api
    from ..api import load as load_model

    if scheduler is None:
        scheduler = Scheduler(settings, ModelCatalog(settings.model, settings.models_dir), Metrics(),
                              load or load_model)
    catalog, metrics = scheduler.catalog, scheduler.metrics
    ctx = ServeContext(settings, catalog, metrics, scheduler, JobStore(settings.result_ttl_s, settings.result_count),
                       catalog.default.name)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await run_in_threadpool(scheduler.load, None)   # load the default model now
        log.info("fastldm %s: serving %s", __version__, catalog.default.name)
        yield
        await run_in_threadpool(scheduler.close)

    app = FastAPI(title="fastldm", version=__version__, lifespan=lifespan,
                  description="Latent diffusion server: A1111 and OpenAI compatible APIs, async jobs with "
                              "server-sent events, step-level batching of concurrent requests.")
    app.state.fastldm = ctx
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["*"],
                           allow_headers=["*"], expose_headers=["Retry-After"], max_age=600)
    _error_handlers(app, ctx)

    key = [Depends(require_key(settings.api_key))]
    app.include_router(a1111.router(ctx), prefix="/sdapi/v1", dependencies=key, tags=["A1111"])
    app.include_router(openai_api.router(ctx), prefix="/v1", dependencies=key, tags=["OpenAI"])
    app.include_router(jobs_api.router(ctx), prefix="/fastldm/v1", dependencies=key, tags=["jobs"])

    @app.get("/healthz", response_model=Health, tags=["server"])
    def healthz() -> Health:
        return Health(status="ok", version=__version__, models_loaded=scheduler.loaded(),
                      queued=len(scheduler.queued()), running=len(scheduler.running()))

    @app.get("/metrics", dependencies=key, tags=["server"], response_class=Response)
    def prometheus() -> Response:
        return Response(metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(WEB / "index.html", media_type="text/html; charset=utf-8")

    app.mount("/static", StaticFiles(directory=WEB), name="static")
    return app


# ---- errors ---------------------------------------------------------------------------------------------------

_OPENAI_TYPE = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error", 499: "cancelled",
                503: "service_unavailable"}
_A1111_FIELDS = {"guidance": "cfg_scale", "strength": "denoising_strength", "n": "batch_size",
                 "init_image": "init_images", "sampler": "sampler_name"}
_OPENAI_FIELDS = {"width": "size", "height": "size", "init_image": "image"}


def _error_handlers(app: FastAPI, ctx: ServeContext) -> None:
    @app.exception_handler(FastLDMError)
    async def user_error(request: Request, e: FastLDMError) -> JSONResponse:
        headers = {}
        if isinstance(e, QueueFull):
            headers["Retry-After"] = str(e.retry_after)
        if isinstance(e, Unauthorized):
            headers["WWW-Authenticate"] = 'Basic realm="fastldm", charset="UTF-8"'
        param, message = None, str(e).splitlines()[0]
        if isinstance(e, RequestError):
            param = _api_field(request, e.field)
            message = f"{param}={e.value!r} is not valid: {e.allowed}"
        return _error(request, ctx, e.http_status, type(e).__name__, message, param, headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        problems = [f"{'.'.join(str(p) for p in err['loc'] if p != 'body') or 'body'}: {err['msg']}"
                    for err in e.errors()]
        first = e.errors()[0]["loc"] if e.errors() else ()
        param = next((str(p) for p in first if p != "body"), None)
        return _error(request, ctx, 422, "RequestValidationError", "; ".join(problems), param)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        message = str(e.detail)
        if e.status_code == 413:
            message = f"the request body is larger than this server accepts ({ctx.settings.max_body_bytes} bytes)"
        return _error(request, ctx, e.status_code, "HTTPError", message, None, dict(e.headers or {}))

    @app.exception_handler(Exception)
    async def bug(request: Request, e: Exception) -> JSONResponse:
        log.error("%s %s failed", request.method, request.url.path, exc_info=e)
        return _error(request, ctx, 500, type(e).__name__, f"internal error: {type(e).__name__}: {e}", None)


def _api_field(request: Request, field: str) -> str:
    path = request.url.path
    table = _A1111_FIELDS if path.startswith("/sdapi/") else _OPENAI_FIELDS if path.startswith("/v1/") else {}
    return table.get(field, field)


def _error(request: Request, ctx: ServeContext, status: int, kind: str, message: str, param: str | None,
           headers: dict | None = None) -> JSONResponse:
    ctx.metrics.errors.labels(str(status)).inc()
    if request.url.path.startswith("/sdapi/"):
        body = {"error": kind, "detail": message, "body": "", "errors": message}
    else:
        body = {"error": {"message": message, "param": param, "code": _snake(kind),
                          "type": _OPENAI_TYPE.get(status, "invalid_request_error" if status < 500 else "server_error")}}
    return JSONResponse(body, status_code=status, headers=headers)


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()
