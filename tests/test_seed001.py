"""Seed 001's examples in sequence, as written, against one directory pool
of a real agent: only uuids and paths substituted. Its create and clone
examples both name the volume "test"; its used/update and clone bodies
carry names that are not the volume's ("snap", "zzz"); its delete body
names "test". The data is checked at every step."""

from __future__ import annotations

import os
import subprocess
import time
import uuid

from agent.api.v1 import jobs_pb2

from support.controller import check_error, check_ok, seed_example, wait_task
from support.volumes import write


def ex(endpoint: str, **subst) -> dict:
    """The seed's request example of an endpoint, with some values substituted."""
    body = seed_example("001", f"/v1/volume/share/{endpoint}\n")
    unknown = set(subst) - set(body)
    assert not unknown, unknown  # only what the example has is substituted
    return {**body, **subst}


def test_seed_001_examples_in_sequence_as_written(cluster, short_tmp):
    c, a, host = cluster
    run = short_tmp / "run-test"
    run.mkdir()

    def digest(pool_uuid: str, volume_uuid: str, snapshot_uuid: str = "") -> str:
        with a.client() as ac:
            job = ac.run(
                f"sum-{uuid.uuid4()}",
                checksum=jobs_pb2.ChecksumSpec(
                    pool_uuid=pool_uuid, volume_uuid=volume_uuid, snapshot_uuid=snapshot_uuid
                ),
            )
            assert job.state == jobs_pb2.JOB_STATE_SUCCEEDED, job.error
            return job.checksum_result.image_digest

    # the create example adopts /xgp/my.qcow2: a 4 GiB qcow2 with data, under the agent's roots
    base = a.roots[0] / "xgp" / "my.qcow2"
    base.parent.mkdir()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "4G"], check=True)
    write(str(base), {0: os.urandom(1 << 20), 3 << 30: os.urandom(4096)}, run)
    pool_body = dict(
        seed_example("002", "/v1/pool/share/create"), pool_type=4, source=str(a.roots[0] / "seq"), avail_host=[host]
    )
    cl = pool_body["cluster_uuid"]
    with c.client("op") as op:
        pid = check_ok(op.post("/v1/pool/share/create", json=pool_body))["pool"]["UUID"]
        vol = check_ok(
            op.post(
                "/v1/volume/share/create", json=ex("create", pool_uuid=pid, cluster_uuid=cl, backing_file=str(base))
            )
        )["volume"]
        tenant = vol["NamespaceUUID"]
        assert (vol["Name"], vol["Capacity"]) == ("test", 4 << 30)
        ref = {"cluster_uuid": cl, "volume_uuid": vol["UUID"]}
        assert check_ok(op.post("/v1/volume/share/get", json=ex("get", **ref)))["volume"]["Name"] == "test"
        check_ok(op.post("/v1/volume/share/used/update", json=ex("used/update", **ref)))  # volume_name "snap"
        check_ok(op.post("/v1/volume/share/snap_length/update", json=ex("snap_length/update", **ref)))
        head = vol["AccessPath"][host]
        write(head, {1 << 20: os.urandom(1 << 20)}, run)
        snap = check_ok(op.post("/v1/volume/share/snapshot/create", json=ex("snapshot/create", **ref)))["snapshot"]
        assert snap["Name"] == "snap"
        want = digest(pid, vol["UUID"], snap["UUID"])
        listed = check_ok(op.post("/v1/volume/share/snapshot/list", json=ex("snapshot/list", **ref)))["list"]
        assert [x["Name"] for x in listed] == ["snap"]
        tree = check_ok(op.post("/v1/volume/share/snapshot/tree/get", json=ex("snapshot/tree/get", **ref)))["tree"]
        assert tree["Root"] == "snap"
        # the clone example: a linked clone named "test" too, beside the first
        cloned = check_ok(
            op.post(
                "/v1/volume/share/clone",
                json=ex("clone", **ref, clone_dst_pool_uuid=pid, snapshot_uuid=snap["UUID"]),
            )
        )
        clone = cloned["volume"]["UUID"]
        assert wait_task(op, cloned["task_id"])["status"] == "success"
        prog = check_ok(
            op.get(
                "/v1/volume/share/clone/progress", params={"tenant": tenant, "cluster_uuid": cl, "volume_uuid": clone}
            )
        )
        assert prog["clone_progress"] == 100.0
        assert (
            check_ok(op.post("/v1/volume/share/get", json=ex("get", cluster_uuid=cl, volume_uuid=clone)))["volume"][
                "Name"
            ]
            == "test"
        )
        assert digest(pid, clone) == want
        # the backup example, to a backup point of seed 000
        bp = check_ok(
            op.post(
                "/v1/volume/internal/backuppoint/add",
                json=dict(
                    seed_example("000", "/v1/volume/internal/backuppoint/add"),
                    tenant=tenant,
                    btype="local",
                    cluster_uuid=cl,
                    root_dir=str(a.roots[0] / "backups"),
                    sub_dir="seq",
                ),
            )
        )["uuid"]
        added = check_ok(
            op.post(
                "/v1/volume/share/backup/add",
                json=ex("backup/add", **ref, snapshot_uuid=snap["UUID"], backup_point_uuid=bp),
            )
        )
        assert (added["backup"]["Name"], added["backup"]["Snapshot"]) == ("backup", "snap")
        assert wait_task(op, added["task_id"])["status"] == "success"
        backup = added["backup"]["UUID"]
        url = seed_example("001", "/v1/volume/share/backup/list", "url").split("?", 1)[1]
        url = (
            url.replace("a97eb422-f42b-4b85-8556-725f152661f0", cl)
            .replace("3e0925e0-648d-4217-bc1a-079cdbcf2e41", vol["UUID"])
            .replace("filter_end_time=1615797008", f"filter_end_time={int(time.time()) + 60}")
            .replace("filter_start_time=1615192208", f"filter_start_time={int(time.time()) - 3600}")
        )
        (b,) = check_ok(op.get("/v1/volume/share/backup/list?" + url))["list"]
        assert (b["UUID"], b["Snapshot"], b["Status"]) == (backup, "snap", "BackupSucceeded")
        restored = check_ok(
            op.post(
                "/v1/volume/share/backup/restore",
                json=ex("backup/restore", backup_uuid=backup, new_pool_uuid=pid, cluster_uuid=cl),
            )
        )
        assert wait_task(op, restored["task_id"])["status"] == "success"
        restore = restored["volume"]["UUID"]
        assert restored["volume"]["Name"] == "restore" and digest(pid, restore) == want
        # rollback: new writes go, the snapshot's content is back
        write(head, {0: os.urandom(2 << 20)}, run)
        rb = ex("snapshot/rollback", **ref, snapshot_uuid=snap["UUID"])
        check_ok(op.post("/v1/volume/share/snapshot/rollback", json=rb))
        assert digest(pid, vol["UUID"]) == want
        # the delete example names "test": it does not delete the volume named "restore"
        dele = ex("delete", cluster_uuid=cl, volume_uuid=restore)
        check_error(op.post("/v1/volume/share/delete", json=dele), 400, "volume_name")
        assert digest(pid, restore) == want
        check_ok(op.post("/v1/volume/share/delete", json=dict(dele, volume_uuid=clone)))  # the clone "test"
        check_error(op.post("/v1/volume/share/get", json=ex("get", cluster_uuid=cl, volume_uuid=clone)), 404)
        sd = ex("snapshot/delete", **ref, snapshot_uuid=snap["UUID"])
        check_ok(op.post("/v1/volume/share/snapshot/delete", json=sd))
        check_ok(
            op.post("/v1/volume/share/backup/delete", json=ex("backup/delete", cluster_uuid=cl, backup_uuid=backup))
        )
        check_ok(op.post("/v1/volume/share/delete", json=dict(dele, volume_uuid=vol["UUID"])))
        assert digest(pid, restore) == want  # the restored volume stands alone
        assert base.exists()  # the adopted file is the owner's: never deleted
