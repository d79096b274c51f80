"""Fixtures that start real blockferry-agent processes."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from agent.volumes.qcow2 import Qcow2Pool

from support.agents import RBD2_POOL_UUID, RBD_POOL_UUID, REPO, AgentProcess, write_config
from support.backups import NfsBk, nfs_section, nid
from support.controller import AGENT_TOKEN, Controller, wait_registered
from support.fctree import build
from support.stores import IscsiTarget, Loop
from support.tls import _cert, _name, _write
from support.volumes import MiB


def pytest_collection_modifyitems(session, config, items):
    """The house rules (test_house.py) run first: they take seconds and
    need no server."""
    items.sort(key=lambda item: 0 if item.module.__name__.endswith("test_house") else 1)


@pytest.fixture
def short_tmp(tmp_path_factory):
    # unix socket paths must stay short
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="bf-", dir="/tmp"))
    yield d
    import shutil

    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def make_agent(short_tmp):
    """make_agent(extra_toml) -> a configured, not yet started AgentProcess."""
    started: list[AgentProcess] = []

    def make(extra: str = "", name: str = "a") -> AgentProcess:
        wd = short_tmp / name
        wd.mkdir(exist_ok=True)
        a = write_config(wd, extra)
        started.append(a)
        return a

    yield make
    for a in started:
        if a.proc and a.proc.poll() is None:
            a.proc.kill()
            a.proc.wait()
        if a.log.exists():  # shown by pytest only when the test failed
            print(f"---- agent log {a.log} (tail) ----\n{a.log_text()[-8000:]}")


@pytest.fixture
def agent(make_agent):
    a = make_agent().start()
    yield a
    assert a.stop() == 0, a.log_text()


@pytest.fixture(scope="session")
def dist(tmp_path_factory) -> Path:
    """`python -m build` of this checkout, once per run: a folder holding the
    sdist and the wheel (the packaging and Ansible tests install it)."""

    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--sdist", "-o", str(out), str(REPO)],
        check=True,
        capture_output=True,
        timeout=900,
    )
    return out


@pytest.fixture(scope="session")
def wheel_venv(dist, tmp_path_factory) -> Path:
    """A fresh venv holding only the wheel (and its dependencies, binary only),
    installed with no compiler at hand (CC=false): what a machine that has
    only the wheel runs."""
    venv = tmp_path_factory.mktemp("wheel") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    env = dict(os.environ, CC="false", CXX="false", PIP_NO_BUILD_ISOLATION="0")
    env.pop("PYTHONPATH", None)
    wheel = next(dist.glob("*.whl"))
    subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", "--only-binary=:all:", str(wheel)],
        check=True,
        env=env,
        capture_output=True,
        timeout=900,
    )
    return venv


@pytest.fixture(scope="session")
def ceph():
    """A real single-node Ceph cluster for the whole test session, with two
    RBD pools ("rbd" and "rbd2")."""
    from support.cephcluster import CephCluster

    # bluestore on a sparse file: its data survives an OSD restart (memstore's
    # does not), which the cluster-stopped test needs.
    cluster = CephCluster(objectstore="bluestore", store_bytes=12 << 30).start()
    cluster.add_pool("rbd2")
    yield cluster
    cluster.destroy()


@pytest.fixture(scope="session")
def rgw(ceph):
    """Ceph's S3 gateway on the session's cluster, with one S3 user."""
    from support.rgw import Rgw

    gw = Rgw(ceph).setup()
    yield gw
    gw.stop()


@pytest.fixture
def rbd_agent(make_agent, ceph):
    extra = ceph.pool_section(RBD_POOL_UUID) + ceph.pool_section(RBD2_POOL_UUID, "rbd2")
    a = make_agent(extra).start()
    yield a
    assert a.stop() == 0, a.log_text()


# ---- real storage servers on 127.0.0.1, one of each per test session ----


@pytest.fixture(scope="session")
def libvirtd():
    """A session-mode libvirtd run as an unprivileged user (its folders private)."""
    import shutil
    import tempfile

    from support.libvirtd import SessionLibvirtd

    base = Path(tempfile.mkdtemp(prefix="bf-lv-", dir="/tmp"))  # short: unix sockets
    d = SessionLibvirtd(base / "libvirt").start()
    yield d
    d.stop()
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def nfs_server():
    """nfs-ganesha (NFSv3) with rpcbind."""
    from support.nfsserver import NfsServer

    srv = NfsServer().start()
    yield srv
    srv.destroy()


@pytest.fixture(scope="session")
def smb_server():
    """smbd with a real Unix user."""
    from support.smbserver import SmbServer

    srv = SmbServer().start()
    yield srv
    srv.destroy()


@pytest.fixture(scope="session")
def tgt_server():
    """tgtd with sparse-file LUNs, with and without CHAP."""
    from support.iscsiserver import TgtServer

    srv = TgtServer().start()
    yield srv
    srv.destroy()


@pytest.fixture(scope="session")
def pg_server():
    """PostgreSQL 15, for the controller's optional backend."""
    from support.pgserver import PgServer

    srv = PgServer().start()
    yield srv
    srv.stop()


