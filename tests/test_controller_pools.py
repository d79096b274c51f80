"""Seed 002 through the controller, with a real agent registered and real
storage: a directory pool and an RBD pool on the Ceph fixture."""
from __future__ import annotations

import json
import time
import uuid

import pytest

from agent.api.v1 import volumes_pb2 as v
from fctree import WWID_B, build
from test_controller import AGENT_TOKEN, TENANT_A, Controller, check_error, check_ok, seed_example
from test_qcow2 import rpc_error


@pytest.fixture
def cluster(short_tmp, make_agent):
    """A controller and one agent registered with it (FC tree in its sysfs)."""
    c = Controller(short_tmp / "ctl")
    host = str(uuid.uuid4())
    sys_root, dev_root = build(short_tmp / "fc")
    a = make_agent(f'[controller]\naddress = "127.0.0.1:{c.grpc_port}"\ntoken = "{AGENT_TOKEN}"\n'
                   f'host_uuid = "{host}"\nheartbeat_interval = 1.0\n')
    a.config.write_text(a.config.read_text().replace('log_level = "debug"', f'log_level = "debug"\n'
                                                     f'sys_root = "{sys_root}"\ndev_root = "{dev_root}"'))
    a.config.chmod(0o600)
    a.start()
    with c.client("op") as op:
        deadline = time.monotonic() + 20
        while not check_ok(op.get("/v1/hosts"))["total_count"]:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    yield c, a, host
    assert a.stop() == 0
    c.stop()


def test_seed_002_pools(cluster, ceph):
    c, a, host = cluster
    create = seed_example("002", "/v1/pool/share/create")
    with c.client("op") as op:
        # as written the example asks for an NFS pool (type 2): agents cannot hold volumes there yet
        check_error(op.post("/v1/pool/share/create", json=create), 400, "pool_type")
        body = dict(create, pool_type=4, source=str(a.roots[0] / "shared-disks"), avail_host=[host])
        pool = check_ok(op.post("/v1/pool/share/create", json=body))["pool"]
        assert (pool["Name"], pool["Type"], pool["Status"], pool["AvailHosts"], pool["LimitHost"]) == (
            "test--", 4, "healthy", [host], True)
        assert pool["Capacity"] > 0 and pool["Attr"] == {"overAllocationThreshold": "1.0"}
        assert set(pool) >= {"UUID", "Name", "Type", "NamespaceUUID", "ZoneUUID", "ZoneName", "MachineUUID", "IP",
                              "Port", "Source", "Username", "Password", "Ctime", "Mtime", "VolumeTotalCount",
                              "AvailHosts", "Volumes", "Capacity", "ShareNsUUIDs", "Used", "Attr", "ShareNsNames",
                              "Status", "AllocatedCapacity", "LimitHost"}
        pid = pool["UUID"]
        with a.client() as ac:  # the agent serves it now
            assert ac.volume_call("GetPoolStatus", v.PoolRef(pool_uuid=pid)).status == "healthy"
        check_error(op.post("/v1/pool/share/create", json=body), 409, "pool_name")
        listed = check_ok(op.post("/v1/pool/share/list", json=dict(seed_example("002", "/v1/pool/share/list"),
                                                                   cluster_uuid=create["cluster_uuid"])))
        assert listed["TotalCount"] == 1 and listed["infos"][0]["pool"]["UUID"] == pid
        get = dict(seed_example("002", "/v1/pool/share/get"), pool_uuid=pid, cluster_uuid=create["cluster_uuid"])
        assert check_ok(op.post("/v1/pool/share/get", json=get))["pool"]["Name"] == "test--"
        setb = dict(seed_example("002", "/v1/pool/share/set"), pool_uuid=pid, cluster_uuid=create["cluster_uuid"])
        assert check_ok(op.post("/v1/pool/share/set", json=setb))["pool"]["Name"] == "disks"
        st = dict(seed_example("002", "/v1/pool/share/status/check"), pool_uuid=pid,
                  cluster_uuid=create["cluster_uuid"])
        assert check_ok(op.post("/v1/pool/share/status/check", json=st))["pool"]["Status"] == "healthy"
        url = seed_example("002", "/v1/pool/share/pool_type/support", "url")
        assert check_ok(op.get("/v1/pool/share/pool_type/support?" + url.split("?", 1)[1]))["PoolTypes"] == [
            "disk", "rbd"]
        fc = check_ok(op.post("/v1/pool/share/fc_device/list", json=seed_example("002", "/v1/pool/share/fc_device/list")))
        assert fc["list"][f"wwn-0x{WWID_B}"] == [{"host_uuid": host, "host_name": fc["list"][f"wwn-0x{WWID_B}"][0][
            "host_name"], "disk_path": fc["list"][f"wwn-0x{WWID_B}"][0]["disk_path"]}]
        # an RBD pool on the real cluster
        rbd_body = dict(create, pool_name="ceph", pool_type=6, source="rbd", limit_host=False, avail_host=[],
                        attr={"ceph_conf": str(ceph.conf)})
        rbd_pool = check_ok(op.post("/v1/pool/share/create", json=rbd_body))["pool"]
        assert rbd_pool["Status"] == "healthy" and rbd_pool["AvailHosts"] == [host]
        # a tenant token may not manage shared pools; bad input names the field
        with c.client(TENANT_A) as t:
            check_error(t.post("/v1/pool/share/create", json=body), 403, "authorization")
        check_error(op.post("/v1/pool/share/create", json=dict(body, pool_name="x", avail_host=[str(uuid.uuid4())])),
                    404, "avail_host")
        check_error(op.post("/v1/pool/share/create", json=dict(body, pool_name="y", source="/etc")), 403)
        check_error(op.post("/v1/pool/share/create", json=dict(body, pool_name="z", pool_type="4")), 400,
                    "pool_type")
        check_error(op.post("/v1/pool/share/create", json=dict(body, pool_name="w", attr={
            "overAllocationThreshold": "lots"})), 400, "attr.overAllocationThreshold")
        # delete: the agents stop serving it
        dele = dict(seed_example("002", "/v1/pool/share/delete"), pool_uuid=pid,
                    cluster_uuid=create["cluster_uuid"])
        check_ok(op.post("/v1/pool/share/delete", json=dele))
        with a.client() as ac:
            assert rpc_error(lambda: ac.volume_call("GetPoolStatus", v.PoolRef(pool_uuid=pid))).code().name == \
                "NOT_FOUND"
        check_ok(op.post("/v1/pool/share/delete", json=dict(dele, pool_uuid=rbd_pool["UUID"])))
        assert check_ok(op.post("/v1/pool/share/list", json={"cluster_uuid": create["cluster_uuid"]}))[
            "TotalCount"] == 0
