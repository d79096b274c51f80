"""Seed 004 as written: ZStack's backup storage API at /zstack/v1, with the
seed's OAuth header, its inventories, its error envelope, every query
operator and paging, reconnect and both delete modes, against a real
controller (SQLite and PostgreSQL) and a real agent with real backups."""

from __future__ import annotations

import os
import re
import time

import httpx

from support.controller import SEEDS, TENANT_B, TOKENS, check_ok, seed_example, wait_task

SEED = next(SEEDS.glob("004_*.txt")).read_text()
# the inventory's keys, from the seed's table (uuid ... attachedZoneUuids)
KEYS = {
    "uuid": str,
    "name": str,
    "url": str,
    "description": str,
    "totalCapacity": int,
    "availableCapacity": int,
    "type": str,
    "state": str,
    "status": str,
    "createDate": str,
    "lastOpDate": str,
    "attachedZoneUuids": list,
}
ZDATE = re.compile(r"^[A-Z][a-z]{2} \d{1,2}, \d{4} \d{1,2}:\d\d:\d\d [AP]M$")


def seed_curl(i: int) -> tuple[str, str, str]:
    """(method, path and query, body) of the seed's i-th curl example."""
    curls = re.findall(r"curl (.*?)(?=\n)", SEED)
    line = curls[i]
    method = re.search(r"-X (\w+)", line).group(1)
    url = re.search(r"http://localhost:8080(\S+)", line).group(1)
    body = re.search(r"-d '([^']*)'", line)
    return method, url, body.group(1) if body else ""


def zclient(c, who: str = "op") -> httpx.Client:
    """The seed's own headers: Content-Type and 'Authorization: OAuth <session>'."""
    return httpx.Client(
        base_url=c.url,
        headers={"Content-Type": "application/json;charset=UTF-8", "Authorization": f"OAuth {TOKENS[who]}"},
        timeout=60,
    )


def zerror(r: httpx.Response, status: int, code: str, text: str = "") -> dict:
    body = r.json()
    assert r.status_code == status and set(body) == {"error"}, (r.status_code, body)
    err = body["error"]
    assert set(err) == {"code", "description", "details", "elaboration", "opaque", "cause"}, err
    assert err["code"] == code and err["description"], err
    assert text in err["description"], err
    assert "Traceback" not in r.text
    return err


def check_inventory(inv: dict) -> None:
    assert set(inv) == set(KEYS), sorted(inv)
    for key, kind in KEYS.items():
        assert isinstance(inv[key], kind), (key, inv[key])
    assert ZDATE.match(inv["createDate"]) and ZDATE.match(inv["lastOpDate"]), inv
    assert inv["state"] == "Enabled" and inv["status"] in ("Connected", "Disconnected"), inv


def add_bp(op, a, cluster: str, tenant: str, name: str, sub: str) -> str:
    return check_ok(
        op.post(
            "/v1/volume/internal/backuppoint/add",
            json=dict(
                seed_example("000", "/v1/volume/internal/backuppoint/add"),
                tenant=tenant,
                name=name,
                btype="local",
                cluster_uuid=cluster,
                root_dir=str(a.roots[0] / "backups"),
                sub_dir=sub,
                env={"chunk_size": 1 << 20},
            ),
        )
    )["uuid"]


