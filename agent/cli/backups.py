"""The backup verbs of `blockferry`: backup, restore, backups (list,
show), backup-point (list, check, stats); verify and gc. Volumes and
snapshots by name or uuid, tables and human units by default, --json for
machines, a progress bar on every job (agent.progress)."""

from __future__ import annotations

import sys
import time
import uuid

from agent.api.v1 import backups_pb2, jobs_pb2
from agent.api.v1 import volumes_pb2 as v
from agent.cli import files, refs
from agent.client import AgentClient
from agent.errors import InvalidArgument
from agent.progress import as_json, exit_code, follow, job_line

OK = jobs_pb2.JOB_STATE_SUCCEEDED
FINAL = (OK, jobs_pb2.JOB_STATE_FAILED, jobs_pb2.JOB_STATE_CANCELLED)


def cmd_backup(client: AgentClient, args) -> int:
    """A backup of a snapshot; of the volume as it is now when no snapshot
    is named (a snapshot is made for it, and kept: the next incremental
    starts from it). Incremental from the volume's latest backup on the
    backup point unless --full."""
    pool, vol_ref, snap_ref = refs.split_ref(args.volume, "volume")
    vol = refs.volume(client, pool, vol_ref)
    if snap_ref:
        snap = refs.snapshot(client, pool, vol.uuid, snap_ref)
    else:
        sid = str(uuid.uuid4())
        snap = client.create_snapshot(
            v.CreateSnapshotRequest(
                pool_uuid=pool,
                volume_uuid=vol.uuid,
                snapshot_uuid=sid,
                name=f"bf-backup-{time.strftime('%Y%m%d-%H%M%S')}-{sid[:8]}",  # unique: two may come in a second
                description="made by `blockferry backup` for a backup of the volume as it was",
            )
        )
    job_id = args.job_id or f"backup-{uuid.uuid4()}"
    spec = jobs_pb2.BackupSpec(
        backup_point_uuid=args.backup_point,
        pool_uuid=pool,
        volume_uuid=vol.uuid,
        snapshot_uuid=snap.uuid,
        backup_uuid=str(uuid.uuid4()),
        name=args.name or snap.name,
        description=args.desc,
        full=args.full,
        parent_backup_uuid=args.parent or "",
        lock_until=int(time.time() + args.lock_days * 86400) if args.lock_days else 0,
    )
    client.submit(job_id, backup=spec)
    job = follow(client, job_id, args.json)
    if args.json:
        return exit_code(job)
    if job.state != OK:
        print(job_line(job), file=sys.stderr)
        return exit_code(job)
    r = job.backup_result
    why = f" ({r.mode_reason})" if r.mode_reason else ""
    print(
        refs.table(
            ("backup", "mode", "snapshot", "size", "read", "stored", "image digest"),
            [
                (
                    r.backup_uuid,
                    r.mode + why,
                    snap.name,
                    refs.human(r.size),
                    refs.human(r.read_bytes),
                    refs.human(r.stored_bytes),
                    r.image_digest,
                )
            ],
        )
    )
    return 0


def cmd_restore(client: AgentClient, args) -> int:
    """Into a new volume of any pool (its name: --name), or --in-place
    into an existing volume (a safety snapshot first; kept on failure, and
    with --keep-safety-snapshot)."""
    job_id = args.job_id or f"restore-{uuid.uuid4()}"
    if args.in_place:
        target = refs.volume(client, args.pool, args.in_place)
        spec = jobs_pb2.RestoreSpec(
            backup_point_uuid=args.backup_point,
            backup_uuid=args.backup,
            pool_uuid=args.pool,
            volume_uuid=target.uuid,
            in_place=True,
            keep_safety_snapshot=args.keep_safety_snapshot,
        )
    else:
        if not args.name:
            raise InvalidArgument("--name: the new volume's name is required (or --in-place VOLUME)", field="name")
        spec = jobs_pb2.RestoreSpec(
            backup_point_uuid=args.backup_point,
            backup_uuid=args.backup,
            pool_uuid=args.pool,
            volume_uuid=str(uuid.uuid4()),
            name=args.name,
            instant=args.instant,
            wait_for_vm=args.wait_for_vm,
        )
    client.submit(job_id, restore=spec)
    if args.instant and not args.json:
        _say_when_ready(client, job_id)
    job = follow(client, job_id, args.json)
    if args.json:
        return exit_code(job)
    if job.state != OK:
        print(job_line(job), file=sys.stderr)
        return exit_code(job)
    r = job.restore_result
    print(
        refs.table(
            ("volume", "capacity", "written", "image digest", "path"),
            [(r.volume_uuid, refs.human(r.capacity), refs.human(r.written_bytes), r.image_digest, r.access_path)],
        )
    )
    if r.safety_snapshot_uuid:
        print(f"safety snapshot kept: {r.safety_snapshot_uuid}")
    if r.instant_copy:
        print(f"copied {'by the VM (block-stream)' if r.instant_copy == 'live' else 'by qemu-img'}; export ended")
    return 0


