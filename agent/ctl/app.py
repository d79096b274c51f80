"""`blockferry-ctl`: the controller's CLI over its REST API. Hosts, zones,
pools, backup points, volumes, snapshots, clones, backups and restores,
tasks, vaults, policies and checkpoints; tables with human units by
default, `--json` for machines; long operations followed with a progress
bar. Exit statuses by class, as `blockferry` (docs/errors.md)."""

from __future__ import annotations

import argparse
import os
import sys
import uuid

from agent import __version__
from agent.cli import refs
from agent.ctl import protection
from agent.ctl.context import Ctx, need, out
from agent.ctl.rest import Controller, load
from agent.errors import BlockferryError, InvalidArgument, exit_status

SNAP_CAPACITY = 1 << 40  # seed 001's snap_capacity: a quota the agents do not enforce


def cmd_hosts(c: Ctx) -> int:
    data = c.ctl.call("GET", "/v1/hosts")
    rows = [
        (
            h["UUID"],
            h["Hostname"],
            h["State"],
            h["Version"],
            f"{h['RunningJobs']}/{h['MaxJobs']}",
            refs.when(h["LastSeen"]),
        )
        for h in data["list"]
    ]
    out(c.args, rows, ("host", "name", "state", "version", "jobs", "last seen"), data)
    return 0


def cmd_zones(c: Ctx) -> int:
    data = c.ctl.call("GET", "/v1/zones")
    rows = [
        (z["ClusterUUID"], z["UUID"] or "-", z["Name"] or "-", len(z["Hosts"]), z["PoolCount"]) for z in data["list"]
    ]
    out(c.args, rows, ("cluster", "zone", "name", "hosts", "pools"), data)
    return 0


POOL_TYPES = {"nfs": 2, "dir": 4, "rbd": 6}


def _zone(c: Ctx, hosts: list[str]) -> str:
    """The seed wants a zone: the first host's, else the cluster's only
    one, else the cluster's default zone (a fixed uuid)."""
    for h in hosts[:1]:
        zone = c.ctl.call("GET", f"/v1/hosts/{h}").get("ZoneUUID")
        if zone:
            return str(zone)
    cluster = need(c.cluster, "cluster")
    known = {z["UUID"] for z in c.ctl.call("GET", "/v1/zones")["list"] if z["ClusterUUID"] == cluster and z["UUID"]}
    if len(known) == 1:
        return known.pop()
    if known:
        raise InvalidArgument(f"zone: cluster {cluster} has zones {', '.join(sorted(known))}: name one", field="zone")
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"blockferry/zone/default/{cluster}"))


def cmd_pools(c: Ctx) -> int:
    a = c.args
    if getattr(a, "pool_cmd", "list") == "create":
        body = {
            "cluster_uuid": need(c.cluster, "cluster"),
            "zone_uuid": a.zone or _zone(c, a.host or []),
            "pool_name": a.name,
            "pool_type": POOL_TYPES[a.type],
            # the seed requires an ip; directory and RBD pools do not use it
            "ip": a.ip or ("" if a.type == "nfs" else "127.0.0.1"),
            "port": "",
            "source": a.source,
            "username": "",
            "password": "",
            "limit_host": bool(a.host),
            "avail_host": a.host or [],
            "avail_tenant": [],
            "attr": {},
        }
        pool = c.ctl.call("POST", "/v1/pool/share/create", body=body)["pool"]
        out(a, [(pool["UUID"], pool["Name"], pool["Type"], pool["Status"], pool["Source"])], POOL_HEADERS, pool)
        return 0
    data = c.ctl.call("POST", "/v1/pool/share/list", body={"cluster_uuid": need(c.cluster, "cluster")})
    rows = [
        (
            p["pool"]["UUID"],
            p["pool"]["Name"],
            p["pool"]["Type"],
            p["pool"]["Health"]["state"],
            refs.human(p["pool"].get("Capacity") or 0),
            p["pool"]["Source"],
            p["pool"]["Health"]["reason"] or "-",
        )
        for p in data["infos"]
    ]
    out(c.args, rows, ("pool", "name", "type", "health", "capacity", "source", "why"), data)
    return 0


