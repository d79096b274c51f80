"""Seed 000: /v1/volume/internal/backuppoint/{add,delete,update,list}; and
beyond the seed, in its style: backuppoint/verify (a backup, or the whole
repository) and backuppoint/gc, both tasks (GET /v1/tasks/{task_id})."""

from __future__ import annotations

import json
import time
import uuid as uuidlib

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, StrictBool, StrictStr
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from agent import fields
from agent.api.v1 import jobs_pb2
from agent.controller import validate as v
from agent.controller.api.auth import Caller, authenticated, context
from agent.controller.api.envelope import ok
from agent.controller.api.shapes import answers, v1
from agent.controller.dispatch import held_at, queue_backup_point_task, queue_copy
from agent.controller.health import Fleet, Health
from agent.controller.inventory import reporting_hosts
from agent.controller.models import Backup, BackupPoint, Host
from agent.errors import AlreadyExists, FailedPrecondition, HasDependents, InvalidArgument, NotFound

BTYPES = ("nfs", "samba", "iscsi", "disk", "fc", "local", "s3")
# what a backup point may need beyond seed 000's fields, passed in its "env"
# object (sealed at rest, like pass_word): ports, SMB user/password, CHAP,
# the iSCSI LUN, formatting a blank LUN, chunk size and compression; for
# s3 (ip: the gateway's host, root_dir: the bucket, sub_dir: the prefix)
# the access key as username, the secret key as secret, and endpoint,
# region and part_size
S3_KEYS = {"endpoint", "region", "part_size"}
ENV_KEYS = S3_KEYS | {
    "port",
    "mount_port",
    "username",
    "secret",
    "smb_encrypt",
    "lun",
    "format_lun",
    "chunk_size",
    "compression",
    "bandwidth_limit",  # bytes per second shared by its jobs (their next attach applies a change)
    "lock_days",  # every backup locked at least this long; with a policy: as long as it keeps them
    "lock_mode",  # agent, or (s3 with object lock) governance or compliance (docs/immutable.md)
}
MASK = "******"
MIN_PART = fields.MIN_PART


class BackupPointAddRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # the seed sends "env": {}
    cluster_uuid: StrictStr
    tenant: StrictStr
    zone_uuid: StrictStr = ""  # required by the seed's table, absent from its example
    name: StrictStr
    btype: StrictStr
    ip: StrictStr
    root_dir: StrictStr
    sub_dir: StrictStr = ""
    pass_word: StrictStr = ""


class BackupPointDeleteRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    cluster_uuid: StrictStr
    uuid: StrictStr
    tenant: StrictStr = ""
    backup_point_name: StrictStr = ""


class BackupPointUpdateRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # the seed sends "environment": {}
    cluster_uuid: StrictStr
    tenant_uuid: StrictStr
    backup_point_uuid: StrictStr
    backup_point_name: StrictStr
    ip: StrictStr
    root_directory: StrictStr
    sub_dir: StrictStr


class VerifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    cluster_uuid: StrictStr
    uuid: StrictStr
    backup_uuid: StrictStr = ""  # empty: the whole repository
    deep: StrictBool = False


class CopyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    cluster_uuid: StrictStr
    uuid: StrictStr  # the source backup point
    target_uuid: StrictStr  # the backup point the copies go to
    backup_uuid: StrictStr = ""  # empty: every backup of the source that the target has no copy of
    volume_uuid: StrictStr = ""  # ... of this volume only
    vault_id: StrictStr = ""  # ... of this vault (seed 003) only


class GcRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    cluster_uuid: StrictStr
    uuid: StrictStr


def _location(btype: str, root_dir: str, field: str) -> str:
    """nfs: the export path; samba: the share (optionally with a path below
    it); iscsi: the target IQN; s3: the bucket; disk, fc, local: an
    absolute path."""
    if btype == "s3":
        if not fields.is_bucket(root_dir):
            raise InvalidArgument(f"{field}: {root_dir!r} must be the bucket's name (3-63 of a-z 0-9 . -)", field=field)
        return root_dir
    if btype == "samba":
        if not root_dir.strip("/"):
            raise InvalidArgument(f"{field}: must name the share", field=field)
        v.rel_path(root_dir.strip("/"), field)
        return root_dir
    if btype == "iscsi":
        return v.iqn(root_dir, field)
    return v.abs_path(root_dir, field)


