"""The job journal: jobs persist in SQLite under the agent's state dir.

State transitions are written with synchronous=FULL before they are shown to
callers, so a crash never loses a job a caller was told about. Progress is
written at most once a second per job.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sqlite3
import threading
from collections.abc import Callable

from agent.jobs.locks import LockMode
from agent.jobs.model import Job, JobError, JobState, Progress

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    resource TEXT NOT NULL,
    lock_mode TEXT NOT NULL,
    spec TEXT NOT NULL,
    state TEXT NOT NULL,
    progress TEXT NOT NULL,
    error_code TEXT,
    error_message TEXT,
    result TEXT,
    created_at REAL NOT NULL,
    started_at REAL,
    ended_at REAL
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
CREATE INDEX IF NOT EXISTS jobs_created ON jobs(created_at);
"""

# (kind name) -> (spec type, result type)
TypeLookup = Callable[[str], tuple[type, type]]


class Journal:
    def __init__(self, path: str, types: TypeLookup):
        self.path = path
        self._types = types
        os.makedirs(os.path.dirname(path), mode=0o750, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        os.chmod(path, 0o600)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise RuntimeError(f"{path}: journal schema {version} is newer than this agent ({SCHEMA_VERSION})")
        self._db.executescript(_SCHEMA)
        self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def save(self, job: Job) -> None:
        row = (
            job.id,
            job.kind,
            job.resource,
            job.lock_mode.value,
            json.dumps(dataclasses.asdict(job.spec)),
            job.state.value,
            json.dumps(dataclasses.asdict(job.progress)),
            job.error.code if job.error else None,
            job.error.message if job.error else None,
            json.dumps(dataclasses.asdict(job.result)) if job.result is not None else None,
            job.created_at,
            job.started_at,
            job.ended_at,
        )
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO jobs (id, kind, resource, lock_mode, spec, state, progress, error_code,"
                " error_message, result, created_at, started_at, ended_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                row,
            )

    def save_progress(self, job: Job) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE jobs SET progress = ? WHERE id = ?", (json.dumps(dataclasses.asdict(job.progress)), job.id)
            )

    def load_all(self) -> list[Job]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, kind, resource, lock_mode, spec, state, progress, error_code, error_message, result,"
                " created_at, started_at, ended_at FROM jobs ORDER BY created_at"
            ).fetchall()
        return [self._job(r) for r in rows]

    def prune(self, keep_finished: int) -> int:
        final = tuple(s.value for s in JobState if s.final)
        with self._lock:
            cur = self._db.execute(
                f"DELETE FROM jobs WHERE state IN ({','.join('?' * len(final))}) AND id NOT IN ("
                f" SELECT id FROM jobs WHERE state IN ({','.join('?' * len(final))})"
                " ORDER BY created_at DESC LIMIT ?)",
                (*final, *final, keep_finished),
            )
            return cur.rowcount

    def _job(self, r) -> Job:
        (id_, kind, resource, lock_mode, spec, state, progress, ecode, emsg, result, created, started, ended) = r
        spec_type, result_type = self._types(kind)
        return Job(
            id=id_,
            kind=kind,
            resource=resource,
            lock_mode=LockMode(lock_mode),
            spec=spec_type(**json.loads(spec)),
            state=JobState(state),
            progress=Progress(**json.loads(progress)),
            error=JobError(ecode, emsg) if ecode else None,
            result=result_type(**json.loads(result)) if result else None,
            created_at=created,
            started_at=started,
            ended_at=ended,
        )
