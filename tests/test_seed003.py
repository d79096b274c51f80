"""Seed 003's remaining endpoints as written, against a real controller
(SQLite and PostgreSQL) and agent: a vault from the seed's disk example
(no backup point named: the configured default), operation logs of every
task, migrating resources with their backups between vaults, and sharing
a backup with a second project that restores it into its own volume."""

from __future__ import annotations

import os

import httpx
from test_vaults import cbr_error, make_env, seed003_example, volume_digest, wait_for

from support.controller import TENANT_B, TOKENS, check_ok, seed_example, wait_task
from support.volumes import write

# the keys of the seed's vault and operation log examples
VAULT_KEYS = {
    "id",
    "name",
    "description",
    "resources",
    "provider_id",
    "created_at",
    "project_id",
    "enterprise_project_id",
    "auto_bind",
    "bind_rules",
    "auto_expand",
    "user_id",
    "billing",
    "tags",
}
BILLING_KEYS = {
    "allocated",
    "cloud_type",
    "consistent_level",
    "frozen_scene",
    "charging_mode",
    "order_id",
    "product_id",
    "protect_type",
    "object_type",
    "spec_code",
    "used",
    "storage_unit",
    "status",
    "size",
}
LOG_KEYS = {
    "status",
    "provider_id",
    "checkpoint_id",
    "updated_at",
    "error_info",
    "vault_id",
    "started_at",
    "id",
    "extra_info",
    "ended_at",
    "created_at",
    "operation_type",
    "vault_name",
    "project_id",
    "policy_id",
}
MEMBER_KEYS = {"status", "image_id", "backup_id", "vault_id", "dest_project_id", "created_at", "updated_at", "id"}


def cbr(c, who: str) -> httpx.Client:
    return httpx.Client(base_url=c.url, headers={"X-Auth-Token": TOKENS[who]}, timeout=60)


