"""Copies between backup points (agent/repo/copy.py): a directory to an
encrypted S3 bucket on radosgw, then S3 to NFS (nfs-ganesha); only what the
target lacks travels, each copy is deep-verified there, an independent
client sees the copies, and once the source backup point is gone the
copies restore bit for bit."""

from __future__ import annotations

import os
import shutil
import time
import uuid

import pytest

from agent.api.v1 import jobs_pb2
from agent.errors import FailedPrecondition

from support.agents import BP_UUID
from support.backups import OK, Bk
from support.cli import cli
from support.volumes import MiB


def test_copies_from_a_directory_to_s3_to_nfs_restore_bit_for_bit(make_agent, rgw, nfs_server, short_tmp):
    bucket = rgw.make_bucket()
    s3bp, nfsbp, wide = (str(uuid.uuid4()) for _ in range(3))
    sub = f"copy-{uuid.uuid4().hex[:8]}"
    a = make_agent(
        rgw.section(s3bp, bucket, "offsite", extra=f'password = "{uuid.uuid4().hex}"\n')
        + f'[backup_points.{nfsbp}]\ntype = "nfs"\nip = "127.0.0.1"\nport = {nfs_server.nfs_port}\n'
        f'mount_port = {nfs_server.mount_port}\nroot_dir = "{nfs_server.export}"\nsub_dir = "{sub}"\n'
        "chunk_size = 1048576\n"
        f'[backup_points.{wide}]\npath = "{short_tmp}/a/wide"\n'  # 4 MiB chunks: no copy there
    )
    a.config.chmod(0o600)
    a.start()
    with a.client() as c:
        bk = Bk(a, c)

        def copy(source, target, *backups, verify=True):
            job = c.run(
                f"copy-{uuid.uuid4()}",
                copy=jobs_pb2.CopySpec(
                    source_backup_point_uuid=source,
                    target_backup_point_uuid=target,
                    backup_uuids=list(backups),
                    verify=verify,
                ),
            )
            assert job.state == OK, job.error
            return job.copy_result

        vol = bk.create(capacity=8 * MiB, name="offsite").uuid
        bk.write(vol, {0: os.urandom(3 * MiB), 6 * MiB: os.urandom(MiB)})
        s1 = bk.snap(vol, "s1").uuid
        r1 = bk.backup(vol, s1)
        bk.write(vol, {MiB: os.urandom(MiB)})
        s2 = bk.snap(vol, "s2").uuid
        r2 = bk.backup(vol, s2)
        want = {r1.backup_uuid: bk.digest(vol, s1), r2.backup_uuid: bk.digest(vol, s2)}
        # every backup of the directory to S3: r2 shares three chunks with r1, they travel once
        got = copy(BP_UUID, s3bp)
        assert sorted(got.copied) == sorted(want) and got.verified == 2, got
        assert (got.chunks_sent, got.chunks_present) == (5, 3), got
        # again, from the CLI: nothing is missing, nothing travels
        out = cli(a, "copy", BP_UUID, s3bp).stdout
        assert "copied 0 backup(s), 2 there already; 0 chunks sent" in out and "2 there" in out, out
        # an independent client sees the copies (sealed: no plain manifest)
        listed = rgw.s3cmd("ls", f"s3://{bucket}/offsite/manifests/").stdout
        assert all(b in listed for b in want), listed
        # S3 to NFS, one backup by id
        got = copy(s3bp, nfsbp, r2.backup_uuid)
        assert list(got.copied) == [r2.backup_uuid] and got.chunks_sent == 4, got
        assert (nfs_server.export / sub / "manifests" / r2.backup_uuid).is_file()
        # different chunk sizes: refused before anything moves, naming the target
        with pytest.raises(FailedPrecondition) as e:
            c.submit("copy-wide", copy=jobs_pb2.CopySpec(source_backup_point_uuid=s3bp, target_backup_point_uuid=wide))
        assert e.value.field == "target_backup_point_uuid" and "chunk size" in e.value.message
        # the source backup point is gone: the copies restore bit for bit
        shutil.rmtree(short_tmp / "a" / "bp")
        for bp, bid in ((s3bp, r1.backup_uuid), (s3bp, r2.backup_uuid), (nfsbp, r2.backup_uuid)):
            restored = Bk(a, c, bp=bp).restore(bid).volume_uuid
            assert bk.digest(restored) == want[bid], (bp, bid)
        listed = {x.uuid: x for x in Bk(a, c, bp=nfsbp).list()}
        assert listed[r2.backup_uuid].image_digest == r2.image_digest and listed[r2.backup_uuid].snapshot_name == "s2"
    assert a.stop() == 0


