"""The `blockferry` parser and main, and the commands of the host, jobs,
volumes, snapshots, clones and VMs (the backup verbs: backups.py)."""

from __future__ import annotations

import argparse
import os
import sys
import uuid

from google.protobuf import json_format

from agent import __version__
from agent.api.v1 import host_pb2, jobs_pb2
from agent.api.v1 import volumes_pb2 as v
from agent.cli import backups, refs
from agent.client import AgentClient, Target, state_name
from agent.errors import BlockferryError, TargetUnreachable, exit_status
from agent.progress import as_json, exit_code, follow, human, job_line


def cmd_checksum(client: AgentClient, args) -> int:
    """The image digest of a file or block device (an absolute path), or of
    a volume or snapshot (POOL:VOLUME[@SNAPSHOT], by name or uuid): the
    guest's content, equal to a backup's image digest."""
    job_id = args.job_id or f"checksum-{uuid.uuid4()}"
    if args.path.startswith("/"):
        job = client.submit_checksum(job_id, args.path, args.offset, args.length)
    else:
        pool, vol_ref, snap_ref = refs.split_ref(args.path, "path")
        vol = refs.volume(client, pool, vol_ref)
        snap = refs.snapshot(client, pool, vol.uuid, snap_ref).uuid if snap_ref else ""
        job = client.submit(
            job_id, checksum=jobs_pb2.ChecksumSpec(pool_uuid=pool, volume_uuid=vol.uuid, snapshot_uuid=snap)
        )
    if not args.wait:
        print(as_json(job) if args.json else job.id)
        return 0
    job = follow(client, job.id, args.json)
    if not args.json:
        if job.state == jobs_pb2.JOB_STATE_SUCCEEDED:
            r = job.checksum_result
            print(f"{r.image_digest}  {job.checksum.path or args.path}")
            print(
                f"format={r.format} length={r.length} data_bytes={r.data_bytes} hole_bytes={r.hole_bytes}",
                file=sys.stderr,
            )
        else:
            print(job_line(job), file=sys.stderr)
    return exit_code(job)


STATE_ARG = {state_name(s): s for s in jobs_pb2.JobState.values() if s}


def cmd_jobs(client: AgentClient, args) -> int:
    if args.jobs_cmd == "list":
        jobs = client.list([STATE_ARG[s] for s in args.state or []], args.kind or "", args.limit)
        for job in jobs:
            print(as_json(job) if args.json else job_line(job))
        return 0
    if args.jobs_cmd == "show":
        job = client.get(args.job_id)
        print(as_json(job) if args.json else job_line(job))
        return 0
    if args.jobs_cmd == "watch":
        return exit_code(follow(client, args.job_id, args.json))
    if args.jobs_cmd == "cancel":
        job = client.cancel(args.job_id)
        print(as_json(job) if args.json else job_line(job))
        return 0
    raise AssertionError(args.jobs_cmd)


def _print_msg(msg, args) -> None:
    print(as_json(msg) if args.json else json_format.MessageToJson(msg, preserving_proto_field_name=True, indent=2))