def test_seed_003_logs_migration_and_sharing_as_written(cluster, short_tmp):
    c, a, host = cluster
    env = make_env(c, a, host)
    run = short_tmp / "run-test"
    run.mkdir()
    # the seed's vault bodies name no backup point: the operator's default takes its place
    c.stop()
    c.config.write_text(
        c.config.read_text().replace("[controller]\n", f'[controller]\ndefault_backup_point = "{env["bp"]}"\n', 1)
    )
    c.start()
    t = env["tenant"]
    v3 = f"/v3/{t}"
    vol0 = env["vols"][0]
    with cbr(c, "op") as op, c.client("op") as op1:
        wait_for(lambda: check_ok(op1.get(f"/v1/hosts/{host}"))["State"] == "online" or None, what="host back")
        vault = op.post(f"{v3}/vaults", json=seed003_example("Creating a 40-GB pay-per-use cloud disk backup vault"))
        assert vault.status_code == 200, vault.text
        vault = vault.json()["vault"]
        assert set(vault) >= VAULT_KEYS and set(vault["billing"]) >= BILLING_KEYS, sorted(vault)
        assert (vault["name"], vault["backup_point_id"], vault["bind_rules"], vault["enterprise_project_id"]) == (
            "test",
            env["bp"],
            {},
            "0",
        )
        assert vault["billing"]["used"] == 0 and isinstance(vault["billing"]["used"], int)
        assert vault["auto_expand"] is False and vault["billing"]["frozen_scene"] is None
        body = seed003_example("Creating a 40-GB pay-per-use cloud disk backup vault")
        body["vault"]["name"] = "dest"
        dest = op.post(f"{v3}/vaults", json=body).json()["vault"]
        r = op.post(f"{v3}/vaults/{vault['id']}/addresources", json={"resources": [{"id": vol0["UUID"]}]})
        assert r.status_code == 200, r.text

        def checkpoint(vault_id: str) -> list[dict]:
            cp = op.post(f"{v3}/checkpoints", json={"checkpoint": {"vault_id": vault_id}}).json()["checkpoint"]
            for x in cp["vault"]["resources"]:
                assert wait_task(op1, x["task_id"], 120)["status"] == "success"
            done = wait_for(
                lambda: (lambda c_: c_ if c_["status"] != "protecting" else None)(
                    op.get(f"{v3}/checkpoints/{cp['id']}").json()["checkpoint"]
                )
            )
            assert done["status"] == "available", done
            return done["vault"]["resources"]

        write(vol0["AccessPath"][host], {0: os.urandom(2 << 20)}, run)
        want1 = volume_digest(a, env["pool"], vol0["UUID"])
        (res1,) = checkpoint(vault["id"])
        b1 = res1["backup_id"]
        assert op.get(f"{v3}/vaults/{vault['id']}").json()["vault"]["billing"]["used"] >= 2  # MB, after dedup

        # operation logs: the backup's task, in the seed's shape, with every filter
        logs = op.get(f"{v3}/operation-logs").json()
        assert set(logs) == {"operation_logs", "count", "limit", "offset"} and logs["count"] >= 1, logs
        (log,) = [x for x in logs["operation_logs"] if x["operation_type"] == "backup"]
        assert set(log) == LOG_KEYS, sorted(log)
        assert (log["status"], log["vault_id"], log["vault_name"], log["project_id"]) == (
            "success",
            vault["id"],
            "test",
            t,
        )
        assert log["checkpoint_id"] and log["error_info"] == {"code": "", "message": ""}
        assert log["extra_info"]["backup"] == {
            "backup_id": b1,
            "backup_name": log["extra_info"]["backup"]["backup_name"],
            "incremental": "false",
        }
        assert log["extra_info"]["resource"] == {"id": vol0["UUID"], "name": "vol0", "type": "OS::Cinder::Volume"}
        assert log["extra_info"]["common"]["progress"] == 100
        assert op.get(f"{v3}/operation-logs/{log['id']}").json() == {"operation_log": log}

        def ids(**params) -> list[str]:
            r = op.get(f"{v3}/operation-logs", params=params)
            assert r.status_code == 200, r.text
            return [x["id"] for x in r.json()["operation_logs"]]

        assert log["id"] in ids(operation_type="backup", status="success", vault_id=vault["id"])
        assert log["id"] in ids(resource_id=vol0["UUID"], resource_name="vol0", vault_name="test")
        assert ids(status="failed") == [] and ids(resource_id=env["vols"][1]["UUID"]) == []
        assert log["id"] in ids(start_time="2020-01-01T00:00:00Z", end_time="2099-01-01T00:00:00Z")
        assert ids(end_time="2020-01-01T00:00:00Z") == []
        assert len(ids(limit=1)) == 1 and ids(offset=1000) == []
        cbr_error(op.get(f"{v3}/operation-logs", params={"status": "done"}), 400, "BackupService.9001", "status")
        cbr_error(op.get(f"{v3}/operation-logs", params={"start_time": "yesterday"}), 400, "BackupService.9001")
        cbr_error(op.get(f"{v3}/operation-logs/{b1}"), 404, "BackupService.6500", "operation_log_id")

        # migrate the volume, with its backup, to the other vault: the chain goes on there
        bad = op.post(
            f"{v3}/vaults/{vault['id']}/migrateresources",
            json={"resource_ids": [env["vols"][1]["UUID"]], "destination_vault_id": dest["id"]},
        )
        cbr_error(bad, 400, "BackupService.6135", "resource_ids[0]")
        r = op.post(
            f"{v3}/vaults/{vault['id']}/migrateresources",
            json={"resource_ids": [vol0["UUID"]], "destination_vault_id": dest["id"]},
        )
        assert r.status_code == 200 and r.json() == {"migrated_resources": [vol0["UUID"]]}, r.text
        assert [x["id"] for x in op.get(f"{v3}/backups", params={"vault_id": dest["id"]}).json()["backups"]] == [b1]
        assert op.get(f"{v3}/vaults/{vault['id']}").json()["vault"]["resources"] == []
        assert [x["id"] for x in op.get(f"{v3}/vaults/{dest['id']}").json()["vault"]["resources"]] == [vol0["UUID"]]
        write(vol0["AccessPath"][host], {4 << 20: os.urandom(1 << 20)}, run)
        want2 = volume_digest(a, env["pool"], vol0["UUID"])
        (res2,) = checkpoint(dest["id"])
        b2 = op.get(f"{v3}/backups/{res2['backup_id']}").json()["backup"]
        assert b2["vault_id"] == dest["id"] and b2["extend_info"]["incremental"] is True

        # share b1 with project B (the seed writes project ids as 32 hex digits)
        r = op.post(f"{v3}/backups/{b1}/members", json={"members": [TENANT_B.replace("-", "")]})
        assert r.status_code == 200, r.text
        (member,) = r.json()["members"]
        assert set(member) == MEMBER_KEYS and (member["status"], member["dest_project_id"]) == ("pending", TENANT_B)
        assert member["vault_id"] is None and member["image_id"] is None and member["updated_at"] is None
        cbr_error(op.post(f"{v3}/backups/{b1}/members", json={"members": [TENANT_B]}), 400, "BackupService.6714")
        cbr_error(op.post(f"{v3}/backups/{b1}/members", json={"members": [t]}), 400, "BackupService.6704")
        cbr_error(op.post(f"{v3}/backups/{b1}/members", json={"members": ["someone"]}), 400, "BackupService.6704")
        listed = op.get(f"{v3}/backups/{b1}/members").json()
        assert listed["count"] == 1 and listed["members"] == [member]
        # project B: a volume and a vault of its own
        vb = check_ok(
            op1.post(
                "/v1/volume/share/create",
                json=dict(
                    seed_example("001", "/v1/volume/share/create"),
                    tenant=TENANT_B,
                    pool_uuid=env["pool"],
                    cluster_uuid=env["cluster"],
                    capacity=16 << 20,
                    backing_file="",
                    volume_name="b-target",
                ),
            )
        )["volume"]
    vb3 = f"/v3/{TENANT_B}"
    with cbr(c, TENANT_B) as b, c.client("op") as op1:
        cbr_error(b.get(f"{vb3}/backups/{b1}"), 404, "BackupService.9004")  # pending: not yet B's to read
        body = seed003_example("Creating a 40-GB pay-per-use cloud disk backup vault")
        vault_b = b.post(f"{vb3}/vaults", json=body).json()["vault"]
        assert b.get(f"{vb3}/backups/{b1}/members").json()["members"] == [member]
        assert b.get(f"{vb3}/backups/{b1}/members/{TENANT_B}").json() == {"member": member}
        cbr_error(
            b.put(f"{vb3}/backups/{b1}/members/{TENANT_B}", json={"status": "accepted"}),
            400,
            "BackupService.9001",
            "vault_id",
        )
        r = b.put(f"{vb3}/backups/{b1}/members/{TENANT_B}", json={"status": "accepted", "vault_id": vault_b["id"]})
        assert r.status_code == 200, r.text
        accepted = r.json()["member"]
        assert (accepted["status"], accepted["vault_id"]) == ("accepted", vault_b["id"]) and accepted["updated_at"]
        assert b.get(f"{vb3}/backups/{b1}").json()["backup"]["id"] == b1
        # B restores the shared backup into its own volume: bit for bit the snapshot backed up
        rr = b.post(f"{vb3}/backups/{b1}/restore", json={"restore": {"volume_id": vb["UUID"]}})
        assert rr.status_code == 202, rr.text
        assert wait_task(op1, rr.headers["X-Task-Id"], 120)["status"] == "success"
        assert volume_digest(a, env["pool"], vb["UUID"]) == want1
        (restore_log,) = [
            x for x in b.get(f"{vb3}/operation-logs").json()["operation_logs"] if x["operation_type"] == "restore"
        ]
        assert restore_log["extra_info"]["restore"]["backup_id"] == b1
        assert restore_log["extra_info"]["restore"]["target_resource_id"] == vb["UUID"]
        assert restore_log["project_id"] == TENANT_B
        assert restore_log["id"] not in [
            x["id"] for x in b.get(f"/v3/{t}/operation-logs").json().get("operation_logs", [])
        ]
    with cbr(c, "op") as op:
        assert op.delete(f"{v3}/backups/{b1}/members/{TENANT_B}").status_code == 204
    with cbr(c, TENANT_B) as b:
        cbr_error(b.get(f"{vb3}/backups/{b1}"), 404, "BackupService.9004")  # the share has ended
        cbr_error(b.get(f"{vb3}/backups/{b1}/members/{TENANT_B}"), 404, "BackupService.9004", "member_id")
    # deletions show in the log with what they deleted
    with cbr(c, "op") as op, c.client("op") as op1:
        assert op.delete(f"{v3}/backups/{res2['backup_id']}").status_code == 204
        deleted = [
            x for x in op.get(f"{v3}/operation-logs", params={"operation_type": "delete"}).json()["operation_logs"]
        ]
        assert deleted[0]["extra_info"]["delete"] == {"backup_id": res2["backup_id"], "backup_name": b2["name"]}
        assert op.delete(f"{v3}/vaults/{dest['id']}", params={"deleteMode": "Enforcing"}).status_code == 204
        (vd,) = op.get(f"{v3}/operation-logs", params={"operation_type": "vault_delete"}).json()["operation_logs"]
        assert vd["vault_id"] == dest["id"] and vd["extra_info"]["vault_delete"] == {"fail_count": 0, "total_count": 1}
        # the restored volume still holds its data after the share and the backups are gone
        assert volume_digest(a, env["pool"], vb["UUID"]) == want1
        assert volume_digest(a, env["pool"], vol0["UUID"]) == want2