POOL_HEADERS = ("pool", "name", "type", "status", "source")


def cmd_backup_points(c: Ctx) -> int:
    a = c.args
    cmd = getattr(a, "bp_cmd", None) or "list"
    if cmd in ("verify", "gc"):
        bp = c.backup_point(a.backup_point)
        body = {"cluster_uuid": need(c.cluster, "cluster"), "uuid": bp["UUID"]}
        if cmd == "verify":
            body.update(backup_uuid=a.backup or "", deep=a.deep)
        return c.task(c.ctl.call("POST", f"/v1/volume/internal/backuppoint/{cmd}", body=body))
    if cmd == "add":
        body = {
            "cluster_uuid": need(c.cluster, "cluster"),
            "tenant": need(c.tenant, "tenant"),
            "name": a.name,
            "btype": a.type,
            # the seed requires an ip; local, disk and FC backup points do not use it
            "ip": a.ip or ("127.0.0.1" if a.type in ("local", "disk", "fc") else ""),
            "root_dir": a.location,
            "sub_dir": a.sub_dir or "",
            # the repository's encryption password: from the environment, never argv
            "pass_word": os.environ.get("BLOCKFERRY_BP_PASSWORD", ""),
            "env": {},
        }
        made = c.ctl.call("POST", "/v1/volume/internal/backuppoint/add", body=body)
        out(a, [(made["uuid"], made["name"])], ("backup point", "name"), made)
        return 0
    data = c.ctl.call(
        "GET", "/v1/volume/internal/backuppoint/list", params={"cluster_uuid": need(c.cluster, "cluster")}
    )
    rows = [
        (
            b["UUID"],
            b["Name"],
            b["BType"],
            b["Bpstate"],
            refs.human(b["Health"]["available_bytes"]) if b["Health"]["total_bytes"] else "-",
            b["indentify"]["IP"] or "-",
            b["indentify"]["RootDir"],
            b["Health"]["reason"] or "-",
        )
        for b in data["list"]
    ]
    headers = ("backup point", "name", "type", "state", "free", "address", "location", "why")
    out(c.args, rows, headers, data)
    return 0


def _vol_row(v: dict) -> tuple:
    return (v["UUID"], v["Name"], v["PoolName"] or v["PoolUUID"], refs.human(v["Capacity"]), refs.human(v["Used"]))


def cmd_volumes(c: Ctx) -> int:
    a = c.args
    headers = ("volume", "name", "pool", "capacity", "used")
    if a.vol_cmd == "list":
        pool = c.pool(a.pool)["UUID"] if a.pool else ""
        data = c.ctl.call("POST", "/v1/volume/share/list", body={**c.ref(), "filter_pool_uuid": pool})
        out(a, [_vol_row(x["volume"]) for x in data["list"]], headers, data)
        return 0
    if a.vol_cmd == "create":
        body = {
            **c.ref(),
            "pool_uuid": c.pool(a.pool)["UUID"],
            "volume_name": a.name,
            "volume_type": "block",
            "capacity": a.size,
            "snap_capacity": SNAP_CAPACITY,
        }
        vol = c.ctl.call("POST", "/v1/volume/share/create", body=body)["volume"]
        out(a, [_vol_row(vol)], headers, vol)
        return 0
    vol = c.volume(a.volume)
    if a.vol_cmd == "show":
        out(a, [_vol_row(vol)], headers, vol)
        return 0
    c.ctl.call(
        "POST",
        "/v1/volume/share/delete",
        body={**c.ref(), "volume_uuid": vol["UUID"], "volume_name": vol["Name"], "force": a.force},
    )
    print(f"deleted {vol['Name']} ({vol['UUID']})")
    return 0


