"""The object-store interface a repository lives on, and the local directory store.

Names are relative, '/'-separated, and never escape the store's root. Remote
stores (NFS, SMB, raw LUNs) implement the same small interface.
"""
from __future__ import annotations

import os
import re
from abc import ABC, abstractmethod

from agent.errors import InvalidArgument, NotFound, StorageIOError

_NAME = re.compile(r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$")


def check_object_name(name: str) -> str:
    if not _NAME.match(name) or any(part in (".", "..") for part in name.split("/")):
        raise InvalidArgument(f"object name {name!r} is not a plain relative name", field="name")
    return name


class ObjectStore(ABC):
    @abstractmethod
    def put(self, name: str, data: bytes) -> None:
        """Write an object (not yet durable or visible as complete)."""

    @abstractmethod
    def publish(self, name: str, data: bytes) -> None:
        """Write an object durably and make it visible atomically."""

    @abstractmethod
    def get(self, name: str) -> bytes: ...

    @abstractmethod
    def list(self, prefix: str) -> list[str]: ...

    @abstractmethod
    def delete(self, name: str) -> None: ...


class LocalStore(ObjectStore):
    def __init__(self, root: str):
        self.root = os.path.realpath(root)
        os.makedirs(self.root, mode=0o750, exist_ok=True)

    def _path(self, name: str) -> str:
        return os.path.join(self.root, check_object_name(name))

    def _write(self, path: str, data: bytes, durable: bool) -> None:
        os.makedirs(os.path.dirname(path), mode=0o750, exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                if durable:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, path)
            if durable:
                dfd = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
        except OSError as e:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise StorageIOError(f"backup point: cannot write {path}: {e.strerror}") from None

    def put(self, name: str, data: bytes) -> None:
        self._write(self._path(name), data, durable=True)

    def publish(self, name: str, data: bytes) -> None:
        self._write(self._path(name), data, durable=True)

    def get(self, name: str) -> bytes:
        try:
            with open(self._path(name), "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise NotFound(f"backup point: object {name} is missing", field="name") from None
        except OSError as e:
            raise StorageIOError(f"backup point: cannot read {name}: {e.strerror}") from None

    def list(self, prefix: str) -> list[str]:
        d = self._path(prefix.rstrip("/"))
        try:
            return sorted(f"{prefix.rstrip('/')}/{f}" for f in os.listdir(d) if ".tmp-" not in f)
        except FileNotFoundError:
            return []

    def delete(self, name: str) -> None:
        try:
            os.unlink(self._path(name))
        except FileNotFoundError:
            pass