def cmd_volume(client: AgentClient, args) -> int:
    """Volumes by name or uuid."""
    ref = dict(pool_uuid=args.pool)
    if getattr(args, "volume", None):
        args.volume = refs.volume(client, args.pool, args.volume).uuid
    if args.volume_cmd == "create":
        msg = client.create_volume(
            v.CreateVolumeRequest(
                **ref,
                volume_uuid=args.uuid or str(uuid.uuid4()),
                name=args.name,
                capacity=args.capacity,
                backing_file=args.backing_file or "",
            )
        )
    elif args.volume_cmd == "list":
        msg = client.list_volumes(v.ListVolumesRequest(**ref))
    elif args.volume_cmd == "show":
        msg = client.get_volume(v.VolumeRef(**ref, volume_uuid=args.volume))
    elif args.volume_cmd == "delete":
        msg = client.delete_volume(v.DeleteVolumeRequest(**ref, volume_uuid=args.volume, force=args.force))
    elif args.volume_cmd == "resize":
        msg = client.resize_volume(v.ResizeVolumeRequest(**ref, volume_uuid=args.volume, capacity=args.capacity))
    elif args.volume_cmd == "extents":
        if args.since is not None or args.changed:
            msg = client.get_changed_extents(
                v.GetChangedExtentsRequest(
                    **ref,
                    volume_uuid=args.volume,
                    snapshot_uuid=args.snapshot or "",
                    since_snapshot_uuid=args.since or "",
                )
            )
        else:
            msg = client.get_extents(
                v.GetExtentsRequest(**ref, volume_uuid=args.volume, snapshot_uuid=args.snapshot or "")
            )
    else:
        raise AssertionError(args.volume_cmd)
    _print_msg(msg, args)
    return 0


def cmd_snapshot(client: AgentClient, args) -> int:
    """Volumes and snapshots by name or uuid."""
    args.volume = refs.volume(client, args.pool, args.volume).uuid
    if getattr(args, "snapshot", None):
        args.snapshot = refs.snapshot(client, args.pool, args.volume, args.snapshot).uuid
    ref = dict(pool_uuid=args.pool, volume_uuid=args.volume)
    if args.snapshot_cmd == "create":
        msg = client.create_snapshot(
            v.CreateSnapshotRequest(
                **ref, snapshot_uuid=args.uuid or str(uuid.uuid4()), name=args.name, description=args.desc
            )
        )
    elif args.snapshot_cmd == "list":
        msg = client.list_snapshots(v.VolumeRef(**ref))
    elif args.snapshot_cmd == "tree":
        msg = client.get_snapshot_tree(v.VolumeRef(**ref))
    elif args.snapshot_cmd == "delete":
        msg = client.delete_snapshot(v.SnapshotRef(**ref, snapshot_uuid=args.snapshot))
    elif args.snapshot_cmd == "rollback":
        msg = client.rollback_snapshot(v.SnapshotRef(**ref, snapshot_uuid=args.snapshot))
    else:
        raise AssertionError(args.snapshot_cmd)
    _print_msg(msg, args)
    return 0


def _pool_volumes(items: list[str]) -> list[tuple[str, str]] | None:
    """POOL:VOLUME arguments as pairs; None (said on stderr) when one is not."""
    out = []
    for i, item in enumerate(items):
        pool, sep, volume = item.partition(":")
        if not sep:
            print(f"blockferry: volumes[{i}]: {item!r} is not POOL:VOLUME", file=sys.stderr)
            return None
        out.append((pool, volume))
    return out


def cmd_snapshot_set(client: AgentClient, args) -> int:
    """One instant for several volumes (a running VM's disks), frozen when
    the VM's guest agent answers (docs/live.md)."""
    pairs = _pool_volumes(args.volumes)
    if pairs is None:
        return 2
    reqs = []
    for pool, volume in pairs:
        reqs.append(
            v.CreateSnapshotRequest(
                pool_uuid=pool,
                volume_uuid=volume,
                snapshot_uuid=str(uuid.uuid4()),
                name=args.name,
                description=args.desc,
            )
        )
    msg = client.create_snapshot_set(
        v.CreateSnapshotSetRequest(snapshots=reqs, no_freeze=args.no_freeze, freeze_timeout=args.freeze_timeout)
    )
    _print_msg(msg, args)
    return 0