def cmd_snapshots(c: Ctx) -> int:
    a = c.args
    vol = c.volume(a.volume)
    ref = {**c.ref(), "volume_uuid": vol["UUID"]}
    if a.snap_cmd == "list":
        data = c.ctl.call("POST", "/v1/volume/share/snapshot/list", body=ref)
        rows = [
            (s["UUID"], s["Name"], refs.when(s["Ctime"]), s["Parent"] or "-", refs.human(s["Size"]))
            for s in data["list"]
        ]
        out(a, rows, ("snapshot", "name", "created", "parent", "size"), data)
        return 0
    if a.snap_cmd == "create":
        s = c.ctl.call("POST", "/v1/volume/share/snapshot/create", body={**ref, "snapshot_name": a.name, "desc": ""})
        out(a, [(s["snapshot"]["UUID"], s["snapshot"]["Name"])], ("snapshot", "name"), s)
        return 0
    snap = c.snapshot(vol, a.snapshot)
    if a.snap_cmd == "rollback":
        c.ctl.call("POST", "/v1/volume/share/snapshot/rollback", body={**ref, "snapshot_uuid": snap["UUID"]})
        print(f"{vol['Name']} rolled back to {snap['Name']}")
        return 0
    body = {**ref, "snapshot_uuid": snap["UUID"], "snapshot_name": snap["Name"]}
    c.ctl.call("POST", "/v1/volume/share/snapshot/delete", body=body)
    print(f"deleted snapshot {snap['Name']} ({snap['UUID']})")
    return 0


def cmd_clone(c: Ctx) -> int:
    a = c.args
    vol = c.volume(a.volume)
    snap = c.snapshot(vol, a.snapshot)
    body = {
        "cluster_uuid": need(c.cluster, "cluster"),
        "volume_uuid": vol["UUID"],
        "volume_name": vol["Name"],
        "clone_dst_vol_name": a.name,
        "clone_dst_vol_tenant": need(c.tenant, "tenant"),
        "clone_dst_pool_uuid": c.pool(a.pool)["UUID"] if a.pool else vol["PoolUUID"],
        "is_link": a.linked,
        "snapshot_uuid": snap["UUID"],
    }
    return c.task(c.ctl.call("POST", "/v1/volume/share/clone", body=body))


def _backup_row(b: dict) -> tuple:
    return (b["UUID"], b["Name"], refs.when(b["Ctime"]), b["Status"], b.get("Mode") or "-", b["Snapshot"], b["BpName"])


def cmd_backups(c: Ctx) -> int:
    a = c.args
    if a.bk_cmd == "list":
        vol = c.volume(a.volume)["UUID"] if a.volume else ""
        params = {"cluster_uuid": need(c.cluster, "cluster"), "tenant": c.tenant, "filter_volume_uuid": vol}
        data = c.ctl.call("GET", "/v1/volume/share/backup/list", params=params)
        headers = ("backup", "name", "created", "status", "mode", "snapshot", "backup point")
        out(a, [_backup_row(b) for b in data["list"]], headers, data)
        return 0
    if a.bk_cmd == "create":
        vol = c.volume(a.volume)
        snap = c.snapshot(vol, a.snapshot)
        body = {
            "cluster_uuid": need(c.cluster, "cluster"),
            "volume_uuid": vol["UUID"],
            "snapshot_uuid": snap["UUID"],
            "backup_point_uuid": c.backup_point(a.backup_point)["UUID"],
            "backup_name": a.name or snap["Name"],
            "desc": "",
            "full": a.full,
        }
        return c.task(c.ctl.call("POST", "/v1/volume/share/backup/add", body=body))
    if a.bk_cmd == "restore":
        body = {
            "cluster_uuid": need(c.cluster, "cluster"),
            "backup_uuid": a.backup,
            "new_volume_name": a.name,
            "new_volume_tenant": need(c.tenant, "tenant"),
            "new_pool_uuid": c.pool(a.pool)["UUID"],
        }
        return c.task(c.ctl.call("POST", "/v1/volume/share/backup/restore", body=body))
    c.ctl.call("POST", "/v1/volume/share/backup/delete", body={**c.ref(), "backup_uuid": a.backup})
    print(f"deleted backup {a.backup}")
    return 0