def test_seed_004_backup_storage_as_written(cluster):
    c, a, host = cluster
    cluster_uuid = seed_example("002", "/v1/pool/share/create")["cluster_uuid"]
    tenant = seed_example("001", "/v1/volume/share/create")["tenant"]  # the volumes' tenant
    with c.client("op") as op:
        bps = {
            "bs-a": add_bp(op, a, cluster_uuid, tenant, "bs-a", "a"),
            "bs-b": add_bp(op, a, cluster_uuid, tenant, "bs-b", "b"),
            "other": add_bp(op, a, cluster_uuid, TENANT_B, "other", "o"),
        }
    z = zclient(c)
    # the seed's query example, its uuid substituted
    method, url, _ = seed_curl(1)
    assert (method, url.split("=")[0]) == ("GET", "/zstack/v1/backup-storage?q")
    r = z.request(method, re.sub(r"uuid=\w+", f"uuid={bps['bs-a']}", url))
    assert r.status_code == 200 and set(r.json()) == {"inventories", "success"}, r.text
    (inv,) = r.json()["inventories"]
    check_inventory(inv)
    assert (inv["uuid"], inv["name"], inv["type"], inv["url"]) == (
        bps["bs-a"],
        "bs-a",
        "local",
        str(a.roots[0] / "backups" / "a"),
    )
    # not yet reached from any host: Disconnected, until reconnect (the seed's PUT example)
    assert inv["status"] == "Disconnected" and inv["totalCapacity"] == 0
    method, url, body = seed_curl(3)
    assert (method, body) == ("PUT", '{"reconnectBackupStorage":{}}')
    r = z.request(method, re.sub(r"backup-storage/\w+", f"backup-storage/{bps['bs-a']}", url), content=body)
    assert r.status_code == 200 and set(r.json()) == {"inventory"}, r.text
    inv = r.json()["inventory"]
    check_inventory(inv)
    st = os.statvfs(a.roots[0])
    assert inv["status"] == "Connected" and inv["totalCapacity"] == st.f_blocks * st.f_frsize, inv
    assert 0 < inv["availableCapacity"] <= inv["totalCapacity"]
    # the seed's body with its tags
    r = z.put(
        f"/zstack/v1/backup-storage/{bps['bs-b']}/actions",
        json={"reconnectBackupStorage": {}, "systemTags": [], "userTags": []},
    )
    assert r.json()["inventory"]["status"] == "Connected", r.text
    # the host reports them in its heartbeats from now on: status stays true without reconnects
    deadline = time.monotonic() + 20
    while True:
        got = z.get(f"/zstack/v1/backup-storage/{bps['bs-a']}").json()["inventories"]
        if got and got[0]["totalCapacity"]:
            break
        assert time.monotonic() < deadline, got
        time.sleep(0.3)
    assert got[0]["status"] == "Connected"
    # the seed's GET by uuid example
    method, url, _ = seed_curl(2)
    r = z.request(method, re.sub(r"backup-storage/\w+", f"backup-storage/{bps['bs-b']}", url))
    assert [x["name"] for x in r.json()["inventories"]] == ["bs-b"]
    # an unknown uuid: an empty answer, as ZStack's query gives
    assert z.get(f"/zstack/v1/backup-storage/{os.urandom(16).hex()}").json() == {"inventories": [], "success": True}

    def names(*q: str, **params) -> list[str]:
        r = z.get("/zstack/v1/backup-storage", params={"q": list(q), **params})
        assert r.status_code == 200, r.text
        return [x["name"] for x in r.json()["inventories"]]

    everything = ["bs-a", "bs-b", "other"]
    assert names() == everything
    assert names("name=bs-a") == ["bs-a"]
    assert names("name!=bs-a") == ["bs-b", "other"]
    assert names("name?=bs-b,other,nothing") == ["bs-b", "other"]
    assert names("name!?=bs-b,other") == ["bs-a"]
    assert names("name~=bs-%") == ["bs-a", "bs-b"]
    assert names("name~=bs-_") == ["bs-a", "bs-b"]
    assert names("name!~=%a") == ["bs-b", "other"]
    assert names("totalCapacity>0") == ["bs-a", "bs-b"]
    assert names("totalCapacity<1") == ["other"]
    assert names("totalCapacity>=1", "name!=bs-b") == ["bs-a"]
    assert names("availableCapacity<=0") == ["other"]
    assert names("description is null") == everything
    assert names("name not null") == everything
    assert names("url~=%/backups/o") == ["other"]
    assert names("status=Connected") == ["bs-a", "bs-b"]
    created = z.get("/zstack/v1/backup-storage", params={"q": "name=bs-b"}).json()["inventories"][0]["createDate"]
    assert names(f"createDate>={created}") == ["bs-b", "other"] or names(f"createDate>={created}") == everything
    assert names("createDate<2000-01-01T00:00:00") == []
    # paging, counting, sorting
    assert names(limit=2) == ["bs-a", "bs-b"]
    assert names(limit=2, start=2) == ["other"]
    assert names(start=5) == []
    assert z.get("/zstack/v1/backup-storage", params={"count": "true"}).json() == {"total": 3, "success": True}
    r = z.get("/zstack/v1/backup-storage", params={"replyWithCount": "true", "limit": 1, "q": "name~=bs%"}).json()
    assert r["total"] == 2 and [x["name"] for x in r["inventories"]] == ["bs-a"]
    assert names(sort="-name") == ["other", "bs-b", "bs-a"]
    assert names(sort="+name") == everything
    assert names(sort="-totalCapacity", q="name~=bs%")[0] in ("bs-a", "bs-b")
    # a tenant sees its own only, with its token as the OAuth session
    with zclient(c, TENANT_B) as zb:
        assert [x["name"] for x in zb.get("/zstack/v1/backup-storage").json()["inventories"]] == ["other"]
        zerror(
            zb.put(f"/zstack/v1/backup-storage/{bps['bs-a']}/actions", json={"reconnectBackupStorage": {}}),
            404,
            "SYS.1003",
        )
    # ZStack's error envelope
    zerror(z.get("/zstack/v1/backup-storage", params={"q": "nosuch=1"}), 400, "SYS.1007", "nosuch")
    zerror(z.get("/zstack/v1/backup-storage", params={"q": "name"}), 400, "SYS.1007", "not a condition")
    zerror(z.get("/zstack/v1/backup-storage", params={"q": "totalCapacity>lots"}), 400, "SYS.1007", "whole number")
    zerror(z.get("/zstack/v1/backup-storage", params={"q": "name>b"}), 400, "SYS.1007", "text")
    zerror(z.get("/zstack/v1/backup-storage", params={"sort": "-attachedZoneUuids"}), 400, "SYS.1007", "sort")
    zerror(z.get("/zstack/v1/backup-storage", params={"limit": -1}), 400, "SYS.1007", "limit")
    zerror(httpx.get(f"{c.url}/zstack/v1/backup-storage", headers={"Authorization": "OAuth wrong"}), 401, "ID.1001")
    zerror(z.put(f"/zstack/v1/backup-storage/{bps['bs-a']}/actions", json={"explode": {}}), 400, "SYS.1007")
    zerror(z.delete(f"/zstack/v1/backup-storage/{bps['bs-a']}", params={"deleteMode": "Soon"}), 400, "SYS.1007")
    zerror(z.get("/zstack/v1/backup-storage/not-a-uuid"), 400, "SYS.1007", "uuid")

    # a backup on bs-a: Permissive refuses, Enforcing deletes the backup from the repository, then bs-a
    with c.client("op") as op:
        pool = check_ok(
            op.post(
                "/v1/pool/share/create",
                json=dict(
                    seed_example("002", "/v1/pool/share/create"),
                    pool_type=4,
                    source=str(a.roots[0] / "p004"),
                    avail_host=[host],
                ),
            )
        )["pool"]["UUID"]
        vol = check_ok(
            op.post(
                "/v1/volume/share/create",
                json=dict(
                    seed_example("001", "/v1/volume/share/create"),
                    pool_uuid=pool,
                    cluster_uuid=cluster_uuid,
                    capacity=4 << 20,
                    backing_file="",
                    volume_name="v004",
                ),
            )
        )["volume"]["UUID"]
        ref = {"tenant": tenant, "cluster_uuid": cluster_uuid, "volume_uuid": vol}
        snap = check_ok(op.post("/v1/volume/share/snapshot/create", json=dict(ref, snapshot_name="s1")))["snapshot"]
        add = dict(
            seed_example("001", "/v1/volume/share/backup/add"),
            cluster_uuid=cluster_uuid,
            volume_uuid=vol,
            snapshot_uuid=snap["UUID"],
            backup_point_uuid=bps["bs-a"],
        )
        started = check_ok(op.post("/v1/volume/share/backup/add", json=add))
        assert wait_task(op, started["task_id"])["status"] == "success"
        backup = started["backup"]["UUID"]
    manifests = a.roots[0] / "backups" / "a" / "manifests"
    assert [p.name for p in manifests.iterdir()] == [backup]
    # the seed's DELETE example (Permissive)
    method, url, _ = seed_curl(0)
    assert method == "DELETE" and url.endswith("?deleteMode=Permissive")
    r = z.request(method, re.sub(r"backup-storage/\w+", f"backup-storage/{bps['bs-a']}", url))
    zerror(r, 409, "SYS.1004", "deleteMode=Enforcing")
    assert names("name=bs-a") == ["bs-a"] and [p.name for p in manifests.iterdir()] == [backup]
    r = z.delete(f"/zstack/v1/backup-storage/{bps['bs-a']}", params={"deleteMode": "Enforcing"})
    assert r.status_code == 200 and r.json() == {}, r.text
    assert names("name=bs-a") == [] and list(manifests.iterdir()) == []
    with c.client("op") as op:
        assert all(
            b["UUID"] != backup
            for b in check_ok(
                op.get("/v1/volume/share/backup/list", params={"cluster_uuid": cluster_uuid, "tenant": tenant})
            )["list"]
        )
    # an empty one goes in the default mode
    assert z.delete(f"/zstack/v1/backup-storage/{bps['bs-b']}").json() == {}
    assert names() == ["other"]
    z.close()
