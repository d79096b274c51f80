"""Secrets qemu's tools need (an iSCSI pool's CHAP secret): kept in files
only root can read and handed to every qemu-img and qemu-nbd as
`--object secret,id=ID,file=PATH`, never in argv or in an image name.

A pool registers its secret when it opens and removes it when it closes;
an image name refers to it by id (`"password-secret": ID`). Passing a
tool objects it does not use costs nothing.
"""

from __future__ import annotations

import os
import re
import threading

_lock = threading.Lock()
_objects: dict[str, str] = {}  # id -> the secret's file
_ID = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")


def add_secret(ident: str, secret: str, directory: str) -> str:
    """Write secret to a 0600 file in directory (made 0700) and register it
    as object `ident`; returns ident."""
    if not _ID.match(ident):
        raise ValueError(f"bad qemu object id {ident!r}")
    os.makedirs(directory, mode=0o700, exist_ok=True)
    os.chmod(directory, 0o700)
    path = os.path.join(directory, f"{ident}.secret")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, secret.encode())
    finally:
        os.close(fd)
    with _lock:
        _objects[ident] = path
    return ident


def remove(ident: str) -> None:
    with _lock:
        path = _objects.pop(ident, None)
    if path:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def argv() -> list[str]:
    """The --object options of every registered secret."""
    with _lock:
        items = sorted(_objects.items())
    out: list[str] = []
    for ident, path in items:
        out += ["--object", f"secret,id={ident},file={path},format=raw"]
    return out


def with_objects(cmd: list[str]) -> list[str]:
    """A qemu-img or qemu-nbd command line with the registered objects in
    it (after qemu-img's subcommand)."""
    objs = argv()
    if not objs or not cmd:
        return cmd
    at = 2 if cmd[0] == "qemu-img" else 1
    return cmd[:at] + objs + cmd[at:]