def test_a_copy_cut_by_an_agent_stop_resumes_after_the_restart(make_agent, short_tmp):
    """The agent stops in the middle of a copy (drain_timeout 0: interrupted
    at a safe point); after the restart the same job resumes by itself,
    sends only what had not arrived, and the copy restores bit for bit."""
    far = str(uuid.uuid4())
    a = make_agent(
        f'[backup_points.{far}]\npath = "{short_tmp}/a/far"\nchunk_size = 1048576\n[jobs]\ndrain_timeout = 0\n'
    )
    a.start()
    with a.client() as c:
        bk = Bk(a, c)
        vol = bk.create(capacity=16 * MiB, name="big").uuid
        bk.write(vol, {0: os.urandom(16 * MiB)})
        s1 = bk.snap(vol, "s1").uuid
        r = bk.backup(vol, s1)
        spec = jobs_pb2.CopySpec(source_backup_point_uuid=BP_UUID, target_backup_point_uuid=far, verify=True)
        spec.bandwidth_limit = 4 * MiB  # about 4 s: time to stop it midway
        c.submit("copy-cut", copy=spec)
        deadline = time.monotonic() + 30
        while c.get("copy-cut").progress.bytes_done < 5 * MiB:
            assert time.monotonic() < deadline, c.get("copy-cut")
            time.sleep(0.05)
    assert a.stop() == 0
    assert not (short_tmp / "a" / "far" / "manifests" / r.backup_uuid).exists()  # nothing half-listed
    a.start()
    with a.client() as c:
        job = c.get("copy-cut")
        deadline = time.monotonic() + 60
        while job.state not in (OK, jobs_pb2.JOB_STATE_FAILED, jobs_pb2.JOB_STATE_CANCELLED):
            assert time.monotonic() < deadline, job
            time.sleep(0.1)
            job = c.get("copy-cut")
        assert job.state == OK, job.error
        got = job.copy_result
        assert list(got.copied) == [r.backup_uuid] and got.verified == 1, got
        assert got.chunks_present >= 4 and got.chunks_sent + got.chunks_present == 16, got  # what arrived stayed
        restored = Bk(a, c, bp=far).restore(r.backup_uuid).volume_uuid
        assert Bk(a, c).digest(restored) == r.image_digest
    assert a.stop() == 0


