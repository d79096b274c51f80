"""Seed 003 through the controller: policies and vaults over REST, errors in
the seed's {"error_code", "error_msg"} shape, with a real agent, real
volumes and a real backup point behind them (SQLite and PostgreSQL)."""

from __future__ import annotations

import copy
import json
import os
import uuid
from datetime import UTC, datetime

import httpx
import pytest

from support.controller import SEEDS, TENANT_B, TOKENS, check_ok, seed_example

POLICY = {
    "policy": {
        "enabled": True,
        "name": "policy001",
        "operation_definition": {
            "day_backups": 0,
            "month_backups": 0,
            "retention_duration_days": 1,
            "timezone": "UTC+08:00",
            "week_backups": 0,
            "year_backups": 0,
        },
        "operation_type": "backup",
        "trigger": {"properties": {"pattern": ["FREQ=WEEKLY;BYDAY=MO,TU,WE,TH,FR,SA,SU;BYHOUR=14;BYMINUTE=00"]}},
    }
}


def cbr_error(r: httpx.Response, status: int, code: str, field: str = "") -> dict:
    body = r.json()
    assert r.status_code == status and set(body) == {"error_code", "error_msg"}, (r.status_code, body)
    assert body["error_code"] == code, body
    if field:
        assert field in body["error_msg"], body
    assert "Traceback" not in r.text
    return body


def make_env(c, a, host, bp_env: dict | None = None) -> dict:
    """A directory pool, two volumes and a local backup point of the seeds' tenant."""
    cluster_uuid = seed_example("002", "/v1/pool/share/create")["cluster_uuid"]
    tenant = seed_example("001", "/v1/volume/share/create")["tenant"]
    with c.client("op") as op:
        pid = check_ok(
            op.post(
                "/v1/pool/share/create",
                json=dict(
                    seed_example("002", "/v1/pool/share/create"),
                    pool_type=4,
                    source=str(a.roots[0] / "p1"),
                    avail_host=[host],
                ),
            )
        )["pool"]["UUID"]
        vols = [
            check_ok(
                op.post(
                    "/v1/volume/share/create",
                    json=dict(
                        seed_example("001", "/v1/volume/share/create"),
                        pool_uuid=pid,
                        cluster_uuid=cluster_uuid,
                        capacity=16 << 20,
                        backing_file="",
                        volume_name=f"vol{i}",
                    ),
                )
            )["volume"]
            for i in range(2)
        ]
        bp = check_ok(
            op.post(
                "/v1/volume/internal/backuppoint/add",
                json=dict(
                    seed_example("000", "/v1/volume/internal/backuppoint/add"),
                    tenant=tenant,
                    btype="local",
                    cluster_uuid=cluster_uuid,
                    root_dir=str(a.roots[0] / "backups"),
                    sub_dir="v1",
                    env={"chunk_size": 1 << 20, **(bp_env or {})},
                ),
            )
        )["uuid"]
    return {"cluster": cluster_uuid, "tenant": tenant, "pool": pid, "vols": vols, "bp": bp}


def volume_digest(a, pool: str, volume: str, snapshot: str = "") -> str:
    """The image digest of a volume (or one of its snapshots), by the agent's checksum job."""
    from agent.api.v1 import jobs_pb2

    with a.client() as ac:
        job = ac.run(
            f"sum-{uuid.uuid4()}",
            checksum=jobs_pb2.ChecksumSpec(pool_uuid=pool, volume_uuid=volume, snapshot_uuid=snapshot),
        )
        assert job.state == jobs_pb2.JOB_STATE_SUCCEEDED, job.error
        return job.checksum_result.image_digest


def vault_body(env, name="vault_name", resources=None, **extra) -> dict:
    body = {
        "vault": {
            "billing": {
                "consistent_level": "crash_consistent",
                "object_type": "disk",
                "protect_type": "backup",
                "size": 40,
                "charging_mode": "post_paid",
                "is_auto_renew": False,
                "is_auto_pay": False,
            },
            "name": name,
            "backup_point_id": env["bp"],
            "resources": [{"id": v["UUID"], "type": "OS::Cinder::Volume"} for v in (resources or [])],
        }
    }
    body["vault"].update(extra)
    return body


