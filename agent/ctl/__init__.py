"""blockferry-ctl: the controller's command-line client over REST
(app.py the commands, rest.py settings, calls and task following)."""

from agent.ctl.app import main, parser

__all__ = ["main", "parser"]
