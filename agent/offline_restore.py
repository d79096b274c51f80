"""`blockferry-restore`: read a repository directly, with no agent and no
controller (a rebuilt host, a lost controller database, a backup point
carried to another site). It lists the backups, verifies one, or writes
one to a raw file, a qcow2 file or a block device, checking the image
digest; it needs only the wheel (and qemu-img for qcow2 output).

    blockferry-restore dir:/srv/backups list
    blockferry-restore nfs://10.0.0.5/exports/backups/site1 verify BACKUP --deep
    blockferry-restore smb://backup@nas/backups/site1 write BACKUP /var/tmp/web.qcow2
    blockferry-restore iscsi://10.0.0.7/iqn.2026-01.net.example:bk/1 write BACKUP /dev/sdx

Secrets never come from argv: the repository password from
--password-file or $BLOCKFERRY_PASSWORD, else asked on the terminal when
the repository is encrypted; the SMB password or CHAP secret from
--secret-file or $BLOCKFERRY_SECRET. What is written goes to
TARGET.partial first and takes TARGET's name only once its digest
matches: a failed or interrupted restore never leaves a file that looks
complete (a block device is written in place and reported failed)."""

from __future__ import annotations

import argparse
import getpass
import json
import os
import stat
import subprocess
import sys
import time
from urllib.parse import parse_qs, unquote, urlsplit

from agent import __version__
from agent.backup_points import BackupPoint
from agent.config import BackupPointSection
from agent.errors import BlockferryError, InvalidArgument, NotFound, exit_status
from agent.repo.format import Manifest
from agent.repo.repository import Repository

SOURCES = (
    "dir:/PATH, nfs://HOST[:PORT]/EXPORT[//SUBDIR][?mount_port=N], smb://[USER@]HOST[:PORT]/SHARE[/SUBDIR], "
    "iscsi://HOST[:PORT]/TARGET-IQN/LUN, disk:/dev/..."
)


def section_of(source: str, secret: str = "") -> BackupPointSection:
    """The backup point a SOURCE names (never with its secrets in it)."""
    if source.startswith(("dir:", "disk:")):
        kind, _, path = source.partition(":")
        if not os.path.isabs(path):
            raise InvalidArgument(f"source: {source!r}: the path must be absolute", field="source")
        if kind == "dir":
            return BackupPointSection(type="local", path=path, initialize=False)
        return BackupPointSection(type="disk", device=path, initialize=False)
    u = urlsplit(source)
    if u.scheme not in ("nfs", "smb", "iscsi") or not u.hostname:
        raise InvalidArgument(f"source: {source!r} is not one of {SOURCES}", field="source")
    if u.password:
        raise InvalidArgument(
            "source: no password in the source; use --secret-file or $BLOCKFERRY_SECRET", field="source"
        )
    parts = [unquote(p) for p in u.path.strip("/").split("/") if p]
    if not parts:
        raise InvalidArgument(f"source: {source!r} names no export, share or target", field="source")
    common = {"ip": u.hostname, "port": u.port or 0, "initialize": False}
    if u.scheme == "nfs":
        # the export, then (after a double slash) the repository's directory below it: nfs://host/export//sub;
        # ?mount_port=N when the server's MOUNT service is not registered with its portmapper
        export, _, sub = unquote(u.path).partition("//")
        query = parse_qs(u.query)
        mount = (query.get("mount_port") or ["0"])[0]
        if not mount.isdigit():
            raise InvalidArgument(f"source: mount_port={mount!r} is not a port", field="source")
        return BackupPointSection(type="nfs", root_dir=export, sub_dir=sub.strip("/"), mount_port=int(mount), **common)
    if u.scheme == "smb":
        return BackupPointSection(
            type="samba",
            root_dir=parts[0],
            sub_dir="/".join(parts[1:]),
            username=unquote(u.username or ""),
            secret=secret,
            **common,
        )
    if len(parts) != 2 or not parts[1].isdigit():
        raise InvalidArgument(f"source: {source!r}: iscsi://HOST[:PORT]/TARGET-IQN/LUN", field="source")
    return BackupPointSection(
        type="iscsi", target=parts[0], lun=int(parts[1]), username=unquote(u.username or ""), secret=secret, **common
    )


def _read_secret(path: str | None, env: str) -> str:
    if path:
        with open(path) as f:
            return f.read().strip()
    return os.environ.get(env, "")


def open_repository(args) -> Repository:
    section = section_of(args.source, _read_secret(args.secret_file, "BLOCKFERRY_SECRET"))
    store = BackupPoint("00000000-0000-0000-0000-000000000000", section).store()
    try:
        config = json.loads(store.get("config"))
    except NotFound:
        raise NotFound(f"source: {args.source} holds no blockferry repository", field="source") from None
    password = _read_secret(args.password_file, "BLOCKFERRY_PASSWORD")
    if config.get("encryption") and not password:
        if not sys.stdin.isatty():
            raise InvalidArgument(
                "password: the repository is encrypted; give --password-file or $BLOCKFERRY_PASSWORD", field="password"
            )
        password = getpass.getpass("repository password: ")
    return Repository.open(store, password=password)