def test_policies_and_vaults_over_rest(cluster):  # noqa: F811
    c, a, host = cluster
    env = make_env(c, a, host)
    t = env["tenant"]
    v3 = f"/v3/{t}"
    with httpx.Client(base_url=c.url, headers={"X-Auth-Token": TOKENS["op"]}, timeout=30) as op:
        # policies: the seed's example works as written; its answer has the seed's shape
        p = op.post(f"{v3}/policies", json=POLICY)
        assert p.status_code == 200, p.text
        pol = p.json()["policy"]
        assert pol["name"] == "policy001" and pol["enabled"] is True and pol["operation_type"] == "backup"
        assert (
            pol["trigger"]["type"] == "time"
            and pol["trigger"]["properties"]["pattern"] == POLICY["policy"]["trigger"]["properties"]["pattern"]
            and pol["associated_vaults"] is None
        )
        assert pol["operation_definition"]["retention_duration_days"] == 1
        assert op.get(f"{v3}/policies/{pol['id']}").json()["policy"] == pol
        cbr_error(op.post(f"{v3}/policies", json=POLICY), 409, "BackupService.9005", "policy.name")
        bad = copy.deepcopy(POLICY)
        bad["policy"]["trigger"]["properties"]["pattern"] = ["FREQ=MINUTELY;BYHOUR=1;BYMINUTE=0"]
        cbr_error(
            op.post(f"{v3}/policies", json=bad), 400, "BackupService.9001", "policy.trigger.properties.pattern[0]"
        )
        bad = copy.deepcopy(POLICY)
        bad["policy"]["operation_definition"] = {"week_backups": 2}
        cbr_error(op.post(f"{v3}/policies", json=bad), 400, "BackupService.9001", "operation_definition.timezone")
        up = op.put(f"{v3}/policies/{pol['id']}", json={"policy": {"enabled": False, "name": "nightly"}})
        assert up.status_code == 200 and up.json()["policy"]["enabled"] is False, up.text
        assert up.json()["policy"]["name"] == "nightly"
        # vaults
        created = op.post(
            f"{v3}/vaults", json=vault_body(env, resources=env["vols"][:1], backup_policy_id=pol["id"], description="d")
        )
        assert created.status_code == 200, created.text
        vault = created.json()["vault"]
        assert vault["name"] == "vault_name" and vault["billing"]["size"] == 40 and vault["billing"]["used"] == 0
        assert vault["capacity"]["totalCapacity"] == 40 << 30 and vault["capacity"]["usedCapacity"] == 0
        assert [r["id"] for r in vault["resources"]] == [env["vols"][0]["UUID"]]
        assert vault["resources"][0]["type"] == "OS::Cinder::Volume" and vault["policy_id"] == pol["id"]
        assert vault["state"] == "Disabled"  # its policy is disabled
        vid = vault["id"]
        assert op.get(f"{v3}/policies/{pol['id']}").json()["policy"]["associated_vaults"] == [
            {"vault_id": vid, "destination_vault_id": None}
        ]
        cbr_error(op.post(f"{v3}/vaults", json=vault_body(env)), 409, "BackupService.9005", "vault.name")
        add = op.post(
            f"{v3}/vaults/{vid}/addresources",
            json={"resources": [{"id": env["vols"][1]["UUID"], "type": "OS::Cinder::Volume"}]},
        )
        assert add.json() == {"add_resource_ids": [env["vols"][1]["UUID"]]}, add.text
        other = op.post(f"{v3}/vaults", json=vault_body(env, name="other"))
        assert other.status_code == 200, other.text
        oid = other.json()["vault"]["id"]
        # a volume belongs to one vault: the seed's BackupService.6103
        cbr_error(
            op.post(f"{v3}/vaults/{oid}/addresources", json={"resources": [{"id": env["vols"][0]["UUID"]}]}),
            400,
            "BackupService.6103",
            "resources[0].id",
        )
        cbr_error(
            op.post(f"{v3}/vaults/{oid}/removeresources", json={"resource_ids": [env["vols"][0]["UUID"]]}),
            400,
            "BackupService.6135",
            "resource_ids[0]",
        )
        # queries, ZStack style and by field
        assert [x["id"] for x in op.get(f"{v3}/vaults", params={"q": "name=other"}).json()["vaults"]] == [oid]
        assert op.get(f"{v3}/vaults", params=[("q", f"uuid={vid}"), ("q", "status=available")]).json()["count"] == 1
        assert op.get(f"{v3}/vaults", params={"policy_id": pol["id"]}).json()["count"] == 1
        op.put(f"{v3}/policies/{pol['id']}", json={"policy": {"enabled": True}})
        assert [x["id"] for x in op.get(f"{v3}/vaults", params={"q": "state=Enabled"}).json()["vaults"]] == [vid]
        cbr_error(op.get(f"{v3}/vaults", params={"q": "colour=red"}), 400, "BackupService.9001", "q")
        # a policy in use is not deleted; dissociated, it is
        cbr_error(op.delete(f"{v3}/policies/{pol['id']}"), 409, "BackupService.9009", "policy_id")
        assert op.post(f"{v3}/vaults/{vid}/dissociatepolicy", json={"policy_id": pol["id"]}).status_code == 200
        assert op.get(f"{v3}/vaults/{vid}").json()["vault"]["policy_id"] is None
        assert op.post(f"{v3}/vaults/{vid}/associatepolicy", json={"policy_id": pol["id"]}).json() == {
            "associate_policy": {"vault_id": vid, "policy_id": pol["id"]}
        }
        # updates and bad input name the field
        assert (
            op.put(f"{v3}/vaults/{vid}", json={"vault": {"billing": {"size": 80}}}).json()["vault"]["billing"]["size"]
            == 80
        )
        cbr_error(
            op.put(f"{v3}/vaults/{vid}", json={"vault": {"billing": {"size": 5}}}),
            400,
            "BackupService.9001",
            "vault.billing.size",
        )
        for change, field in (
            ({"billing": {"object_type": "turbo", "protect_type": "backup", "size": 40}}, "vault.billing.object_type"),
            ({"backup_point_id": str(uuid.uuid4())}, "vault.backup_point_id"),
            ({"resources": [{"id": str(uuid.uuid4())}]}, "vault.resources[0].id"),
            ({"resources": [{"id": env["vols"][1]["UUID"], "type": "OS::Nova::Server"}]}, "vault.resources[0].type"),
            ({"name": ""}, "vault.name"),
        ):
            body = vault_body(env, name="third")
            body["vault"].update(change)
            r = op.post(f"{v3}/vaults", json=body)
            assert r.status_code in (400, 404) and field in r.json()["error_msg"], r.text
        # removing resources, deleting vaults (empty: Permissive is enough)
        assert op.post(
            f"{v3}/vaults/{vid}/removeresources", json={"resource_ids": [env["vols"][1]["UUID"]]}
        ).json() == {"remove_resource_ids": [env["vols"][1]["UUID"]]}
        cbr_error(op.delete(f"{v3}/vaults/{oid}", params={"mode": "Sometimes"}), 400, "BackupService.9001", "mode")
        cbr_error(
            op.delete(f"{v3}/vaults/{oid}", params={"deleteMode": "Later"}), 400, "BackupService.9001", "deleteMode"
        )
        assert op.delete(f"{v3}/vaults/{oid}").status_code == 204
        cbr_error(op.get(f"{v3}/vaults/{oid}"), 404, "BackupService.9004", "vault_id")
        # seed 004's reconnect action: the backup point re-checked through the agent
        rc = op.put(f"{v3}/vaults/{vid}/actions", json={"reconnectBackupStorage": {}, "systemTags": []})
        assert rc.status_code == 200, rc.text
        assert rc.json()["vault"]["backup_storage"]["status"] == "healthy"
        assert rc.json()["vault"]["backup_storage"]["host_uuid"] == host
        cbr_error(
            op.put(f"{v3}/vaults/{vid}/actions", json={"explode": {}}),
            400,
            "BackupService.9001",
            "reconnectBackupStorage",
        )
        with c.client("op") as op1:
            logged = {x["operation_type"]: x for x in check_ok(op1.get("/v1/tasks"))["tasks"]}
        assert logged["vault_delete"]["result"] == {"mode": "Permissive", "backups_deleted": 0}
        assert logged["remove_resource"]["resource"] == {"type": "vault", "uuid": vid}
    # tenants: another tenant's token sees none of it, and cannot name this project
    with c.client(TENANT_B) as other_tenant:
        cbr_error(other_tenant.get(f"{v3}/vaults"), 404, "BackupService.9004", "project_id")
        assert other_tenant.get(f"/v3/{TENANT_B}/vaults").json() == {"vaults": [], "count": 0}
    with httpx.Client(base_url=c.url, timeout=30) as anonymous:
        cbr_error(anonymous.get(f"{v3}/policies"), 401, "BackupService.9024", "authorization")


