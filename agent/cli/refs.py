"""What people type for the CLI's objects: volumes and snapshots by name or
uuid, POOL:VOLUME[@SNAPSHOT], sizes with suffixes; and what they read
back: aligned tables that fit the terminal, human sizes, local times; and
what both CLIs share: size arguments, completion, a closed pipe."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import sys
import time
import uuid
from collections.abc import Callable, Sequence

from agent.api.v1 import volumes_pb2 as v
from agent.client import AgentClient
from agent.errors import BlockferryError, InvalidArgument, NotFound

_UNITS = {"": 1, "b": 1}
for _i, _p in enumerate("kmgtp", start=1):
    _UNITS[_p] = _UNITS[f"{_p}i"] = _UNITS[f"{_p}ib"] = 1 << (10 * _i)  # as qemu-img: 64M is 64 MiB
    _UNITS[f"{_p}b"] = 1000**_i  # 64MB: decimal, as disks are sold
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$")


def size(text: str) -> int:
    """Bytes from `1073741824`, `64M`, `1G`, `1.5GiB`, `1TiB` (binary) or
    `500MB` (decimal); an argparse type."""
    m = _SIZE.match(str(text).lower())
    if not m or m.group(2) not in _UNITS:
        raise InvalidArgument(
            f"size: {text!r} is not a size (bytes, or with a suffix: 64M, 1G, 1.5GiB, 1TiB, 500MB)", field="size"
        )
    n = float(m.group(1)) * _UNITS[m.group(2)]
    if n != int(n):
        raise InvalidArgument(f"size: {text!r} is not a whole number of bytes", field="size")
    return int(n)


def size_arg(text: str) -> int:
    """size() as an argparse type: a bad size is a usage error."""
    try:
        return size(text)
    except BlockferryError as e:
        raise argparse.ArgumentTypeError(e.message) from None


def completion(p: argparse.ArgumentParser, shell: str) -> int:
    """Print the shell completion script of a CLI's parser."""
    import shtab

    print(shtab.complete(p, shell=shell))
    return 0


def quiet_on_closed_pipe(run: Callable[[], int]) -> int:
    """run()'s exit status; when the reader of stdout went away (`| head`),
    141 and no traceback (not even when Python flushes at exit)."""
    try:
        rc = run()
        sys.stdout.flush()
        return rc
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE


def is_uuid(text: str) -> bool:
    try:
        uuid.UUID(text)
        return True
    except ValueError:
        return False


def volume(client: AgentClient, pool: str, name_or_uuid: str) -> v.Volume:
    """A volume of the pool by uuid, or by its name when that names one."""
    if is_uuid(name_or_uuid):
        return client.get_volume(v.VolumeRef(pool_uuid=pool, volume_uuid=name_or_uuid))
    found = [x for x in client.list_volumes(v.ListVolumesRequest(pool_uuid=pool)).volumes if x.name == name_or_uuid]
    if not found:
        raise NotFound(f"volume: pool {pool} has no volume named {name_or_uuid!r}", field="volume")
    if len(found) > 1:
        raise InvalidArgument(
            f"volume: {len(found)} volumes of pool {pool} are named {name_or_uuid!r}; give the uuid "
            f"({', '.join(x.uuid for x in found)})",
            field="volume",
        )
    return found[0]


def snapshot(client: AgentClient, pool: str, volume_uuid: str, name_or_uuid: str) -> v.Snapshot:
    snaps = client.list_snapshots(v.VolumeRef(pool_uuid=pool, volume_uuid=volume_uuid)).snapshots
    found = [s for s in snaps if name_or_uuid in (s.uuid, s.name)]
    if not found:
        raise NotFound(f"snapshot: volume {volume_uuid} has no snapshot {name_or_uuid!r}", field="snapshot")
    return found[0]


def split_ref(text: str, field: str) -> tuple[str, str, str]:
    """POOL:VOLUME[@SNAPSHOT] as (pool, volume, snapshot or "")."""
    pool, sep, rest = text.partition(":")
    if not sep or not pool or not rest:
        raise InvalidArgument(f"{field}: {text!r} is not POOL:VOLUME or POOL:VOLUME@SNAPSHOT", field=field)
    vol, _, snap = rest.partition("@")
    return pool, vol, snap


def human(n: float) -> str:
    """Bytes as people read them: 64.0 MiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def when(t: float) -> str:
    """A unix time in the local time zone, to the second."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], width: int | None = None) -> str:
    """Columns aligned; on a terminal, lines cut to its width (a pipe gets
    them whole)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    if width is None:
        width = shutil.get_terminal_size().columns if sys.stdout.isatty() else 1 << 30
    lines = []
    for r in cells:
        line = "  ".join(c.ljust(w) for c, w in zip(r[:-1], widths[:-1], strict=True))
        line = (line + "  " + r[-1]) if len(r) > 1 else r[-1]
        if len(line) > width:
            line = line[: max(1, width - 1)] + "…"
        lines.append(line.rstrip())
    return "\n".join(lines)