@pytest.fixture
def loop(short_tmp):
    made = []

    def make(size: int = 512 * MiB, name: str = "lun.img", sector_size: int = 0) -> Loop:
        lo = Loop(short_tmp / name, size, sector_size=sector_size)
        made.append(lo)
        return lo

    yield make
    for lo in made:
        lo.detach()


@pytest.fixture
def iscsi_lun(tgt_server):
    made = []

    def make(size: int = 512 * MiB, chap: bool = False, initiators: tuple[str, ...] = ()) -> IscsiTarget:
        t = IscsiTarget(tgt_server, tgt_server.add_lun(size, chap=chap, initiators=initiators))
        made.append(t)
        return t

    yield make
    for t in made:
        t.forget()


@pytest.fixture
def pool(short_tmp):
    return Qcow2Pool(nid(), str(short_tmp / "pool"), run_dir=str(short_tmp / "run"), allowed_roots=[str(short_tmp)])


@pytest.fixture
def nfs_agent(make_agent, nfs_server):
    pool = str(uuid.uuid4())  # a fresh pool directory on the shared export per test
    a = make_agent(nfs_section(nfs_server, pool)).start()
    with a.client() as c:
        yield NfsBk(a, c, nfs_server, pool)
    assert a.stop() == 0, a.log_text()


@pytest.fixture(params=["sqlite", "postgresql"])
def cluster(request, short_tmp, make_agent):
    """A controller (on SQLite, and on a real PostgreSQL) and one agent
    registered with it (FC tree in its sysfs)."""
    url = None
    if request.param == "postgresql":
        url = request.getfixturevalue("pg_server").create_database(f"bf_{uuid.uuid4().hex[:10]}")
    from support.cephcluster import free_port

    metrics_port = free_port()
    c = Controller(short_tmp / "ctl", url, extra=f'metrics_listen = "127.0.0.1:{metrics_port}"\n')
    c.metrics_port = metrics_port
    host = str(uuid.uuid4())
    sys_root, dev_root = build(short_tmp / "fc")
    a = make_agent(
        f'[controller]\naddress = "127.0.0.1:{c.grpc_port}"\ntoken = "{AGENT_TOKEN}"\n'
        f'host_uuid = "{host}"\nheartbeat_interval = 1.0\n[vms]\nreport_interval = 1.0\n'
    )
    a.config.write_text(
        a.config.read_text().replace(
            'log_level = "debug"', f'log_level = "debug"\nsys_root = "{sys_root}"\ndev_root = "{dev_root}"'
        )
    )
    a.config.chmod(0o600)
    try:
        a.start()
        with c.client("op") as op:
            wait_registered(op)
        yield c, a, host
        assert a.stop() == 0
    finally:
        c.stop()  # also when the setup failed: no controller outlives its test


@pytest.fixture
def pki(short_tmp):
    d = short_tmp / "pki"
    d.mkdir()
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("blockferry test CA", ca_key, _name("blockferry test CA"), ca_key, ca=True)
    _write(d / "ca.pem", cert=ca)
    for who in ("server", "client"):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _cert(who, ca_key, ca.subject, key, ca=False, san="localhost")
        _write(d / f"{who}.pem", cert=cert)
        _write(d / f"{who}.key", key=key)
    other_key = ec.generate_private_key(ec.SECP256R1())
    other = _cert("other CA", other_key, _name("other CA"), other_key, ca=True)
    rogue_key = ec.generate_private_key(ec.SECP256R1())
    _write(d / "rogue.pem", cert=_cert("rogue", other_key, other.subject, rogue_key, ca=False, san="localhost"))
    _write(d / "rogue.key", key=rogue_key)
    return d
