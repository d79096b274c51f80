"""The backup points this agent serves, from [backup_points.<uuid>] in its
config; each opens (or, when allowed, creates) its repository once and keeps
it for the life of the agent."""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from dataclasses import dataclass

from agent.attached import AttachedDefinitions
from agent.config import BackupPointSection, Config, same_place
from agent.errors import AuthFailed, BlockferryError, FailedPrecondition, NotFound, TargetUnreachable
from agent.repo.holds import Lock
from agent.repo.repository import Repository
from agent.stores.base import ObjectStore
from agent.stores.local import LocalStore
from agent.volumes.base import check_uuid

LOW_SPACE = 0.05  # under 5 % free: degraded
SLOW_MS = 1000.0  # a metadata round trip slower than this: degraded


class BackupPoint:
    def __init__(self, uuid: str, section: BackupPointSection, state_dir: str = ""):
        self.uuid = uuid
        self.section = section
        # the id of the repository this backup point held, once it held one: a
        # backup point whose repository vanished (a disk not mounted, another
        # export) is refused, never silently given a new, empty repository
        self._known = os.path.join(state_dir, "repositories", uuid) if state_dir else ""
        self._repo: Repository | None = None
        self._store: ObjectStore | None = None
        self._lock = threading.Lock()

    def lock_for(self, until: float = 0) -> Lock | None:
        """The lock a new backup gets: until the later of `until` (a job's,
        from a policy's retention) and now + lock_days; None when neither."""
        s = self.section
        latest = max(until, time.time() + s.lock_days * 86400 if s.lock_days else 0)
        return Lock(latest, s.lock_mode) if latest else None

    @property
    def label(self) -> str:
        """How errors name this backup point: its uuid and where it is (never a secret)."""
        return f"{self.uuid} ({self.location})"

    @property
    def location(self) -> str:
        """Where it is: a path, or a URL without credentials."""
        s = self.section
        return {
            "local": s.path,
            "nfs": f"nfs://{s.ip}{s.root_dir.rstrip('/')}/{s.sub_dir}".rstrip("/"),
            "samba": f"smb://{s.ip}/{s.root_dir.strip('/')}/{s.sub_dir}".rstrip("/"),
            "iscsi": f"iscsi://{s.ip}/{s.target}/{s.lun}",
            "s3": f"{s.endpoint.rstrip('/')}/{s.bucket}/{s.sub_dir}".rstrip("/"),
        }.get(s.type, s.device)

    def store(self) -> ObjectStore:
        s = self.section
        if s.type == "nfs":
            from agent.stores.nfs import NfsStore

            return NfsStore(
                s.ip,
                s.root_dir,
                s.sub_dir,
                nfs_port=s.port,
                mount_port=s.mount_port,
                timeout=s.timeout,
                label=self.label,
            )
        if s.type == "samba":
            from agent.stores.smb import SmbStore

            return SmbStore(
                s.ip,
                s.root_dir,
                s.sub_dir,
                username=s.username,
                password=s.secret,
                port=s.port,
                encrypt=s.smb_encrypt,
                timeout=s.timeout,
                label=self.label,
            )
        if s.type == "s3":
            from agent.stores.s3 import S3Store

            return S3Store(
                s.endpoint,
                s.bucket,
                s.sub_dir,
                access_key=s.username,
                secret_key=s.secret,
                region=s.region,
                timeout=s.timeout,
                part_size=s.part_size,
                label=self.label,
            )
        if s.type in ("disk", "fc"):
            from agent.stores.blockdev import LocalBlockDevice
            from agent.stores.lun import open_lun

            path = os.path.realpath(s.device)
            return open_lun(
                path, lambda: LocalBlockDevice(path, label=s.device), format_lun=s.format_lun, label=self.label
            )
        if s.type == "iscsi":
            from agent.stores.iscsi import IscsiBlockDevice
            from agent.stores.lun import credential_digest, open_lun

            key = f"iscsi://{s.ip}:{s.port}/{s.target}/{s.lun}"
            return open_lun(
                key,
                lambda: IscsiBlockDevice(
                    s.ip,
                    s.target,
                    s.lun,
                    port=s.port,
                    user=s.username,
                    secret=s.secret,
                    timeout=s.timeout,
                    label=self.label,
                ),
                credential=credential_digest(s.username, s.secret),
                format_lun=s.format_lun,
                label=self.label,
            )
        return LocalStore(s.path)

    def _open_store(self) -> ObjectStore:
        if self._store is None:
            self._store = self.store()
        return self._store

    def known_repository(self) -> str:
        """The id of the repository this backup point held ("" if none yet)."""
        try:
            with open(self._known) as f:
                return f.read().strip()
        except (FileNotFoundError, ValueError):
            return ""

    def _remember(self, repo_id: str) -> None:
        if self._known and self.known_repository() != repo_id:
            os.makedirs(os.path.dirname(self._known), mode=0o700, exist_ok=True)
            tmp = f"{self._known}.tmp"
            with open(tmp, "w") as f:
                f.write(repo_id + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._known)

    def forget(self) -> None:
        """No longer remember its repository (the backup point was detached)."""
        if self._known:
            try:
                os.unlink(self._known)
            except FileNotFoundError:
                pass

    def _vanished(self, known: str) -> TargetUnreachable:
        return TargetUnreachable(
            f"backup_point_uuid: {self.label} held repository {known}, which is not there: is its disk "
            "mounted, its export or share the right one? blockferry never starts a new repository in its "
            f"place; to start afresh on purpose, remove {self._known}",
            field="backup_point_uuid",
        )

    def _replaced(self, found: str, known: str) -> TargetUnreachable:
        return TargetUnreachable(
            f"backup_point_uuid: {self.label} now holds repository {found}, not {known} it held: another "
            f"disk or export? To use this one on purpose, remove {self._known}",
            field="backup_point_uuid",
        )

    def repository(self) -> Repository:
        """The repository, opened with the configured password (a wrong one
        is refused); an empty directory gets a new one if `initialize`,
        unless this backup point held another one before."""
        with self._lock:
            if self._repo is None:
                known = self.known_repository()
                if known and self.section.type == "local" and not os.path.isdir(self.section.path):
                    raise self._vanished(known)  # not even the directory: never recreate it
                store = self._open_store()
                try:
                    store.get("config")
                except NotFound:
                    if known:
                        raise self._vanished(known) from None
                    repo = self._create(store)
                else:
                    repo = None
                if repo is None:
                    repo = Repository.open(store, password=self.section.password)
                    if known and repo.id != known:
                        raise self._replaced(repo.id, known)
                self._remember(repo.id)
                self._repo = repo
            return self._repo

    def _create(self, store: ObjectStore) -> Repository | None:
        """A new repository in an empty store, or None when another agent
        created one there meanwhile (then it is opened like any other)."""
        if not self.section.initialize:
            raise FailedPrecondition(
                f"backup_point_uuid: {self.label} holds no repository and initialize is off",
                field="backup_point_uuid",
            )
        if not store.is_empty():
            if _has_config(store):
                return None  # another writer's, published since we looked
            raise FailedPrecondition(
                f"backup_point_uuid: {self.label} holds other data and no blockferry repository; it is never touched",
                field="backup_point_uuid",
            )
        try:
            return Repository.init(
                store,
                chunk_size=self.section.chunk_size,
                password=self.section.password,
                compression=self.section.compression,
            )
        except FailedPrecondition:
            if _has_config(store):
                return None  # lost the race to create it: use the winner's
            raise

    def check(self) -> BackupPointHealth:
        """Health, capacity and latency, without creating a repository."""
        s = self.section
        known = self.known_repository()
        t0 = time.monotonic()
        try:
            if known and s.type == "local" and not os.path.isdir(s.path):
                raise self._vanished(known)  # checked first: opening the store would recreate the directory
            with self._lock:
                store = self._open_store()
            st = store.stats()
            present = "config" in store.list("")
            latency = (time.monotonic() - t0) * 1000
            facts = store.facts(present)
            if known and not present:
                raise self._vanished(known)
            if known and present:
                found = _repository_id(store)
                if found != known:
                    raise self._replaced(found or "?", known)
        except AuthFailed as e:
            return BackupPointHealth(self.uuid, s.type, self.label, "auth_failed", error_code=e.code, error=e.message)
        except BlockferryError as e:
            self.reset()  # the next call connects again
            return BackupPointHealth(self.uuid, s.type, self.label, "unreachable", error_code=e.code, error=e.message)
        except OSError as e:  # a local directory or device gone (unmounted, removed)
            self.reset()
            why = f"{e.strerror or e}: {e.filename}" if e.filename else str(e.strerror or e)
            return BackupPointHealth(
                self.uuid, s.type, self.label, "unreachable", error_code="TARGET_UNREACHABLE", error=why
            )
        status, why = "healthy", ""
        if st.total_bytes and st.available_bytes < LOW_SPACE * st.total_bytes:
            status, why = (
                "degraded",
                (f"only {st.available_bytes * 100 / st.total_bytes:.1f} % free ({st.available_bytes} bytes)"),
            )
        elif latency > SLOW_MS:
            status, why = "degraded", f"a metadata round trip took {latency:.0f} ms"
        if not facts.writable:  # restores still work: degraded, not down
            status = "degraded"
            why = (
                "the credentials may read but not write: backups are listed, but backups and "
                "restores (which write a lock record) are refused"
            )
        if s.lock_mode != "agent" and not facts.object_lock.startswith(("on", "unknown")):
            status = "degraded"
            why = (
                f"lock_mode {s.lock_mode} needs object lock on the bucket, which is {facts.object_lock}: "
                "locked backups will fail"
            )
        return BackupPointHealth(
            self.uuid,
            s.type,
            self.label,
            status,
            st.total_bytes,
            st.used_bytes,
            st.available_bytes,
            latency,
            present,
            "",
            why,
            facts.object_lock,
        )

    def reset(self) -> None:
        """Close sessions and forget the open repository; the next use
        connects (and logs in) again."""
        with self._lock:
            store, self._store, self._repo = self._store, None, None
        if store is not None:
            try:
                store.close()
            except Exception:
                pass

    def reconnect(self) -> BackupPointHealth:
        self.reset()
        return self.check()