def _say_when_ready(client: AgentClient, job_id: str) -> None:
    """An instant restore's volume is usable long before the job ends: say
    where, as soon as it is."""
    while True:
        job = client.get(job_id)
        if job.progress.phase.startswith("ready at ") or job.state in FINAL:
            break
        time.sleep(0.1)
    if job.progress.phase.startswith("ready at "):
        path = job.progress.phase.removeprefix("ready at ")
        print(f"volume ready at {path}: start the VM on it now; its data is copied in meanwhile", file=sys.stderr)


def _backup_rows(backups) -> list[tuple]:
    return [
        (
            b.uuid,
            b.name,
            refs.when(b.created_at),
            b.mode,
            refs.human(b.size),
            b.snapshot_name or b.snapshot_uuid,
            b.volume_uuid,
        )
        for b in backups
    ]


def _export_row(e) -> tuple:
    return (e.export_id, e.backup_uuid, refs.human(e.size), refs.when(e.expires_at), e.uri)


EXPORT_HEADERS = ("export", "backup", "size", "until", "uri")


def cmd_backups(client: AgentClient, args) -> int:
    if args.backups_cmd in files.COMMANDS:
        return files.COMMANDS[args.backups_cmd](client, args)
    if args.backups_cmd == "export":
        e = client.export_backup(
            backups_pb2.ExportBackupRequest(
                backup_point_uuid=args.backup_point, backup_uuid=args.backup, lease_seconds=args.lease
            )
        )
        print(as_json(e) if args.json else refs.table(EXPORT_HEADERS, [_export_row(e)]))
        return 0
    if args.backups_cmd == "unexport":
        client.unexport_backup(args.export_id)
        print(f"export {args.export_id} ended")
        return 0
    if args.backups_cmd == "exports":
        found = client.list_exports()
        print(as_json(found) if args.json else refs.table(EXPORT_HEADERS, [_export_row(e) for e in found.exports]))
        return 0
    if args.backups_cmd == "show":
        b = client.get_backup(
            backups_pb2.GetBackupRequest(backup_point_uuid=args.backup_point, backup_uuid=args.backup)
        )
        if args.json:
            print(as_json(b))
            return 0
        rows = [
            ("uuid", b.uuid),
            ("name", b.name),
            ("created", refs.when(b.created_at)),
            ("volume", f"{b.pool_uuid}:{b.volume_uuid}"),
            ("snapshot", f"{b.snapshot_name} ({b.snapshot_uuid})"),
            ("mode", b.mode + (f" ({b.mode_reason})" if b.mode_reason else "")),
            ("parent", b.parent_backup_uuid or "-"),
            ("size", f"{refs.human(b.size)} ({refs.human(b.data_bytes)} data)"),
            ("image digest", b.image_digest),
            ("consistency", b.consistency or "-"),
            ("locked until", f"{refs.when(b.locked_until)} ({b.lock_mode})" if b.locked_until else "-"),
            ("description", b.description or "-"),
            ("format", f"{b.format_version} (agent {b.agent_version}, chunks of {refs.human(b.chunk_size)})"),
        ]
        print(refs.table(("field", "value"), rows))
        return 0
    if args.backups_cmd == "delete":
        client.delete_backup(
            backups_pb2.DeleteBackupRequest(backup_point_uuid=args.backup_point, backup_uuid=args.backup)
        )
        print(f"backup {args.backup} deleted (its space comes back at the next gc)")
        return 0
    if args.backups_cmd == "lock":
        until = args.until if args.until else time.time() + args.days * 86400
        b = client.lock_backup(
            backups_pb2.LockBackupRequest(
                backup_point_uuid=args.backup_point, backup_uuid=args.backup, until=int(until)
            )
        )
        print(as_json(b) if args.json else f"backup {b.uuid} locked until {refs.when(b.locked_until)} ({b.lock_mode})")
        return 0
    req = backups_pb2.ListBackupsRequest(
        backup_point_uuid=args.backup_point,
        volume_uuid=args.volume or "",
        name=args.name or "",
        created_after=args.since or 0,
    )
    backups = sorted(client.list_backups(req).backups, key=lambda b: b.created_at)
    if args.json:
        for b in backups:
            print(as_json(b))
        return 0
    print(refs.table(("backup", "name", "created", "mode", "size", "snapshot", "volume"), _backup_rows(backups)))
    return 0


