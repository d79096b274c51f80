"""Three agents in their own network namespaces (veth + bridge, pyroute2),
one controller, shared storage, and the backup target (a real smbd) in a
fourth namespace: the seed flow end to end through the REST API (a
directory pool, and an RBD pool on a Ceph cluster listening on the bridge),
then a host's link cut while clones are queued and running."""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import time
import uuid

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from test_vaults import volume_digest

from support.agents import write_config
from support.cephcluster import CephCluster, free_port
from support.controller import AGENT_TOKEN, Controller, check_ok, seed_example, wait_task
from support.netns import BRIDGE_IP, HostNet
from support.smbserver import SmbServer
from support.volumes import write

AGENT_AUTH = "agents-grpc-token-0123456789"
NAMES = ["a", "b", "c"]


def _pki(d, ips: list[str]) -> None:
    """A CA and one server certificate whose SANs are the agents' addresses."""

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("bf test CA"))
        .issuer_name(name("bf test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name("agents"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    (d / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (d / "agent.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / "agent.key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    (d / "agent.key").chmod(0o600)


@pytest.fixture
def fleet(short_tmp):
    net = HostNet([*NAMES, "backup"])
    agents, ctl, smb = {}, None, None
    try:
        # the backup target: smbd in its own namespace, reached over the bridge
        smb = SmbServer(user="bfsmbnet", ip=net.ip("backup"), prefix=net.prefix("backup")).start()
        pki = short_tmp / "pki"
        pki.mkdir()
        _pki(pki, [net.ip(n) for n in NAMES])
        shared = short_tmp / "shared"  # the "shared storage": the same file system for every host
        shared.mkdir()
        gport = free_port()
        ctl = Controller(
            short_tmp / "ctl",
            grpc_listen=f"{BRIDGE_IP}:{gport}",
            extra=f'agent_tls_ca = "{pki}/ca.pem"\nagent_auth_token = "{AGENT_AUTH}"\n'
            f'agent_tls_cert = "{pki}/agent.pem"\nagent_tls_key = "{pki}/agent.key"\n',  # mutual TLS
        )
        for n in NAMES:
            wd = short_tmp / f"agent-{n}"
            wd.mkdir()
            ip = net.ip(n)
            extra = (
                f'tcp_listen = "{ip}:9443"\ntls_cert = "{pki}/agent.pem"\ntls_key = "{pki}/agent.key"\n'
                f'tls_client_ca = "{pki}/ca.pem"\nauth_token = "{AGENT_AUTH}"\n'
                f'[controller]\naddress = "{BRIDGE_IP}:{gport}"\ntoken = "{AGENT_TOKEN}"\n'
                f'host_uuid = "{uuid.uuid5(uuid.NAMESPACE_DNS, n)}"\nadvertise = "{ip}:9443"\n'
                f"heartbeat_interval = 1.0\nfence_after = 2.5\n"
                f"[jobs]\nmax_concurrent = 1\nbandwidth_limit = 24000000\n"
            )
            own = short_tmp / f"own-{n}"  # the host's own directories, besides the shared storage
            own.mkdir()
            a = write_config(wd, extra, roots=[shared, own])
            dev = short_tmp / "dev"  # /dev/disk/by-id as the hosts see it (the shared LUN's WWN)
            (dev / "disk" / "by-id").mkdir(parents=True, exist_ok=True)
            a.config.write_text(
                a.config.read_text().replace('log_level = "debug"', f'log_level = "debug"\ndev_root = "{dev}"')
            )
            a.config.chmod(0o600)
            a.prefix = net.prefix(n)
            agents[n] = a.start()
        with ctl.client("op") as op:
            deadline = time.monotonic() + 30
            while len([h for h in check_ok(op.get("/v1/hosts"))["list"] if h["State"] == "online"]) < 3:
                assert time.monotonic() < deadline, check_ok(op.get("/v1/hosts"))
                time.sleep(0.2)
        yield net, ctl, agents, shared, smb
    finally:
        for a in agents.values():
            if a.proc and a.proc.poll() is None:
                a.proc.terminate()
                try:
                    a.proc.wait(30)
                except Exception:
                    a.proc.kill()
        if ctl:
            ctl.stop()
        if smb:
            smb.destroy()
        net.destroy()


def rbd_leg(op, cluster_uuid, tenant, volume_uuid, snapshot_uuid, want, digest) -> None:
    """An RBD pool on a real Ceph cluster listening on the bridge, attached
    on all three hosts; a full clone of the directory pool's snapshot into
    it, followed through clone/progress; the clone's data; delete."""
    ceph = CephCluster(objectstore="memstore", store_bytes=2 << 30, addr=BRIDGE_IP, with_mgr=False).start()
    try:
        rbd = check_ok(
            op.post(
                "/v1/pool/share/create",
                json=dict(
                    seed_example("002", "/v1/pool/share/create"),
                    pool_name="fleet-ceph",
                    pool_type=6,
                    source=ceph.pool,
                    limit_host=False,
                    avail_host=[],
                    attr={"ceph_conf": str(ceph.conf)},
                ),
            )
        )["pool"]
        assert len(rbd["AvailHosts"]) == 3 and rbd["Status"] == "healthy"
        full = check_ok(
            op.post(
                "/v1/volume/share/clone",
                json=dict(
                    seed_example("001", "/v1/volume/share/clone"),
                    cluster_uuid=cluster_uuid,
                    volume_uuid=volume_uuid,
                    clone_dst_pool_uuid=rbd["UUID"],
                    clone_dst_vol_name="on-ceph",
                    clone_dst_vol_tenant=tenant,
                    snapshot_uuid=snapshot_uuid,
                    is_link=False,
                ),
            )
        )
        new = full["volume"]["UUID"]
        seen = []
        deadline = time.monotonic() + 120
        while not seen or seen[-1] < 100:
            seen.append(
                check_ok(
                    op.get(
                        "/v1/volume/share/clone/progress",
                        params={"cluster_uuid": cluster_uuid, "tenant": tenant, "volume_uuid": new},
                    )
                )["clone_progress"]
            )
            task = check_ok(op.get(f"/v1/tasks/{full['task_id']}"))
            assert task["status"] in ("waiting", "running", "success"), json.dumps(task)
            assert time.monotonic() < deadline, (seen, task)
            time.sleep(0.2)
        assert seen == sorted(seen) and len(set(seen)) > 2, seen  # it moved, and never back
        assert wait_task(op, full["task_id"])["status"] == "success"
        assert digest(rbd["UUID"], new) == want
        ceph.rbd("info", f"{ceph.pool}/{new}")  # a real image in the cluster
        ref = {"tenant": tenant, "cluster_uuid": cluster_uuid, "volume_uuid": new}
        dele = dict(seed_example("001", "/v1/volume/share/delete"), **ref, volume_name="on-ceph")  # its own name
        check_ok(op.post("/v1/volume/share/delete", json=dele))
        assert new not in ceph.rbd("ls", ceph.pool)
        check_ok(
            op.post(
                "/v1/pool/share/delete",
                json=dict(
                    seed_example("002", "/v1/pool/share/delete"), pool_uuid=rbd["UUID"], cluster_uuid=cluster_uuid
                ),
            )
        )
    finally:
        ceph.destroy()


def test_fleet_seed_flow_and_a_cut_link(fleet, short_tmp):
    net, ctl, agents, shared, smb = fleet
    run = short_tmp / "run-test"
    run.mkdir()
    cluster_uuid = seed_example("002", "/v1/pool/share/create")["cluster_uuid"]
    tenant = seed_example("001", "/v1/volume/share/create")["tenant"]

    def digest(pool_uuid, volume_uuid, snapshot_uuid=""):
        # over a's unix socket: the test's own view, not the controller's
        return volume_digest(agents["a"], pool_uuid, volume_uuid, snapshot_uuid)

    with ctl.client("op") as op:
        pool = check_ok(
            op.post(
                "/v1/pool/share/create",
                json=dict(
                    seed_example("002", "/v1/pool/share/create"),
                    pool_type=4,
                    source=str(shared / "pool"),
                    limit_host=False,
                    avail_host=[],
                ),
            )
        )["pool"]
        assert len(pool["AvailHosts"]) == 3  # attached on every host
        pid = pool["UUID"]
        vol = check_ok(
            op.post(
                "/v1/volume/share/create",
                json=dict(
                    seed_example("001", "/v1/volume/share/create"),
                    pool_uuid=pid,
                    cluster_uuid=cluster_uuid,
                    capacity=128 << 20,
                    backing_file="",
                ),
            )
        )["volume"]
        head = next(iter(vol["AccessPath"].values()))
        write(head, {0: os.urandom(48 << 20), 100 << 20: os.urandom(8 << 20)}, run)
        ref = {"tenant": tenant, "cluster_uuid": cluster_uuid, "volume_uuid": vol["UUID"]}
        s1 = check_ok(op.post("/v1/volume/share/snapshot/create", json=dict(ref, snapshot_name="s1")))["snapshot"]
        want = digest(pid, vol["UUID"], s1["UUID"])
        # backup, change, incremental, restore: through whichever hosts the dispatcher picks, to the
        # SMB server in the backup namespace (seed 000: add, list, update, delete), encrypted
        bp = check_ok(
            op.post(
                "/v1/volume/internal/backuppoint/add",
                json=dict(
                    seed_example("000", "/v1/volume/internal/backuppoint/add"),
                    tenant=tenant,
                    btype="samba",
                    cluster_uuid=cluster_uuid,
                    ip=smb.ip,
                    root_dir="backups",
                    sub_dir="fleet",
                    pass_word="fleet-bp-pw",
                    env={"port": smb.port, "username": smb.user, "secret": smb.password, "chunk_size": 1 << 20},
                ),
            )
        )["uuid"]
        add = dict(
            seed_example("001", "/v1/volume/share/backup/add"),
            cluster_uuid=cluster_uuid,
            volume_uuid=vol["UUID"],
            snapshot_uuid=s1["UUID"],
            backup_point_uuid=bp,
        )
        b1 = check_ok(op.post("/v1/volume/share/backup/add", json=add))
        assert wait_task(op, b1["task_id"], 120)["status"] == "success"
        write(head, {4096: os.urandom(4096)}, run)
        s2 = check_ok(op.post("/v1/volume/share/snapshot/create", json=dict(ref, snapshot_name="s2")))["snapshot"]
        want2 = digest(pid, vol["UUID"], s2["UUID"])
        b2 = check_ok(
            op.post("/v1/volume/share/backup/add", json=dict(add, snapshot_uuid=s2["UUID"], backup_name="b2"))
        )
        t2 = wait_task(op, b2["task_id"], 120)
        assert t2["status"] == "success" and t2["result"]["mode"] == "incremental", t2
        rs = check_ok(
            op.post(
                "/v1/volume/share/backup/restore",
                json=dict(
                    seed_example("001", "/v1/volume/share/backup/restore"),
                    backup_uuid=b2["backup"]["UUID"],
                    new_volume_name="restored",
                    new_pool_uuid=pid,
                    new_volume_tenant=tenant,
                    cluster_uuid=cluster_uuid,
                ),
            )
        )
        assert wait_task(op, rs["task_id"], 120)["status"] == "success"
        assert digest(pid, rs["volume"]["UUID"]) == want2
        # the repository really is on the server in the other namespace (samba's own client reads it)
        listing = smb.smbclient("backups", "cd fleet; ls").stdout.decode()
        assert all(name in listing for name in ("config", "manifests", "packs")), listing
        item = next(
            x
            for x in check_ok(
                op.get("/v1/volume/internal/backuppoint/list", params={"cluster_uuid": cluster_uuid, "tenant": tenant})
            )["list"]
            if x["UUID"] == bp
        )
        assert (item["BType"], item["indentify"]["IP"], item["indentify"]["Pwd"]) == ("samba", smb.ip, "******")
        upd = dict(
            seed_example("000", "v1/volume/internal/backuppoint/update"),
            cluster_uuid=cluster_uuid,
            tenant_uuid=tenant,
            backup_point_uuid=bp,
            ip=smb.ip,
            root_directory="backups",
            sub_dir="fleet",
            backup_point_name="smb-renamed",
        )
        check_ok(op.post("/v1/volume/internal/backuppoint/update", json=upd))
        bp_delete = {"cluster_uuid": cluster_uuid, "uuid": bp}

        def leftovers():
            return [f for n in NAMES for f in (short_tmp / f"agent-{n}" / "state" / "backup_points.d").glob(f"{bp}*")]

        assert leftovers()  # attached where the backups ran
        assert op.post("/v1/volume/internal/backuppoint/delete", json=bp_delete).status_code == 409  # holds backups
        for b in (b1, b2):
            check_ok(
                op.post(
                    "/v1/volume/share/backup/delete",
                    json={"cluster_uuid": cluster_uuid, "tenant": tenant, "backup_uuid": b["backup"]["UUID"]},
                )
            )
        check_ok(op.post("/v1/volume/internal/backuppoint/delete", json=bp_delete))
        assert bp not in [
            x["UUID"]
            for x in check_ok(
                op.get("/v1/volume/internal/backuppoint/list", params={"cluster_uuid": cluster_uuid, "tenant": tenant})
            )["list"]
        ]
        # the agents that had it attached drop its definition (and SMB password) at their next heartbeat
        deadline = time.monotonic() + 15
        while leftovers():
            assert time.monotonic() < deadline, leftovers()
            time.sleep(0.2)
        linked = check_ok(
            op.post(
                "/v1/volume/share/clone",
                json=dict(
                    seed_example("001", "/v1/volume/share/clone"),
                    cluster_uuid=cluster_uuid,
                    volume_uuid=vol["UUID"],
                    clone_dst_pool_uuid=pid,
                    clone_dst_vol_name="linked",
                    clone_dst_vol_tenant=tenant,
                    snapshot_uuid=s1["UUID"],
                    is_link=True,
                ),
            )
        )
        assert wait_task(op, linked["task_id"])["status"] == "success"
        assert digest(pid, linked["volume"]["UUID"]) == want
        rbd_leg(op, cluster_uuid, tenant, vol["UUID"], s1["UUID"], want, digest)

        # four full clones (each ~2.5 s at the agents' bandwidth limit, one at a time per host)
        clones = [
            check_ok(
                op.post(
                    "/v1/volume/share/clone",
                    json=dict(
                        seed_example("001", "/v1/volume/share/clone"),
                        cluster_uuid=cluster_uuid,
                        volume_uuid=vol["UUID"],
                        clone_dst_pool_uuid=pid,
                        clone_dst_vol_name=f"full-{i}",
                        clone_dst_vol_tenant=tenant,
                        snapshot_uuid=s1["UUID"],
                        is_link=False,
                    ),
                )
            )
            for i in range(4)
        ]
        deadline = time.monotonic() + 30
        while True:  # one of them running on a host: cut that host's link
            running = [
                t for t in (check_ok(op.get(f"/v1/tasks/{c['task_id']}")) for c in clones) if t["status"] == "running"
            ]
            if running:
                break
            assert time.monotonic() < deadline
            time.sleep(0.1)
        victim_task = running[0]
        victim = next(n for n in NAMES if str(uuid.uuid5(uuid.NAMESPACE_DNS, n)) == victim_task["host_uuid"])
        net.cut(victim)
        final = [wait_task(op, c["task_id"], 180) for c in clones]
        for c, t in zip(clones, final, strict=True):
            assert t["status"] == "success", json.dumps(t)
            assert digest(pid, c["volume"]["UUID"]) == want
        moved = next(t for t in final if t["id"] == victim_task["id"])
        assert moved["attempts"] == 2 and moved["host_uuid"] != victim_task["host_uuid"], moved
        hosts = {h["UUID"]: h["State"] for h in check_ok(op.get("/v1/hosts"))["list"]}
        assert hosts[victim_task["host_uuid"]] == "offline"
    deadline = time.monotonic() + 20  # the cut-off agent fenced itself (it may have had nothing left to stop)
    while "self-fencing" not in agents[victim].log_text():
        assert time.monotonic() < deadline, agents[victim].log_text()[-3000:]
        time.sleep(0.2)
    net.cut(victim, up=True)


def test_fleet_copies_a_backup_between_two_hosts_own_directories(fleet, short_tmp):
    """Host a's directory backup point to host b's, agents in their own
    network namespaces: no host serves both, so the copy runs on b, which
    reads the backup from a's agent over mutual TLS; a's directory is then
    removed and the copy restores on b bit for bit."""
    import shutil

    from support.controller import eventually, reconnect

    net, ctl, agents, shared, smb = fleet
    run = short_tmp / "run-test"
    run.mkdir()
    cluster_uuid = seed_example("002", "/v1/pool/share/create")["cluster_uuid"]
    tenant = seed_example("001", "/v1/volume/share/create")["tenant"]
    host = {n: str(uuid.uuid5(uuid.NAMESPACE_DNS, n)) for n in NAMES}
    own = {n: short_tmp / f"own-{n}" for n in NAMES}

    def digest(name, pool_uuid, volume_uuid, snapshot_uuid=""):
        return volume_digest(agents[name], pool_uuid, volume_uuid, snapshot_uuid)

    def own_pool(op, name):
        body = dict(seed_example("002", "/v1/pool/share/create"), pool_type=4, pool_name=f"own-{name}")
        body.update(source=str(own[name] / "pool"), limit_host=True, avail_host=[host[name]])
        return check_ok(op.post("/v1/pool/share/create", json=body))["pool"]["UUID"]

    with ctl.client("op") as op:
        pool_a, pool_b = own_pool(op, "a"), own_pool(op, "b")
        body = dict(seed_example("001", "/v1/volume/share/create"), pool_uuid=pool_a, cluster_uuid=cluster_uuid)
        body.update(capacity=16 << 20, backing_file="", volume_name="mine")
        vol = check_ok(op.post("/v1/volume/share/create", json=body))["volume"]
        write(vol["AccessPath"][host["a"]], {0: os.urandom(3 << 20)}, run)
        ref = {"tenant": tenant, "cluster_uuid": cluster_uuid, "volume_uuid": vol["UUID"]}
        snap = check_ok(op.post("/v1/volume/share/snapshot/create", json=dict(ref, snapshot_name="s")))["snapshot"]
        want = digest("a", pool_a, vol["UUID"], snap["UUID"])
        points = {}
        for name in ("a", "b"):
            bp = dict(seed_example("000", "/v1/volume/internal/backuppoint/add"), tenant=tenant, btype="local")
            bp.update(cluster_uuid=cluster_uuid, name=f"own-{name}", root_dir=str(own[name] / "backups"), sub_dir="")
            bp.update(env={"chunk_size": 1 << 20})
            points[name] = check_ok(op.post("/v1/volume/internal/backuppoint/add", json=bp))["uuid"]
        assert min(host.values()) == host["b"]
        reconnect(op, points["b"])  # through the first host by uuid: b, whose directory it is
        add = dict(seed_example("001", "/v1/volume/share/backup/add"), cluster_uuid=cluster_uuid)
        add.update(volume_uuid=vol["UUID"], snapshot_uuid=snap["UUID"], backup_point_uuid=points["a"])
        b1 = check_ok(op.post("/v1/volume/share/backup/add", json=add))
        assert wait_task(op, b1["task_id"], 120)["status"] == "success"
        copy = {"cluster_uuid": cluster_uuid, "uuid": points["a"], "target_uuid": points["b"]}
        r = eventually(
            lambda: op.post("/v1/volume/internal/backuppoint/copy", json=copy), lambda r: r.status_code == 200
        )
        (queued,) = check_ok(r)["list"]
        done = wait_task(op, queued["task_id"], 120)
        assert done["status"] == "success" and done["host_uuid"] == host["b"], done
        assert done["result"]["chunks_sent"] == "3", done
        shutil.rmtree(own["a"] / "backups")
        restore = dict(seed_example("001", "/v1/volume/share/backup/restore"), cluster_uuid=cluster_uuid)
        restore.update(backup_uuid=queued["copy_uuid"], new_pool_uuid=pool_b, new_volume_name="theirs")
        restore.update(new_volume_tenant=tenant)
        rs = check_ok(op.post("/v1/volume/share/backup/restore", json=restore))
        assert wait_task(op, rs["task_id"], 120)["status"] == "success"
        assert digest("b", pool_b, rs["volume"]["UUID"]) == want


def test_fleet_shares_one_lun(fleet, short_tmp, loop):
    """Seed 002's type 4 pool by WWN on one LUN that all three hosts see (a
    loop device: host-wide, so every namespace has it): one metadata owner
    elected by the on-LUN lease, volumes created through REST, the same data
    read by every host, a volume created and snapshotted by asking a host
    that is not the owner (it passes the changes on), concurrent allocations
    that never overlap, and the owner killed with SIGKILL: another host takes
    over and the pool keeps serving."""
    import signal
    import threading

    from agent.api.v1 import volumes_pb2 as v
    from agent.stores.blockdev import LocalBlockDevice
    from agent.volumes.lun.table import PoolLun, SliceTable

    from support.controller import eventually

    net, ctl, agents, shared, smb = fleet
    run = short_tmp / "run-lun"
    run.mkdir()
    lo = loop(256 << 20)
    wwn = "wwn-0x5000c500ad9285bb"
    (short_tmp / "dev" / "disk" / "by-id" / wwn).symlink_to(lo.dev)
    create = seed_example("002", "/v1/pool/share/create")
    cluster_uuid = create["cluster_uuid"]
    tenant = seed_example("001", "/v1/volume/share/create")["tenant"]
    host = {n: str(uuid.uuid5(uuid.NAMESPACE_DNS, n)) for n in NAMES}
    name_of = {u: n for n, u in host.items()}

    def digest(name, pool_uuid, volume_uuid, snapshot_uuid=""):
        return volume_digest(agents[name], pool_uuid, volume_uuid, snapshot_uuid)

    def owner_of(pool_uuid, among):
        for n in among:
            with agents[n].client() as ac:
                o = ac.get_pool_status(v.PoolRef(pool_uuid=pool_uuid)).metadata_owner
            if o:
                return o
        return ""

    with ctl.client("op") as op:
        body = dict(create, pool_type=4, source=wwn, pool_name="san", limit_host=False, avail_host=[])
        body["attr"] = dict(create["attr"], leaseTimeout="2", leaseIoTimeout="0.1")
        pool = check_ok(op.post("/v1/pool/share/create", json=body))["pool"]
        assert sorted(pool["AvailHosts"]) == sorted(host.values()) and pool["Type"] == 4
        pid = pool["UUID"]
        owner = eventually(lambda: owner_of(pid, NAMES), bool, timeout=15)
        assert all(owner_of(pid, [n]) == owner for n in NAMES)  # one owner, the same for all
        with agents[name_of[owner]].client() as ac:
            assert sorted(ac.get_pool_status(v.PoolRef(pool_uuid=pid)).live_hosts) == sorted(host.values())
        # a volume through REST lands on the owner; every host reads the same data
        vc = dict(seed_example("001", "/v1/volume/share/create"), pool_uuid=pid, cluster_uuid=cluster_uuid)
        vc.update(capacity=16 << 20, backing_file="", volume_name="shared")
        vol = eventually(
            lambda: op.post("/v1/volume/share/create", json=vc), lambda r: r.status_code == 200, timeout=20
        ).json()["data"]["volume"]
        write(vol["AccessPath"][owner], {0: os.urandom(2 << 20), 11 << 20: os.urandom(70000)}, run)
        ref = {"tenant": tenant, "cluster_uuid": cluster_uuid, "volume_uuid": vol["UUID"]}
        snap = check_ok(op.post("/v1/volume/share/snapshot/create", json=dict(ref, snapshot_name="s")))["snapshot"]
        want = {digest(n, pid, vol["UUID"], snap["UUID"]) for n in NAMES}
        assert len(want) == 1
        # asked of a host that is not the owner: passed on to the owner's agent (mutual TLS, fleet token)
        other = next(n for n in NAMES if host[n] != owner)
        with agents[other].client() as ac:
            made = ac.create_volume(
                v.CreateVolumeRequest(pool_uuid=pid, volume_uuid=str(uuid.uuid4()), name="via-b", capacity=4 << 20)
            )
            snapped = ac.create_snapshot(
                v.CreateSnapshotRequest(pool_uuid=pid, volume_uuid=made.uuid, snapshot_uuid=str(uuid.uuid4()), name="s")
            )
            assert snapped.volume_uuid == made.uuid
            ac.delete_snapshot(v.SnapshotRef(pool_uuid=pid, volume_uuid=made.uuid, snapshot_uuid=snapped.uuid))
            ac.delete_volume(v.DeleteVolumeRequest(pool_uuid=pid, volume_uuid=made.uuid))
        # concurrent allocations on the owner: the table never overlaps
        errors = []

        def make(i):
            try:
                with agents[name_of[owner]].client() as ac:
                    ac.create_volume(
                        v.CreateVolumeRequest(
                            pool_uuid=pid, volume_uuid=str(uuid.uuid4()), name=f"c{i}", capacity=(i + 1) << 20
                        )
                    )
            except Exception as e:  # noqa: BLE001
                errors.append(e)

        threads = [threading.Thread(target=make, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        used = SliceTable(PoolLun(LocalBlockDevice(lo.dev, exclusive=False), pid)).used()
        assert len({r.volume for r in used}) == 7
        for prev, nxt in zip(used, used[1:], strict=False):
            assert prev.end <= nxt.offset
        # the owner dies: another host takes the lease over and serves changes
        dead = name_of[owner]
        agents[dead].proc.send_signal(signal.SIGKILL)
        agents[dead].proc.wait()
        alive = [n for n in NAMES if n != dead]
        new_owner = eventually(lambda: owner_of(pid, alive), lambda o: o and o != owner, timeout=20)
        assert name_of[new_owner] in alive
        vol2 = eventually(
            lambda: op.post("/v1/volume/share/create", json=dict(vc, volume_name="after")),
            lambda r: r.status_code == 200,
            timeout=30,
        ).json()["data"]["volume"]
        assert set(vol2["AccessPath"]) >= {new_owner}
        assert {digest(n, pid, vol["UUID"], snap["UUID"]) for n in alive} == want
        # AvailHosts: the hosts that see the LUN and hold a live host lease; the dead host's lapses
        get = dict(seed_example("002", "/v1/pool/share/get"), pool_uuid=pid, cluster_uuid=cluster_uuid)
        eventually(
            lambda: sorted(check_ok(op.post("/v1/pool/share/get", json=get))["pool"]["AvailHosts"]),
            lambda hosts: hosts == sorted(host[n] for n in alive),
            timeout=20,
        )
