"""Seed 003 through the controller: policies and vaults over REST, errors in
the seed's {"error_code", "error_msg"} shape, with a real agent, real
volumes and a real backup point behind them (SQLite and PostgreSQL)."""
from __future__ import annotations

import copy
import uuid

import httpx

from test_controller import TENANT_B, TOKENS, check_ok, seed_example
from test_controller_pools import cluster  # noqa: F401 - the fixture

POLICY = {"policy": {"enabled": True, "name": "policy001",
                     "operation_definition": {"day_backups": 0, "month_backups": 0, "retention_duration_days": 1,
                                              "timezone": "UTC+08:00", "week_backups": 0, "year_backups": 0},
                     "operation_type": "backup",
                     "trigger": {"properties": {"pattern": [
                         "FREQ=WEEKLY;BYDAY=MO,TU,WE,TH,FR,SA,SU;BYHOUR=14;BYMINUTE=00"]}}}}


def cbr_error(r: httpx.Response, status: int, code: str, field: str = "") -> dict:
    body = r.json()
    assert r.status_code == status and set(body) == {"error_code", "error_msg"}, (r.status_code, body)
    assert body["error_code"] == code, body
    if field:
        assert field in body["error_msg"], body
    assert "Traceback" not in r.text
    return body


def make_env(c, a, host) -> dict:
    """A directory pool, two volumes and a local backup point of the seeds' tenant."""
    cluster_uuid = seed_example("002", "/v1/pool/share/create")["cluster_uuid"]
    tenant = seed_example("001", "/v1/volume/share/create")["tenant"]
    with c.client("op") as op:
        pid = check_ok(op.post("/v1/pool/share/create", json=dict(
            seed_example("002", "/v1/pool/share/create"), pool_type=4, source=str(a.roots[0] / "p1"),
            avail_host=[host])))["pool"]["UUID"]
        vols = [check_ok(op.post("/v1/volume/share/create", json=dict(
            seed_example("001", "/v1/volume/share/create"), pool_uuid=pid, cluster_uuid=cluster_uuid,
            capacity=16 << 20, backing_file="", volume_name=f"vol{i}")))["volume"] for i in range(2)]
        bp = check_ok(op.post("/v1/volume/internal/backuppoint/add", json=dict(
            seed_example("000", "/v1/volume/internal/backuppoint/add"), tenant=tenant, btype="local",
            cluster_uuid=cluster_uuid, root_dir=str(a.roots[0] / "backups"), sub_dir="v1",
            env={"chunk_size": 1 << 20})))["uuid"]
    return {"cluster": cluster_uuid, "tenant": tenant, "pool": pid, "vols": vols, "bp": bp}