def cmd_backup_point(client: AgentClient, args) -> int:
    if args.bp_cmd == "list":
        points = client.list_backup_points(backups_pb2.ListBackupPointsRequest()).backup_points
        if args.json:
            for p in points:
                print(as_json(p))
            return 0
        rows = [
            (
                p.backup_point_uuid,
                p.type,
                p.status,
                refs.human(p.available_bytes),
                refs.human(p.total_bytes),
                p.location,
            )
            for p in points
        ]
        print(refs.table(("backup point", "type", "status", "free", "size", "location"), rows))
        return 0
    ref = backups_pb2.BackupPointRef(backup_point_uuid=args.backup_point)
    if args.bp_cmd == "check":
        st = client.check_backup_point(ref)
        if args.json:
            print(as_json(st))
        else:
            why = f": {st.error_code}: {st.error}" if st.error else ""
            print(
                f"{st.backup_point_uuid}: {st.status}{why}; {refs.human(st.available_bytes)} free of "
                f"{refs.human(st.total_bytes)}, {st.latency_ms:.1f} ms; "
                f"{'a repository' if st.repository else 'no repository yet'}"
                + (f"; object lock {st.object_lock}" if st.object_lock else "")
            )
        return 0 if st.status in ("healthy", "degraded") else 5
    stats = client.get_repository_stats(backups_pb2.RepositoryStatsRequest(backup_point_uuid=args.backup_point))
    if args.json:
        print(as_json(stats))
        return 0
    ratio = stats.logical_bytes / stats.stored_bytes if stats.stored_bytes else 0.0
    rows = [
        ("repository", stats.repository_id),
        ("format", f"{stats.format_version}{', encrypted' if stats.encrypted else ''}"),
        ("backups", stats.backups),
        ("chunks", f"{stats.chunks} of {refs.human(stats.chunk_size)}"),
        ("logical", refs.human(stats.logical_bytes)),
        ("unique", refs.human(stats.unique_bytes)),
        ("stored", f"{refs.human(stats.stored_bytes)} in {stats.packs} packs ({ratio:.2f}x)"),
        ("free", f"{refs.human(stats.available_bytes)} of {refs.human(stats.total_bytes)}"),
    ]
    print(refs.table(("field", "value"), rows))
    return 0