def wait_for(fn, timeout: float = 60.0, what: str = ""):
    import time

    deadline = time.monotonic() + timeout
    while True:
        got = fn()
        if got:
            return got
        assert time.monotonic() < deadline, what
        time.sleep(0.3)


def test_checkpoints_retention_and_restores_bit_for_bit(cluster, short_tmp, ceph):  # noqa: F811
    """A vault with two qcow2 volumes and an RBD volume and a policy (keep 2, a full re-read
    every other run): manual checkpoints and two scheduled ones (the scheduler
    with its clock moved to the next run, on the controller's database),
    retention pruning, one base snapshot per volume, restores that equal the
    volumes as they were, vault deletion in both modes."""
    from datetime import timedelta
    from types import SimpleNamespace

    import rados
    import rbd

    from agent.controller import config as ccfg
    from agent.controller.agents import AgentClients
    from agent.controller.db import Database
    from agent.controller.scheduler import Scheduler
    from agent.controller.secrets import SecretBox

    from support.controller import wait_task
    from support.volumes import write

    c, a, host = cluster
    env = make_env(c, a, host)
    t, pid = env["tenant"], env["pool"]
    v3 = f"/v3/{t}"
    run = short_tmp / "run-test"
    run.mkdir()
    # a third volume, in an RBD pool on the Ceph fixture
    rados_pool = f"vault{uuid.uuid4().hex[:8]}"
    ceph.add_pool(rados_pool)
    with c.client("op") as op1:
        rbd_pid = check_ok(
            op1.post(
                "/v1/pool/share/create",
                json=dict(
                    seed_example("002", "/v1/pool/share/create"),
                    pool_name="ceph",
                    pool_type=6,
                    source=rados_pool,
                    limit_host=False,
                    avail_host=[],
                    attr={"ceph_conf": str(ceph.conf)},
                ),
            )
        )["pool"]["UUID"]
        env["vols"].append(
            check_ok(
                op1.post(
                    "/v1/volume/share/create",
                    json=dict(
                        seed_example("001", "/v1/volume/share/create"),
                        pool_uuid=rbd_pid,
                        cluster_uuid=env["cluster"],
                        capacity=16 << 20,
                        backing_file="",
                        volume_name="rbd0",
                    ),
                )
            )["volume"]
        )
    heads = [vol["AccessPath"][host] for vol in env["vols"][:2]]
    vol_ids = [vol["UUID"] for vol in env["vols"]]
    pool_of = {vol_ids[0]: pid, vol_ids[1]: pid, vol_ids[2]: rbd_pid}
    cluster_h = rados.Rados(conffile=str(ceph.conf))
    cluster_h.connect(timeout=10)
    rbd_io = cluster_h.open_ioctx(rados_pool)

    def digest(volume_uuid: str) -> str:
        return volume_digest(a, pool_of.get(volume_uuid, pid), volume_uuid)

    def rbd_write(offset: int, data: bytes) -> None:  # as a VM's librbd would
        with rbd.Image(rbd_io, vol_ids[2]) as img:
            img.write(data, offset)
            img.flush()

    policy = copy.deepcopy(POLICY)
    policy["policy"]["operation_definition"] = {"max_backups": 2, "full_backup_interval": 1}
    policy["policy"]["trigger"]["properties"]["pattern"] = ["FREQ=DAILY;BYHOUR=3;BYMINUTE=0"]
    with httpx.Client(base_url=c.url, headers={"X-Auth-Token": TOKENS["op"]}, timeout=60) as op, c.client("op") as op1:
        pol = op.post(f"{v3}/policies", json=policy).json()["policy"]
        vault = op.post(
            f"{v3}/vaults",
            json=vault_body(env, resources=env["vols"], backup_policy_id=pol["id"], backup_name_prefix="nightly"),
        ).json()["vault"]
        vid = vault["id"]
        wants, modes = [], []

        def checkpoint_done(cp_id: str) -> dict:
            return wait_for(
                lambda: (lambda cp: cp if cp["status"] != "protecting" else None)(
                    op.get(f"{v3}/checkpoints/{cp_id}").json()["checkpoint"]
                ),
                what=cp_id,
            )

        def change(k: int) -> list[str]:
            write(heads[0], {0: os.urandom(1 << 20), (k + 1) << 20: os.urandom(4096)}, run)  # chunk 0 rewritten
            write(heads[1], {(k + 8) << 20: os.urandom(64 << 10)}, run)
            rbd_write((k * 3) << 20, os.urandom(1 << 20))
            return [digest(x) for x in vol_ids]

        for k in range(3):
            wants.append(change(k))
            r = op.post(
                f"{v3}/checkpoints",
                json={
                    "checkpoint": {
                        "vault_id": vid,
                        "parameters": {"name": f"run{k}", "description": "by hand", "incremental": True},
                    }
                },
            )
            assert r.status_code == 200, r.text
            cp = r.json()["checkpoint"]
            assert cp["status"] == "protecting" and cp["vault"]["skipped_resources"] == [], cp
            assert [x["id"] for x in cp["vault"]["resources"]] == vol_ids
            for x in cp["vault"]["resources"]:
                done_task = wait_task(op1, x["task_id"])
                assert done_task["status"] == "success", done_task["error_info"]
                # what the agent did: an incremental from the base snapshot's bitmaps, not a fallback
                assert done_task["result"]["mode"] == ("incremental" if k == 1 else "full"), done_task["result"]
            done = checkpoint_done(cp["id"])
            assert done["status"] == "available", done
            modes.append([x["backup_mode"] for x in done["vault"]["resources"]])
        assert modes == [["full"] * 3, ["incremental"] * 3, ["full"] * 3]
        # a scheduled run: the scheduler on the controller's database, its clock at the next 03:00 UTC
        cfg = ccfg.load(str(c.config))
        state = SimpleNamespace(
            db=Database(cfg.database_url),
            cfg=cfg,
            agents=AgentClients(cfg),
            dispatcher=None,
            secrets=SecretBox.from_file(cfg.secret_key_file),
        )
        now = datetime.now(UTC)
        nxt = (now + timedelta(days=1)).replace(hour=3, minute=0, second=0, microsecond=0)
        if nxt - now > timedelta(days=1):
            nxt -= timedelta(days=1)
        made = []
        try:
            for day in range(2):  # two scheduled runs, a day apart
                wants.append(change(3 + day))
                due = nxt + timedelta(days=day)
                got = Scheduler(state, clock=lambda: due.timestamp() + 30).tick()
                assert len(got) == 1
                assert Scheduler(state, clock=lambda: due.timestamp() + 90).tick() == []  # never twice
                made += got
                scheduled = op.get(f"{v3}/checkpoints/{got[0]}").json()["checkpoint"]
                assert scheduled["manual"] is False and scheduled["due_at"] == due.strftime("%Y-%m-%dT%H:%M:%S")
                for x in scheduled["vault"]["resources"]:
                    done_task = wait_task(op1, x["task_id"])
                    assert done_task["status"] == "success"
                    assert done_task["result"]["mode"] == ("incremental" if day == 0 else "full"), done_task
                done = checkpoint_done(got[0])
                assert done["status"] == "available"
                modes.append([x["backup_mode"] for x in done["vault"]["resources"]])
        finally:
            state.agents.close()
        assert modes[3:] == [["incremental"] * 3, ["full"] * 3]  # full_backup_interval 1: every other run
        # retention kept the newest 2 per volume; the pruning is a task with its counts
        backups = [
            b
            for b in check_ok(op1.get("/v1/volume/share/backup/list", params={"cluster_uuid": env["cluster"]}))["list"]
        ]
        auto = [f"nightly_autobk_{m[:8]}" for m in made]
        assert sorted(b["Name"] for b in backups) == sorted(auto * 3)
        deletes = wait_for(lambda: check_ok(op1.get("/v1/tasks", params={"operation_type": "delete"}))["tasks"])
        assert sum(d["result"]["OpExtendInfoDelete"]["deleted"] for d in deletes) == 9
        assert all(d["status"] == "success" for d in deletes)
        gcs = wait_for(
            lambda: (lambda ts: ts if ts and all(x["status"] not in ("waiting", "running") for x in ts) else None)(
                check_ok(op1.get("/v1/tasks", params={"operation_type": "gc"}))["tasks"]
            ),
            what="gc",
        )
        assert {x["status"] for x in gcs} == {"success"}, gcs
        assert sum(int(x["result"].get("chunks_removed", 0)) for x in gcs) > 0, gcs
        # one snapshot of ours per volume: the base of the next incremental
        for vol_id in vol_ids:
            snaps = check_ok(
                op1.post(
                    "/v1/volume/share/snapshot/list",
                    json={"tenant": t, "cluster_uuid": env["cluster"], "volume_uuid": vol_id},
                )
            )
            names = [x["Name"] for x in (snaps.get("snapshots") or snaps.get("list") or [])]
            assert len([n for n in names if n.startswith("cbr-")]) == 1, names
        # every remaining backup restores bit for bit
        by_name = {}
        for b in backups:
            by_name.setdefault(b["Name"], {})[b["VolumeUUID"]] = b["UUID"]
        for name, k in ((auto[0], 3), (auto[1], 4)):
            for i, vol_id in enumerate(vol_ids):
                rs = check_ok(
                    op1.post(
                        "/v1/volume/share/backup/restore",
                        json=dict(
                            seed_example("001", "/v1/volume/share/backup/restore"),
                            backup_uuid=by_name[name][vol_id],
                            new_volume_name=f"r{k}-{i}",
                            new_pool_uuid=pid,
                            new_volume_tenant=t,
                            cluster_uuid=env["cluster"],
                        ),
                    )
                )
                assert wait_task(op1, rs["task_id"])["status"] == "success"
                assert digest(rs["volume"]["UUID"]) == wants[k][i]
        got = op.get(f"{v3}/vaults/{vid}").json()["vault"]
        assert got["capacity"]["backups"] == 6 and got["capacity"]["usedCapacity"] > 0
        assert {r["id"]: r["backup_count"] for r in got["resources"]} == {x: 2 for x in vol_ids}
        # the controller's metrics saw it all
        from support.metrics import promtool_lint, scrape, value

        m = scrape(c.metrics_port)
        assert value(m, "blockferry_task_duration_seconds_count", operation_type="backup") == 15
        assert value(m, "blockferry_tasks", operation_type="backup", status="success") == 15
        assert value(m, "blockferry_task_moved_bytes_total", operation_type="backup") > 0
        assert value(m, "blockferry_vault_used_bytes", vault=vid, name=got["name"]) == got["capacity"]["usedCapacity"]
        # the time of the last good backup, per vault and per volume (what stale-backup alerts read)
        in_vault = op.get(f"{v3}/backups", params={"vault_id": vid}).json()["backups"]
        newest_at = max(datetime.fromisoformat(b["created_at"]).replace(tzinfo=UTC).timestamp() for b in in_vault)
        last = value(m, "blockferry_vault_last_backup_timestamp_seconds", vault=vid, name=got["name"], tenant=t)
        assert abs(last - newest_at) < 1, (last, newest_at)
        assert not [k for k in m if k[0].endswith("_created")]
        assert promtool_lint(c.metrics_port) == ""  # tasks, histograms and vaults included
        # seed 003's backups: list, get, restore in place into the volume itself, delete
        listed = op.get(f"{v3}/backups", params={"vault_id": vid}).json()
        assert listed["count"] == 6 and {b["status"] for b in listed["backups"]} == {"available"}
        newest = by_name[auto[1]][vol_ids[0]]
        one = op.get(f"{v3}/backups/{newest}").json()["backup"]
        assert one["resource_id"] == vol_ids[0] and one["vault_id"] == vid and one["checkpoint_id"] == made[1]
        assert one["extend_info"]["auto_trigger"] is True
        write(heads[0], {0: os.urandom(8 << 20)}, run)  # the volume goes wrong after the backup
        assert digest(vol_ids[0]) != wants[4][0]
        rr = op.post(
            f"{v3}/backups/{newest}/restore",
            json={"restore": {"mappings": [{"backup_id": newest, "volume_id": vol_ids[0]}]}},
        )
        assert rr.status_code == 202 and rr.headers["X-Task-Id"], rr.text
        tr = wait_task(op1, rr.headers["X-Task-Id"])
        assert tr["status"] == "success" and tr["operation_type"] == "restore", tr
        assert tr["result"]["safety_snapshot_deleted"] is True and "safety_snapshot_uuid" not in tr["result"]
        assert digest(vol_ids[0]) == wants[4][0]  # the volume is the backup again
        small = check_ok(
            op1.post(
                "/v1/volume/share/create",
                json=dict(
                    seed_example("001", "/v1/volume/share/create"),
                    pool_uuid=pid,
                    cluster_uuid=env["cluster"],
                    capacity=4 << 20,
                    backing_file="",
                    volume_name="small",
                ),
            )
        )["volume"]["UUID"]
        cbr_error(
            op.post(f"{v3}/backups/{newest}/restore", json={"restore": {"volume_id": small}}),
            400,
            "BackupService.2001",
            "restore.volume_id",
        )
        cbr_error(
            op.post(f"{v3}/backups/{newest}/restore", json={"restore": {"volume_id": str(uuid.uuid4())}}),
            404,
            "BackupService.9004",
            "restore.volume_id",
        )
        older = by_name[auto[0]][vol_ids[1]]
        assert op.delete(f"{v3}/backups/{older}").status_code == 204
        cbr_error(op.get(f"{v3}/backups/{older}"), 404, "BackupService.9004", "backup_id")
        assert op.get(f"{v3}/backups", params={"vault_id": vid}).json()["count"] == 5
        # deletion: Permissive refuses while backups exist; Enforcing deletes them, then the vault
        cbr_error(op.delete(f"{v3}/vaults/{vid}"), 400, "BackupService.7301", "vault_id")
        assert op.delete(f"{v3}/vaults/{vid}", params={"deleteMode": "Enforcing"}).status_code == 204
        assert check_ok(op1.get("/v1/volume/share/backup/list", params={"cluster_uuid": env["cluster"]}))["list"] == []
        cbr_error(op.get(f"{v3}/vaults/{vid}"), 404, "BackupService.9004", "vault_id")
    rbd_io.close()
    cluster_h.shutdown()