def _task_row(t: dict) -> tuple:
    err = (t.get("error_info") or {}).get("code") or ""
    res = t.get("resource") or {}
    return (
        t["id"],
        t["operation_type"],
        t["status"],
        f"{t['progress']:.0f}%",
        refs.when(t["created_at"]),
        res.get("uuid", ""),
        err,
    )


def cmd_tasks(c: Ctx) -> int:
    a = c.args
    headers = ("task", "operation", "status", "progress", "created", "resource", "error")
    if a.task_cmd == "list":
        data = c.ctl.call("GET", "/v1/tasks", params={"status": a.status or "", "operation_type": a.operation or ""})
        out(a, [_task_row(t) for t in data["tasks"]], headers, data)
        return 0
    if a.task_cmd == "watch":
        t = c.ctl.follow(a.task_id, quiet=a.json)
        out(a, [_task_row(t)], headers, t)
        return 0 if t["status"] == "success" else 1
    t = c.ctl.call("GET", f"/v1/tasks/{a.task_id}")
    out(a, [_task_row(t)], headers, t)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="blockferry-ctl",
        description="the blockferry controller's CLI (token: $BLOCKFERRY_CTL_TOKEN or the config file)",
    )
    p.add_argument("--config", help="config file (default ~/.config/blockferry/ctl.toml, /etc/blockferry/ctl.toml)")
    p.add_argument("--url", help="the controller (default $BLOCKFERRY_URL, the config file, http://127.0.0.1:8080)")
    p.add_argument("--cluster", help="cluster uuid (default $BLOCKFERRY_CLUSTER or the config file)")
    p.add_argument("--tenant", help="tenant (project) uuid (default $BLOCKFERRY_TENANT or the config file)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--no-wait", dest="wait", action="store_false", help="print a long operation's task id and return")
    p.add_argument("--version", action="version", version=f"blockferry-ctl {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, what in (
        ("hosts", "agent hosts and their state"),
        ("zones", "clusters and zones"),
    ):
        sub.add_parser(name, help=what)

    po = sub.add_parser("pools", help="shared pools: list, create")
    pos = po.add_subparsers(dest="pool_cmd")
    pos.add_parser("list")
    pc = pos.add_parser("create", help="a directory (dir), NFS export (nfs) or RADOS pool (rbd) as a pool")
    pc.add_argument("name")
    pc.add_argument("source", help="dir: a directory of the hosts; nfs: the export path; rbd: the RADOS pool")
    pc.add_argument("--type", choices=sorted(POOL_TYPES), default="dir")
    pc.add_argument("--ip", help="nfs: the server")
    pc.add_argument("--host", action="append", help="a host that serves it (repeat; default: every host)")
    pc.add_argument("--zone", help="zone uuid")

    bp = sub.add_parser(
        "backup-points", help="backup points: list, add, verify, gc (password: $BLOCKFERRY_BP_PASSWORD)"
    )
    bps = bp.add_subparsers(dest="bp_cmd")
    bps.add_parser("list")
    bv = bps.add_parser("verify", help="one backup, or every pack, index and manifest (a task)")
    bv.add_argument("backup_point", help="name or uuid")
    bv.add_argument("--backup", help="only this backup (uuid)")
    bv.add_argument("--deep", action="store_true", help="also recompute the image digests")
    bps.add_parser("gc", help="reclaim the space of deleted and failed backups (a task)").add_argument("backup_point")
    ba = bps.add_parser("add")
    ba.add_argument("name")
    ba.add_argument("type", choices=("local", "nfs", "samba", "iscsi", "disk", "fc"))
    ba.add_argument("location", help="local, disk, fc: a path; nfs: the export; samba: the share; iscsi: the IQN")
    ba.add_argument("--ip", help="the server (nfs, samba, iscsi)")
    ba.add_argument("--sub-dir", help="a directory below the location")

    vol = sub.add_parser("volumes", help="volumes: list, show, create, delete")
    vs = vol.add_subparsers(dest="vol_cmd", required=True)
    vs.add_parser("list").add_argument("--pool", help="of this pool (name or uuid)")
    vc = vs.add_parser("create")
    vc.add_argument("pool", help="name or uuid")
    vc.add_argument("name")
    vc.add_argument("size", type=refs.size_arg, help="bytes or 64M, 1G, 1TiB")
    vs.add_parser("show").add_argument("volume", help="name or uuid")
    vd = vs.add_parser("delete")
    vd.add_argument("volume", help="name or uuid")
    vd.add_argument("--force", action="store_true", help="also its snapshots")

    sn = sub.add_parser("snapshots", help="snapshots of a volume: list, create, delete, rollback")
    ss = sn.add_subparsers(dest="snap_cmd", required=True)
    ss.add_parser("list").add_argument("volume")
    sc = ss.add_parser("create")
    sc.add_argument("volume")
    sc.add_argument("name")
    for name in ("delete", "rollback"):
        x = ss.add_parser(name)
        x.add_argument("volume")
        x.add_argument("snapshot", help="name or uuid")

    cl = sub.add_parser("clone", help="clone a snapshot into a new volume (a task)")
    cl.add_argument("volume")
    cl.add_argument("snapshot")
    cl.add_argument("name")
    cl.add_argument("--pool", help="the new volume's pool (default: the source's)")
    cl.add_argument("--linked", action="store_true")

    bk = sub.add_parser("backups", help="backups: list, create, restore, delete")
    bs = bk.add_subparsers(dest="bk_cmd", required=True)
    bs.add_parser("list").add_argument("--volume")
    bc = bs.add_parser("create")
    bc.add_argument("volume")
    bc.add_argument("snapshot")
    bc.add_argument("backup_point", help="name or uuid")
    bc.add_argument("--name", default="")
    bc.add_argument("--full", action="store_true")
    br = bs.add_parser("restore")
    br.add_argument("backup")
    br.add_argument("pool", help="the new volume's pool (name or uuid)")
    br.add_argument("name")
    bs.add_parser("delete").add_argument("backup")

    tk = sub.add_parser("tasks", help="tasks: list, show, watch")
    ts = tk.add_subparsers(dest="task_cmd", required=True)
    tl = ts.add_parser("list")
    tl.add_argument("--status")
    tl.add_argument("--operation")
    for name in ("show", "watch"):
        ts.add_parser(name).add_argument("task_id")

    protection.add_parsers(sub)
    sub.add_parser("completion", help="print the shell completion script (bash, zsh)").add_argument(
        "shell", choices=("bash", "zsh")
    )
    return p


COMMANDS = {
    "hosts": cmd_hosts,
    "zones": cmd_zones,
    "pools": cmd_pools,
    "backup-points": cmd_backup_points,
    "volumes": cmd_volumes,
    "snapshots": cmd_snapshots,
    "clone": cmd_clone,
    "backups": cmd_backups,
    "tasks": cmd_tasks,
    **protection.COMMANDS,
}


def _main(argv: list[str] | None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.cmd == "completion":
        return refs.completion(p, args.shell)
    try:
        ctl = Controller(load(args.config, args.url or "", args.cluster or "", args.tenant or ""))
        try:
            return COMMANDS[args.cmd](Ctx(ctl, args))
        finally:
            ctl.close()
    except BlockferryError as e:
        print(f"blockferry-ctl: {e.code}: {e.message}", file=sys.stderr)
        return exit_status(e)
    except KeyboardInterrupt:
        return 130


def main(argv: list[str] | None = None) -> int:
    """Exit statuses by class (docs/errors.md); a closed pipe (`| head`)
    ends quietly."""
    return refs.quiet_on_closed_pipe(lambda: _main(argv))