def add_parsers(sub) -> None:
    b = sub.add_parser("backup", help="back up a volume or one of its snapshots (a job)")
    b.add_argument("backup_point", metavar="BACKUP_POINT")
    b.add_argument("volume", metavar="POOL:VOLUME[@SNAPSHOT]", help="volume and snapshot by name or uuid")
    b.add_argument("--name", default="", help="the backup's name (default: the snapshot's)")
    b.add_argument("--desc", default="")
    b.add_argument("--full", action="store_true", help="read every chunk, even when a parent backup exists")
    b.add_argument("--parent", help="incremental from this backup (default: the volume's latest one here)")
    b.add_argument(
        "--lock-days",
        type=float,
        default=0,
        metavar="DAYS",
        help="lock the backup this long: nothing deletes it before (the backup point's lock_days may add)",
    )
    b.add_argument("--job-id")

    r = sub.add_parser("restore", help="restore a backup into a new volume, or in place (a job)")
    r.add_argument("backup_point", metavar="BACKUP_POINT")
    r.add_argument("backup", metavar="BACKUP")
    r.add_argument("pool", metavar="POOL", help="the pool of the new volume (or of --in-place's)")
    r.add_argument("--name", help="the new volume's name")
    r.add_argument("--in-place", metavar="VOLUME", help="overwrite this existing volume (name or uuid)")
    r.add_argument("--keep-safety-snapshot", action="store_true", help="with --in-place: keep it after success")
    r.add_argument(
        "--instant",
        action="store_true",
        help="the volume is usable at once (an overlay on the backup's export) while its data is copied in",
    )
    r.add_argument(
        "--wait-for-vm",
        type=int,
        default=0,
        metavar="SECONDS",
        help="with --instant: wait this long for a VM to start on it, whose qemu then copies (default 0)",
    )
    r.add_argument("--job-id")

    cp = sub.add_parser("copy", help="copy backups to another backup point, only what it lacks (a job)")
    cp.add_argument("source", metavar="SOURCE_BACKUP_POINT")
    cp.add_argument("target", metavar="TARGET_BACKUP_POINT")
    cp.add_argument("backups", metavar="BACKUP", nargs="*", help="these backups (default: every one, or --volume's)")
    cp.add_argument("--volume", help="every backup of this volume (uuid)")
    cp.add_argument("--no-verify", action="store_true", help="skip the deep verify of each copy at the target")
    cp.add_argument(
        "--from",
        dest="source_address",
        metavar="HOST:PORT",
        help="SOURCE_BACKUP_POINT is that agent's (its TLS listener; this agent's [grpc] TLS and token)",
    )
    cp.add_argument("--job-id")

    bs = sub.add_parser(
        "backups", help="the backups of a backup point: list, show, delete, lock, export, mount, files, extract"
    )
    bsub = bs.add_subparsers(dest="backups_cmd", required=True)
    bl = bsub.add_parser("list")
    bl.add_argument("backup_point", metavar="BACKUP_POINT")
    bl.add_argument("--volume", help="of this volume (uuid)")
    bl.add_argument("--name", help="this exact name")
    bl.add_argument("--since", type=float, help="created at or after (unix seconds)")
    bsh = bsub.add_parser("show")
    bsh.add_argument("backup_point", metavar="BACKUP_POINT")
    bsh.add_argument("backup", metavar="BACKUP")
    be = bsub.add_parser("export", help="serve a backup read-only over NBD (nbdinfo, nbdcopy, qemu read its URI)")
    be.add_argument("backup_point", metavar="BACKUP_POINT")
    be.add_argument("backup", metavar="BACKUP")
    be.add_argument("--lease", type=int, default=3600, metavar="SECONDS", help="it ends after this (default 1 h)")
    bd = bsub.add_parser("delete", help="delete a backup (refused while it is locked)")
    bd.add_argument("backup_point", metavar="BACKUP_POINT")
    bd.add_argument("backup", metavar="BACKUP")
    bk = bsub.add_parser("lock", help="lock a backup until a time, or extend its lock (never shortened)")
    bk.add_argument("backup_point", metavar="BACKUP_POINT")
    bk.add_argument("backup", metavar="BACKUP")
    when = bk.add_mutually_exclusive_group(required=True)
    when.add_argument("--days", type=float, help="from now")
    when.add_argument("--until", type=float, help="unix seconds")
    bsub.add_parser("unexport", help="end an export").add_argument("export_id", metavar="EXPORT")
    bsub.add_parser("exports", help="the exports this agent serves")
    files.add_parsers(bsub)

    bp = sub.add_parser("backup-point", help="backup points: list, check, stats")
    bpsub = bp.add_subparsers(dest="bp_cmd", required=True)
    bpsub.add_parser("list")
    for name in ("check", "stats"):
        bpsub.add_parser(name).add_argument("backup_point", metavar="BACKUP_POINT")


def cmd_copy(client: AgentClient, args) -> int:
    """Backups to another backup point (an off-site copy): only what it lacks."""
    job_id = args.job_id or f"copy-{uuid.uuid4()}"
    spec = jobs_pb2.CopySpec(
        source_backup_point_uuid=args.source,
        target_backup_point_uuid=args.target,
        backup_uuids=args.backups,
        volume_uuid=args.volume or "",
        verify=not args.no_verify,
        source_address=args.source_address or "",
    )
    client.submit(job_id, copy=spec)
    job = follow(client, job_id, args.json)
    if args.json:
        return exit_code(job)
    if job.state != OK:
        print(job_line(job), file=sys.stderr)
        return exit_code(job)
    r = job.copy_result
    print(
        f"copied {len(r.copied)} backup(s), {len(r.present)} there already; "
        f"{r.chunks_sent} chunks sent ({refs.human(r.bytes_sent)}), {r.chunks_present} there already; "
        f"{r.verified} verified at {args.target}"
    )
    return 0


COMMANDS = {
    "backup": cmd_backup,
    "restore": cmd_restore,
    "backups": cmd_backups,
    "backup-point": cmd_backup_point,
    "copy": cmd_copy,
}
