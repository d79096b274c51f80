"""The controller's FastAPI application: one router per seed, the seeds'
envelope for every answer, bearer tokens, OpenAPI at /openapi.json and
/docs."""
from __future__ import annotations

from fastapi import FastAPI

from agent import __version__
from agent.controller.agents import AgentClients
from agent.controller.api import backuppoints, envelope, hosts, pools, volumes
from agent.controller.api.auth import TokenAuth
from agent.controller.config import ControllerConfig
from agent.controller.db import Database
from agent.controller.secrets import SecretBox


def create_app(cfg: ControllerConfig, db: Database, secrets: SecretBox) -> FastAPI:
    app = FastAPI(title="blockferry-controller", version=__version__,
                  description="Shared storage pools, volumes, backup points and backups (seeds 000-002).")
    app.state.cfg = cfg
    app.state.db = db
    app.state.secrets = secrets
    app.state.agents = AgentClients(cfg)
    envelope.install(app)
    auth = TokenAuth(cfg.tokens)
    app.include_router(backuppoints.router(auth))
    app.include_router(hosts.router(auth))
    app.include_router(pools.router(auth))
    app.include_router(volumes.router(auth))
    return app