def test_a_vault_on_an_encrypted_nfs_backup_point(cluster, short_tmp, nfs_server):  # noqa: F811
    """The same cycle on the real nfs-ganesha server (libnfs in the agent),
    with a password (encrypted repository): two checkpoints under a keep-1
    policy, the older pruned, the newer restored in place bit for bit."""

    from support.controller import wait_task
    from support.volumes import write

    c, a, host = cluster
    env = make_env(c, a, host)
    t, pid = env["tenant"], env["pool"]
    v3 = f"/v3/{t}"
    run = short_tmp / "run-nfs"
    run.mkdir()
    vol = env["vols"][0]
    with c.client("op") as op1:
        bp = check_ok(
            op1.post(
                "/v1/volume/internal/backuppoint/add",
                json=dict(
                    seed_example("000", "/v1/volume/internal/backuppoint/add"),
                    tenant=t,
                    cluster_uuid=env["cluster"],
                    btype="nfs",
                    ip="127.0.0.1",
                    root_dir=str(nfs_server.export),
                    sub_dir=f"vault-{uuid.uuid4().hex[:6]}",
                    pass_word="vault-secret-pw",
                    name="nfs-vault-bp",
                    env={"port": nfs_server.nfs_port, "mount_port": nfs_server.mount_port, "chunk_size": 1 << 20},
                ),
            )
        )["uuid"]

    def digest() -> str:
        return volume_digest(a, pid, vol["UUID"])

    policy = copy.deepcopy(POLICY)
    policy["policy"]["name"] = "keep-one"
    policy["policy"]["operation_definition"] = {"max_backups": 1}
    with httpx.Client(base_url=c.url, headers={"X-Auth-Token": TOKENS["op"]}, timeout=60) as op, c.client("op") as op1:
        pol = op.post(f"{v3}/policies", json=policy).json()["policy"]
        body = vault_body(env, name="nfs", resources=[vol], backup_policy_id=pol["id"])
        body["vault"]["backup_point_id"] = bp
        vid = op.post(f"{v3}/vaults", json=body).json()["vault"]["id"]
        wants, cps = [], []
        for k in range(2):
            write(vol["AccessPath"][host], {k << 20: os.urandom(1 << 20)}, run)
            wants.append(digest())
            cp = op.post(f"{v3}/checkpoints", json={"checkpoint": {"vault_id": vid}}).json()["checkpoint"]
            for x in cp["vault"]["resources"]:
                done_task = wait_task(op1, x["task_id"], 120)
                assert done_task["status"] == "success", done_task["error_info"]
            cps.append(
                wait_for(
                    lambda: (lambda c_: c_ if c_["status"] != "protecting" else None)(
                        op.get(f"{v3}/checkpoints/{cp['id']}").json()["checkpoint"]
                    )
                )
            )
        assert [x["status"] for x in cps] == ["available", "available"]
        left = wait_for(
            lambda: (lambda b: b if b["count"] == 1 else None)(op.get(f"{v3}/backups", params={"vault_id": vid}).json())
        )
        newest = left["backups"][0]
        assert newest["checkpoint_id"] == cps[1]["id"]
        write(vol["AccessPath"][host], {0: os.urandom(4 << 20)}, run)
        rr = op.post(f"{v3}/backups/{newest['id']}/restore", json={"restore": {"volume_id": vol["UUID"]}})
        assert rr.status_code == 202, rr.text
        assert wait_task(op1, rr.headers["X-Task-Id"], 120)["status"] == "success"
        assert digest() == wants[1]
        assert op.delete(f"{v3}/vaults/{vid}", params={"deleteMode": "Enforcing"}).status_code == 204
    for log in (c.workdir / "controller.log", a.log):  # the password: sealed, never logged
        assert "vault-secret-pw" not in log.read_text()


