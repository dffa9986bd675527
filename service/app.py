"""The app factory. `create_app(settings)` builds a FastAPI app whose lifespan owns all state:

startup   load the model (unless the caller already did), start the batcher, warm up in the
          background (/healthz answers at once, /readyz only once warm);
shutdown  (uvicorn has stopped accepting and let in-flight requests finish) refuse new work,
          run whatever is still queued, stop the threads.

API docs: Swagger UI at /docs and the schema at /openapi.json, served from files installed with
fastapi-offline, so they work without internet (FastAPI's own /docs loads from a CDN).
"""

import asyncio
import contextlib
import logging

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from model import Enhancer, __version__, load_model

from . import errors, job_routes, logs, page, routes, security
from .metrics import Metrics
from .middleware import ServiceMiddleware
from .runtime import Runtime
from .settings import Settings
from .shared_jobs import SharedJobs

log = logging.getLogger("sgz.service")

DESCRIPTION = """Brightens dark photos with SGZ (EFE + RIE), with dynamic micro-batching.

Send an image to `POST /enhance` (multipart field `image`, or the raw body with its
Content-Type); fetch its factor map later from `GET /factor/{X-Factor-ID}`. Videos go to
`POST /jobs` and are enhanced in the background (`GET /jobs/{id}`, `/jobs/{id}/result`).
Errors are JSON `{"error", "detail"}`. When `SGZ_API_KEY` is set, every endpoint but
`/healthz` and `/readyz` needs `X-API-Key: KEY` or `Authorization: Bearer KEY`."""


def create_app(settings: Settings | None = None, *, enhancer: Enhancer | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        model = enhancer
        if model is None:
            model = await asyncio.to_thread(load_model, settings.checkpoint, device=settings.device)
        logs.startup(settings, model)
        runtime = Runtime(settings, model, metrics)
        app.state.runtime = runtime
        # the job routes' view: this replica's jobs, with SGZ_REDIS_URL every replica's
        app.state.jobs = SharedJobs.open(settings, runtime.jobs, metrics.registry)
        runtime.start()
        app.state.jobs.start()
        warm_up = asyncio.create_task(runtime.warm_up())
        try:
            yield
        finally:
            log.info(
                "shutting down: finishing %d queued images",
                runtime.batcher.depth,
                extra={"event": "shutdown", "queued": runtime.batcher.depth},
            )
            await runtime.close()
            if not warm_up.done():
                warm_up.cancel()
            with contextlib.suppress(BaseException):
                await warm_up
            await runtime.factors.close()
            await app.state.jobs.close()  # after the jobs: their records go with their files
            log.info("stopped", extra={"event": "stopped"})

    app = FastAPIOffline(
        title="sgz-serve",
        version=__version__,
        description=DESCRIPTION,
        redoc_url=None,
        lifespan=lifespan,
        swagger_ui_parameters={"validatorUrl": None},
    )  # no call-out either
    app.state.settings = settings
    app.state.metrics = metrics
    errors.install(app, settings.retry_after_s)
    app.include_router(routes.router)
    app.include_router(job_routes.router)
    api_key = settings.api_key.get_secret_value() if settings.api_key else None
    # the routes to name requests by in metrics: the app's own (docs) and ours
    named = [r for r in app.router.routes if isinstance(getattr(r, "path", None), str)]
    ours = [*routes.router.routes, *job_routes.router.routes]
    app.add_middleware(
        ServiceMiddleware,
        metrics=metrics,
        routes=named + ours,
        api_key=api_key,
        log_requests=settings.log_format == "json",
    )
    page.install(app)  # / and /static/: public, outside the key check, inside security
    security.install(app, settings)  # outside ServiceMiddleware: headers on its 401s too
    return app
