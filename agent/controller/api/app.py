"""The controller's FastAPI application: one router per seed, the seeds'
envelope for every answer, bearer tokens, OpenAPI at /openapi.json and
/docs."""
from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI

from agent import __version__
from agent.controller.agents import AgentClients
from agent.controller.api import backuppoints, backups, checkpoints, envelope, hosts, jobs, policies, pools, vaults, volumes
from agent.controller.dispatch import Dispatcher
from agent.controller.metrics import ControllerMetrics
from agent.controller.scheduler import Scheduler
from agent.controller.api.auth import TokenAuth
from agent.controller.config import ControllerConfig
from agent.controller.db import Database
from agent.controller.secrets import SecretBox


def create_app(cfg: ControllerConfig, db: Database, secrets: SecretBox) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if cfg.metrics_listen:
            app.state.metrics.serve(cfg.metrics_listen)
        app.state.dispatcher.start()  # places and follows tasks while the API serves
        app.state.scheduler.start()   # makes the policies' checkpoints
        yield
        app.state.scheduler.stop()
        app.state.dispatcher.stop()
        app.state.metrics.stop()
        app.state.agents.close()

    app = FastAPI(title="blockferry-controller", version=__version__, lifespan=lifespan,
                  description="Shared storage pools, volumes, backup points and backups (seeds 000-002); "
                              "vaults, policies and checkpoints (seed 003).")
    app.state.cfg = cfg
    app.state.db = db
    app.state.secrets = secrets
    app.state.agents = AgentClients(cfg)
    app.state.dispatcher = Dispatcher(cfg, db, app.state.agents, secrets)
    app.state.metrics = ControllerMetrics(db, cfg)
    if cfg.metrics_listen:
        app.state.dispatcher.metrics = app.state.metrics
    app.state.scheduler = Scheduler(app.state, interval=cfg.scheduler_interval, grace=cfg.schedule_grace)
    envelope.install(app)
    auth = TokenAuth(cfg.tokens)
    app.include_router(backuppoints.router(auth))
    app.include_router(hosts.router(auth))
    app.include_router(hosts.zones_router(auth))
    app.include_router(pools.router(auth))
    app.include_router(volumes.router(auth))
    app.include_router(jobs.router(auth))
    app.include_router(policies.router(auth))
    app.include_router(vaults.router(auth))
    app.include_router(checkpoints.router(auth))
    app.include_router(backups.router(auth))

    return app