def seed003_example(title: str) -> dict:
    """A request example of seed 003, by the line that introduces it."""
    text = next(SEEDS.glob("003_*.txt")).read_text()
    section = text[text.index(title) :]
    return json.loads(section.split("```")[1].split("\n", 2)[2])


def test_a_server_vault_backs_up_a_running_vms_disks_as_one_set(cluster, short_tmp):  # noqa: F811
    """Seed 003's server vault example, as written (ids, the policy and our
    backup_point_id substituted): the VM's disks, less the excluded one, are
    snapshotted at one instant inside a guest freeze while the guest writes,
    backed up, and restore bit for bit to that instant."""

    from support.controller import wait_task
    from support.fake_qga import FakeGuestAgent
    from support.vms import Vm

    c, a, host = cluster
    env = make_env(c, a, host)
    t, pid = env["tenant"], env["pool"]
    v3 = f"/v3/{t}"
    with c.client("op") as op1:
        extra = check_ok(
            op1.post(
                "/v1/volume/share/create",
                json=dict(
                    seed_example("001", "/v1/volume/share/create"),
                    pool_uuid=pid,
                    cluster_uuid=env["cluster"],
                    capacity=16 << 20,
                    backing_file="",
                    volume_name="scratch",
                ),
            )
        )["volume"]
    disks = [*env["vols"], extra]
    ga = FakeGuestAgent(str(short_tmp / "qga.sock"))
    vm = Vm(short_tmp, [next(iter(d["AccessPath"].values())) for d in disks], name="ECS-0001", qga=ga.path)

    def digest(volume_uuid: str, snapshot_uuid: str = "") -> str:
        return volume_digest(a, pid, volume_uuid, snapshot_uuid)

    try:
        for i in range(3):
            vm.write(i, 0x10 + i, i << 20, 1 << 20)
        with httpx.Client(base_url=c.url, headers={"X-Auth-Token": TOKENS["op"]}, timeout=60) as op:
            wait_for(lambda: check_ok(op.get("/v1/vms"))["list"], what="the VM in the inventory")
            pol = op.post(f"{v3}/policies", json=POLICY).json()["policy"]
            body = seed003_example("Creating a 100-GB pay-per-use cloud server backup vault")
            b = body["vault"]
            b["backup_policy_id"], b["backup_point_id"] = pol["id"], env["bp"]
            b["resources"][0]["id"] = vm.uuid
            b["resources"][0]["extra_info"]["exclude_volumes"] = [extra["UUID"]]
            r = op.post(f"{v3}/vaults", json=body)
            assert r.status_code == 200, r.text
            vault = r.json()["vault"]
            assert vault["billing"]["object_type"] == "server"
            assert vault["billing"]["spec_code"] == "vault.backup.server.normal"
            (res,) = vault["resources"]
            assert (res["id"], res["type"], res["name"]) == (vm.uuid, "OS::Nova::Server", "ECS-0001")
            assert res["extra_info"] == {"exclude_volumes": [extra["UUID"]]}
            listed = op.get(f"{v3}/vaults", params={"object_type": "server"}).json()
            assert [x["id"] for x in listed["vaults"]] == [vault["id"]]
            # refused: a volume vault's resource type, a server that runs nowhere, the server twice
            bad = copy.deepcopy(body)
            bad["vault"]["name"] = "other"
            bad["vault"]["resources"][0]["type"] = "OS::Cinder::Volume"
            cbr_error(op.post(f"{v3}/vaults", json=bad), 400, "BackupService.9001", "vault.resources[0].type")
            bad["vault"]["resources"][0].update(type="OS::Nova::Server", id=str(uuid.uuid4()))
            cbr_error(op.post(f"{v3}/vaults", json=bad), 404, "BackupService.9004", "vault.resources[0].id")
            bad["vault"]["resources"][0]["id"] = vm.uuid
            cbr_error(op.post(f"{v3}/vaults", json=bad), 400, "BackupService.6103", "vault.resources[0].id")

            r = op.post(f"{v3}/checkpoints", json={"checkpoint": {"vault_id": vault["id"], "parameters": {}}})
            assert r.status_code == 200, r.text
            cp = r.json()["checkpoint"]
            vm.write(0, 0x7F, 0, 16 << 20)  # the guest goes on writing: not in the backups
            got = cp["vault"]["resources"]
            assert sorted(x["id"] for x in got) == sorted(d["UUID"] for d in env["vols"])  # the excluded one is not
            assert {x["extra_info"]["server_id"] for x in got} == {vm.uuid}
            assert {x["extra_info"]["consistency"] for x in got} == {"application"}
            assert [n for n in ga.names() if n != "guest-sync-delimited"] == [
                "guest-fsfreeze-freeze",
                "guest-fsfreeze-thaw",
            ]  # one freeze for both disks
            with c.client("op") as op1:
                for x in got:
                    assert wait_task(op1, x["task_id"])["status"] == "success"
                    made = op.get(f"{v3}/backups/{x['backup_id']}").json()["backup"]
                    assert made["extend_info"]["consistency"] == "application"  # kept with the backup
                    want = digest(x["id"], x["extra_info"]["snapshot_id"])
                    rs = check_ok(
                        op1.post(
                            "/v1/volume/share/backup/restore",
                            json=dict(
                                seed_example("001", "/v1/volume/share/backup/restore"),
                                backup_uuid=x["backup_id"],
                                new_volume_name=f"r-{x['id'][:8]}",
                                new_pool_uuid=pid,
                                new_volume_tenant=t,
                                cluster_uuid=env["cluster"],
                            ),
                        )
                    )
                    assert wait_task(op1, rs["task_id"])["status"] == "success"
                    assert digest(rs["volume"]["UUID"]) == want
            # the next run: incremental from the first set, whose snapshots qemu then merges away
            wait_for(
                lambda: op.get(f"{v3}/checkpoints/{cp['id']}").json()["checkpoint"]["status"] != "protecting",
                what="the first checkpoint",
            )
            r = op.post(f"{v3}/checkpoints", json={"checkpoint": {"vault_id": vault["id"], "parameters": {}}})
            cp2 = r.json()["checkpoint"]
            with c.client("op") as op1:
                for x in cp2["vault"]["resources"]:
                    done = wait_task(op1, x["task_id"])
                    assert done["status"] == "success" and done["result"]["mode"] == "incremental", done
                done = wait_for(
                    lambda: (lambda k: k if k["status"] != "protecting" else None)(
                        op.get(f"{v3}/checkpoints/{cp2['id']}").json()["checkpoint"]
                    ),
                    what="the second checkpoint",
                )
                assert done["status"] == "available", done
                for d in env["vols"]:
                    snaps = check_ok(
                        op1.post(
                            "/v1/volume/share/snapshot/list",
                            json={"tenant": t, "cluster_uuid": env["cluster"], "volume_uuid": d["UUID"]},
                        )
                    )
                    names = [x["Name"] for x in (snaps.get("snapshots") or snaps.get("list") or [])]
                    assert len([n for n in names if n.startswith("cbr-")]) == 1, names  # the old base went live
            # removing the server removes its disks from the vault
            r = op.post(f"{v3}/vaults/{vault['id']}/removeresources", json={"resource_ids": [vm.uuid]})
            assert r.status_code == 200, r.text
            assert op.get(f"{v3}/vaults/{vault['id']}").json()["vault"]["resources"] == []
    finally:
        vm.quit()
        ga.close()