def cmd_vm_backup(client: AgentClient, args) -> int:
    """The disks of a running libvirt VM backed up at one instant, live,
    through libvirt's pull backup (docs/live.md); one backup per disk."""
    pairs = _pool_volumes(args.volumes)
    if pairs is None:
        return 2
    disks = [
        jobs_pb2.VmBackupDisk(pool_uuid=pool, volume_uuid=volume, backup_uuid=str(uuid.uuid4()))
        for pool, volume in pairs
    ]
    job_id = args.job_id or f"vm-backup-{uuid.uuid4()}"
    spec = jobs_pb2.VmBackupSpec(
        backup_point_uuid=args.backup_point,
        disks=disks,
        name=args.name,
        full=args.full,
        no_freeze=args.no_freeze,
    )
    client.submit(job_id, vm_backup=spec)
    job = follow(client, job_id, args.json)
    if args.json:
        return exit_code(job)
    if job.state != jobs_pb2.JOB_STATE_SUCCEEDED:
        print(job_line(job), file=sys.stderr)
        return exit_code(job)
    r = job.vm_backup_result
    why = f" ({r.reason})" if r.reason else ""
    print(f"{r.vm}: {r.consistency}{why}, checkpoint {r.checkpoint}")
    for d, b in zip(disks, r.backups, strict=False):
        reason = f"  ({b.mode_reason})" if b.mode_reason else ""
        print(f"  {d.volume_uuid}  backup {b.backup_uuid}  {b.mode}  read {human(b.read_bytes)}{reason}")
    return exit_code(job)


def cmd_vms(client: AgentClient, args) -> int:
    msg = client.list_vms()
    if args.json:
        _print_msg(msg, args)
        return 0
    for vm in msg.vms:
        agent = "guest agent" if vm.guest_agent else "no guest agent"
        print(f"{vm.name}  {vm.uuid or '-'}  {vm.state}  {agent}")
        for d in vm.disks:
            where = f"{d.pool_uuid}:{d.volume_uuid}" if d.volume_uuid else "(no volume of this agent)"
            print(f"  {d.device}  {where}  {d.file}")
    return 0


def cmd_clone(client: AgentClient, args) -> int:
    job_id = args.job_id or f"clone-{uuid.uuid4()}"
    spec = jobs_pb2.CloneSpec(
        pool_uuid=args.pool,
        volume_uuid=args.volume,
        snapshot_uuid=args.snapshot,
        target_pool_uuid=args.target_pool or args.pool,
        target_volume_uuid=args.target_uuid or str(uuid.uuid4()),
        target_name=args.name,
        linked=args.linked,
    )
    client.submit(job_id, clone=spec)
    job = follow(client, job_id, args.json)
    if not args.json:
        print(
            job_line(job)
            if job.state != jobs_pb2.JOB_STATE_SUCCEEDED
            else f"{job.clone_result.volume_uuid}  {job.clone_result.access_path}"
        )
    return exit_code(job)


def cmd_flatten(client: AgentClient, args) -> int:
    job_id = args.job_id or f"flatten-{uuid.uuid4()}"
    client.submit(job_id, flatten=jobs_pb2.FlattenSpec(pool_uuid=args.pool, volume_uuid=args.volume))
    job = follow(client, job_id, args.json)
    if not args.json:
        print(job_line(job))
    return exit_code(job)


def cmd_verify(client: AgentClient, args) -> int:
    """Verify one backup, or (without BACKUP) the whole repository of a
    backup point; every damaged item is listed, and the exit status is 1."""
    job_id = args.job_id or f"verify-{uuid.uuid4()}"
    client.submit(
        job_id,
        verify=jobs_pb2.VerifySpec(
            backup_point_uuid=args.backup_point,
            backup_uuid=args.backup or "",
            deep=args.deep,
            repository=not args.backup,
        ),
    )
    job = follow(client, job_id, args.json)
    if args.json:
        return exit_code(job)
    r = job.verify_result
    what = f"backup {args.backup}" if args.backup else f"{r.backups_checked} backups, {r.packs_checked} packs"
    if job.state == jobs_pb2.JOB_STATE_SUCCEEDED:
        print(f"ok: {what}: {r.chunks_checked} chunks, {human(r.bytes_checked)} checked{' (deep)' if r.deep else ''}")
    else:
        print(job_line(job) if not r.damage else f"DAMAGED: {what}: {len(r.damage)} damaged item(s)", file=sys.stderr)
    for d in r.damage:
        item = f"chunk {d.chunk_id} in {d.pack or '(no pack)'}" if d.chunk_id else d.object
        at = f" at position {d.first_chunk_index}" if d.first_chunk_index >= 0 and d.chunk_id else ""
        print(f"  {item}{at}: {d.reason}" + (f"; breaks {', '.join(d.backup_uuids)}" if d.backup_uuids else ""))
    if r.orphan_packs:
        print(f"  packs without an index (the next gc removes them): {', '.join(r.orphan_packs)}")
    if r.unreferenced_chunks:
        print(
            f"  {r.unreferenced_chunks} chunks ({human(r.unreferenced_bytes)}) no backup references "
            "(the next gc reclaims them)"
        )
    return exit_code(job)