def check_local(s, cluster: str, zone: str, root: str, sub: str, field: str) -> None:
    """A local backup point must be a directory under the roots of a host
    of its cluster: refused now, not at its first backup."""
    hosts = [
        h
        for h in s.scalars(select(Host))
        if h.cluster_uuid in ("", cluster) and (not zone or h.zone_uuid in ("", zone))
    ]
    if not hosts:
        raise FailedPrecondition(
            f"{field}: no host of cluster {cluster} has registered yet; a local backup point "
            "is a directory of a host, checked against its roots",
            field=field,
        )
    roots = {r for h in hosts for r in json.loads(h.facts_json or "{}").get("roots", [])}
    path = root.rstrip("/") + (f"/{sub}" if sub else "")
    v.under_roots(path, sorted(roots), field, f"any host of cluster {cluster}")


def _env(env, field: str, btype: str) -> dict:
    """A backup point's env (seed 000 `env` at add, `environment` at update)."""
    if not isinstance(env, dict) or any(
        not isinstance(k, str) or not isinstance(x, (str, int, bool)) for k, x in env.items()
    ):
        raise InvalidArgument(f"{field}: must be an object of strings, numbers or booleans", field=field)
    unknown = set(env) - ENV_KEYS
    if unknown:
        raise InvalidArgument(
            f"{field}: unknown keys {sorted(unknown)} (known: {', '.join(sorted(ENV_KEYS))})", field=field
        )
    limit = env.get("bandwidth_limit", 0)
    if isinstance(limit, bool) or not isinstance(limit, int) or not 0 <= limit <= 1 << 40:
        raise InvalidArgument(
            f"{field}.bandwidth_limit: bytes per second, 0 (none) or more", field=f"{field}.bandwidth_limit"
        )
    days = env.get("lock_days", 0)
    if isinstance(days, bool) or not isinstance(days, int) or not 0 <= days <= 36500:
        raise InvalidArgument(f"{field}.lock_days: whole days, 0 (none) to 36500", field=f"{field}.lock_days")
    mode = env.get("lock_mode", "agent")
    if mode not in ("agent", "governance", "compliance"):
        raise InvalidArgument(
            f"{field}.lock_mode: must be agent, governance or compliance, not {mode!r}", field=f"{field}.lock_mode"
        )
    if mode != "agent" and btype != "s3":
        raise InvalidArgument(
            f"{field}.lock_mode: {mode} is S3 object lock; a {btype} backup point has agent only",
            field=f"{field}.lock_mode",
        )
    if btype != "s3" and S3_KEYS & set(env):
        key = sorted(S3_KEYS & set(env))[0]
        raise InvalidArgument(f"{field}.{key}: only an s3 backup point has one", field=f"{field}.{key}")
    for key in ("endpoint", "region"):
        if not isinstance(env.get(key, ""), str):
            raise InvalidArgument(f"{field}.{key}: must be a string", field=f"{field}.{key}")
    part = env.get("part_size", MIN_PART)
    if isinstance(part, bool) or not isinstance(part, int) or not MIN_PART <= part <= 5 << 30:
        raise InvalidArgument(
            f"{field}.part_size: bytes per multipart part, 5 MiB (5242880) to 5 GiB", field=f"{field}.part_size"
        )
    return env


def check_s3(env: dict, ip: str, field: str) -> None:
    """An s3 backup point's endpoint is on its ip (the gateway's host), and
    it has the keys to sign with."""
    endpoint = env.get("endpoint", "")
    if endpoint and fields.endpoint_host(endpoint) != ip:
        raise InvalidArgument(
            f"{field}.endpoint: {endpoint!r} must be http(s)://{ip}[:port] (the backup point's ip), "
            "without path or credentials",
            field=f"{field}.endpoint",
        )
    if not env.get("username") or not env.get("secret"):
        raise InvalidArgument(
            f"{field}.username: an s3 backup point needs username (the access key) and secret (the secret key)",
            field=f"{field}.username",
        )


