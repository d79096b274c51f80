"""blockferry: the command-line client of blockferry-agent.

app.py holds the parser and the commands of volumes, snapshots, clones,
VMs, jobs and the host; backups.py the backup verbs; refs.py what people
type (names, POOL:VOLUME@SNAPSHOT, sizes) and read (tables, units, times)."""

from agent.cli.app import main, parser

__all__ = ["main", "parser"]