def cmd_gc(client: AgentClient, args) -> int:
    job_id = args.job_id or f"gc-{uuid.uuid4()}"
    client.submit(job_id, gc=jobs_pb2.GcSpec(backup_point_uuid=args.backup_point, wait_seconds=args.wait))
    job = follow(client, job_id, args.json)
    if not args.json:
        r = job.gc_result
        print(
            f"freed {human(r.bytes_freed)}: {r.packs_deleted} packs deleted, {r.packs_rewritten} rewritten, "
            f"{r.chunks_removed} chunks removed"
            if job.state == jobs_pb2.JOB_STATE_SUCCEEDED
            else job_line(job)
        )
    return exit_code(job)


def cmd_info(client: AgentClient, args) -> int:
    info = client.host_info()
    if args.json:
        print(as_json(info))
    else:
        limit = info.bandwidth_limit_bytes_per_second
        print(
            f"blockferry-agent {info.version} on {info.hostname}; max jobs {info.max_concurrent_jobs}; "
            f"bandwidth limit {human(limit) + '/s' if limit else 'none'}{'; DRAINING' if info.draining else ''}"
        )
        for b in info.bindings:
            print(f"  {b.module}: {'ok' if b.ok else 'MISSING: ' + b.error} ({b.debian_package})")
    return 0


def cmd_fc_devices(client: AgentClient, args) -> int:
    r = client.list_fc_devices(host_pb2.ListFcDevicesRequest(fc_only=args.fc_only))
    if args.json:
        print(as_json(r))
        return 0
    for hba in r.hbas:
        print(f"HBA {hba.host} port {hba.port_name} {hba.port_state} {hba.speed}")
    for d in r.devices:
        print(f"{d.disk_path}  {human(d.size_bytes)}  {d.transport}  {d.id}{'  IN USE' if d.in_use else ''}")
    return 0


def cmd_iscsi_discover(client: AgentClient, args) -> int:
    """SendTargets on a portal. The CHAP secret comes from
    $BLOCKFERRY_CHAP_SECRET, never from argv (which every user can read)."""
    secret = os.environ.get("BLOCKFERRY_CHAP_SECRET", "")
    if args.username and not secret:
        print("blockferry: --username needs the CHAP secret in $BLOCKFERRY_CHAP_SECRET", file=sys.stderr)
        return 2
    r = client.discover_iscsi(
        host_pb2.DiscoverIscsiRequest(ip=args.ip, port=args.port, username=args.username or "", secret=secret)
    )
    if args.json:
        print(as_json(r))
        return 0
    for t in r.targets:
        print(f"{t.iqn}  {t.portal}  {t.state}")
        for lun in t.luns:
            print(f"  lun {lun.lun}  {human(lun.size_bytes)}")
    return 0


