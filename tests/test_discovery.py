"""Remote backup points through a real agent process (config -> registry ->
store), and the discovery and health RPCs: FC devices from a sysfs tree
shaped like a real FC host's, iSCSI SendTargets, backup point status and
reconnect, host facts."""

from __future__ import annotations

import os
import uuid

import pytest

from agent.api.v1 import backups_pb2 as b
from agent.api.v1 import host_pb2 as h
from agent.api.v1 import jobs_pb2
from agent.stores.fc import list_devices, list_hbas

from support.backups import Bk
from support.fctree import WWID_A, WWID_B, build
from support.volumes import MiB

NFS_BP = "0b0b0b0b-1111-4111-8111-000000000001"
SMB_BP = "0b0b0b0b-1111-4111-8111-000000000002"
ISCSI_BP = "0b0b0b0b-1111-4111-8111-000000000003"
DISK_BP = "0b0b0b0b-1111-4111-8111-000000000004"
BADSMB_BP = "0b0b0b0b-1111-4111-8111-000000000005"


def test_fc_devices_from_a_real_fc_host_layout(tmp_path):
    sys_root, dev_root = build(tmp_path)
    hbas = list_hbas(sys_root)
    assert [(x.host, x.port_name, x.port_state) for x in hbas] == [
        ("host5", "0x21000024ff3f6c5a", "Online"),
        ("host6", "0x21000024ff3f6c5b", "Online"),
    ]
    devs = {d.disk_path.replace(dev_root, ""): d for d in list_devices(sys_root, dev_root)}
    assert set(devs) == {"/mapper/mpatha", "/sdd", "/sda"}  # sdb and sdc only as paths of the map
    mp = devs["/mapper/mpatha"]
    assert (mp.id, mp.transport, mp.hba, mp.size_bytes) == (f"wwn-0x{WWID_A}", "multipath", "host5,host6", 100 << 30)
    assert mp.paths == [f"{dev_root}/sdb", f"{dev_root}/sdc"] and mp.wwid == f"naa.{WWID_A}"
    sdd = devs["/sdd"]
    assert (sdd.id, sdd.transport, sdd.hba, sdd.vendor, sdd.in_use) == (
        f"wwn-0x{WWID_B}",
        "fc",
        "host5",
        "NETAPP",
        False,
    )
    sda = devs["/sda"]
    assert (sda.transport, sda.in_use, sda.id) == ("scsi", True, "scsi-0QEMU_QEMU_HARDDISK_drive-scsi0-0-0-0")


def test_fc_discovery_on_this_machine_has_no_hbas():
    assert list_hbas() == []  # the real default roots: no FC here, and no error
    list_devices()


@pytest.fixture
def remote_agent(make_agent, nfs_server, smb_server, tgt_server, short_tmp):
    from support.stores import Loop

    lun = tgt_server.add_lun(256 * MiB, chap=True)
    loop = Loop(short_tmp / "disk.img", 256 * MiB)
    sys_root, dev_root = build(short_tmp / "fc")
    extra = "\n".join(
        [
            nfs_server.section(NFS_BP, sub_dir=f"agent-{uuid.uuid4().hex[:6]}"),
            smb_server.section(SMB_BP, sub_dir=f"agent-{uuid.uuid4().hex[:6]}"),
            tgt_server.section(ISCSI_BP, lun),
            (
                f'[backup_points.{DISK_BP}]\ntype = "disk"\ndevice = "{loop.dev}"\n'
                "format_lun = true\nchunk_size = 1048576\n"
            ),
            smb_server.section(BADSMB_BP, sub_dir="x").replace(
                f'secret = "{smb_server.password}"', 'secret = "wrong-password-31337"'
            ),
        ]
    )
    a = make_agent(extra)
    cfg = a.config.read_text().replace(
        'log_level = "debug"', f'log_level = "debug"\nsys_root = "{sys_root}"\ndev_root = "{dev_root}"'
    )
    a.config.write_text(cfg)
    os.chmod(a.config, 0o600)  # it holds secrets
    a.start()
    yield a, lun, loop
    assert a.stop() == 0, a.log_text()
    loop.detach()