def vault_body(env, name="vault_name", resources=None, **extra) -> dict:
    body = {"vault": {"billing": {"consistent_level": "crash_consistent", "object_type": "disk",
                                  "protect_type": "backup", "size": 40, "charging_mode": "post_paid",
                                  "is_auto_renew": False, "is_auto_pay": False},
                      "name": name, "backup_point_id": env["bp"],
                      "resources": [{"id": v["UUID"], "type": "OS::Cinder::Volume"} for v in (resources or [])]}}
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
        assert pol["trigger"]["type"] == "time" and pol["trigger"]["properties"]["pattern"] == \
            POLICY["policy"]["trigger"]["properties"]["pattern"] and pol["associated_vaults"] is None
        assert pol["operation_definition"]["retention_duration_days"] == 1
        assert op.get(f"{v3}/policies/{pol['id']}").json()["policy"] == pol
        cbr_error(op.post(f"{v3}/policies", json=POLICY), 409, "BackupService.9005", "policy.name")
        bad = copy.deepcopy(POLICY)
        bad["policy"]["trigger"]["properties"]["pattern"] = ["FREQ=MINUTELY;BYHOUR=1;BYMINUTE=0"]
        cbr_error(op.post(f"{v3}/policies", json=bad), 400, "BackupService.9001",
                  "policy.trigger.properties.pattern[0]")
        bad = copy.deepcopy(POLICY)
        bad["policy"]["operation_definition"] = {"week_backups": 2}
        cbr_error(op.post(f"{v3}/policies", json=bad), 400, "BackupService.9001", "operation_definition.timezone")
        up = op.put(f"{v3}/policies/{pol['id']}", json={"policy": {"enabled": False, "name": "nightly"}})
        assert up.status_code == 200 and up.json()["policy"]["enabled"] is False, up.text
        assert up.json()["policy"]["name"] == "nightly"
        # vaults
        created = op.post(f"{v3}/vaults", json=vault_body(env, resources=env["vols"][:1],
                                                             backup_policy_id=pol["id"], description="d"))
        assert created.status_code == 200, created.text
        vault = created.json()["vault"]
        assert vault["name"] == "vault_name" and vault["billing"]["size"] == 40 and vault["billing"]["used"] == 0
        assert vault["capacity"]["totalCapacity"] == 40 << 30 and vault["capacity"]["usedCapacity"] == 0
        assert [r["id"] for r in vault["resources"]] == [env["vols"][0]["UUID"]]
        assert vault["resources"][0]["type"] == "OS::Cinder::Volume" and vault["policy_id"] == pol["id"]
        assert vault["state"] == "Disabled"  # its policy is disabled
        vid = vault["id"]
        assert op.get(f"{v3}/policies/{pol['id']}").json()["policy"]["associated_vaults"] == [
            {"vault_id": vid, "destination_vault_id": None}]
        cbr_error(op.post(f"{v3}/vaults", json=vault_body(env)), 409, "BackupService.9005", "vault.name")
        add = op.post(f"{v3}/vaults/{vid}/addresources",
                      json={"resources": [{"id": env["vols"][1]["UUID"], "type": "OS::Cinder::Volume"}]})
        assert add.json() == {"add_resource_ids": [env["vols"][1]["UUID"]]}, add.text
        other = op.post(f"{v3}/vaults", json=vault_body(env, name="other"))
        assert other.status_code == 200, other.text
        oid = other.json()["vault"]["id"]
        # a volume belongs to one vault: the seed's BackupService.6103
        cbr_error(op.post(f"{v3}/vaults/{oid}/addresources", json={"resources": [{"id": env["vols"][0]["UUID"]}]}),
                  409, "BackupService.6103", "resources[0].id")
        cbr_error(op.post(f"{v3}/vaults/{oid}/removeresources", json={"resource_ids": [env["vols"][0]["UUID"]]}),
                  404, "BackupService.6135", "resource_ids[0]")
        # queries, ZStack style and by field
        assert [x["id"] for x in op.get(f"{v3}/vaults", params={"q": "name=other"}).json()["vaults"]] == [oid]
        assert op.get(f"{v3}/vaults", params=[("q", f"uuid={vid}"), ("q", "status=available")]).json()[
            "count"] == 1
        assert op.get(f"{v3}/vaults", params={"policy_id": pol["id"]}).json()["count"] == 1
        op.put(f"{v3}/policies/{pol['id']}", json={"policy": {"enabled": True}})
        assert [x["id"] for x in op.get(f"{v3}/vaults", params={"q": "state=Enabled"}).json()["vaults"]] == [vid]
        cbr_error(op.get(f"{v3}/vaults", params={"q": "colour=red"}), 400, "BackupService.9001", "q")
        # a policy in use is not deleted; dissociated, it is
        cbr_error(op.delete(f"{v3}/policies/{pol['id']}"), 409, "BackupService.9009", "policy_id")
        assert op.post(f"{v3}/vaults/{vid}/dissociatepolicy", json={"policy_id": pol["id"]}).status_code == 200
        assert op.get(f"{v3}/vaults/{vid}").json()["vault"]["policy_id"] is None
        assert op.post(f"{v3}/vaults/{vid}/associatepolicy", json={"policy_id": pol["id"]}).json() == {
            "associate_policy": {"vault_id": vid, "policy_id": pol["id"]}}
        # updates and bad input name the field
        assert op.put(f"{v3}/vaults/{vid}", json={"vault": {"billing": {"size": 80}}}).json()["vault"][
            "billing"]["size"] == 80
        cbr_error(op.put(f"{v3}/vaults/{vid}", json={"vault": {"billing": {"size": 5}}}), 400,
                  "BackupService.9001", "vault.billing.size")
        for change, field in (({"billing": {"object_type": "server", "protect_type": "backup", "size": 40}},
                               "vault.billing.object_type"),
                              ({"backup_point_id": str(uuid.uuid4())}, "vault.backup_point_id"),
                              ({"resources": [{"id": str(uuid.uuid4())}]}, "vault.resources[0].id"),
                              ({"resources": [{"id": env["vols"][1]["UUID"], "type": "OS::Nova::Server"}]},
                               "vault.resources[0].type"),
                              ({"name": ""}, "vault.name")):
            body = vault_body(env, name="third")
            body["vault"].update(change)
            r = op.post(f"{v3}/vaults", json=body)
            assert r.status_code in (400, 404) and field in r.json()["error_msg"], r.text
        # removing resources, deleting vaults (empty: Permissive is enough)
        assert op.post(f"{v3}/vaults/{vid}/removeresources", json={"resource_ids": [env["vols"][1]["UUID"]]}).json() \
            == {"remove_resource_ids": [env["vols"][1]["UUID"]]}
        cbr_error(op.delete(f"{v3}/vaults/{oid}", params={"mode": "Sometimes"}), 400, "BackupService.9001", "mode")
        assert op.delete(f"{v3}/vaults/{oid}").status_code == 200
        cbr_error(op.get(f"{v3}/vaults/{oid}"), 404, "BackupService.9004", "vault_id")
    # tenants: another tenant's token sees none of it, and cannot name this project
    with c.client(TENANT_B) as other_tenant:
        cbr_error(other_tenant.get(f"{v3}/vaults"), 404, "BackupService.9004", "project_id")
        assert other_tenant.get(f"/v3/{TENANT_B}/vaults").json() == {"vaults": [], "count": 0}
    with httpx.Client(base_url=c.url, timeout=30) as anonymous:
        cbr_error(anonymous.get(f"{v3}/policies"), 401, "BackupService.9024", "authorization")