def cmd_s3_discover(client: AgentClient, args) -> int:
    """The buckets an S3 user's keys list, as the agent's host reaches the
    gateway. The secret key comes from $BLOCKFERRY_S3_SECRET, never argv."""
    secret = os.environ.get("BLOCKFERRY_S3_SECRET", "")
    if not secret:
        print("blockferry: s3-discover needs the secret key in $BLOCKFERRY_S3_SECRET", file=sys.stderr)
        return 2
    r = client.discover_s3(
        host_pb2.DiscoverS3Request(endpoint=args.endpoint, username=args.username, secret=secret, region=args.region)
    )
    if args.json:
        print(as_json(r))
        return 0
    rows = [
        (
            b.name,
            b.error or f"object lock {b.object_lock}",
            b.versioning or "-",
            human(b.used_bytes),
            human(b.total_bytes) if b.total_bytes else "no quota",
        )
        for b in r.buckets
    ]
    print(refs.table(("bucket", "state", "versioning", "used", "quota"), rows))
    return 0


def cmd_pool(client: AgentClient, args) -> int:
    st = client.get_pool_status(v.PoolRef(pool_uuid=args.pool))
    if args.json:
        print(as_json(st))
        return 0
    why = f": {st.error}" if st.error else ""
    print(
        f"{st.pool_uuid} ({st.type}): {st.status}{why}; {human(st.available_bytes)} free of "
        f"{human(st.total_bytes)}, {human(st.used_bytes)} allocated, {st.latency_ms:.1f} ms"
    )
    if st.type == "lun":
        print(f"  metadata owner: {st.metadata_owner or '(none yet)'}")
        print(f"  live hosts: {', '.join(st.live_hosts) or '-'}")
        if st.lapsed_hosts:
            print(f"  lapsed hosts (lease not renewed, not released): {', '.join(st.lapsed_hosts)}")
    return 0 if st.status in ("healthy", "degraded") else 5