def _repository_id(store: ObjectStore) -> str:
    """The id in a repository's config ("" if it cannot be read)."""
    try:
        config = json.loads(store.get("config"))
    except (ValueError, NotFound):
        return ""
    return str(config.get("id", "")) if isinstance(config, dict) else ""


@dataclass(frozen=True)
class BackupPointHealth:
    uuid: str
    type: str
    location: str
    status: str  # healthy, degraded, unreachable or auth_failed
    total_bytes: int = 0
    used_bytes: int = 0
    available_bytes: int = 0
    latency_ms: float = 0.0
    repository: bool = False
    error_code: str = ""
    error: str = ""
    object_lock: str = ""  # object stores: off, on, or on with the bucket's default retention


class BackupPoints:
    """Backup points of the config file, and those the controller attached
    at run time (kept in <state_dir>/backup_points.d/<uuid>.json, 0600: they
    may hold a password or secret)."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self._lock = threading.Lock()
        state = cfg.agent.state_dir
        self._points = {u: BackupPoint(u, s, state) for u, s in cfg.backup_points.items()}
        self._attached: set[str] = set()
        self.attached = AttachedDefinitions(os.path.join(cfg.agent.state_dir, "backup_points.d"), BackupPointSection)
        for u, section in self.attached.load().items():
            if u not in self._points:
                self._points[u] = BackupPoint(u, section, state)
                self._attached.add(u)

    def get(self, uuid: str, field: str = "backup_point_uuid") -> BackupPoint:
        check_uuid(uuid, field)
        bp = self._points.get(uuid)
        if bp is None:
            raise NotFound(f"{field}: backup point {uuid} is not configured on this agent", field=field)
        return bp

    def all(self) -> list[BackupPoint]:
        return list(self._points.values())

    def relock(self, uuid: str, lock_days: int, lock_mode: str) -> None:
        """How a backup point locks new backups, changed at run time (a
        reload): the next backup follows it."""
        with self._lock:
            bp = self._points.get(uuid)
            if bp is not None:
                bp.section = dataclasses.replace(bp.section, lock_days=lock_days, lock_mode=lock_mode)

    def attach(self, uuid: str, section: BackupPointSection) -> BackupPoint:
        """Serve a backup point from now on (idempotent for the same
        definition; a new definition of an attached one replaces it). Its
        storage must answer and hold a repository, or be empty (and then get
        one, if `initialize`)."""
        from agent.errors import AlreadyExists

        check_uuid(uuid, "backup_point_uuid")
        probe = dataclasses.replace(self.cfg, pools={}, backup_points={uuid: section})
        probe.validate()  # the same rules as the config file
        if section.type == "local":
            from agent.paths import resolve_under_roots

            section = dataclasses.replace(section, path=resolve_under_roots(section.path, self.cfg.agent.roots, "path"))
        with self._lock:
            current = self._points.get(uuid)
            if current is not None:
                if current.section == section:
                    return current
                if uuid not in self._attached:
                    raise AlreadyExists(
                        f"backup_point_uuid: backup point {uuid} is defined in the agent's config "
                        "file with another definition",
                        field="backup_point_uuid",
                    )
                # the controller updated it (seed 000 update): the new definition replaces the old
                # one; jobs already running keep the repository they opened
            bp = BackupPoint(uuid, section, self.cfg.agent.state_dir)
            if current is not None and not same_place(current.section, section):
                bp.forget()  # a new definition on purpose (seed 000 update): where it points now is its repository
            bp.repository()  # reachable, credentials right, a repository (or an empty place for one)
            self.attached.save(uuid, section)
            self._points[uuid] = bp
            self._attached.add(uuid)
            if current is not None:
                current.reset()
            return bp

    def is_attached(self, uuid: str) -> bool:
        """Attached by the controller at run time (not from the config file)."""
        return uuid in self._attached

    def detach_unused(self, uuid: str, engine) -> None:
        """Detach, unless a running job uses it (Busy)."""
        from agent.errors import Busy
        from agent.jobs.model import JobState

        bp = self.get(uuid)
        if any(getattr(j.spec, "backup_point_uuid", "") == bp.uuid for j in engine.list({JobState.RUNNING})):
            raise Busy(f"backup_point_uuid: jobs are using {bp.label}", field="backup_point_uuid")
        self.detach(uuid)

    def detach(self, uuid: str) -> None:
        bp = self.get(uuid)
        with self._lock:
            if uuid not in self._attached:
                raise FailedPrecondition(
                    f"backup_point_uuid: backup point {uuid} comes from the agent's config file; remove it there",
                    field="backup_point_uuid",
                )
            self.attached.remove(uuid)
            del self._points[uuid]
            self._attached.discard(uuid)
        bp.reset()
        bp.forget()


def _has_config(store: ObjectStore) -> bool:
    try:
        store.get("config")
    except NotFound:
        return False
    return True
