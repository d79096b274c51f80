"""The fault suite: what must hold when things go wrong, against real
servers (tgtd, smbd, nfs-ganesha), real agents and a real controller.

- credentials: every backup point authenticates with its own, also when
  another backup point already has a session to the same target;
"""
from __future__ import annotations

import os
import uuid

import pytest

from agent.config import BackupPointSection
from agent.errors import AuthFailed, FailedPrecondition
from agent.repo.backup import backup
from agent.repo.catalog import latest_for_volume
from agent.targets.registry import BackupPoint
from test_backup import CS, MiB, nid
from test_qcow2 import write
from test_targets import iscsi_lun, pool, snapshot  # noqa: F401 - fixtures

# ---- credentials ----


def _iscsi_point(t, user: str, secret: str) -> BackupPoint:
    section = BackupPointSection(type="iscsi", ip="127.0.0.1", port=t.srv.port, target=t.lun.iqn, lun=1,
                                 username=user, secret=secret, format_lun=True, chunk_size=CS, timeout=5.0)
    return BackupPoint(str(uuid.uuid4()), section)


def test_iscsi_chap_is_checked_per_backup_point_on_a_shared_target(iscsi_lun, pool, short_tmp):
    """Backup points of one CHAP target: once one has sessions open, a
    wrong secret, an empty one or an unknown user still gets AUTH_FAILED
    (no backup, no listing); the same credentials share the sessions; a
    second valid account is refused while the first serves the LUN, and
    served once it let go."""
    t = iscsi_lun(128 * MiB, chap=True)
    t.srv._adm("--op", "new", "--mode", "account", "--user", "bfother", "--password", "other-secret-42",
               input=None)
    t.srv._adm("--op", "bind", "--mode", "account", "--tid", str(t.lun.tid), "--user", "bfother")
    owner = _iscsi_point(t, t.lun.user, t.lun.secret)
    vol = pool.create_volume(nid(), "src", 8 * MiB).uuid
    write(pool.head_path(vol), {0: os.urandom(2 * MiB)}, short_tmp)
    m = backup(pool, vol, snapshot(pool, vol), owner.repository())
    assert owner.check().status == "healthy"
    strangers = [_iscsi_point(t, t.lun.user, "wrong-secret-0815"), _iscsi_point(t, t.lun.user, ""),
                 _iscsi_point(t, "nobody", t.lun.secret)]
    for bp in strangers:
        with pytest.raises(AuthFailed) as e:
            bp.repository()
        assert "0815" not in str(e.value) and t.lun.secret not in str(e.value)
        health = bp.check()
        assert health.status == "auth_failed" and health.error_code == "AUTH_FAILED"
    twin = _iscsi_point(t, t.lun.user, t.lun.secret)  # the same credentials: the same sessions
    assert latest_for_volume(twin.repository(), vol).backup_id == m.backup_id
    other = _iscsi_point(t, "bfother", "other-secret-42")
    with pytest.raises(FailedPrecondition, match="other credentials"):
        other.repository()
    owner.reset()
    assert latest_for_volume(twin.repository(), vol).backup_id == m.backup_id  # the twin's store is still open
    twin.reset()
    assert latest_for_volume(other.repository(), vol).backup_id == m.backup_id
    other.reset()
