"""Seed 002 through the controller, with a real agent registered and real
storage: a directory pool and an RBD pool on the Ceph fixture."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from agent.api.v1 import volumes_pb2 as v

from support.controller import AGENT_TOKEN, TENANT_A, Controller, check_error, check_ok, seed_example, wait_task
from support.fctree import WWID_B
from support.volumes import rpc_error


def test_seed_002_pools(cluster, ceph):
    c, a, host = cluster
    create = seed_example("002", "/v1/pool/share/create")
    with c.client("op") as op:
        # the example as written is an NFS pool (type 2): test_seed_002_nfs_pool_as_written
        check_error(op.post("/v1/pool/share/create", json=dict(create, pool_type=3)), 400, "pool_type")
        body = dict(create, pool_type=4, source=str(a.roots[0] / "shared-disks"), avail_host=[host])
        pool = check_ok(op.post("/v1/pool/share/create", json=body))["pool"]
        assert (pool["Name"], pool["Type"], pool["Status"], pool["AvailHosts"], pool["LimitHost"]) == (
            "test--",
            4,
            "healthy",
            [host],
            True,
        )
        assert pool["Capacity"] > 0 and pool["Attr"] == {"overAllocationThreshold": "1.0"}
        assert set(pool) >= {
            "UUID",
            "Name",
            "Type",
            "NamespaceUUID",
            "ZoneUUID",
            "ZoneName",
            "MachineUUID",
            "IP",
            "Port",
            "Source",
            "Username",
            "Password",
            "Ctime",
            "Mtime",
            "VolumeTotalCount",
            "AvailHosts",
            "Volumes",
            "Capacity",
            "ShareNsUUIDs",
            "Used",
            "Attr",
            "ShareNsNames",
            "Status",
            "AllocatedCapacity",
            "LimitHost",
        }
        pid = pool["UUID"]
        with a.client() as ac:  # the agent serves it now
            assert ac.get_pool_status(v.PoolRef(pool_uuid=pid)).status == "healthy"
        check_error(op.post("/v1/pool/share/create", json=body), 409, "pool_name")
        listed = check_ok(
            op.post(
                "/v1/pool/share/list",
                json=dict(seed_example("002", "/v1/pool/share/list"), cluster_uuid=create["cluster_uuid"]),
            )
        )
        assert listed["TotalCount"] == 1 and listed["infos"][0]["pool"]["UUID"] == pid
        get = dict(seed_example("002", "/v1/pool/share/get"), pool_uuid=pid, cluster_uuid=create["cluster_uuid"])
        assert check_ok(op.post("/v1/pool/share/get", json=get))["pool"]["Name"] == "test--"
        setb = dict(seed_example("002", "/v1/pool/share/set"), pool_uuid=pid, cluster_uuid=create["cluster_uuid"])
        assert check_ok(op.post("/v1/pool/share/set", json=setb))["pool"]["Name"] == "disks"
        st = dict(
            seed_example("002", "/v1/pool/share/status/check"), pool_uuid=pid, cluster_uuid=create["cluster_uuid"]
        )
        assert check_ok(op.post("/v1/pool/share/status/check", json=st))["pool"]["Status"] == "healthy"
        url = seed_example("002", "/v1/pool/share/pool_type/support", "url")
        assert check_ok(op.get("/v1/pool/share/pool_type/support?" + url.split("?", 1)[1]))["PoolTypes"] == [
            "iscsi",
            "nfs",
            "disk",
            "fc",  # the host's sysfs shows FC HBAs
            "rbd",
        ]
        fc = check_ok(
            op.post("/v1/pool/share/fc_device/list", json=seed_example("002", "/v1/pool/share/fc_device/list"))
        )
        assert fc["list"][f"wwn-0x{WWID_B}"] == [
            {
                "host_uuid": host,
                "host_name": fc["list"][f"wwn-0x{WWID_B}"][0]["host_name"],
                "disk_path": fc["list"][f"wwn-0x{WWID_B}"][0]["disk_path"],
            }
        ]
        # an RBD pool on the real cluster
        rados_pool = f"ctl{uuid.uuid4().hex[:8]}"  # its own RADOS pool: other tests leave images in "rbd"
        ceph.add_pool(rados_pool)
        rbd_body = dict(
            create,
            pool_name="ceph",
            pool_type=6,
            source=rados_pool,
            limit_host=False,
            avail_host=[],
            attr={"ceph_conf": str(ceph.conf)},
        )
        rbd_pool = check_ok(op.post("/v1/pool/share/create", json=rbd_body))["pool"]
        assert rbd_pool["Status"] == "healthy" and rbd_pool["AvailHosts"] == [host]
        # a tenant token may not manage shared pools; bad input names the field
        with c.client(TENANT_A) as t:
            check_error(t.post("/v1/pool/share/create", json=body), 403, "authorization")
        check_error(
            op.post("/v1/pool/share/create", json=dict(body, pool_name="x", avail_host=[str(uuid.uuid4())])),
            404,
            "avail_host",
        )
        check_error(op.post("/v1/pool/share/create", json=dict(body, pool_name="y", source="/etc")), 403)
        check_error(op.post("/v1/pool/share/create", json=dict(body, pool_name="z", pool_type="4")), 400, "pool_type")
        check_error(
            op.post("/v1/pool/share/create", json=dict(body, pool_name="w", attr={"overAllocationThreshold": "lots"})),
            400,
            "attr.overAllocationThreshold",
        )
        # delete: the agents stop serving it
        dele = dict(seed_example("002", "/v1/pool/share/delete"), pool_uuid=pid, cluster_uuid=create["cluster_uuid"])
        check_ok(op.post("/v1/pool/share/delete", json=dele))
        with a.client() as ac:
            assert rpc_error(lambda: ac.get_pool_status(v.PoolRef(pool_uuid=pid))).code().name == "NOT_FOUND"
        check_ok(op.post("/v1/pool/share/delete", json=dict(dele, pool_uuid=rbd_pool["UUID"])))
        assert (
            check_ok(op.post("/v1/pool/share/list", json={"cluster_uuid": create["cluster_uuid"]}))["TotalCount"] == 0
        )


def test_seed_002_nfs_pool_as_written(cluster, nfs_server, short_tmp):
    """The seed's pool create example is an NFS pool: as written, but for the
    server's address, the export (the seed's path below the test server's
    export) and this test's host. Volumes and snapshots of seed 001 then
    live on the export, where the server's side of it shows them."""
    from support.volumes import write

    c, a, host = cluster
    run = short_tmp / "run-nfs"
    run.mkdir()
    create = seed_example("002", "/v1/pool/share/create")
    assert create["pool_type"] == 2 and create["port"] == ""
    source = f"{nfs_server.export}{create['source']}"
    on_server = Path(source)
    on_server.mkdir(parents=True, exist_ok=True)  # the NFS admin's export directory
    body = dict(create, ip="127.0.0.1", source=source, avail_host=[host])
    with c.client("op") as op:
        check_error(op.post("/v1/pool/share/create", json=dict(body, port="2049")), 400, "port")
        check_error(op.post("/v1/pool/share/create", json=dict(body, source=source + "/a b")), 400, "source")
        pool = check_ok(op.post("/v1/pool/share/create", json=body))["pool"]
        assert (pool["Type"], pool["Status"], pool["IP"], pool["Source"], pool["AvailHosts"]) == (
            2,
            "healthy",
            "127.0.0.1",
            source,
            [host],
        )
        assert pool["Capacity"] > 0
        with a.client() as ac:
            assert ac.get_pool_status(v.PoolRef(pool_uuid=pool["UUID"])).type == "nfs"
        cluster_uuid = create["cluster_uuid"]
        vc = dict(
            seed_example("001", "/v1/volume/share/create"),
            pool_uuid=pool["UUID"],
            cluster_uuid=cluster_uuid,
            capacity=16 << 20,
        )
        vc.pop("backing_file")  # the example adopts /xgp/my.qcow2, a file of that host
        vol = check_ok(op.post("/v1/volume/share/create", json=vc))["volume"]
        head = vol["AccessPath"][host]
        assert head == f"nfs://127.0.0.1{source}/pool-{pool['UUID']}/volume/{vol['UUID']}"
        data = os.urandom(1 << 20)
        write(head, {0: data}, run)
        ref = {"tenant": vc["tenant"], "cluster_uuid": cluster_uuid, "volume_uuid": vol["UUID"]}
        snap = check_ok(
            op.post(
                "/v1/volume/share/snapshot/create",
                json=dict(seed_example("001", "/v1/volume/share/snapshot/create"), **ref, snapshot_name="aaa"),
            )
        )["snapshot"]
        layer = on_server / f"pool-{pool['UUID']}" / "snapshot" / vol["UUID"] / snap["UUID"]
        subprocess.run(
            [
                "qemu-img",
                "dd",
                "-U",
                "-f",
                "qcow2",
                "-O",
                "raw",
                f"if={layer}",
                f"of={run}/out.raw",
                "bs=1M",
                "count=1",
            ],
            capture_output=True,
            check=True,
        )
        assert (run / "out.raw").read_bytes() == data  # read from the server's own files
        check_ok(
            op.post(
                "/v1/volume/share/snapshot/delete",
                json=dict(seed_example("001", "/v1/volume/share/snapshot/delete"), **ref, snapshot_uuid=snap["UUID"]),
            )
        )
        check_ok(op.post("/v1/volume/share/delete", json=dict(seed_example("001", "/v1/volume/share/delete"), **ref)))
        assert not layer.exists() and not list((on_server / f"pool-{pool['UUID']}" / "volume").iterdir())
        check_ok(
            op.post(
                "/v1/pool/share/delete",
                json=dict(
                    seed_example("002", "/v1/pool/share/delete"), pool_uuid=pool["UUID"], cluster_uuid=cluster_uuid
                ),
            )
        )


