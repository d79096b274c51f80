"""`blockferry backups mount/umount/files/extract`: a backup's disk and
filesystems opened read-only on this host (agent.mounts) over the agent's
NBD export of it, and files listed or copied out (agent.files). Runs as
root on the host of the agent that serves the backup point."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Iterator

from agent import files, mounts
from agent.api.v1 import backups_pb2
from agent.cli import refs
from agent.client import AgentClient


def as_json(obj) -> str:
    return json.dumps(dataclasses.asdict(obj), sort_keys=True)


FS_HEADERS = ("filesystem", "type", "size", "offset", "state")


def _fs_rows(m: mounts.Mount) -> list[tuple]:
    return [
        (
            fs.name,
            fs.type or "-",
            refs.human(fs.size),
            fs.offset,
            os.path.join(m.dir, fs.name) if fs.mounted else f"not mounted: {fs.why}",
        )
        for fs in m.filesystems
    ]


def _export(client: AgentClient, args, lease: int) -> backups_pb2.BackupExport:
    return client.export_backup(
        backups_pb2.ExportBackupRequest(
            backup_point_uuid=args.backup_point, backup_uuid=args.backup, lease_seconds=lease
        )
    )


def _mount(client: AgentClient, args, directory: str, lease: int) -> mounts.Mount:
    e = _export(client, args, lease)
    try:
        return mounts.mount(e.socket, e.export_id, directory)
    except BaseException:
        client.unexport_backup(e.export_id)
        raise


def _umount(client: AgentClient, directory: str) -> mounts.Mount:
    m = mounts.umount(directory)
    with contextlib.suppress(Exception):  # its lease may have ended it already
        client.unexport_backup(m.export_id)
    return m


@contextlib.contextmanager
def _opened(client: AgentClient, args) -> Iterator[mounts.Mount]:
    """The backup mounted in a private directory for one command."""
    work = tempfile.mkdtemp(prefix="blockferry-files-")
    try:
        m = _mount(client, args, os.path.join(work, "m"), 3600)
        try:
            yield m
        finally:
            _umount(client, m.dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _entry_row(e: files.Entry) -> tuple:
    link = f" -> {e.target}" if e.target else ""
    return (e.kind, f"{e.uid}:{e.gid}", e.size, refs.when(e.mtime_ns / 1e9), e.path + link)


ENTRY_HEADERS = ("mode", "owner", "size", "modified", "path")


def cmd_mount(client: AgentClient, args) -> int:
    m = _mount(client, args, args.dir, args.lease)
    if args.json:
        print(as_json(m))
        return 0
    print(f"{m.image}: the whole disk ({m.partition_table or 'no partition table'}), read-only")
    print(refs.table(FS_HEADERS, _fs_rows(m)))
    print(f"until {refs.when(_lease_end(client, m.export_id))}; end with: blockferry backups umount {m.dir}")
    return 0


def _lease_end(client: AgentClient, export_id: str) -> float:
    return next((e.expires_at for e in client.list_exports().exports if e.export_id == export_id), 0.0)


def cmd_umount(client: AgentClient, args) -> int:
    m = _umount(client, args.dir)
    print(f"{args.dir}: unmounted; export {m.export_id} ended")
    return 0


def cmd_files(client: AgentClient, args) -> int:
    with _opened(client, args) as m:
        if not args.path.strip("/"):
            print(as_json(m) if args.json else refs.table(FS_HEADERS, _fs_rows(m)))
            return 0
        found = files.listing(m.dir, args.path)
    if args.json:
        for e in found:
            print(as_json(e))
        return 0
    print(refs.table(ENTRY_HEADERS, [_entry_row(e) for e in found]))
    return 0


def cmd_extract(client: AgentClient, args) -> int:
    with _opened(client, args) as m:
        copied = files.extract(m.dir, args.paths, args.to)
    for e in copied:
        print(as_json(e) if args.json else f"{os.path.join(args.to, e.path)}  {e.kind} {refs.human(e.size)}")
    return 0


COMMANDS = {"mount": cmd_mount, "umount": cmd_umount, "files": cmd_files, "extract": cmd_extract}


def add_parsers(bsub) -> None:
    def backup_args(p) -> None:
        p.add_argument("backup_point", metavar="BACKUP_POINT")
        p.add_argument("backup", metavar="BACKUP")

    m = bsub.add_parser(
        "mount", help="show a backup read-only under DIR: the disk as DIR/disk.raw, its filesystems as DIR/p1 ..."
    )
    backup_args(m)
    m.add_argument("dir", metavar="DIR", help="an empty directory, or one to create")
    m.add_argument("--lease", type=int, default=86400, metavar="SECONDS", help="it ends after this (default 1 day)")
    bsub.add_parser("umount", help="unmount what mount showed under DIR and end its export").add_argument(
        "dir", metavar="DIR"
    )
    f = bsub.add_parser("files", help="list the filesystems of a backup, or a directory in one (p1/etc)")
    backup_args(f)
    f.add_argument("path", metavar="PATH", nargs="?", default="", help="FILESYSTEM/PATH, as files shows them")
    x = bsub.add_parser("extract", help="copy files out of a backup, keeping modes, owners, times, holes, links")
    backup_args(x)
    x.add_argument("paths", metavar="PATH", nargs="+", help="FILESYSTEM/PATH, as files shows them")
    x.add_argument("--to", required=True, metavar="DEST", help="the directory to copy into (made if missing)")