@pytest.mark.parametrize("cluster", ["sqlite"], indirect=True)
def test_a_server_vault_backs_up_a_libvirt_vm_live_as_one_set(cluster, libvirtd, short_tmp):  # noqa: F811
    """Seed 003's server vault example for a VM a libvirtd manages: each
    checkpoint is one vm_backup job (libvirt's pull backup, no snapshot),
    the second incremental from libvirt's checkpoint; every backup restores
    to what the guest had written at its instant."""
    from pathlib import Path

    from agent import native

    from support.controller import wait_task

    c, a, host = cluster
    a.stop()  # the agent asks the test's libvirtd too
    a.config.write_text(a.config.read_text() + f'libvirt_uri = "{libvirtd.uri}"\n')
    a.start()
    env = make_env(c, a, host)
    t, pid = env["tenant"], env["pool"]
    v3 = f"/v3/{t}"
    vm = libvirtd.vm([Path(next(iter(d["AccessPath"].values()))) for d in env["vols"]])
    data = [bytearray(16 << 20) for _ in env["vols"]]

    def write(disk: int, pattern: int, offset: int, length: int) -> None:
        vm.write(disk, pattern, offset, length)
        data[disk][offset : offset + length] = bytes([pattern]) * length

    def digest_of(b: bytes) -> str:
        r = native.RefImageHash()
        r.update(b)
        return r.digest().hex()

    try:
        write(0, 0x41, 0, 2 << 20)
        write(1, 0x42, 3 << 20, 1 << 20)
        with httpx.Client(base_url=c.url, headers={"X-Auth-Token": TOKENS["op"]}, timeout=60) as op:
            vms = wait_for(
                lambda: [x for x in check_ok(op.get("/v1/vms"))["list"] if x["Name"] == vm.name],
                what="the VM in the inventory",
            )
            assert vms[0]["Manager"] == "libvirt"
            assert [d["VolumeUUID"] for d in vms[0]["Disks"]] == [d["UUID"] for d in env["vols"]]
            pol = op.post(f"{v3}/policies", json=POLICY).json()["policy"]
            body = seed003_example("Creating a 100-GB pay-per-use cloud server backup vault")
            b = body["vault"]
            b["backup_policy_id"], b["backup_point_id"] = pol["id"], env["bp"]
            b["resources"][0]["id"] = vm.dom.UUIDString()
            b["resources"][0]["extra_info"]["exclude_volumes"] = []
            r = op.post(f"{v3}/vaults", json=body)
            assert r.status_code == 200, r.text
            vault = r.json()["vault"]
            modes = []
            for run in range(2):
                want = [digest_of(bytes(d)) for d in data]
                r = op.post(f"{v3}/checkpoints", json={"checkpoint": {"vault_id": vault["id"], "parameters": {}}})
                assert r.status_code == 200, r.text
                cp = r.json()["checkpoint"]
                got = cp["vault"]["resources"]
                assert len({x["task_id"] for x in got}) == 1  # one job for the VM's disks
                with c.client("op") as op1:
                    done = wait_task(op1, got[0]["task_id"], 120)
                    assert done["status"] == "success", done
                    modes.append([x["mode"] for x in done["result"]["backups"]])
                    write(0, 0x50 + run, 8 << 20, 1 << 20)  # after the instant: not in this run's backups
                    for x in got:
                        made = op.get(f"{v3}/backups/{x['backup_id']}").json()["backup"]
                        assert made["extend_info"]["consistency"] == "crash"  # no guest agent in this VM
                        rs = check_ok(
                            op1.post(
                                "/v1/volume/share/backup/restore",
                                json=dict(
                                    seed_example("001", "/v1/volume/share/backup/restore"),
                                    backup_uuid=x["backup_id"],
                                    new_volume_name=f"r{run}-{x['id'][:8]}",
                                    new_pool_uuid=pid,
                                    new_volume_tenant=t,
                                    cluster_uuid=env["cluster"],
                                ),
                            )
                        )
                        assert wait_task(op1, rs["task_id"])["status"] == "success"
                        disk = [d["UUID"] for d in env["vols"]].index(x["id"])
                        assert volume_digest(a, pid, rs["volume"]["UUID"]) == want[disk]
                wait_for(
                    lambda: op.get(f"{v3}/checkpoints/{cp['id']}").json()["checkpoint"]["status"] == "available",
                    what="the checkpoint",
                )
            assert modes == [["full", "full"], ["incremental", "incremental"]]
    finally:
        libvirtd.clear()


