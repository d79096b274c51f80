"""blockferry-restore, run from a fresh venv that holds only the wheel,
against an encrypted repository an agent wrote and then stopped: list,
verify, write to a raw file and to qcow2, the data equal to what was
backed up; a wrong or missing password refused; a damaged chunk makes
the write fail and leaves no file that looks complete."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import uuid

from support.backups import Bk
from support.volumes import MiB

PASSWORD = "offline-" + uuid.uuid4().hex


def restore(
    venv, *args: str, password: str | None = PASSWORD, secret: str = "", check: bool = True
) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BLOCKFERRY_", "PYTHON"))}
    if password is not None:
        env["BLOCKFERRY_PASSWORD"] = password
    if secret:  # the SMB password, never in argv
        env["BLOCKFERRY_SECRET"] = secret
    r = subprocess.run(
        [str(venv / "bin" / "blockferry-restore"), *args],
        capture_output=True,
        text=True,
        env=env,
        stdin=subprocess.DEVNULL,
        timeout=300,
    )
    if check:
        assert r.returncode == 0, (args, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    assert PASSWORD not in r.stdout + r.stderr
    return r


def test_restore_without_agent_or_controller(make_agent, wheel_venv, short_tmp):
    bp = str(uuid.uuid4())
    where = short_tmp / "repo"
    a = make_agent(
        f'[backup_points.{bp}]\ntype = "local"\npath = "{where}"\npassword = "{PASSWORD}"\nchunk_size = 1048576\n'
    )
    a.config.chmod(0o600)
    a.start()
    data = {0: os.urandom(MiB + 4096), 5 * MiB: os.urandom(3 * MiB)}
    size = 12 * MiB
    with a.client() as c:
        bk = Bk(a, c, bp=bp)
        vol = bk.create(capacity=size, name="offline").uuid
        bk.write(vol, data)
        result = bk.backup(vol, bk.snap(vol, "s").uuid, name="before-the-fire")
    assert a.stop() == 0  # from here on, no agent
    want = bytearray(size)
    for off, chunk in data.items():
        want[off : off + len(chunk)] = chunk
    want_sha = hashlib.sha256(want).hexdigest()

    source = f"dir:{where}"
    listed = json.loads(restore(wheel_venv, source, "list", "--json").stdout)
    (b,) = listed
    assert (b["backup_id"], b["name"], b["size"]) == (result.backup_uuid, "before-the-fire", size)
    assert b["image_digest"] == result.image_digest
    assert result.backup_uuid in restore(wheel_venv, source, "list").stdout  # the table
    assert "ok" in restore(wheel_venv, source, "verify", result.backup_uuid[:8], "--deep").stdout

    raw = short_tmp / "web.raw"
    out = restore(wheel_venv, source, "write", result.backup_uuid, str(raw)).stdout
    assert "image digest" in out and "checked" in out
    assert hashlib.sha256(raw.read_bytes()).hexdigest() == want_sha
    assert os.stat(raw).st_blocks * 512 < size  # sparse: the zero chunks were not written
    qcow = short_tmp / "web.qcow2"
    restore(wheel_venv, source, "write", result.backup_uuid, str(qcow))
    back = short_tmp / "back.raw"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(qcow), str(back)], check=True)
    assert hashlib.sha256(back.read_bytes()).hexdigest() == want_sha
    r = restore(wheel_venv, source, "write", result.backup_uuid, str(raw), check=False)
    assert r.returncode == 2 and "--force" in r.stderr  # an existing file is not replaced silently

    # the password: missing (no terminal to ask on), wrong
    r = restore(wheel_venv, source, "list", password=None, check=False)
    assert r.returncode != 0 and "BLOCKFERRY_PASSWORD" in r.stderr, r.stderr
    r = restore(wheel_venv, source, "list", password="not-the-password", check=False)
    assert r.returncode != 0 and "password" in r.stderr.lower(), r.stderr

    # a damaged chunk: the write fails, and nothing that looks complete is left
    packs = [f for f in (where / "packs").rglob("*") if f.is_file() and f.suffix != ".idx"]
    pack = max(packs, key=lambda f: f.stat().st_size)
    with open(pack, "r+b") as f:
        f.seek(pack.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    broken = short_tmp / "broken.raw"
    r = restore(wheel_venv, source, "write", result.backup_uuid, str(broken), check=False)
    assert r.returncode != 0 and "DATA_CORRUPT" in r.stderr, r.stderr
    assert not broken.exists() and not list(short_tmp.glob("broken.raw*"))
    r = restore(wheel_venv, source, "verify", result.backup_uuid, check=False)
    assert r.returncode == 1 and "DAMAGED" in r.stdout


def test_restore_from_nfs_and_smb_sources(make_agent, wheel_venv, short_tmp, nfs_server, smb_server):
    """The same, from an encrypted repository on the real NFS server and one
    on the real SMB server (the SMB password from the environment)."""
    nfs_bp, smb_bp = str(uuid.uuid4()), str(uuid.uuid4())
    sub = f"offline-{uuid.uuid4().hex[:8]}"
    secret = f'password = "{PASSWORD}"\n'
    a = make_agent(
        nfs_server.section(nfs_bp, sub_dir=sub, extra=secret) + smb_server.section(smb_bp, sub_dir=sub, extra=secret)
    )
    a.config.chmod(0o600)
    a.start()
    data = {MiB: os.urandom(2 * MiB)}
    size = 4 * MiB
    with a.client() as c:
        bk = Bk(a, c, bp=nfs_bp)
        vol = bk.create(capacity=size, name="net").uuid
        bk.write(vol, data)
        snap = bk.snap(vol, "s").uuid
        on_nfs = bk.backup(vol, snap)
        on_smb = Bk(a, c, bp=smb_bp).backup(vol, snap)
    assert a.stop() == 0
    want = bytearray(size)
    want[MiB : 3 * MiB] = data[MiB]
    sources = {
        f"nfs://127.0.0.1:{nfs_server.nfs_port}{nfs_server.export}//{sub}?mount_port={nfs_server.mount_port}": on_nfs,
        f"smb://{smb_server.user}@{smb_server.ip}:{smb_server.port}/backups/{sub}": on_smb,
    }
    for source, result in sources.items():
        listed = json.loads(restore(wheel_venv, source, "list", "--json", secret=smb_server.password).stdout)
        assert [b["backup_id"] for b in listed] == [result.backup_uuid], source
        out = short_tmp / f"{result.backup_uuid}.raw"
        r = restore(wheel_venv, source, "write", result.backup_uuid, str(out), secret=smb_server.password)
        assert out.read_bytes() == bytes(want), source
        assert smb_server.password not in r.stdout + r.stderr


def test_restore_from_an_iscsi_lun(make_agent, wheel_venv, short_tmp, tgt_server):
    """The same from a CHAP-protected LUN on the real tgtd (the CHAP secret
    from the environment)."""
    lun = tgt_server.add_lun(256 * MiB, chap=True)
    bp = str(uuid.uuid4())
    a = make_agent(tgt_server.section(bp, lun, extra=f'password = "{PASSWORD}"\n'))
    a.config.chmod(0o600)
    a.start()
    data = {0: os.urandom(MiB), 3 * MiB: os.urandom(MiB)}
    with a.client() as c:
        bk = Bk(a, c, bp=bp)
        vol = bk.create(capacity=4 * MiB, name="lun").uuid
        bk.write(vol, data)
        result = bk.backup(vol, bk.snap(vol, "s").uuid)
    assert a.stop() == 0
    source = f"iscsi://{lun.user}@127.0.0.1:{tgt_server.port}/{lun.iqn}/1"
    listed = json.loads(restore(wheel_venv, source, "list", "--json", secret=lun.secret).stdout)
    assert [b["backup_id"] for b in listed] == [result.backup_uuid]
    out = short_tmp / "lun.raw"
    r = restore(wheel_venv, source, "write", result.backup_uuid, str(out), secret=lun.secret)
    want = bytearray(4 * MiB)
    for off, chunk in data.items():
        want[off : off + len(chunk)] = chunk
    assert out.read_bytes() == bytes(want) and lun.secret not in r.stdout + r.stderr
    r = restore(wheel_venv, source, "list", secret="wrong-chap-secret-1234", check=False)
    assert r.returncode != 0 and lun.secret not in r.stderr


def test_restore_from_a_block_device(make_agent, wheel_venv, short_tmp, loop):
    """The same from an encrypted repository on a local block device (a loop
    device standing in for an FC LUN), given as disk:/dev/..."""
    lo = loop(128 * MiB)
    bp = str(uuid.uuid4())
    a = make_agent(
        f'[backup_points.{bp}]\ntype = "disk"\ndevice = "{lo.dev}"\nformat_lun = true\n'
        f'chunk_size = 1048576\npassword = "{PASSWORD}"\n'
    )
    a.config.chmod(0o600)
    a.start()
    data = {MiB: os.urandom(MiB), 3 * MiB: os.urandom(4096)}
    with a.client() as c:
        bk = Bk(a, c, bp=bp)
        vol = bk.create(capacity=4 * MiB, name="disk").uuid
        bk.write(vol, data)
        result = bk.backup(vol, bk.snap(vol, "s").uuid)
    assert a.stop() == 0
    source = f"disk:{lo.dev}"
    listed = json.loads(restore(wheel_venv, source, "list", "--json").stdout)
    assert [b["backup_id"] for b in listed] == [result.backup_uuid]
    assert ": ok" in restore(wheel_venv, source, "verify", result.backup_uuid).stdout
    out = short_tmp / "disk.raw"
    restore(wheel_venv, source, "write", result.backup_uuid, str(out))
    want = bytearray(4 * MiB)
    for off, chunk in data.items():
        want[off : off + len(chunk)] = chunk
    assert out.read_bytes() == bytes(want)
    r = restore(wheel_venv, source, "list", password="not-the-password", check=False)
    assert r.returncode != 0 and "WRONG_PASSWORD" in r.stderr, r.stderr