def to_seed(bp: BackupPoint, health: Health) -> dict:
    """Bpstate is the backup point's health from the hosts' heartbeats
    (health.py); Health says why, host by host."""
    return {
        "tenant": bp.tenant,
        "tenant_name": bp.tenant_name,
        "Name": bp.name,
        "UUID": bp.uuid,
        "BType": bp.btype,
        "NsUUID": bp.tenant,
        "Ref": bp.ref,
        "indentify": {
            "IP": bp.ip,
            "PORT": bp.port,
            "RootDir": bp.root_dir,
            "SubDir": bp.sub_dir,
            "Dest": "",
            "Env": None,
            "Pwd": MASK if bp.password_sealed else "",
        },
        "Ctime": bp.ctime,
        "Mtime": bp.mtime,
        "Bpstate": health.state,
        "Health": health.to_json(),
    }


router = APIRouter(prefix="/v1/volume/internal/backuppoint", tags=["backup points (seed 000)"])


@router.post("/add", **answers(v1.BackupPointAddedAnswer))
def add(req: BackupPointAddRequest, request: Request, caller: Caller = Depends(authenticated)):
    cluster = v.uuid(req.cluster_uuid, "cluster_uuid")
    tenant = v.uuid(req.tenant, "tenant")
    caller.check_tenant(tenant)
    zone = v.uuid(req.zone_uuid, "zone_uuid", required=False)
    name = v.name(req.name, "name")
    if req.btype not in BTYPES:
        raise InvalidArgument(f"btype: must be one of {', '.join(BTYPES)}, not {req.btype!r}", field="btype")
    ip = v.host(req.ip, "ip")
    root = _location(req.btype, req.root_dir, "root_dir")
    sub = v.rel_path(req.sub_dir, "sub_dir")
    if req.btype == "local":
        with context(request).db.session() as s:
            check_local(s, cluster, zone, root, sub, "root_dir")
    now = int(time.time())
    env = _env(getattr(req, "env", None) or {}, "env", req.btype)
    if req.btype == "s3":
        check_s3(env, ip, "env")
    secrets = context(request).secrets
    bp = BackupPoint(
        uuid=str(uuidlib.uuid4()),
        tenant=tenant,
        cluster_uuid=cluster,
        zone_uuid=zone,
        name=name,
        btype=req.btype,
        ip=ip,
        root_dir=root,
        sub_dir=sub,
        password_sealed=secrets.seal(req.pass_word),
        env_sealed=secrets.seal(json.dumps(env)) if env else "",
        ctime=now,
        mtime=now,
        last_gc_at=now,
    )
    try:
        with context(request).db.session() as s:
            s.add(bp)
    except IntegrityError:
        raise AlreadyExists(f"name: tenant {tenant} has a backup point named {name!r} already", field="name") from None
    return ok({"uuid": bp.uuid, "name": bp.name})


@router.post("/delete", **answers(v1.EmptyAnswer))
def delete(req: BackupPointDeleteRequest, request: Request, caller: Caller = Depends(authenticated)):
    v.uuid(req.cluster_uuid, "cluster_uuid")
    bid = v.uuid(req.uuid, "uuid")
    if req.tenant:
        caller.check_tenant(v.uuid(req.tenant, "tenant"))
    with context(request).db.session() as s:
        bp = s.get(BackupPoint, bid)
        if bp is None or not caller.sees(bp.tenant) or bp.cluster_uuid != req.cluster_uuid.lower():
            raise NotFound(f"uuid: backup point {bid} does not exist", field="uuid")
        if bp.ref:
            raise HasDependents(
                f"uuid: backup point {bp.name!r} still holds {bp.ref} backup(s); delete them first", field="uuid"
            )
        s.delete(bp)
    return ok({})