@pytest.mark.parametrize("cluster", ["sqlite"], indirect=True)
def test_the_controller_copies_a_backup_that_then_restores_on_its_own(cluster, short_tmp):
    """backuppoint/copy through the controller: the copy is a backup of its
    own on the target (copy_of the source's), listed, restored bit for bit
    after the original is deleted and its backup point's files are gone; a
    second request finds nothing missing."""
    from support.controller import check_error, check_ok, eventually, reconnect, seed_example, wait_task
    from support.volumes import write

    c, a, host = cluster
    run = short_tmp / "run-test"
    run.mkdir()

    def digest(pool_uuid: str, volume_uuid: str, snapshot_uuid: str = "") -> str:
        job = ac.run(
            f"sum-{uuid.uuid4()}",
            checksum=jobs_pb2.ChecksumSpec(pool_uuid=pool_uuid, volume_uuid=volume_uuid, snapshot_uuid=snapshot_uuid),
        )
        assert job.state == OK, job.error
        return job.checksum_result.image_digest

    def ex(endpoint: str, **subst) -> dict:
        return {**seed_example("001", f"/v1/volume/share/{endpoint}\n"), **subst}

    pool_body = dict(
        seed_example("002", "/v1/pool/share/create"), pool_type=4, source=str(a.roots[0] / "p"), avail_host=[host]
    )
    cl = pool_body["cluster_uuid"]
    with c.client("op") as op, a.client() as ac:
        pid = check_ok(op.post("/v1/pool/share/create", json=pool_body))["pool"]["UUID"]
        vol = check_ok(
            op.post(
                "/v1/volume/share/create",
                json=ex("create", pool_uuid=pid, cluster_uuid=cl, backing_file="", capacity=8 << 20),
            )
        )["volume"]
        ref = {"cluster_uuid": cl, "volume_uuid": vol["UUID"]}
        write(vol["AccessPath"][host], {0: os.urandom(3 << 20)}, run)
        snap = check_ok(op.post("/v1/volume/share/snapshot/create", json=ex("snapshot/create", **ref)))["snapshot"]
        want = digest(pid, vol["UUID"], snap["UUID"])
        points = []
        for sub in ("near", "far"):
            body = dict(
                seed_example("000", "/v1/volume/internal/backuppoint/add"),
                tenant=vol["NamespaceUUID"],
                btype="local",
                cluster_uuid=cl,
                root_dir=str(a.roots[0] / "backups"),
                sub_dir=sub,
                name=sub,
                env={"chunk_size": 1 << 20},
            )
            points.append(check_ok(op.post("/v1/volume/internal/backuppoint/add", json=body))["uuid"])
        near, far = points
        added = check_ok(
            op.post(
                "/v1/volume/share/backup/add",
                json=ex("backup/add", **ref, snapshot_uuid=snap["UUID"], backup_point_uuid=near),
            )
        )
        assert wait_task(op, added["task_id"])["status"] == "success"
        original = added["backup"]["UUID"]
        body = {"cluster_uuid": cl, "uuid": near, "target_uuid": far}
        # once a heartbeat reports the backup point (its backup attached it)
        other = {**body, "volume_uuid": str(uuid.uuid4())}  # another volume's backups: none to copy
        r = eventually(
            lambda: op.post("/v1/volume/internal/backuppoint/copy", json=other), lambda r: r.status_code == 200
        )
        assert check_ok(r)["total_count"] == 0
        in_vault = {**body, "vault_id": str(uuid.uuid4())}  # a vault's: none (this backup is in none)
        assert check_ok(op.post("/v1/volume/internal/backuppoint/copy", json=in_vault))["total_count"] == 0
        check_error(op.post("/v1/volume/internal/backuppoint/copy", json={**body, "volume_uuid": "x"}), 400)
        queued = check_ok(op.post("/v1/volume/internal/backuppoint/copy", json={**body, "volume_uuid": vol["UUID"]}))
        assert queued["total_count"] == 1 and queued["list"][0]["backup_uuid"] == original, queued
        copy_id = queued["list"][0]["copy_uuid"]
        # far, a directory, is one host's and no host serves it yet: the task waits rather
        # than make a new repository wherever the source is
        time.sleep(3)  # three heartbeats
        assert check_ok(op.get(f"/v1/tasks/{queued['list'][0]['task_id']}"))["status"] == "waiting"
        assert not (a.roots[0] / "backups" / "far").exists()
        reconnect(op, far)  # seed 004's reconnect attaches it on the host
        done = wait_task(op, queued["list"][0]["task_id"])
        assert done["status"] == "success" and done["result"]["verified"] == "1", done
        assert check_ok(op.post("/v1/volume/internal/backuppoint/copy", json=body))["total_count"] == 0

        check_error(op.post("/v1/volume/internal/backuppoint/copy", json={**body, "target_uuid": near}), 400)
        # the original goes, with every file of its backup point: the copy restores on its own
        dele = ex("backup/delete", cluster_uuid=cl, backup_uuid=original)
        check_ok(op.post("/v1/volume/share/backup/delete", json=dele))
        shutil.rmtree(a.roots[0] / "backups" / "near")
        restored = check_ok(
            op.post(
                "/v1/volume/share/backup/restore",
                json=ex("backup/restore", backup_uuid=copy_id, new_pool_uuid=pid, cluster_uuid=cl),
            )
        )
        assert wait_task(op, restored["task_id"])["status"] == "success"
        assert digest(pid, restored["volume"]["UUID"]) == want