def test_a_locked_backup_point_keeps_backups_through_deletes_and_retention(cluster):  # noqa: F811
    """A backup point with env lock_days (docs/immutable.md): every checkpoint's
    backup is locked; retention that would prune one keeps it (kept_by_lock,
    not a failure); the /v3 and seed 001 deletes are refused naming the date;
    lock_mode compliance is refused for a local backup point, naming the key."""
    from support.controller import wait_task

    c, a, host = cluster
    env = make_env(c, a, host, bp_env={"lock_days": 1})
    t = env["tenant"]
    v3 = f"/v3/{t}"
    policy = copy.deepcopy(POLICY)
    policy["policy"]["operation_definition"] = {"max_backups": 1}
    with httpx.Client(base_url=c.url, headers={"X-Auth-Token": TOKENS["op"]}, timeout=60) as op, c.client("op") as op1:
        bad = dict(seed_example("000", "/v1/volume/internal/backuppoint/add"), tenant=t, btype="local")
        bad.update(
            cluster_uuid=env["cluster"], root_dir=str(a.roots[0] / "x"), sub_dir="", env={"lock_mode": "compliance"}
        )
        r = op1.post("/v1/volume/internal/backuppoint/add", json=bad)
        assert r.status_code == 400 and "env.lock_mode" in r.json()["message"], r.text
        pol = op.post(f"{v3}/policies", json=policy).json()["policy"]
        vault = op.post(
            f"{v3}/vaults", json=vault_body(env, resources=env["vols"][:1], backup_policy_id=pol["id"])
        ).json()["vault"]
        for _ in range(2):
            r = op.post(f"{v3}/checkpoints", json={"checkpoint": {"vault_id": vault["id"], "parameters": {}}})
            assert r.status_code == 200, r.text
            cp = r.json()["checkpoint"]
            for x in cp["vault"]["resources"]:
                assert wait_task(op1, x["task_id"])["status"] == "success"
            wait_for(lambda: op.get(f"{v3}/checkpoints/{cp['id']}").json()["checkpoint"]["status"] != "protecting")
        # max_backups 1 would prune the first backup; its lock keeps it, and the run is no failure
        backups = op.get(f"{v3}/backups", params={"vault_id": vault["id"]}).json()["backups"]
        assert len(backups) == 2, backups
        tasks = check_ok(op1.get("/v1/tasks", params={"operation_type": "delete"}))["tasks"]
        pruning = [x for x in tasks if x["result"] and "OpExtendInfoDelete" in x["result"]]
        assert [x["status"] for x in pruning] == ["success"], tasks
        info = pruning[0]["result"]["OpExtendInfoDelete"]
        assert (info["kept_by_lock"], info["deleted"], info["failed"]) == (1, 0, 0), info
        oldest = min(backups, key=lambda b: b["created_at"])["id"]
        r = op.delete(f"{v3}/backups/{oldest}")
        body = cbr_error(r, 409, "BackupService.9038", "locked until")
        assert "BACKUP_LOCKED" in body["error_msg"], body
        with c.client("op") as op0:
            r = op0.post(
                "/v1/volume/share/backup/delete",
                json=dict(
                    seed_example("001", "/v1/volume/share/backup/delete"),
                    cluster_uuid=env["cluster"],
                    backup_uuid=oldest,
                ),
            )
        assert r.status_code == 409 and "locked until" in r.json()["message"], r.text
        assert len(op.get(f"{v3}/backups", params={"vault_id": vault["id"]}).json()["backups"]) == 2