def test_seed_002_lun_pools_by_wwn_and_fc(cluster, loop, short_tmp, iscsi_lun, tgt_server):
    """Seed 002's list example is a type 4 pool whose Source is a WWN: a
    shared LUN, found under the host's /dev/disk/by-id (the FC tree's dev
    root here), formatted when blank and holding volumes in slices. A type 5
    pool takes a device fc_device/list offers, a type 1 pool a tgtd LUN
    (portal, target IQN, attr.lun). Type 3 is refused with why."""
    import re

    from support.volumes import ref_digest_of, write

    c, a, host = cluster
    dev_root = Path(re.search(r'dev_root = "(.*)"', a.config.read_text()).group(1))
    listed = seed_example("002", "/v1/pool/share/list", "answer")["data"]["infos"][0]["pool"]
    wwn = listed["Source"]
    assert listed["Type"] == 4 and wwn == "wwn-0x5000c500ad9285bb"
    disk, fc_lun = loop(64 << 20, name="disk.img"), loop(64 << 20, name="fc.img")
    (dev_root / "disk" / "by-id" / wwn).symlink_to(disk.dev)
    fc_id = f"wwn-0x{WWID_B}"  # an FC device of the host's tree: its node becomes a real LUN
    (dev_root / "disk" / "by-id" / fc_id).unlink()
    (dev_root / "disk" / "by-id" / fc_id).symlink_to(fc_lun.dev)
    create = seed_example("002", "/v1/pool/share/create")
    attr = dict(create["attr"], leaseTimeout="2", leaseIoTimeout="0.1")  # short leases for the test
    create = dict(create, avail_host=[host], attr=attr)
    cluster_uuid = create["cluster_uuid"]
    run = short_tmp / "run-lun"
    run.mkdir()
    with c.client("op") as op:
        err = check_error(op.post("/v1/pool/share/create", json=dict(create, pool_type=3)), 400, "pool_type")
        assert "SMB" in err["message"] and "backup point" in err["message"]
        url = seed_example("002", "/v1/pool/share/pool_type/support", "url")
        assert check_ok(op.get("/v1/pool/share/pool_type/support?" + url.split("?", 1)[1]))["PoolTypes"] == [
            "iscsi",
            "nfs",
            "disk",
            "fc",
            "rbd",
        ]
        bad = dict(create, pool_type=4, source="wwn-0x../../etc", pool_name="bad")
        check_error(op.post("/v1/pool/share/create", json=bad), 400, "source")
        bad = dict(create, pool_type=4, source=wwn, pool_name="bad", attr=dict(attr, leaseIoTimeout="1"))
        check_error(op.post("/v1/pool/share/create", json=bad), 400, "attr.leaseTimeout")
        check_error(
            op.post("/v1/pool/share/create", json=dict(create, pool_type=4, source="wwn-0x1234", pool_name="gone")),
            404,
            "source",
        )
        pool = check_ok(op.post("/v1/pool/share/create", json=dict(create, pool_type=4, source=wwn, pool_name="san")))[
            "pool"
        ]
        assert (pool["Type"], pool["Source"], pool["Status"], pool["AvailHosts"]) == (4, wwn, "healthy", [host])
        assert pool["Capacity"] == 61 << 20 and pool["Used"] == 0 == pool["AllocatedCapacity"]
        with open(disk.file, "rb") as f:
            assert f.read(8) == b"BFSHPOOL"  # formatted: it was blank
        fc = check_ok(op.post("/v1/pool/share/create", json=dict(create, pool_type=5, source=fc_id, pool_name="fc")))[
            "pool"
        ]
        assert (fc["Type"], fc["Status"]) == (5, "healthy")
        t = iscsi_lun(64 << 20, chap=True)
        ib = dict(create, pool_type=1, ip="127.0.0.1", port=str(tgt_server.port), source=t.lun.iqn, pool_name="is")
        ib["attr"] = dict(attr, lun="1")
        ib.update(username=t.lun.user, password=t.lun.secret)
        check_error(op.post("/v1/pool/share/create", json=dict(ib, password="")), 400, "username")
        check_error(op.post("/v1/pool/share/create", json=dict(ib, source="not-an-iqn")), 400, "source")
        wrong = dict(ib, password="not-the-secret")
        assert op.post("/v1/pool/share/create", json=wrong).status_code >= 400  # the target refuses the login
        iscsi = check_ok(op.post("/v1/pool/share/create", json=ib))["pool"]
        assert (iscsi["Type"], iscsi["Status"], iscsi["Capacity"]) == (1, "healthy", 61 << 20)
        ivc = dict(seed_example("001", "/v1/volume/share/create"), pool_uuid=iscsi["UUID"], cluster_uuid=cluster_uuid)
        ivc.pop("backing_file")
        ivol = check_ok(op.post("/v1/volume/share/create", json=dict(ivc, capacity=8 << 20)))["volume"]
        assert '"driver":"iscsi"' in ivol["AccessPath"][host] and t.lun.secret not in ivol["AccessPath"][host]
        assert t.lun.secret not in a.log_text()
        (secret_file,) = (a.workdir / "run" / "secrets").glob("bfchap-*.secret")  # the agent's copy for qemu
        assert secret_file.stat().st_mode & 0o777 == 0o600 and secret_file.parent.stat().st_mode & 0o777 == 0o700
        from agent.volumes import qemu_objects

        # a qemu of this test reads the CHAP secret the way the agents' do: a secret object by the id the name uses
        ident = json.loads(ivol["AccessPath"][host][5:])["file"]["file"]["password-secret"]
        qemu_objects.add_secret(ident, t.lun.secret, str(run / "secrets"))
        try:
            write(ivol["AccessPath"][host], {0: os.urandom(1 << 20)}, run)
        finally:
            qemu_objects.remove(ident)
        iref = {"tenant": ivc["tenant"], "cluster_uuid": cluster_uuid, "volume_uuid": ivol["UUID"]}
        check_ok(op.post("/v1/volume/share/delete", json=dict(seed_example("001", "/v1/volume/share/delete"), **iref)))
        with open(t.lun.file, "rb") as f:
            assert f.read(8) == b"BFSHPOOL"
        vc = dict(
            seed_example("001", "/v1/volume/share/create"),
            pool_uuid=pool["UUID"],
            cluster_uuid=cluster_uuid,
            capacity=16 << 20,
        )
        vc.pop("backing_file")
        vol = check_ok(op.post("/v1/volume/share/create", json=vc))["volume"]
        head = vol["AccessPath"][host]
        assert head.startswith("json:") and str(dev_root / "disk" / "by-id" / wwn) in head
        data = os.urandom(1 << 20)
        write(head, {3 << 20: data}, run)
        ref = {"tenant": vc["tenant"], "cluster_uuid": cluster_uuid, "volume_uuid": vol["UUID"]}
        snap = check_ok(
            op.post(
                "/v1/volume/share/snapshot/create",
                json=dict(seed_example("001", "/v1/volume/share/snapshot/create"), **ref, snapshot_name="aaa"),
            )
        )["snapshot"]
        with a.client() as ac:
            head_now = ac.get_volume(v.VolumeRef(pool_uuid=pool["UUID"], volume_uuid=vol["UUID"])).access_path
            assert ref_digest_of(head_now, run) == ref_digest_of(head, run)  # the snapshot kept the data
            st = ac.get_pool_status(v.PoolRef(pool_uuid=pool["UUID"]))
            assert st.type == "lun" and st.metadata_owner == host and list(st.live_hosts) == [host]
        pref = {"pool_uuid": pool["UUID"], "cluster_uuid": cluster_uuid}
        check_ok(
            op.post(
                "/v1/pool/share/status/check", json=dict(seed_example("002", "/v1/pool/share/status/check"), **pref)
            )
        )
        got = check_ok(op.post("/v1/pool/share/get", json=dict(seed_example("002", "/v1/pool/share/get"), **pref)))
        assert got["pool"]["Used"] > 32 << 20 and got["pool"]["AllocatedCapacity"] == got["pool"]["Used"]
        check_ok(
            op.post(
                "/v1/volume/share/snapshot/delete",
                json=dict(seed_example("001", "/v1/volume/share/snapshot/delete"), **ref, snapshot_uuid=snap["UUID"]),
            )
        )
        check_ok(op.post("/v1/volume/share/delete", json=dict(seed_example("001", "/v1/volume/share/delete"), **ref)))
        for p in (pool, fc, iscsi):
            body = dict(seed_example("002", "/v1/pool/share/delete"), pool_uuid=p["UUID"], cluster_uuid=cluster_uuid)
            check_ok(op.post("/v1/pool/share/delete", json=body))
        with a.client() as ac:
            for p in (pool, fc, iscsi):  # detached: the agent serves them no more
                assert "NOT_FOUND" in rpc_error(ac.get_pool_status, v.PoolRef(pool_uuid=p["UUID"])).details()
        assert not secret_file.exists()  # the pool gone, so is its secret