def test_a_copy_from_another_agents_backup_point_over_grpc(make_agent, pki, short_tmp):
    """Two agents, each with its own directory backup point and nothing
    shared: B copies A's backups over mutual TLS with the fleet's token,
    only the chunks it lacks, and restores them bit for bit once A's
    directory is gone. A wrong token is refused by A."""
    from agent.errors import BlockferryError
    from agent.peer import PeerSource

    from support.tls import free_port

    token = uuid.uuid4().hex

    def tls(port: int) -> str:
        return (
            f'tcp_listen = "localhost:{port}"\ntls_cert = "{pki}/server.pem"\ntls_key = "{pki}/server.key"\n'
            f'tls_client_ca = "{pki}/ca.pem"\nauth_token = "{token}"\n'
        )

    port_a, far = free_port(), str(uuid.uuid4())
    a = make_agent(tls(port_a), name="a")
    b = make_agent(
        tls(free_port()) + f'[backup_points.{far}]\npath = "{short_tmp}/b/far"\nchunk_size = 1048576\n', name="b"
    )
    for x in (a, b):
        x.config.chmod(0o600)
        x.start()
    with a.client() as ca, b.client() as cb:
        src = Bk(a, ca)
        vol = src.create(capacity=8 * MiB, name="there").uuid
        src.write(vol, {0: os.urandom(3 * MiB), 6 * MiB: os.urandom(MiB)})
        s1 = src.snap(vol, "s1").uuid
        r1 = src.backup(vol, s1)
        src.write(vol, {MiB: os.urandom(MiB)})
        s2 = src.snap(vol, "s2").uuid
        r2 = src.backup(vol, s2)
        want = {r1.backup_uuid: src.digest(vol, s1), r2.backup_uuid: src.digest(vol, s2)}
        out = cli(b, "copy", BP_UUID, far, "--from", f"localhost:{port_a}").stdout
        assert "copied 2 backup(s), 0 there already; 5 chunks sent (5.0 MiB), 3 there already; 2 verified" in out, out
        shutil.rmtree(short_tmp / "a" / "bp")  # A's backup point is gone
        dst = Bk(b, cb, bp=far)
        for bid, digest in want.items():
            restored = dst.restore(bid).volume_uuid
            assert dst.digest(restored) == digest
    with pytest.raises(BlockferryError) as e:
        PeerSource(
            f"localhost:{port_a}",
            BP_UUID,
            tls_ca=f"{pki}/ca.pem",
            tls_cert=f"{pki}/server.pem",
            tls_key=f"{pki}/server.key",
            token="not-the-token",
        )
    assert (
        e.value.code == "UNAUTHENTICATED"
        and e.value.message == f"agent localhost:{port_a}: missing or wrong bearer token"
    )
    for x in (a, b):
        assert x.stop() == 0
    assert token not in a.log_text() + b.log_text()


def test_the_controller_copies_between_two_hosts_own_directories(make_agent, pki, short_tmp):
    """Two hosts with their own directories, one controller over mutual
    TLS: no host serves both backup points, so the copy runs on the
    target's host, which reads the source from the other agent; the copy
    restores there bit for bit into that host's pool."""
    from support.controller import (
        CLUSTER,
        Controller,
        agent_section,
        check_ok,
        dir_pool,
        eventually,
        hosts_online,
        reconnect,
        seed_example,
        wait_task,
    )
    from support.tls import free_port
    from support.volumes import Vol, write

    token = uuid.uuid4().hex
    c = Controller(
        short_tmp / "ctl",
        extra=f'agent_tls_ca = "{pki}/ca.pem"\nagent_tls_cert = "{pki}/client.pem"\n'
        f'agent_tls_key = "{pki}/client.key"\nagent_auth_token = "{token}"\n',
    )
    # host uuids in this order: seed 004's reconnect, which picks the first, attaches B's directory on B
    host_b, host_a = "00000000-0000-4000-8000-00000000000b", "ffffffff-ffff-4fff-bfff-fffffffffffa"
    agents = {}
    for name, host in (("a", host_a), ("b", host_b)):
        port = free_port()
        agents[name] = make_agent(
            f'tcp_listen = "localhost:{port}"\ntls_cert = "{pki}/server.pem"\ntls_key = "{pki}/server.key"\n'
            f'tls_client_ca = "{pki}/ca.pem"\nauth_token = "{token}"\n'
            + agent_section(c, host, f'advertise = "localhost:{port}"\n'),
            name=name,
        )
        agents[name].config.chmod(0o600)
        agents[name].start()
    a, b = agents["a"], agents["b"]
    try:
        with c.client("op") as op:
            hosts_online(op, 2)
            pool_a = dir_pool(op, a.roots[0] / "p", host_a, name="pa")
            pool_b = dir_pool(op, b.roots[0] / "p", host_b, name="pb")
            body = dict(seed_example("001", "/v1/volume/share/create\n"), pool_uuid=pool_a, cluster_uuid=CLUSTER)
            body.update(backing_file="", capacity=8 << 20, volume_name="there")
            vol = check_ok(op.post("/v1/volume/share/create", json=body))["volume"]
            run = short_tmp / "run-test"
            run.mkdir()
            write(vol["AccessPath"][host_a], {0: os.urandom(3 << 20)}, run)
            ref = {"cluster_uuid": CLUSTER, "volume_uuid": vol["UUID"]}
            snap_body = {**seed_example("001", "/v1/volume/share/snapshot/create\n"), **ref}
            snap = check_ok(op.post("/v1/volume/share/snapshot/create", json=snap_body))["snapshot"]
            with a.client() as ac:
                want = Vol(a, ac, pool=pool_a).digest(vol["UUID"], snap["UUID"])
            points = {}
            for name, root in (("near", a.roots[0]), ("far", b.roots[0])):
                bp_body = dict(seed_example("000", "/v1/volume/internal/backuppoint/add"), name=name, btype="local")
                bp_body.update(tenant=vol["NamespaceUUID"], cluster_uuid=CLUSTER, root_dir=str(root / "backups"))
                bp_body.update(sub_dir=name, env={"chunk_size": 1 << 20})
                points[name] = check_ok(op.post("/v1/volume/internal/backuppoint/add", json=bp_body))["uuid"]
            near, far = points["near"], points["far"]
            reconnect(op, far)  # through the first host by uuid: B, whose directory it is
            backup_body = {**seed_example("001", "/v1/volume/share/backup/add\n"), **ref}
            backup_body.update(snapshot_uuid=snap["UUID"], backup_point_uuid=near)
            added = check_ok(op.post("/v1/volume/share/backup/add", json=backup_body))
            assert wait_task(op, added["task_id"])["status"] == "success"
            copy = {"cluster_uuid": CLUSTER, "uuid": near, "target_uuid": far}
            r = eventually(
                lambda: op.post("/v1/volume/internal/backuppoint/copy", json=copy), lambda r: r.status_code == 200
            )
            (queued,) = check_ok(r)["list"]
            done = wait_task(op, queued["task_id"])
            assert done["status"] == "success" and done["host_uuid"] == host_b, done
            assert done["result"]["chunks_sent"] == "3", done
            shutil.rmtree(a.roots[0] / "backups")  # A's copy is gone: B's stands alone
            restore = {**seed_example("001", "/v1/volume/share/backup/restore\n"), "cluster_uuid": CLUSTER}
            restore.update(backup_uuid=queued["copy_uuid"], new_pool_uuid=pool_b, new_volume_name="here")
            restored = check_ok(op.post("/v1/volume/share/backup/restore", json=restore))
            assert wait_task(op, restored["task_id"])["status"] == "success"
            with b.client() as bc:
                assert Vol(b, bc, pool=pool_b).digest(restored["volume"]["UUID"]) == want
            # deleting the copy goes to B, whose directory holds it (not to A, its volume's host)
            manifest = b.roots[0] / "backups" / "far" / "manifests" / queued["copy_uuid"]
            assert manifest.is_file()
            dele = {**seed_example("001", "/v1/volume/share/backup/delete\n"), "cluster_uuid": CLUSTER}
            check_ok(op.post("/v1/volume/share/backup/delete", json={**dele, "backup_uuid": queued["copy_uuid"]}))
            assert not manifest.exists()
    finally:
        for x in (a, b):
            x.stop()
        c.stop()


