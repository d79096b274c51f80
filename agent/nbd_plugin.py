"""nbdkit's python plugin for a read-only export of one backup (loaded by
`nbdkit python agent/nbd_plugin.py syspath=... spec=FILE`, in nbdkit's
own interpreter; agent/exports.py starts it). The spec file (0600, removed
by the agent once the export listens) names the backup point, its
secrets and the backup.

Reads come from the repository chunk by chunk, each checked against its
digests as it is decoded: a damaged chunk is a read error (EIO), never
wrong data. Block status reports the manifest's zero chunks as holes
that read as zeros. Decoded chunks are kept in a cache bounded by the
spec's cache_bytes. Connections are served in parallel, the requests of
one connection one at a time."""

from __future__ import annotations

import builtins
import errno
import json
import sys
import threading
from collections import OrderedDict

import nbdkit  # type: ignore[import-not-found]  # provided by nbdkit's interpreter

API_VERSION = 2

_spec: dict = {}
_state: dict = {}
_lock = threading.Lock()


def config(key: str, value: str) -> None:
    if key == "syspath":
        sys.path[:0] = [p for p in value.split(":") if p]
    elif key == "spec":
        with builtins.open(value) as f:  # open() is the plugin's own callback below
            _spec.update(json.load(f))
    else:
        raise RuntimeError(f"unknown parameter {key}")


def config_complete() -> None:
    from agent.backup_points import BackupPoint
    from agent.config import BackupPointSection
    from agent.repo.format import ZERO

    section = BackupPointSection(**_spec["section"])
    repo = BackupPoint(_spec["backup_point_uuid"], section).repository()
    manifest = repo.manifest(_spec["backup_uuid"])
    _state.update(
        repo=repo,
        manifest=manifest,
        zero=ZERO,
        cache=OrderedDict(),
        cache_bytes=int(_spec.get("cache_bytes", 64 << 20)),
    )


def thread_model():
    # one request at a time per connection, connections in parallel: nbdkit 1.32 aborts
    # (raw_send_socket: sock >= 0) when a client drops a connection with several reads in flight
    return nbdkit.THREAD_MODEL_SERIALIZE_REQUESTS


def open(readonly):  # noqa: A001 - the name nbdkit calls
    return 1


def get_size(h) -> int:
    return _state["manifest"].size


def can_write(h) -> bool:
    return False


def can_extents(h) -> bool:
    return True


def can_multi_conn(h) -> bool:
    return True  # read-only: every connection sees the same bytes


def _chunk(i: int) -> bytes:
    cache: OrderedDict = _state["cache"]
    with _lock:
        data = cache.get(i)
        if data is not None:
            cache.move_to_end(i)
            return data
    m = _state["manifest"]
    data, _ = _state["repo"].get(bytes.fromhex(m.chunks[i]))  # decrypted, decompressed, digests checked
    data = bytes(data)
    with _lock:
        cache[i] = data
        while len(cache) * m.chunk_size > _state["cache_bytes"] and len(cache) > 1:
            cache.popitem(last=False)
    return data


def pread(h, buf, offset: int, flags) -> None:
    m = _state["manifest"]
    cs = m.chunk_size
    done = 0
    while done < len(buf):
        pos = offset + done
        i, within = divmod(pos, cs)
        n = min(len(buf) - done, cs - within, m.size - pos)
        if m.chunks[i] == _state["zero"]:
            buf[done : done + n] = bytes(n)
        else:
            try:
                data = _chunk(i)
            except Exception as e:  # a damaged or unreadable chunk: an error, never wrong data
                nbdkit.set_error(errno.EIO)
                raise RuntimeError(f"chunk {i} of backup {m.backup_id}: {e}") from None
            buf[done : done + n] = data[within : within + n]
        done += n


def extents(h, count: int, offset: int, flags):
    m = _state["manifest"]
    cs = m.chunk_size
    out: list[tuple[int, int, int]] = []
    pos, end = offset, min(offset + count, m.size)
    while pos < end:
        i = pos // cs
        n = min(end, (i + 1) * cs) - pos
        kind = nbdkit.EXTENT_HOLE | nbdkit.EXTENT_ZERO if m.chunks[i] == _state["zero"] else 0
        if out and out[-1][2] == kind:
            start, length, _ = out[-1]
            out[-1] = (start, length + n, kind)
        else:
            out.append((pos, n, kind))
        pos += n
    return out