@router.post("/update", **answers(v1.EmptyAnswer))
def update(req: BackupPointUpdateRequest, request: Request, caller: Caller = Depends(authenticated)):
    v.uuid(req.cluster_uuid, "cluster_uuid")
    tenant = v.uuid(req.tenant_uuid, "tenant_uuid")
    caller.check_tenant(tenant, "tenant_uuid")
    bid = v.uuid(req.backup_point_uuid, "backup_point_uuid")
    name = v.name(req.backup_point_name, "backup_point_name")
    ip = v.host(req.ip, "ip")
    sub = v.rel_path(req.sub_dir, "sub_dir")
    try:
        with context(request).db.session() as s:
            bp = s.get(BackupPoint, bid)
            if bp is None or bp.tenant != tenant or bp.cluster_uuid != req.cluster_uuid.lower():
                raise NotFound(f"backup_point_uuid: backup point {bid} does not exist", field="backup_point_uuid")
            root = _location(bp.btype, req.root_directory, "root_directory")
            if bp.btype == "local":
                check_local(s, bp.cluster_uuid, bp.zone_uuid, root, sub, "root_directory")
            if bp.ref and (ip, root, sub) != (bp.ip, bp.root_dir, bp.sub_dir):
                raise HasDependents(
                    f"backup_point_uuid: backup point {bp.name!r} holds {bp.ref} backup(s); "
                    "it can be renamed, but moved only when empty",
                    field="backup_point_uuid",
                )
            bp.name, bp.ip, bp.root_dir, bp.sub_dir, bp.mtime = name, ip, root, sub, int(time.time())
            changes = _env(getattr(req, "environment", None) or {}, "environment", bp.btype)
            secrets = context(request).secrets
            env = {**(json.loads(secrets.open(bp.env_sealed)) if bp.env_sealed else {}), **changes}
            if bp.btype == "s3":
                check_s3(env, ip, "environment")  # same host; a new port or scheme is fine
            if changes:  # merged over what it has: a new bandwidth limit, a new CHAP secret, ...
                bp.env_sealed = secrets.seal(json.dumps(env))
    except IntegrityError:
        raise AlreadyExists(
            f"backup_point_name: tenant {tenant} has a backup point named {name!r} already", field="backup_point_name"
        ) from None
    return ok({})


def served(s, req, caller: Caller) -> BackupPoint:
    """The caller's backup point, and a host that reaches it (one whose
    heartbeat reports it: its first backup attached it there)."""
    v.uuid(req.cluster_uuid, "cluster_uuid")
    bid = v.uuid(req.uuid, "uuid")
    bp = s.get(BackupPoint, bid)
    if bp is None or not caller.sees(bp.tenant) or bp.cluster_uuid != req.cluster_uuid.lower():
        raise NotFound(f"uuid: backup point {bid} does not exist", field="uuid")
    if not reporting_hosts(s.scalars(select(Host)).all(), bid):
        raise FailedPrecondition(
            f"uuid: no host serves backup point {bp.name!r} yet (a backup attaches it to its host)", field="uuid"
        )
    return bp


@router.post("/verify", **answers(v1.TaskStartedAnswer))
def verify(req: VerifyRequest, request: Request, caller: Caller = Depends(authenticated)):
    """A task that verifies one backup (backup_uuid) or the whole
    repository: every pack, index and manifest; deep also recomputes
    image digests. A failed task's result lists every damaged item."""
    state = context(request)
    with state.db.session() as s:
        bp = served(s, req, caller)
        backup = v.uuid(req.backup_uuid, "backup_uuid", required=False)
        if backup:
            b = s.get(Backup, backup)
            if b is None or b.backup_point_uuid != bp.uuid or b.status != "BackupSucceeded":
                raise NotFound(f"backup_uuid: no backup {backup} on backup point {bp.name!r}", field="backup_uuid")
        spec = jobs_pb2.VerifySpec(backup_point_uuid=bp.uuid, backup_uuid=backup, deep=req.deep, repository=not backup)
        task_id = queue_backup_point_task(
            s,
            operation="verify",
            tenant=bp.tenant,
            bp_uuid=bp.uuid,
            spec=spec,
            resource_uuid=backup,
            resource_type="backup" if backup else "backup_point",
        )
    state.dispatcher.wake()
    return ok({"task_id": task_id})