def test_a_cancelled_copy_lists_nothing_at_the_target(make_agent, short_tmp):
    """A copy cancelled midway ends CANCELLED; the target lists no copy,
    and the packs it wrote go (reclaimed at once, like a failed backup's)."""
    far = str(uuid.uuid4())
    a = make_agent(f'[backup_points.{far}]\npath = "{short_tmp}/a/far"\nchunk_size = 1048576\n')
    a.start()
    with a.client() as c:
        bk = Bk(a, c)
        vol = bk.create(capacity=16 * MiB, name="big").uuid
        bk.write(vol, {0: os.urandom(16 * MiB)})
        r = bk.backup(vol, bk.snap(vol, "s1").uuid)
        spec = jobs_pb2.CopySpec(source_backup_point_uuid=BP_UUID, target_backup_point_uuid=far, verify=True)
        spec.bandwidth_limit = 4 * MiB
        c.submit("copy-cancel", copy=spec)
        deadline = time.monotonic() + 30
        while c.get("copy-cancel").progress.bytes_done < 5 * MiB:
            assert time.monotonic() < deadline, c.get("copy-cancel")
            time.sleep(0.05)
        c.cancel("copy-cancel")
        while (job := c.get("copy-cancel")).state not in (OK, jobs_pb2.JOB_STATE_FAILED, jobs_pb2.JOB_STATE_CANCELLED):
            time.sleep(0.05)
        assert job.state == jobs_pb2.JOB_STATE_CANCELLED, job
        assert Bk(a, c, bp=far).list() == []
        assert not (short_tmp / "a" / "far" / "manifests" / r.backup_uuid).exists()
        assert Bk(a, c, bp=far).stats().packs == 0  # reclaimed
    assert a.stop() == 0