def cmd_facts(client: AgentClient, args) -> int:
    f = client.host_facts()
    if args.json:
        print(as_json(f))
        return 0
    print(
        f"{f.hostname}: blockferry {f.version} (API level {f.api_level}), {f.cpus} CPUs, "
        f"{human(f.memory_available_bytes)} of {human(f.memory_total_bytes)} memory free"
    )
    print(f"  pool types: {', '.join(f.pool_types)}; backup point types: {', '.join(f.backup_point_types)}")
    print(f"  pools: {', '.join(f.pool_uuids) or '-'}; backup points: {', '.join(f.backup_point_uuids) or '-'}")
    if f.iscsi_initiator:
        print(f"  iSCSI initiator: {f.iscsi_initiator}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="blockferry", description="blockferry agent client")
    p.add_argument("--socket", help="agent unix socket (default $BLOCKFERRY_SOCKET or /run/blockferry/agent.sock)")
    p.add_argument("--address", help="host:port of an agent's TLS listener")
    p.add_argument("--tls-ca", help="CA bundle that signed the agent's certificate")
    p.add_argument("--tls-cert", help="client certificate (mutual TLS)")
    p.add_argument("--tls-key", help="client key (mutual TLS)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--version", action="version", version=f"blockferry {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)
    backups.add_parsers(sub)

    c = sub.add_parser("checksum", help="image digest of a file, device, volume or snapshot (a job)")
    c.add_argument("path", metavar="PATH|POOL:VOLUME[@SNAPSHOT]", help="an absolute path, or a volume by name or uuid")
    c.add_argument("--offset", type=int, default=0)
    c.add_argument("--length", type=int, default=0, help="bytes; 0 means to the end")
    c.add_argument("--job-id", help="idempotency key (default: a new UUID)")
    c.add_argument("--no-wait", dest="wait", action="store_false", help="print the job id and return")

    j = sub.add_parser("jobs", help="list, show, watch or cancel jobs")
    jsub = j.add_subparsers(dest="jobs_cmd", required=True)
    jl = jsub.add_parser("list")
    jl.add_argument("--state", action="append", choices=sorted(STATE_ARG))
    jl.add_argument("--kind")
    jl.add_argument("--limit", type=int, default=0)
    for name in ("show", "watch", "cancel"):
        jsub.add_parser(name).add_argument("job_id")

    sub.add_parser("info", help="agent version, limits and bindings")
    sub.add_parser("facts", help="host facts: version, API level, pool and backup point types")
    fcd = sub.add_parser("fc-devices", help="block devices by /dev/disk/by-id name, and FC HBAs")
    fcd.add_argument("--fc-only", action="store_true", help="only FC and multipath LUNs")
    isd = sub.add_parser(
        "iscsi-discover", help="targets and LUNs on an iSCSI portal (CHAP secret: $BLOCKFERRY_CHAP_SECRET)"
    )
    isd.add_argument("ip")
    isd.add_argument("--port", type=int, default=0, help="portal port (0: 3260)")
    isd.add_argument("--username", help="CHAP user")
    s3d = sub.add_parser(
        "s3-discover", help="buckets an S3 user sees, with object lock and quota (secret key: $BLOCKFERRY_S3_SECRET)"
    )
    s3d.add_argument("endpoint", help="http(s)://host[:port]")
    s3d.add_argument("--username", required=True, help="the access key")
    s3d.add_argument("--region", default="", help="default us-east-1")

    pl = sub.add_parser("pool", help="a pool this agent serves: status (a shared LUN's metadata owner and hosts)")
    plsub = pl.add_subparsers(dest="pool_cmd", required=True)
    plsub.add_parser("status").add_argument("pool")

    vol = sub.add_parser("volume", help="volumes of a pool")
    vsub = vol.add_subparsers(dest="volume_cmd", required=True)
    vc = vsub.add_parser("create")
    vc.add_argument("pool")
    vc.add_argument("name")
    vc.add_argument("capacity", type=refs.size_arg, help="bytes or 64M, 1G, 1TiB (0 with --backing-file: its size)")
    vc.add_argument("--uuid")
    vc.add_argument("--backing-file")
    vsub.add_parser("list").add_argument("pool")
    for name in ("show", "delete", "resize", "extents"):
        x = vsub.add_parser(name)
        x.add_argument("pool")
        x.add_argument("volume")
        if name == "delete":
            x.add_argument("--force", action="store_true", help="also its snapshots; flatten its clones")
        if name == "resize":
            x.add_argument("capacity", type=refs.size_arg, help="bytes or 64M, 1G, 1TiB")
        if name == "extents":
            x.add_argument("--snapshot")
            x.add_argument("--changed", action="store_true", help="changed extents (with --since)")
            x.add_argument("--since", help="changed since this snapshot")

    sn = sub.add_parser("snapshot", help="snapshots of a volume")
    ssub = sn.add_subparsers(dest="snapshot_cmd", required=True)
    for name in ("create", "list", "tree", "delete", "rollback"):
        x = ssub.add_parser(name)
        x.add_argument("pool")
        x.add_argument("volume")
        if name == "create":
            x.add_argument("name")
            x.add_argument("--desc", default="")
            x.add_argument("--uuid")
        if name in ("delete", "rollback"):
            x.add_argument("snapshot")

    ss = sub.add_parser("snapshot-set", help="snapshot a running VM's disks at one instant (guest frozen if it can be)")
    ss.add_argument("name")
    ss.add_argument("volumes", nargs="+", metavar="POOL:VOLUME")
    ss.add_argument("--desc", default="")
    ss.add_argument("--no-freeze", action="store_true", help="do not ask the guest agent to freeze")
    ss.add_argument("--freeze-timeout", type=float, default=0.0, help="seconds per guest agent command (default 10)")

    sub.add_parser("vms", help="the running VMs of this host, disks mapped to volumes")

    vb = sub.add_parser("vm-backup", help="back up a running libvirt VM's disks live, at one instant (a job)")
    vb.add_argument("backup_point")
    vb.add_argument("volumes", nargs="+", metavar="POOL:VOLUME")
    vb.add_argument("--name", default="")
    vb.add_argument("--full", action="store_true", help="read every disk whole, even when a parent backup exists")
    vb.add_argument("--no-freeze", action="store_true", help="do not ask the guest agent to freeze")
    vb.add_argument("--job-id")

    cl = sub.add_parser("clone", help="clone a snapshot into a new volume (a job)")
    cl.add_argument("pool")
    cl.add_argument("volume")
    cl.add_argument("snapshot")
    cl.add_argument("name")
    cl.add_argument("--linked", action="store_true", help="a qcow2 overlay: instant, depends on the snapshot")
    cl.add_argument("--target-pool")
    cl.add_argument("--target-uuid")
    cl.add_argument("--job-id")

    fl = sub.add_parser("flatten", help="make a linked clone independent (a job)")
    fl.add_argument("pool")
    fl.add_argument("volume")
    fl.add_argument("--job-id")

    ve = sub.add_parser("verify", help="verify a backup, or every backup and pack of a backup point (a job)")
    ve.add_argument("backup_point")
    ve.add_argument("backup", nargs="?", help="one backup (default: the whole repository)")
    ve.add_argument("--deep", action="store_true", help="also recompute the image digests")
    ve.add_argument("--job-id")

    g = sub.add_parser("gc", help="reclaim the space of deleted and failed backups (a job)")
    g.add_argument("backup_point")
    g.add_argument(
        "--wait",
        type=int,
        default=0,
        metavar="SECONDS",
        help="wait this long for running backups to let go of the repository (default: refuse at once)",
    )
    g.add_argument("--job-id")

    co = sub.add_parser("completion", help="print the shell completion script (bash, zsh)")
    co.add_argument("shell", choices=("bash", "zsh"))

    d = sub.add_parser("demo", help="run the main job on the embedded default (starts its own agent)")
    d.add_argument("--workdir", help="where the demo keeps its pool, state and socket")
    return p


def _main(argv: list[str] | None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.cmd == "completion":
        return refs.completion(p, args.shell)
    if args.cmd == "demo":
        from agent.demo import run_demo

        return run_demo(args.workdir)
    target = Target(
        socket=args.socket,
        address=args.address,
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        token=os.environ.get("BLOCKFERRY_TOKEN"),
    )
    try:
        with AgentClient(target) as client:
            return {
                **backups.COMMANDS,
                "checksum": cmd_checksum,
                "jobs": cmd_jobs,
                "info": cmd_info,
                "pool": cmd_pool,
                "volume": cmd_volume,
                "snapshot": cmd_snapshot,
                "snapshot-set": cmd_snapshot_set,
                "vms": cmd_vms,
                "vm-backup": cmd_vm_backup,
                "clone": cmd_clone,
                "flatten": cmd_flatten,
                "facts": cmd_facts,
                "fc-devices": cmd_fc_devices,
                "iscsi-discover": cmd_iscsi_discover,
                "s3-discover": cmd_s3_discover,
                "verify": cmd_verify,
                "gc": cmd_gc,
            }[args.cmd](client, args)
    except BlockferryError as e:
        print(f"blockferry: {e.code}: {e.message}", file=sys.stderr)
        if isinstance(e, TargetUnreachable) and not args.address:
            sock = args.socket or os.environ.get("BLOCKFERRY_SOCKET") or "/run/blockferry/agent.sock"
            print(
                f"blockferry: is blockferry-agent running (systemctl status blockferry-agent)? The socket is "
                f"{sock} (--socket or $BLOCKFERRY_SOCKET to change it); members of group blockferry may use it.",
                file=sys.stderr,
            )
        return exit_status(e)
    except KeyboardInterrupt:
        return 130


def main(argv: list[str] | None = None) -> int:
    """Exit statuses by class (docs/errors.md); a closed pipe (`| head`)
    ends quietly."""
    return refs.quiet_on_closed_pipe(lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