def _find(repo: Repository, backup: str) -> Manifest:
    found = [m for m in repo.manifests() if m.backup_id == backup or m.backup_id.startswith(backup)]
    if not found:
        raise NotFound(f"backup: no backup {backup!r} in this repository", field="backup")
    if len(found) > 1:
        raise InvalidArgument(f"backup: {backup!r} names {len(found)} backups; give more of the id", field="backup")
    return found[0]


def cmd_list(repo: Repository, args) -> int:
    rows = sorted(repo.manifests(), key=lambda m: m.created_at)
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "backup_id": m.backup_id,
                        "name": m.name,
                        "volume_uuid": m.volume_uuid,
                        "snapshot_name": m.snapshot_name,
                        "created_at": m.created_at,
                        "size": m.size,
                        "mode": m.mode,
                        "image_digest": m.image_digest,
                    }
                    for m in rows
                ]
            )
        )
        return 0
    print(f"{'backup':36}  {'created':19}  {'size':>10}  {'mode':11}  name")
    for m in rows:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(m.created_at))
        print(f"{m.backup_id:36}  {when:19}  {m.size >> 20:>7} MiB  {m.mode:11}  {m.name}")
    return 0


def cmd_verify(repo: Repository, args) -> int:
    from agent.repo.verify import verify

    m = _find(repo, args.backup)
    result = verify(repo, m, deep=args.deep)
    if result.damage:
        for d in result.damage:
            print(f"damaged: {d}", file=sys.stderr)
        print(f"{m.backup_id}: DAMAGED ({len(result.damage)} problem(s))")
        return 1
    print(f"{m.backup_id}: ok{' (image digest recomputed)' if args.deep else ''}")
    return 0


def cmd_write(repo: Repository, args) -> int:
    from agent.repo.restore import restore

    m = _find(repo, args.backup)
    target = args.target
    device = os.path.exists(target) and stat.S_ISBLK(os.stat(target).st_mode)
    fmt = args.format or ("qcow2" if target.endswith(".qcow2") and not device else "raw")
    if device and fmt != "raw":
        raise InvalidArgument("format: a block device takes raw data", field="format")
    if not device and os.path.exists(target) and not args.force:
        raise InvalidArgument(f"target: {target} exists; --force replaces it", field="target")
    partial = target if device else f"{target}.partial"
    raw = partial if fmt == "raw" else f"{target}.raw.partial"
    fd = os.open(raw, os.O_WRONLY | (0 if device else os.O_CREAT | os.O_TRUNC), 0o600)
    try:
        if device:
            size = os.lseek(fd, 0, os.SEEK_END)
            if size < m.size:
                raise InvalidArgument(f"target: {target} has {size} bytes, the backup {m.size}", field="target")
        else:
            os.ftruncate(fd, m.size)  # sparse: zero chunks are never written

        def write(offset: int, data) -> None:
            view = memoryview(data)
            while view:
                n = os.pwrite(fd, view, offset)
                view, offset = view[n:], offset + n

        zeros = bytes(m.chunk_size)

        def zero(offset: int, length: int) -> None:  # a device keeps old data where the backup has zeros
            write(offset, memoryview(zeros)[: min(length, m.size - offset)])

        digest = restore(repo, m, write, concurrent=True, zero=zero if device else None)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        if not device:
            os.unlink(raw)
        raise
    os.close(fd)
    if digest != m.image_digest:
        if not device:
            os.unlink(raw)
        print(
            f"blockferry-restore: DATA_CORRUPT: {m.backup_id}: image digest {digest} != {m.image_digest}",
            file=sys.stderr,
        )
        return 1
    if fmt == "qcow2":
        try:
            subprocess.run(
                ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, partial], check=True, capture_output=True
            )
        except FileNotFoundError:
            raise InvalidArgument("format: qcow2 output needs qemu-img (Debian: qemu-utils)", field="format") from None
        finally:
            os.unlink(raw)
    if not device:
        os.replace(partial, target)
    print(f"{m.backup_id}: {m.size} bytes written to {target} ({fmt}); image digest {digest} checked")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="blockferry-restore",
        description="Read a blockferry repository without agent or controller: list, verify, write.",
    )
    p.add_argument("source", help=f"the backup point: {SOURCES}")
    p.add_argument("--password-file", help="the repository password (else $BLOCKFERRY_PASSWORD, else asked)")
    p.add_argument("--secret-file", help="the SMB password or CHAP secret (else $BLOCKFERRY_SECRET)")
    p.add_argument("--version", action="version", version=f"blockferry-restore {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="the backups, oldest first").add_argument("--json", action="store_true")
    v = sub.add_parser("verify", help="check one backup's chunks (--deep: and its image digest)")
    v.add_argument("backup", help="a backup id (or the start of one)")
    v.add_argument("--deep", action="store_true")
    w = sub.add_parser("write", help="write a backup to a raw or qcow2 file or a block device")
    w.add_argument("backup")
    w.add_argument("target", help="a file (raw, or qcow2 when it ends in .qcow2) or a block device")
    w.add_argument("--format", choices=("raw", "qcow2"))
    w.add_argument("--force", action="store_true", help="replace an existing file")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        repo = open_repository(args)
        return {"list": cmd_list, "verify": cmd_verify, "write": cmd_write}[args.cmd](repo, args)
    except BlockferryError as e:
        print(f"blockferry-restore: {e.code}: {e.message}", file=sys.stderr)
        return exit_status(e)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
