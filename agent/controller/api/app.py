"""The controller's FastAPI application: one router per seed, the seeds'
envelope for every answer, bearer tokens, OpenAPI at /openapi.json and
/docs."""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI

from agent import __version__
from agent.controller.agents import AgentClients
from agent.controller.api import (
    backuppoints,
    backups,
    checkpoints,
    envelope,
    exports,
    health,
    hosts,
    jobs,
    members,
    notifications,
    operation_logs,
    policies,
    pools,
    shapes,
    status,
    vaults,
    volumes,
    zstack,
)
from agent.controller.config import ControllerConfig
from agent.controller.context import ControllerContext
from agent.controller.db import Database
from agent.controller.dispatch import Dispatcher
from agent.controller.metrics import ControllerMetrics
from agent.controller.notify import Notifier
from agent.controller.scheduler import Scheduler
from agent.controller.secrets import SecretBox


def create_app(cfg: ControllerConfig, db: Database, secrets: SecretBox) -> FastAPI:
    ctx = ControllerContext(cfg, db, secrets, AgentClients(cfg))
    ctx.dispatcher = Dispatcher(cfg, db, ctx.agents, secrets)
    ctx.metrics = ControllerMetrics(db, cfg)
    if cfg.metrics_listen:
        ctx.dispatcher.metrics = ctx.metrics
    ctx.scheduler = Scheduler(ctx, interval=cfg.scheduler_interval, grace=cfg.schedule_grace)
    ctx.notifier = Notifier(cfg, db)
    ctx.dispatcher.notifier = ctx.notifier

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if cfg.metrics_listen:
            ctx.metrics.serve(cfg.metrics_listen)
        ctx.dispatcher.start()  # places and follows tasks while the API serves
        ctx.scheduler.start()  # makes the policies' checkpoints
        ctx.notifier.start()  # webhooks and e-mail, when configured
        yield
        ctx.notifier.stop()
        ctx.scheduler.stop()
        ctx.dispatcher.stop()
        ctx.metrics.stop()
        ctx.agents.close()

    app = FastAPI(
        title="blockferry-controller",
        version=__version__,
        lifespan=lifespan,
        description="Shared storage pools, volumes, backup points and backups (seeds 000-002); "
        "vaults, policies and checkpoints (seed 003); backup storage (seed 004).",
    )
    app.state.ctx = ctx
    envelope.install(app)
    for r in (
        health.router,
        backuppoints.router,
        hosts.router,
        hosts.zones_router,
        hosts.vms_router,
        pools.router,
        volumes.router,
        jobs.router,
        exports.router,
        policies.router,
        vaults.router,
        checkpoints.router,
        backups.router,
        members.router,
        operation_logs.router,
        notifications.router,
        status.router,
        zstack.router,
    ):
        app.include_router(r)
    _openapi_errors(app)
    return app


def _openapi_errors(app: FastAPI) -> None:
    """The OpenAPI shows the bodies read and the errors actually sent (a
    bad request is 400 with the envelope of its API, never FastAPI's 422)."""
    from fastapi.openapi.utils import get_openapi

    def schema() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        shapes.document(doc)
        app.openapi_schema = doc
        return doc

    app.openapi = schema  # type: ignore[method-assign]