@pytest.mark.parametrize("cluster", ["sqlite"], indirect=True)
def test_a_policy_copies_each_checkpoint_off_site_with_its_own_retention(cluster):
    """A policy's copy rule (copy_backup_point_id, beyond the seed): each
    checkpoint's backups are copied to a second backup point as backups of
    their own, the vault keeps one backup (max_backups 1) and the copies
    two (copy_max_backups 2), and the newest copy restores bit for bit."""
    from support.controller import reconnect, wait_task
    from support.volumes import write

    c, a, host = cluster
    env = make_env(c, a, host)
    t, vol = env["tenant"], env["vols"][0]
    v3 = f"/v3/{t}"
    with httpx.Client(base_url=c.url, headers={"X-Auth-Token": TOKENS["op"]}, timeout=60) as op, c.client("op") as op1:
        body = dict(
            seed_example("000", "/v1/volume/internal/backuppoint/add"),
            tenant=t,
            btype="local",
            cluster_uuid=env["cluster"],
            root_dir=str(a.roots[0] / "backups"),
            sub_dir="far",
            name="far",
            env={"chunk_size": 1 << 20},
        )
        far = check_ok(op1.post("/v1/volume/internal/backuppoint/add", json=body))["uuid"]
        reconnect(op1, far)  # a directory is one host's: copies go only where it is served
        policy = copy.deepcopy(POLICY)
        policy["policy"]["operation_definition"] = {
            "max_backups": 1,
            "copy_backup_point_id": far,
            "copy_max_backups": 2,
        }
        r = op.post(f"{v3}/policies", json=policy)
        assert r.status_code == 200, r.text
        assert r.json()["policy"]["operation_definition"]["copy_backup_point_id"] == far
        bad = copy.deepcopy(policy)
        bad["policy"]["operation_definition"]["copy_backup_point_id"] = "far"
        cbr_error(op.post(f"{v3}/policies", json=bad), 400, "BackupService.9001", "copy_backup_point_id")
        vault = op.post(
            f"{v3}/vaults", json=vault_body(env, resources=[vol], backup_policy_id=r.json()["policy"]["id"])
        ).json()["vault"]
        wants = []
        for k in range(3):
            run = a.workdir / f"run-{k}"
            run.mkdir()
            write(vol["AccessPath"][host], {k << 20: os.urandom(1 << 20)}, run)
            wants.append(volume_digest(a, env["pool"], vol["UUID"]))
            r = op.post(f"{v3}/checkpoints", json={"checkpoint": {"vault_id": vault["id"], "parameters": {}}})
            assert r.status_code == 200, r.text
            cp = r.json()["checkpoint"]
            for x in cp["vault"]["resources"]:
                assert wait_task(op1, x["task_id"])["status"] == "success"
            wait_for(lambda: op.get(f"{v3}/checkpoints/{cp['id']}").json()["checkpoint"]["status"] != "protecting")
            copies = [x for x in check_ok(op1.get("/v1/tasks", params={"operation_type": "copy"}))["tasks"]]
            assert len(copies) == k + 1, copies
            for x in copies:
                assert wait_task(op1, x["id"])["status"] == "success"
        # the vault kept its newest backup; the far point its two newest copies (the oldest pruned at run 3)
        listed = check_ok(op1.get("/v1/volume/share/backup/list", params={"cluster_uuid": env["cluster"]}))
        rows = {b["UUID"]: b for b in listed["list"]}
        ours = [b for b in rows.values() if b["BpUUID"] == env["bp"]]
        kept_copies = [b for b in rows.values() if b["BpUUID"] == far]
        assert len(ours) == 1 and len(kept_copies) == 2, listed
        got = set()
        for b in kept_copies:
            restored = check_ok(
                op1.post(
                    "/v1/volume/share/backup/restore",
                    json=dict(
                        seed_example("001", "/v1/volume/share/backup/restore\n"),
                        backup_uuid=b["UUID"],
                        new_pool_uuid=env["pool"],
                        cluster_uuid=env["cluster"],
                        new_volume_name=f"r{b['UUID'][:8]}",
                    ),
                )
            )
            assert wait_task(op1, restored["task_id"])["status"] == "success"
            got.add(volume_digest(a, env["pool"], restored["volume"]["UUID"]))
        assert got == set(wants[1:]), (got, wants)