@router.post("/copy", **answers(v1.CopiesQueuedAnswer))
def copy(req: CopyRequest, request: Request, caller: Caller = Depends(authenticated)):
    """Copy tasks, one per backup the target lacks (one backup, or all of
    the source's, of a volume or of a vault): each copy becomes a
    backup of its own on the target backup point (its own uuid, copy_of
    the source's), restored, listed, locked and deleted like any other.
    Only the chunks the target lacks travel (docs/backups.md)."""
    state = context(request)
    with state.db.session() as s:
        bp = served(s, req, caller)
        target_id = v.uuid(req.target_uuid, "target_uuid")
        target = s.get(BackupPoint, target_id)
        if target is None or not caller.sees(target.tenant) or target.cluster_uuid != bp.cluster_uuid:
            raise NotFound(f"target_uuid: backup point {target_id} does not exist", field="target_uuid")
        if target.uuid == bp.uuid:
            raise InvalidArgument("target_uuid: must differ from uuid", field="target_uuid")
        ours = select(Backup).where(Backup.backup_point_uuid == bp.uuid, Backup.status == "BackupSucceeded")
        backup = v.uuid(req.backup_uuid, "backup_uuid", required=False)
        if backup:
            sources = list(s.scalars(ours.where(Backup.uuid == backup)))
            if not sources:
                raise NotFound(f"backup_uuid: no backup {backup} on backup point {bp.name!r}", field="backup_uuid")
        else:
            volume = v.uuid(req.volume_uuid, "volume_uuid", required=False)
            vault = v.uuid(req.vault_id, "vault_id", required=False)
            if volume:
                ours = ours.where(Backup.volume_uuid == volume)
            if vault:
                ours = ours.where(Backup.vault_id == vault)
            sources = list(s.scalars(ours.order_by(Backup.ctime)))
        held = held_at(s, target.uuid)
        queued = [
            queue_copy(s, src, target.uuid)
            for src in sources
            if src.uuid not in held and not (src.copy_of and src.copy_of in held)
        ]
    state.dispatcher.wake()
    return ok({"total_count": len(queued), "list": queued})


@router.post("/gc", **answers(v1.TaskStartedAnswer))
def gc(req: GcRequest, request: Request, caller: Caller = Depends(authenticated)):
    """A task that reclaims the space of deleted and failed backups
    (waiting up to 10 minutes for running backups to let go)."""
    state = context(request)
    with state.db.session() as s:
        bp = served(s, req, caller)
        task_id = queue_backup_point_task(
            s,
            operation="gc",
            tenant=bp.tenant,
            bp_uuid=bp.uuid,
            spec=jobs_pb2.GcSpec(backup_point_uuid=bp.uuid, wait_seconds=600),
        )
    state.dispatcher.wake()
    return ok({"task_id": task_id})


@router.get("/list", **answers(v1.BackupPointListAnswer))
def list_(
    request: Request,
    cluster_uuid: str = Query(...),
    tenant: str = Query(""),
    page_num: int = Query(0),
    page_size: int = Query(0),
    filter_name: str = Query(""),
    caller: Caller = Depends(authenticated),
):
    cluster = v.uuid(cluster_uuid, "cluster_uuid")
    q = select(BackupPoint).where(BackupPoint.cluster_uuid == cluster)
    if tenant:
        tenant = v.uuid(tenant, "tenant")
        caller.check_tenant(tenant)
        q = q.where(BackupPoint.tenant == tenant)
    elif not caller.operator:
        q = q.where(BackupPoint.tenant == caller.tenant)
    if filter_name:
        q = q.where(BackupPoint.name.contains(filter_name, autoescape=True))
    offset, limit = v.page(page_num, page_size)
    with context(request).db.session() as s:
        total = s.scalar(select(func.count()).select_from(q.subquery()))
        q = q.order_by(BackupPoint.ctime, BackupPoint.name).offset(offset)
        if limit:
            q = q.limit(limit)
        rows = s.scalars(q).all()
        fleet = Fleet(s, context(request).cfg.host_dead_after)
    return ok({"total_count": total, "list": [to_seed(bp, fleet.backup_point(bp.uuid)) for bp in rows]})