def test_zones_place_pools_on_the_hosts_of_their_zone(short_tmp, make_agent):
    """An agent configured into a cluster and zone ([controller] cluster_uuid,
    zone_uuid, zone_name) serves pools of that zone only; GET /v1/zones
    lists what the hosts and pools name."""
    create = seed_example("002", "/v1/pool/share/create")
    cluster, zone, other = create["cluster_uuid"], create["zone_uuid"], str(uuid.uuid4())
    c = Controller(short_tmp / "ctl")
    host = str(uuid.uuid4())
    a = make_agent(
        f'[controller]\naddress = "127.0.0.1:{c.grpc_port}"\ntoken = "{AGENT_TOKEN}"\n'
        f'host_uuid = "{host}"\nheartbeat_interval = 1.0\ncluster_uuid = "{cluster}"\n'
        f'zone_uuid = "{zone.upper()}"\nzone_name = "rack-1"\n'
    )
    a.config.chmod(0o600)
    a.start()
    try:
        with c.client("op") as op:
            deadline = time.monotonic() + 20
            while not check_ok(op.get("/v1/hosts"))["total_count"]:
                assert time.monotonic() < deadline
                time.sleep(0.2)
            h = check_ok(op.get(f"/v1/hosts/{host}"))
            assert (h["ClusterUUID"], h["ZoneUUID"], h["ZoneName"]) == (cluster, zone, "rack-1")
            body = dict(create, pool_type=4, source=str(a.roots[0] / "zoned"), limit_host=False, avail_host=[])
            # another zone, or another cluster: this host is not eligible, and nothing is attached
            check_error(op.post("/v1/pool/share/create", json=dict(body, zone_uuid=other)), 502, "avail_host")
            check_error(op.post("/v1/pool/share/create", json=dict(body, cluster_uuid=other)), 502, "avail_host")
            check_error(
                op.post("/v1/pool/share/create", json=dict(body, zone_uuid=other, limit_host=True, avail_host=[host])),
                400,
                "avail_host",
            )
            assert not (a.roots[0] / "zoned").exists()
            pool = check_ok(op.post("/v1/pool/share/create", json=body))["pool"]
            assert (pool["AvailHosts"], pool["ZoneUUID"], pool["ZoneName"]) == ([host], zone, "rack-1")
            # the pool really lives on the agent: a volume made through the seed API has its file there
            vol = check_ok(
                op.post(
                    "/v1/volume/share/create",
                    json=dict(
                        seed_example("001", "/v1/volume/share/create"),
                        cluster_uuid=cluster,
                        pool_uuid=pool["UUID"],
                        tenant=TENANT_A,
                        volume_name="zoned-vol",
                        capacity=1 << 20,
                        backing_file="",
                    ),
                )
            )["volume"]
            assert vol["ZoneName"] == "rack-1"
            assert list((a.roots[0] / "zoned").rglob(vol["UUID"]))
            zones = check_ok(op.get("/v1/zones"))
            assert zones["list"] == [
                {"ClusterUUID": cluster, "UUID": zone, "Name": "rack-1", "Hosts": [host], "PoolCount": 1}
            ]
            with c.client(TENANT_A) as t:
                check_error(t.get("/v1/zones"), 403, "authorization")
    finally:
        assert a.stop() == 0
        c.stop()
    # a zone_uuid that is not a uuid is refused when the agent starts
    bad = make_agent('[controller]\naddress = "127.0.0.1:1"\nzone_uuid = "rack-1"\n')
    r = subprocess.run(
        [sys.executable, "-m", "agent.server", "-c", str(bad.config), "--show-config"], capture_output=True, text=True
    )
    assert r.returncode != 0 and "[controller] zone_uuid" in r.stderr, r.stderr


