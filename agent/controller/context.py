"""What the controller's parts share, typed: the config, the database, the
secret box, the agent clients and the long-running services. Built once by
the application (agent.controller.api.app) and handed to the domain code
(dispatch, scheduler, checkpoints, inventory) and to every router."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from agent.controller.agents import AgentClients
from agent.controller.config import ControllerConfig
from agent.controller.db import Database
from agent.controller.secrets import SecretBox

if TYPE_CHECKING:  # built above this module: only their types are needed here
    from agent.controller.dispatch import Dispatcher
    from agent.controller.metrics import ControllerMetrics
    from agent.controller.notify import Notifier
    from agent.controller.scheduler import Scheduler


@dataclass
class ControllerContext:
    cfg: ControllerConfig
    db: Database
    secrets: SecretBox
    agents: AgentClients
    dispatcher: Dispatcher | None = None
    metrics: ControllerMetrics | None = None
    scheduler: Scheduler | None = None
    notifier: Notifier | None = None
    registry_ready: bool = False  # the agents' gRPC registry listens (set by server.py)
