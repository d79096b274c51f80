"""The policy scheduler against a real (SQLite) controller database, with
its clock compressed: two simulated weeks of a policy firing hourly on some
weekdays, restarts, a second scheduler on the same database, and downtimes
within and beyond the grace period. The exact checkpoints are asserted."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

from agent.controller.config import ControllerConfig
from agent.controller.db import Database, migrate
from agent.controller.models import Checkpoint, Policy, Vault
from agent.controller.scheduler import Scheduler

UTC = UTC
START = datetime(2026, 11, 2, tzinfo=UTC)  # a Monday
PATTERN = "FREQ=WEEKLY;BYDAY=MO,WE,FR;BYHOUR=9,10,11;BYMINUTE=30"
GRACE = 3600


def state_for(tmp):
    url = f"sqlite:///{tmp}/controller.sqlite3"
    migrate(url)
    return SimpleNamespace(db=Database(url), cfg=ControllerConfig(), agents=None, dispatcher=None, secrets=None)


def add_vault(state, policy_start: float, enabled: bool = True) -> str:
    pid, vid, tenant = str(uuid.uuid4()), str(uuid.uuid4()), str(uuid.uuid4())
    with state.db.session() as s:
        s.add(
            Policy(
                id=pid,
                tenant=tenant,
                name="hourly",
                enabled=enabled,
                operation_type="backup",
                definition_json=json.dumps({"max_backups": 5}),
                patterns_json=json.dumps([PATTERN]),
                start_time=policy_start,
                created_at=policy_start,
                updated_at=policy_start,
            )
        )
        s.add(
            Vault(
                id=vid,
                tenant=tenant,
                name="v",
                description="",
                backup_point_uuid=str(uuid.uuid4()),
                size_gb=10,
                policy_id=pid,
                policy_since=policy_start,
                status="available",
                created_at=policy_start,
                updated_at=policy_start,
            )
        )
    return vid


def checkpoints(state, vault_id: str) -> list[tuple[str, str]]:
    with state.db.session() as s:
        rows = s.query(Checkpoint).filter(Checkpoint.vault_id == vault_id).order_by(Checkpoint.due_at).all()
        return [(datetime.fromtimestamp(c.due_at, UTC).strftime("%a %d %H:%M"), c.status) for c in rows]


def expected_runs(days: int) -> list[str]:
    out = []
    for d in range(days):
        day = START + timedelta(days=d)
        if day.weekday() in (0, 2, 4):
            out += [(day + timedelta(hours=h, minutes=30)).strftime("%a %d %H:%M") for h in (9, 10, 11)]
    return out


def test_two_weeks_with_restarts_downtimes_and_a_second_scheduler(short_tmp):
    state = state_for(short_tmp)
    vault = add_vault(state, START.timestamp())
    idle = add_vault(state, START.timestamp(), enabled=False)  # a disabled policy makes nothing
    now = START.timestamp()
    sched = Scheduler(state, grace=GRACE)
    other = Scheduler(state, grace=GRACE)  # a second controller thread on the same database
    wed2, fri2 = START + timedelta(days=9), START + timedelta(days=11)
    down = [
        (wed2.replace(hour=9), wed2.replace(hour=11)),  # within the grace: 10:30 made late, 09:30 missed
        (fri2.replace(hour=8), fri2.replace(hour=13)),
    ]  # beyond it: 11:30 recorded as missed, none run
    step = 600
    ticks = 0
    while now < (START + timedelta(days=14)).timestamp():
        now += step
        t = datetime.fromtimestamp(now, UTC)
        if any(a <= t < b for a, b in down):
            continue
        if ticks % 97 == 0:  # a restart: a new scheduler with no memory of its own
            sched = Scheduler(state, grace=GRACE)
        made = sched.tick(now)
        again = other.tick(now)
        assert not (set(made) & set(again))
        ticks += 1
    got = checkpoints(state, vault)
    want = [r for r in expected_runs(14) if r not in ("Wed 11 09:30", "Fri 13 09:30", "Fri 13 10:30", "Fri 13 11:30")]
    assert [d for d, status in got if status == "available"] == want
    assert [(d, status) for d, status in got if status != "available"] == [("Fri 13 11:30", "error")]
    assert len({d for d, _ in got}) == len(got)  # never twice
    with state.db.session() as s:
        missed = s.query(Checkpoint).filter(Checkpoint.vault_id == vault, Checkpoint.status == "error").one()
        assert "missed" in json.loads(missed.skipped_json)[0]["reason"]
    assert checkpoints(state, idle) == []


def test_a_run_is_made_on_time_not_before(short_tmp):
    state = state_for(short_tmp)
    vault = add_vault(state, START.timestamp())
    sched = Scheduler(state, grace=GRACE, clock=lambda: (START + timedelta(hours=9, minutes=29)).timestamp())
    assert sched.tick() == []
    sched.clock = lambda: (START + timedelta(hours=9, minutes=30)).timestamp()
    assert len(sched.tick()) == 1 and sched.tick() == []
    assert checkpoints(state, vault) == [("Mon 02 09:30", "available")]


def test_a_policy_applied_later_runs_only_from_then(short_tmp):
    state = state_for(short_tmp)
    vault = add_vault(state, START.timestamp())
    with state.db.session() as s:  # associated on Wednesday at noon
        s.get(Vault, vault).policy_since = (START + timedelta(days=2, hours=12)).timestamp()
    Scheduler(state, grace=GRACE).tick((START + timedelta(days=4, hours=12)).timestamp())
    assert checkpoints(state, vault) == [("Fri 06 11:30", "available")]


def test_resources_that_cannot_be_backed_up_are_skipped_with_a_code(short_tmp):
    """No online host for its pool, a backup of it still running, a full
    vault: each volume lands in skipped_resources with seed 003's code."""
    from agent.controller import checkpoints as cps
    from agent.controller.models import Backup, Host, Pool, VaultResource, Volume

    state = state_for(short_tmp)
    vault = add_vault(state, START.timestamp())
    now = START.timestamp()
    with state.db.session() as s:  # a pool whose only host stopped sending heartbeats long ago
        s.add(Host(uuid="h-dead", hostname="dead", address="127.0.0.1:1", registered_at=0, last_seen=0))
        s.add(
            Pool(
                uuid="p1",
                cluster_uuid="c",
                name="p",
                pool_type=4,
                kind="dir",
                source="/x",
                limit_host=True,
                avail_hosts_json=json.dumps(["h-dead"]),
                ctime=0,
            )
        )
    vols = []
    with state.db.session() as s:
        v = s.get(Vault, vault)
        for i in range(2):
            vid = str(uuid.uuid4())
            s.add(
                Volume(
                    uuid=vid,
                    tenant=v.tenant,
                    cluster_uuid="c",
                    pool_uuid="p1",
                    name=f"v{i}",
                    vtype="block",
                    capacity=1 << 30,
                    state="ready",
                    ctime=0,
                    mtime=0,
                )
            )
            s.add(VaultResource(volume_uuid=vid, vault_id=vault, tenant=v.tenant, runs=0, added_at=now + i))
            vols.append(vid)
        s.add(
            Backup(
                uuid=str(uuid.uuid4()),
                tenant=v.tenant,
                cluster_uuid="c",
                name="running",
                backup_point_uuid="b",
                volume_uuid=vols[1],
                snapshot_uuid="s",
                status="BackupStarted",
                ctime=0,
                mtime=0,
            )
        )
    cp = cps.create(state, vault, due_at=now, manual=True)
    with state.db.session() as s:
        row = s.get(Checkpoint, cp)
        skipped = {x["id"]: x for x in json.loads(row.skipped_json)}
        assert row.status == "error" and json.loads(row.resources_json) == []
    assert skipped[vols[0]]["code"] == "BackupService.9018" and "no online host" in skipped[vols[0]]["reason"]
    assert skipped[vols[1]]["code"] == "BackupService.6125" and "in progress" in skipped[vols[1]]["reason"]
    with state.db.session() as s:  # the vault is full: everything is skipped for that
        v = s.get(Vault, vault)
        s.add(
            Backup(
                uuid=str(uuid.uuid4()),
                tenant=v.tenant,
                cluster_uuid="c",
                name="big",
                backup_point_uuid="b",
                volume_uuid=vols[0],
                snapshot_uuid="s",
                status="BackupSucceeded",
                stored_bytes=11 << 30,
                vault_id=vault,
                ctime=0,
                mtime=0,
            )
        )
    cp = cps.create(state, vault, due_at=now + 1, manual=True)
    with state.db.session() as s:
        codes = {x["code"] for x in json.loads(s.get(Checkpoint, cp).skipped_json)}
    assert codes == {"BackupService.6114"}


def test_a_checkpoint_is_finished_once_and_a_restart_recovers_the_half_done(short_tmp):
    from agent.controller import checkpoints as cps

    state = state_for(short_tmp)
    vault = add_vault(state, START.timestamp())
    rows = {}
    with state.db.session() as s:
        v = s.get(Vault, vault)
        for status in ("preparing", "finishing", "protecting"):
            rows[status] = str(uuid.uuid4())
            s.add(
                Checkpoint(
                    id=rows[status], vault_id=vault, tenant=v.tenant, due_at=len(rows), status=status, created_at=0
                )
            )
    assert cps.finish_ready(state, START.timestamp()) == [rows["protecting"]]  # no tasks: ready at once
    assert cps.finish_ready(state, START.timestamp()) == []  # never twice
    cps.recover(state)  # what a start does
    with state.db.session() as s:
        got = {k: s.get(Checkpoint, i).status for k, i in rows.items()}
        reason = json.loads(s.get(Checkpoint, rows["preparing"]).skipped_json)[-1]["reason"]
    assert got == {"preparing": "error", "finishing": "protecting", "protecting": "available"}
    assert "stopped" in reason
    assert cps.finish_ready(state, START.timestamp()) == [rows["finishing"]]