def test_seed_001_volumes_and_snapshots(cluster, short_tmp):
    """Volume create, snapshots, tree, rollback, used, delete: the seed
    examples with the uuids of what we created, checked against the data."""
    import hashlib

    from support.volumes import write

    c, a, host = cluster
    run = short_tmp / "run-test"
    run.mkdir()
    pool_body = dict(
        seed_example("002", "/v1/pool/share/create"), pool_type=4, source=str(a.roots[0] / "vols"), avail_host=[host]
    )
    with c.client("op") as op:
        pool = check_ok(op.post("/v1/pool/share/create", json=pool_body))["pool"]
        create = dict(
            seed_example("001", "/v1/volume/share/create"),
            pool_uuid=pool["UUID"],
            cluster_uuid=pool_body["cluster_uuid"],
            capacity=16 << 20,
        )
        create.pop("backing_file")  # the example adopts /xgp/my.qcow2, a file of that host
        vol = check_ok(op.post("/v1/volume/share/create", json=create))["volume"]
        assert (vol["Name"], vol["Type"], vol["Capacity"], vol["SnapCap"], vol["PoolUUID"]) == (
            "test",
            "block",
            16 << 20,
            create["snap_capacity"],
            pool["UUID"],
        )
        assert vol["NamespaceUUID"] == create["tenant"] and list(vol["AccessPath"]) == [host]
        head = vol["AccessPath"][host]
        ref = {"tenant": create["tenant"], "cluster_uuid": create["cluster_uuid"], "volume_uuid": vol["UUID"]}
        # names need not be unique (the seed identifies volumes by uuid, and its create and clone
        # examples both name "test"); a delete whose name is not the volume's is refused
        twin = check_ok(op.post("/v1/volume/share/create", json=create))["volume"]
        assert twin["Name"] == "test" and twin["UUID"] != vol["UUID"]
        dele = dict(seed_example("001", "/v1/volume/share/delete"), **dict(ref, volume_uuid=twin["UUID"]))
        check_error(op.post("/v1/volume/share/delete", json=dict(dele, volume_name="restore")), 400, "volume_name")
        assert check_ok(op.post("/v1/volume/share/get", json=dict(ref, volume_uuid=twin["UUID"])))["volume"]
        check_ok(op.post("/v1/volume/share/delete", json=dele))  # the seed's body: volume_name "test"
        assert os.path.exists(head)
        first = os.urandom(1 << 20)
        write(head, {0: first}, run)
        snap = dict(seed_example("001", "/v1/volume/share/snapshot/create"), **ref, snapshot_name="aaa")
        aaa = check_ok(op.post("/v1/volume/share/snapshot/create", json=snap))["snapshot"]
        assert (aaa["Name"], aaa["Volume"], aaa["Parent"], aaa["Children"]) == ("aaa", vol["UUID"], "", ["head"])
        write(head, {0: os.urandom(1 << 20)}, run)
        second = check_ok(op.post("/v1/volume/share/snapshot/create", json=dict(snap, snapshot_name="snap")))[
            "snapshot"
        ]
        assert second["Parent"] == "aaa"
        check_error(op.post("/v1/volume/share/snapshot/create", json=snap), 409, "snapshot_name")
        listed = check_ok(op.post("/v1/volume/share/snapshot/list", json=ref))["list"]
        assert [(x["Name"], x["Children"]) for x in listed] == [("aaa", ["snap"]), ("snap", ["head"])]
        tree = check_ok(op.post("/v1/volume/share/snapshot/tree/get", json=ref))["tree"]
        assert tree["Parents"] == {"aaa": "", "snap": "aaa", "head": "snap"} and tree["Root"] == "aaa"
        assert tree["Children"][""]["Children"] == ["aaa"]
        # rollback to aaa: the live state holds the first data again
        rb = dict(seed_example("001", "/v1/volume/share/snapshot/rollback"), **ref, snapshot_uuid=aaa["UUID"])
        check_ok(op.post("/v1/volume/share/snapshot/rollback", json=rb))
        subprocess.run(
            ["qemu-img", "dd", "-U", "-f", "qcow2", "-O", "raw", f"if={head}", f"of={run}/out.raw", "bs=1M", "count=1"],
            capture_output=True,
            check=True,
        )
        got = (run / "out.raw").read_bytes()
        assert hashlib.sha256(got).digest() == hashlib.sha256(first).digest()
        check_ok(op.post("/v1/volume/share/used/update", json=dict(ref, volume_name="test")))
        check_ok(op.post("/v1/volume/share/snap_length/update", json=dict(ref, volume_name="test")))
        got_vol = check_ok(op.post("/v1/volume/share/get", json=ref))["volume"]
        assert got_vol["Used"] >= 1 << 20 and got_vol["SnapLength"] > 0
        sd = dict(seed_example("001", "/v1/volume/share/snapshot/delete"), **ref, snapshot_uuid=second["UUID"])
        check_ok(op.post("/v1/volume/share/snapshot/delete", json=sd))
        assert [x["Name"] for x in check_ok(op.post("/v1/volume/share/snapshot/list", json=ref))["list"]] == ["aaa"]
        # another tenant sees nothing of it
        with c.client(TENANT_A) as t:
            check_error(t.post("/v1/volume/share/get", json=dict(ref, tenant=TENANT_A)), 404, "volume_uuid")
            check_error(t.post("/v1/volume/share/get", json=ref), 404, "tenant")
        dele = dict(seed_example("001", "/v1/volume/share/delete"), **ref)
        check_ok(op.post("/v1/volume/share/delete", json=dele))
        assert not os.path.exists(head)
        check_error(op.post("/v1/volume/share/get", json=ref), 404, "volume_uuid")


