"""Locked (immutable) backups on a directory backup point (agent locks):
no API deletes one before its date, a lock is extended but never
shortened, gc keeps every pack it needs as it is, and when the lock ends
the backup goes like any other. The S3 object lock side is in
test_s3.py."""

from __future__ import annotations

import json
import os
import time
import uuid

import pytest

from agent.api.v1 import backups_pb2
from agent.errors import BackupLocked, InvalidArgument

from support.backups import OK, Bk
from support.cli import cli
from support.volumes import MiB


def test_a_locked_backup_outlives_deletes_and_gc_until_its_date(make_agent, short_tmp):
    by_days = str(uuid.uuid4())
    a = make_agent(f'[backup_points.{by_days}]\npath = "{short_tmp}/a/bp2"\nchunk_size = 1048576\nlock_days = 2\n')
    a.start()
    with a.client() as c:
        bk = Bk(a, c)
        vol = bk.create(capacity=4 * MiB, name="locked").uuid
        bk.write(vol, {0: os.urandom(4 * MiB)})
        s0 = bk.snap(vol, "s0").uuid
        r0 = bk.backup(vol, s0)  # unlocked: four chunks in one pack
        bk.write(vol, {MiB: os.urandom(3 * MiB)})
        s1 = bk.snap(vol, "s1").uuid
        until = time.time() + 20  # room for the steps below on a loaded CI machine
        r1 = bk.backup(vol, s1, lock_until=until)  # shares chunk 0 with r0's pack
        b = c.get_backup(backups_pb2.GetBackupRequest(backup_point_uuid=bk.bp, backup_uuid=r1.backup_uuid))
        assert (int(b.locked_until), b.lock_mode) == (int(until), "agent"), b
        with pytest.raises(BackupLocked) as e:
            bk.delete(r1.backup_uuid)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(until)))
        assert f"backup {r1.backup_uuid} is locked until {stamp}" in e.value.message, e.value.message
        out = cli(a, "backups", "delete", bk.bp, r1.backup_uuid, check=False)
        assert out.returncode == 4 and "BACKUP_LOCKED" in out.stderr and stamp in out.stderr, out
        # a lock is extended, never shortened
        lock = backups_pb2.LockBackupRequest(backup_point_uuid=bk.bp, backup_uuid=r1.backup_uuid)
        lock.until = int(until) - 5
        with pytest.raises(InvalidArgument) as e:
            c.lock_backup(lock)
        assert e.value.field == "until" and "can only be extended" in e.value.message
        until += 4
        lock.until = int(until)
        assert int(c.lock_backup(lock).locked_until) == int(until)
        out = cli(a, "backups", "lock", bk.bp, r1.backup_uuid, "--until", str(int(until))).stdout  # the same: kept
        assert f"backup {r1.backup_uuid} locked until" in out and "(agent)" in out, out
        # the lock on disk (repository-format.md): one object per date, never rewritten
        holds = sorted(p.name for p in (short_tmp / "a" / "bp" / "holds").iterdir())
        assert holds == sorted(f"{r1.backup_uuid}.{int(t)}" for t in (until - 4, until)), holds
        record = json.loads((short_tmp / "a" / "bp" / "holds" / holds[-1]).read_bytes())
        assert record.keys() == {"backup", "until", "mode", "at"} and record["mode"] == "agent", record
        # r0 goes; its pack now holds one live chunk of four (r1's): gc would
        # rewrite it, but r1 is locked, so it stays as it is
        bk.delete(r0.backup_uuid)
        g = bk.gc()
        assert (g.packs_locked, g.packs_rewritten, g.packs_deleted) == (2, 0, 0), g
        v = bk.verify(r1.backup_uuid)
        assert v.state == OK and not v.verify_result.damage and v.verify_result.chunks_checked == 4, v
        restored = bk.restore(r1.backup_uuid).volume_uuid
        assert bk.digest(restored) == bk.digest(vol, s1) == r1.image_digest
        listed = {x.uuid: x for x in bk.list()}
        assert int(listed[r1.backup_uuid].locked_until) == int(until)
        # a backup point's lock_days locks every backup made there
        days = Bk(a, c, bp=by_days).backup(vol, s1)
        b = c.get_backup(backups_pb2.GetBackupRequest(backup_point_uuid=by_days, backup_uuid=days.backup_uuid))
        assert abs(b.locked_until - (time.time() + 2 * 86400)) < 120, b
        show = cli(a, "backups", "show", by_days, days.backup_uuid).stdout
        assert "locked until" in show and "(agent)" in show, show
        # the date passes: the lock is gone, and so is the backup
        time.sleep(max(0.0, until - time.time()) + 1)
        assert (
            c.get_backup(backups_pb2.GetBackupRequest(backup_point_uuid=bk.bp, backup_uuid=r1.backup_uuid)).locked_until
            == 0
        )
        bk.delete(r1.backup_uuid)
        g = bk.gc()
        assert (g.packs_locked, g.packs_deleted) == (0, 2), g
        assert not list((short_tmp / "a" / "bp" / "holds").iterdir())  # its ended lock went with it
        assert bk.stats().packs == 0
    assert a.stop() == 0