def test_every_remote_type_through_the_agent(remote_agent):
    a, lun, _ = remote_agent
    with a.client() as c:
        statuses = {s.backup_point_uuid: s for s in c.list_backup_points(b.ListBackupPointsRequest()).backup_points}
        for bp in (NFS_BP, SMB_BP, ISCSI_BP, DISK_BP):
            assert statuses[bp].status in ("healthy", "degraded"), statuses[bp]
            assert statuses[bp].total_bytes > 0 and statuses[bp].latency_ms > 0
        assert statuses[BADSMB_BP].status == "auth_failed" and statuses[BADSMB_BP].error_code == "AUTH_FAILED"
        assert "31337" not in str(statuses[BADSMB_BP])
        vol_helper = Bk(a, c)
        vol = vol_helper.create(capacity=16 * MiB, name="src").uuid
        vol_helper.write(vol, {0: os.urandom(3 * MiB), 9 * MiB: os.urandom(MiB)})
        s1 = vol_helper.snap(vol, "s1").uuid
        want = vol_helper.digest(vol, s1)
        for bp in (NFS_BP, SMB_BP, ISCSI_BP, DISK_BP):
            k = Bk(a, c, bp=bp)
            full = k.backup(vol, s1)
            restored = k.restore(full.backup_uuid)
            assert restored.image_digest == want == k.digest(restored.volume_uuid)
            assert k.verify(full.backup_uuid).state == jobs_pb2.JOB_STATE_SUCCEEDED
            assert [x.uuid for x in k.list()] == [full.backup_uuid]
            st = c.check_backup_point(b.BackupPointRef(backup_point_uuid=bp))
            assert st.repository and st.status in ("healthy", "degraded")
    log = a.log_text()
    for secret in (lun.secret, "wrong-password-31337"):
        assert secret not in log


def test_status_unreachable_then_reconnect(remote_agent, nfs_server):
    a, _, _ = remote_agent
    with a.client() as c:
        ref = b.BackupPointRef(backup_point_uuid=NFS_BP)
        assert c.check_backup_point(ref).status in ("healthy", "degraded")
        nfs_server.stop()
        try:
            st = c.check_backup_point(ref)
            assert st.status == "unreachable" and st.error_code == "TARGET_UNREACHABLE", st
            assert "nfs://127.0.0.1" in st.error
        finally:
            nfs_server.start()
        st = c.reconnect_backup_point(ref)
        assert st.status in ("healthy", "degraded"), st


def test_discovery_and_host_facts_rpcs(remote_agent, tgt_server):
    a, lun, _ = remote_agent
    with a.client() as c:
        fc = c.list_fc_devices(h.ListFcDevicesRequest(fc_only=True))
        assert sorted(d.id for d in fc.devices) == sorted([f"wwn-0x{WWID_A}", f"wwn-0x{WWID_B}"])
        assert [x.host for x in fc.hbas] == ["host5", "host6"]
        every = c.list_fc_devices(h.ListFcDevicesRequest())
        assert len(every.devices) == 3
        found = c.discover_iscsi(
            h.DiscoverIscsiRequest(ip="127.0.0.1", port=tgt_server.port, username=lun.user, secret=lun.secret)
        )
        mine = [t for t in found.targets if t.iqn == lun.iqn]
        assert mine and [(x.lun, x.size_bytes) for x in mine[0].luns] == [(1, 256 * MiB)]
        facts = c.host_facts()
        assert facts.cpus >= 1 and facts.memory_total_bytes > 0
        lo = [n for n in facts.nics if n.name == "lo"]
        assert lo and any(x.address == "127.0.0.1" and x.prefixlen == 8 for x in lo[0].addresses)
        assert set(facts.backup_point_types) == {"local", "nfs", "samba", "iscsi", "disk", "fc", "s3"}
        assert "dir" in facts.pool_types and list(facts.shared_pool_types)[:3] == ["iscsi", "nfs", "disk"]
        assert NFS_BP in facts.backup_point_uuids and facts.iscsi_initiator.startswith("iqn.")
        assert [x.host for x in facts.fc_hbas] == ["host5", "host6"]
        assert facts.disks and all(d.total_bytes > 0 for d in facts.disks)
        assert facts.api_level >= 1
    # the same through the CLI (the operator guide's commands); the CHAP
    # secret goes in the environment, never in argv
    import os
    import subprocess
    import sys

    cli = [sys.executable, "-m", "agent.cli", "--socket", str(a.socket)]
    env = dict(os.environ, BLOCKFERRY_CHAP_SECRET=lun.secret)
    out = subprocess.run(
        [*cli, "iscsi-discover", "127.0.0.1", "--port", str(tgt_server.port), "--username", lun.user],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert f"{lun.iqn}  " in out.stdout and "  lun 1  256.0 MiB" in out.stdout, out.stdout
    out = subprocess.run(
        [*cli, "iscsi-discover", "127.0.0.1", "--username", lun.user],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in env.items() if k != "BLOCKFERRY_CHAP_SECRET"},
    )
    assert out.returncode == 2 and "BLOCKFERRY_CHAP_SECRET" in out.stderr
    out = subprocess.run([*cli, "fc-devices", "--fc-only"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.count("/dev/") == 2 and f"wwn-0x{WWID_A}" in out.stdout, out.stdout
    out = subprocess.run([*cli, "facts"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "API level 1" in out.stdout and NFS_BP in out.stdout, out.stdout
    assert lun.secret not in a.log_text()