def test_seed_001_clones_backups_restores_as_tasks(cluster, short_tmp):
    """Clone (linked and full), backup, change, incremental backup, restore
    each, delete: long operations return a task at once; the restored and
    cloned data equals the source snapshots."""
    from agent.api.v1 import jobs_pb2

    from support.volumes import write

    c, a, host = cluster
    run = short_tmp / "run-test"
    run.mkdir()
    cluster_uuid = seed_example("002", "/v1/pool/share/create")["cluster_uuid"]
    tenant = seed_example("001", "/v1/volume/share/create")["tenant"]

    def digest(pool_uuid, volume_uuid, snapshot_uuid=""):
        with a.client() as ac:
            job = ac.run(
                f"sum-{uuid.uuid4()}",
                checksum=jobs_pb2.ChecksumSpec(
                    pool_uuid=pool_uuid, volume_uuid=volume_uuid, snapshot_uuid=snapshot_uuid
                ),
            )
            assert job.state == jobs_pb2.JOB_STATE_SUCCEEDED, job.error
            return job.checksum_result.image_digest

    with c.client("op") as op:
        pool = check_ok(
            op.post(
                "/v1/pool/share/create",
                json=dict(
                    seed_example("002", "/v1/pool/share/create"),
                    pool_type=4,
                    source=str(a.roots[0] / "p1"),
                    avail_host=[host],
                ),
            )
        )["pool"]
        pid = pool["UUID"]
        vol = check_ok(
            op.post(
                "/v1/volume/share/create",
                json=dict(
                    seed_example("001", "/v1/volume/share/create"),
                    pool_uuid=pid,
                    cluster_uuid=cluster_uuid,
                    capacity=24 << 20,
                    backing_file="",
                ),
            )
        )["volume"]
        ref = {"tenant": tenant, "cluster_uuid": cluster_uuid, "volume_uuid": vol["UUID"]}
        head = vol["AccessPath"][host]
        write(head, {0: os.urandom(3 << 20), 12 << 20: os.urandom(1 << 20)}, run)
        s1 = check_ok(op.post("/v1/volume/share/snapshot/create", json=dict(ref, snapshot_name="s1")))["snapshot"]
        want1 = digest(pid, vol["UUID"], s1["UUID"])
        # a backup point of the tenant (seed 000), a directory under the agent's roots
        bp = check_ok(
            op.post(
                "/v1/volume/internal/backuppoint/add",
                json=dict(
                    seed_example("000", "/v1/volume/internal/backuppoint/add"),
                    tenant=tenant,
                    btype="local",
                    cluster_uuid=cluster_uuid,
                    root_dir=str(a.roots[0] / "backups"),
                    sub_dir="t1",
                    env={"chunk_size": 1 << 20},
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
        started = check_ok(op.post("/v1/volume/share/backup/add", json=add))
        assert started["backup"]["Status"] == "BackupStarted" and started["backup"]["BpUUID"] == bp
        assert started["backup"]["Snapshot"] == "s1"  # the snapshot's name, as the seed shows it
        t = wait_task(op, started["task_id"])
        assert t["status"] == "success" and t["operation_type"] == "backup" and t["progress"] == 100.0, t
        assert t["result"]["mode"] == "full" and t["host_uuid"] == host
        b1 = started["backup"]["UUID"]
        # change, snapshot, incremental backup
        write(head, {1 << 20: os.urandom(4096)}, run)
        s2 = check_ok(op.post("/v1/volume/share/snapshot/create", json=dict(ref, snapshot_name="s2")))["snapshot"]
        want2 = digest(pid, vol["UUID"], s2["UUID"])
        second = check_ok(
            op.post("/v1/volume/share/backup/add", json=dict(add, snapshot_uuid=s2["UUID"], backup_name="backup2"))
        )
        t2 = wait_task(op, second["task_id"])
        assert t2["status"] == "success" and t2["result"]["mode"] == "incremental", t2
        url = seed_example("001", "/v1/volume/share/backup/list", "url").split("?", 1)[1]
        listed = check_ok(
            op.get(
                "/v1/volume/share/backup/list?"
                + url.replace(
                    "filter_volume_uuid=3e0925e0-648d-4217-bc1a-079cdbcf2e41", f"filter_volume_uuid={vol['UUID']}"
                )
                .replace("cluster_uuid=a97eb422-f42b-4b85-8556-725f152661f0", f"cluster_uuid={cluster_uuid}")
                .replace("filter_end_time=1615797008", f"filter_end_time={int(time.time()) + 60}")
            )
        )
        assert sorted((x["Status"], x["Snapshot"]) for x in listed["list"]) == [
            ("BackupSucceeded", "s1"),
            ("BackupSucceeded", "s2"),
        ]
        # restore both into new volumes: bit for bit
        for bid, want in ((b1, want1), (second["backup"]["UUID"], want2)):
            rs = check_ok(
                op.post(
                    "/v1/volume/share/backup/restore",
                    json=dict(
                        seed_example("001", "/v1/volume/share/backup/restore"),
                        backup_uuid=bid,
                        new_volume_name=f"restored-{bid[:6]}",
                        new_pool_uuid=pid,
                        new_volume_tenant=tenant,
                        cluster_uuid=cluster_uuid,
                    ),
                )
            )
            tr = wait_task(op, rs["task_id"])
            assert tr["status"] == "success", tr
            assert digest(pid, rs["volume"]["UUID"]) == want
            got = check_ok(op.post("/v1/volume/share/get", json=dict(ref, volume_uuid=rs["volume"]["UUID"])))
            assert got["volume"]["Name"] == f"restored-{bid[:6]}"
        # clones: linked and full, with progress
        for linked in (True, False):
            cl = check_ok(
                op.post(
                    "/v1/volume/share/clone",
                    json=dict(
                        seed_example("001", "/v1/volume/share/clone"),
                        cluster_uuid=cluster_uuid,
                        volume_uuid=vol["UUID"],
                        clone_dst_pool_uuid=pid,
                        clone_dst_vol_name=f"clone-{linked}",
                        clone_dst_vol_tenant=tenant,
                        snapshot_uuid=s1["UUID"],
                        is_link=linked,
                    ),
                )
            )
            new = cl["volume"]["UUID"]
            tc = wait_task(op, cl["task_id"])
            assert tc["status"] == "success", tc
            prog = check_ok(
                op.get(
                    "/v1/volume/share/clone/progress",
                    params={"cluster_uuid": cluster_uuid, "tenant": tenant, "volume_uuid": new},
                )
            )
            assert prog["clone_progress"] == 100.0
            assert digest(pid, new) == want1
        tasks = check_ok(op.get("/v1/tasks", params={"status": "success"}))
        assert tasks["total_count"] == 6 and {x["operation_type"] for x in tasks["tasks"]} == {
            "backup",
            "restore",
            "clone",
        }
        # delete the first backup: the second still restores
        check_ok(
            op.post(
                "/v1/volume/share/backup/delete",
                json=dict(
                    seed_example("001", "/v1/volume/share/backup/delete"),
                    backup_uuid=b1,
                    tenant=tenant,
                    cluster_uuid=cluster_uuid,
                ),
            )
        )
        assert [
            x["UUID"]
            for x in check_ok(op.get("/v1/volume/share/backup/list", params={"cluster_uuid": cluster_uuid}))["list"]
        ] == [second["backup"]["UUID"]]
        check_error(
            op.post("/v1/volume/internal/backuppoint/delete", json={"cluster_uuid": cluster_uuid, "uuid": bp}),
            409,
            "uuid",
        )
        # bad input: another tenant's volume, unknown snapshot
        with c.client(TENANT_A) as t:
            check_error(t.post("/v1/volume/share/backup/add", json=add), 404, "volume_uuid")
        # an unknown snapshot is refused at once, nothing queued
        nosnap = op.post("/v1/volume/share/backup/add", json=dict(add, snapshot_uuid=str(uuid.uuid4())))
        check_error(nosnap, 404, "snapshot_uuid")


@pytest.mark.parametrize("kind", ["nfs", "samba", "s3"])
def test_seed_000_backup_points_on_real_servers(cluster, short_tmp, kind, request):
    """A backup point on a real NFS, SMB or S3 server, added through the seed 000
    API; a backup to it and a restore from it through seed 001; a rename; a
    move refused while it holds backups and allowed once empty (agents take
    the new definition); delete once its backups are gone."""
    from agent.api.v1 import jobs_pb2

    from support.volumes import write

    c, a, host = cluster
    run = short_tmp / "run-test"
    run.mkdir()
    cluster_uuid = seed_example("002", "/v1/pool/share/create")["cluster_uuid"]
    tenant = seed_example("000", "/v1/volume/internal/backuppoint/add")["tenant"]
    if kind == "nfs":
        srv = request.getfixturevalue("nfs_server")
        point = dict(
            btype="nfs",
            ip="127.0.0.1",
            root_dir=str(srv.export),
            sub_dir=f"ctl-{uuid.uuid4().hex[:6]}",
            env={"port": srv.nfs_port, "mount_port": srv.mount_port, "chunk_size": 1 << 20},
        )
    elif kind == "s3":
        srv = request.getfixturevalue("rgw")
        point = dict(
            btype="s3",
            ip="127.0.0.1",
            root_dir=srv.make_bucket(),
            sub_dir=f"ctl-{uuid.uuid4().hex[:6]}",
            env={
                "endpoint": srv.endpoint,
                "username": srv.access_key,
                "secret": srv.secret_key,
                "part_size": 5 << 20,
                "chunk_size": 1 << 20,
            },
        )
    else:
        srv = request.getfixturevalue("smb_server")
        point = dict(
            btype="samba",
            ip="127.0.0.1",
            root_dir="backups",
            sub_dir=f"ctl-{uuid.uuid4().hex[:6]}",
            env={"port": srv.port, "username": srv.user, "secret": srv.password, "chunk_size": 1 << 20},
        )
    with c.client("op") as op:
        pid = check_ok(
            op.post(
                "/v1/pool/share/create",
                json=dict(
                    seed_example("002", "/v1/pool/share/create"),
                    pool_type=4,
                    source=str(a.roots[0] / "p"),
                    avail_host=[host],
                ),
            )
        )["pool"]["UUID"]
        vol = check_ok(
            op.post(
                "/v1/volume/share/create",
                json=dict(
                    seed_example("001", "/v1/volume/share/create"),
                    tenant=tenant,
                    pool_uuid=pid,
                    cluster_uuid=cluster_uuid,
                    capacity=16 << 20,
                    backing_file="",
                ),
            )
        )["volume"]
        write(vol["AccessPath"][host], {0: os.urandom(3 << 20)}, run)
        ref = {"tenant": tenant, "cluster_uuid": cluster_uuid, "volume_uuid": vol["UUID"]}
        s1 = check_ok(op.post("/v1/volume/share/snapshot/create", json=dict(ref, snapshot_name="s1")))["snapshot"]
        add = dict(
            seed_example("000", "/v1/volume/internal/backuppoint/add"),
            cluster_uuid=cluster_uuid,
            pass_word="bp-secret-pw",
            **point,
        )
        if kind == "s3":  # bad input named, nothing added
            env = point["env"]
            for bad, field in (
                (dict(root_dir="Not_A_Bucket"), "root_dir"),
                (dict(env=dict(env, endpoint="http://10.9.9.9:8080")), "env.endpoint"),
                (dict(env=dict(env, endpoint="ftp://127.0.0.1")), "env.endpoint"),
                (dict(env={k: x for k, x in env.items() if k != "secret"}), "env.username"),
                (dict(env=dict(env, part_size=1 << 20)), "env.part_size"),
                (dict(btype="nfs", root_dir="/export", env={"part_size": 5 << 20}), "env.part_size"),
            ):
                check_error(op.post("/v1/volume/internal/backuppoint/add", json=dict(add, **bad)), 400, field)
        bp = check_ok(op.post("/v1/volume/internal/backuppoint/add", json=add))["uuid"]

        def backup(name):
            started = check_ok(
                op.post(
                    "/v1/volume/share/backup/add",
                    json=dict(
                        seed_example("001", "/v1/volume/share/backup/add"),
                        cluster_uuid=cluster_uuid,
                        volume_uuid=vol["UUID"],
                        snapshot_uuid=s1["UUID"],
                        backup_point_uuid=bp,
                        backup_name=name,
                    ),
                )
            )
            t = wait_task(op, started["task_id"], 120)
            assert t["status"] == "success", t
            return started["backup"]["UUID"]

        def delete_backup(bid):
            check_ok(
                op.post(
                    "/v1/volume/share/backup/delete",
                    json={"cluster_uuid": cluster_uuid, "tenant": tenant, "backup_uuid": bid},
                )
            )

        first = backup("first")
        rs = check_ok(
            op.post(
                "/v1/volume/share/backup/restore",
                json=dict(
                    seed_example("001", "/v1/volume/share/backup/restore"),
                    backup_uuid=first,
                    new_volume_name="back",
                    new_pool_uuid=pid,
                    new_volume_tenant=tenant,
                    cluster_uuid=cluster_uuid,
                ),
            )
        )
        assert wait_task(op, rs["task_id"], 120)["status"] == "success"
        with a.client() as ac:

            def digest(v, snap=""):
                j = ac.run(
                    f"sum-{uuid.uuid4()}",
                    checksum=jobs_pb2.ChecksumSpec(pool_uuid=pid, volume_uuid=v, snapshot_uuid=snap),
                )
                return j.checksum_result.image_digest

            assert digest(rs["volume"]["UUID"]) == digest(vol["UUID"], s1["UUID"])
        listed = check_ok(
            op.get("/v1/volume/internal/backuppoint/list", params={"cluster_uuid": cluster_uuid, "tenant": tenant})
        )
        item = next(x for x in listed["list"] if x["UUID"] == bp)
        assert item["BType"] == kind and item["Ref"] == 1 and item["indentify"]["Pwd"] == "******"
        upd = dict(
            seed_example("000", "v1/volume/internal/backuppoint/update"),
            cluster_uuid=cluster_uuid,
            tenant_uuid=tenant,
            backup_point_uuid=bp,
            ip="127.0.0.1",
            root_directory=point["root_dir"],
            sub_dir=point["sub_dir"],
            backup_point_name=f"{kind}-renamed",
        )
        check_ok(op.post("/v1/volume/internal/backuppoint/update", json=upd))  # a rename: fine
        moved = dict(upd, sub_dir=point["sub_dir"] + "-moved")
        check_error(op.post("/v1/volume/internal/backuppoint/update", json=moved), 409, "backup_point_uuid")
        check_error(
            op.post("/v1/volume/internal/backuppoint/delete", json={"cluster_uuid": cluster_uuid, "uuid": bp}),
            409,
            "uuid",
        )
        delete_backup(first)
        check_ok(op.post("/v1/volume/internal/backuppoint/update", json=moved))  # empty now: it may move
        delete_backup(backup("after-move"))  # the agent took the new definition
        check_ok(op.post("/v1/volume/internal/backuppoint/delete", json={"cluster_uuid": cluster_uuid, "uuid": bp}))
    for secret in ("bp-secret-pw", getattr(srv, "password", getattr(srv, "secret_key", "bp-secret-pw"))):
        assert secret not in a.log_text() and secret not in c.log.read_text()
