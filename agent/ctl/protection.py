"""blockferry-ctl's seed 003 commands: vaults (a backup point, a size and
the volumes they protect), policies (RRULE schedules and retention) and
checkpoints (a vault backed up now)."""

from __future__ import annotations

import json

from agent.cli import refs
from agent.ctl.context import Ctx, need, out

VOLUME_TYPE = "OS::Cinder::Volume"


def _project(c: Ctx) -> str:
    return need(c.tenant, "tenant")


def _vault_row(x: dict) -> tuple:
    return (
        x["id"],
        x["name"],
        x["status"],
        x["billing"]["object_type"],
        f"{refs.human(x['capacity']['usedCapacity'])} of {x['billing']['size']} GB",
        len(x["resources"]),
        x["policy_id"] or "-",
    )


VAULT_HEADERS = ("vault", "name", "status", "type", "used", "resources", "policy")


def cmd_vaults(c: Ctx) -> int:
    a = c.args
    project = _project(c)
    if a.vault_cmd == "list":
        data = c.ctl.call("GET", f"/v3/{project}/vaults")
        out(a, [_vault_row(x) for x in data["vaults"]], VAULT_HEADERS, data)
        return 0
    if a.vault_cmd == "create":
        body = {
            "name": a.name,
            "billing": {"object_type": "disk", "protect_type": "backup", "size": a.size},
            "resources": [{"id": c.volume(v)["UUID"], "type": VOLUME_TYPE} for v in a.volume or []],
        }
        if a.backup_point:
            body["backup_point_id"] = c.backup_point(a.backup_point)["UUID"]
        if a.policy:
            body["backup_policy_id"] = c.policy(a.policy)["id"]
        data = c.ctl.call("POST", f"/v3/{project}/vaults", body={"vault": body})
        out(a, [_vault_row(data["vault"])], VAULT_HEADERS, data)
        return 0
    vault = c.vault(a.vault)
    path = f"/v3/{project}/vaults/{vault['id']}"
    if a.vault_cmd == "show":
        rows = [
            (r["id"], r["name"], r["type"], r["backup_count"], refs.human(r["backup_size"])) for r in vault["resources"]
        ]
        if a.json:
            print(json.dumps({"vault": vault}, sort_keys=True))
        else:
            print(refs.table(VAULT_HEADERS, [_vault_row(vault)]))
            print(refs.table(("resource", "name", "type", "backups", "stored"), rows))
        return 0
    if a.vault_cmd == "delete":
        c.ctl.call("DELETE", path, params={"mode": "Enforcing" if a.with_backups else "Permissive"})
        gone = " and its backups" if a.with_backups else ""
        print(f"deleted vault {vault['name']} ({vault['id']}){gone}")
        return 0
    if a.vault_cmd in ("add", "remove"):
        ids = [c.volume(v)["UUID"] for v in a.volume]
        if a.vault_cmd == "add":
            body: dict = {"resources": [{"id": i, "type": VOLUME_TYPE} for i in ids]}
            done = c.ctl.call("POST", f"{path}/addresources", body=body)["add_resource_ids"]
        else:
            done = c.ctl.call("POST", f"{path}/removeresources", body={"resource_ids": ids})["remove_resource_ids"]
        verb = "added to" if a.vault_cmd == "add" else "removed from"
        print(json.dumps(done) if a.json else f"{len(done)} volume(s) {verb} vault {vault['name']}")
        return 0
    policy = c.policy(a.policy)
    action = "associatepolicy" if a.vault_cmd == "associate" else "dissociatepolicy"
    data = c.ctl.call("POST", f"{path}/{action}", body={"policy_id": policy["id"]})
    verb = "now follows" if a.vault_cmd == "associate" else "no longer follows"
    print(json.dumps(data) if a.json else f"vault {vault['name']} {verb} policy {policy['name']}")
    return 0


def _policy_row(p: dict) -> tuple:
    d = p["operation_definition"]
    keep = []
    if d["max_backups"] > 0:
        keep.append(f"{d['max_backups']} newest")
    if d["retention_duration_days"] > 0:
        keep.append(f"{d['retention_duration_days']} days")
    for key, label in (("day_backups", "d"), ("week_backups", "w"), ("month_backups", "m"), ("year_backups", "y")):
        if d[key]:
            keep.append(f"{d[key]}{label}")
    return (
        p["id"],
        p["name"],
        "on" if p["enabled"] else "off",
        "; ".join(p["trigger"]["properties"]["pattern"]),
        ", ".join(keep) or "all",
        len(p["associated_vaults"] or []),
    )


POLICY_HEADERS = ("policy", "name", "enabled", "schedule", "keeps", "vaults")


def cmd_policies(c: Ctx) -> int:
    a = c.args
    project = _project(c)
    cmd = a.policy_cmd or "list"
    if cmd == "list":
        data = c.ctl.call("GET", f"/v3/{project}/policies")
        out(a, [_policy_row(p) for p in data["policies"]], POLICY_HEADERS, data)
        return 0
    if cmd == "create":
        definition: dict = {
            "max_backups": a.keep,
            "retention_duration_days": a.days,
            "full_backup_interval": a.full_every,
        }
        for key in ("day_backups", "week_backups", "month_backups", "year_backups"):
            definition[key] = getattr(a, key)
        if a.timezone:
            definition["timezone"] = a.timezone
        if a.bandwidth_limit:
            definition["bandwidth_limit"] = a.bandwidth_limit
        body = {
            "policy": {
                "name": a.name,
                "operation_type": "backup",
                "enabled": not a.disabled,
                "operation_definition": definition,
                "trigger": {"properties": {"pattern": a.rrule}},
            }
        }
        data = c.ctl.call("POST", f"/v3/{project}/policies", body=body)
        out(a, [_policy_row(data["policy"])], POLICY_HEADERS, data)
        return 0
    policy = c.policy(a.policy)
    if cmd == "show":
        out(a, [_policy_row(policy)], POLICY_HEADERS, {"policy": policy})
        return 0
    c.ctl.call("DELETE", f"/v3/{project}/policies/{policy['id']}")
    print(f"deleted policy {policy['name']} ({policy['id']})")
    return 0


def cmd_checkpoints(c: Ctx) -> int:
    a = c.args
    project = _project(c)
    if a.cp_cmd == "create":
        body = {"checkpoint": {"vault_id": c.vault(a.vault)["id"]}}
        data = c.ctl.call("POST", f"/v3/{project}/checkpoints", body=body)
    else:
        data = c.ctl.call("GET", f"/v3/{project}/checkpoints/{a.checkpoint}")
    cp = data["checkpoint"]
    rows = [
        (
            r["id"],
            r.get("name") or "-",
            r.get("protect_status") or "-",
            r.get("backup_id") or "-",
            r.get("task_id") or "-",
        )
        for r in cp["vault"]["resources"]
    ]
    if a.json:
        print(json.dumps(data, sort_keys=True))
    else:
        print(f"checkpoint {cp['id']} {cp['status']}")
        print(refs.table(("resource", "name", "status", "backup", "task"), rows))
    return 0


def add_parsers(sub) -> None:
    va = sub.add_parser("vaults", help="vaults: list, show, create, delete, add, remove, associate, dissociate")
    vas = va.add_subparsers(dest="vault_cmd", required=True)
    vas.add_parser("list", help="the project's vaults")
    vas.add_parser("show", help="a vault and its resources").add_argument("vault", help="name or uuid")
    vc = vas.add_parser("create", help="a vault of volumes on a backup point")
    vc.add_argument("name")
    vc.add_argument("--size", type=int, required=True, metavar="GB", help="GB the vault's backups may use (10 or more)")
    vc.add_argument("--backup-point", help="name or uuid (default: the controller's default_backup_point)")
    vc.add_argument("--volume", action="append", help="a volume it protects (repeat)")
    vc.add_argument("--policy", help="the policy that schedules and prunes its backups")
    vd = vas.add_parser("delete", help="an empty vault, or with --with-backups the vault and its backups")
    vd.add_argument("vault")
    vd.add_argument("--with-backups", action="store_true", help="delete its backups too (from their repository)")
    for name, what in (("add", "volumes join the vault"), ("remove", "volumes leave it (their backups stay)")):
        x = vas.add_parser(name, help=what)
        x.add_argument("vault")
        x.add_argument("volume", nargs="+")
    for name in ("associate", "dissociate"):
        x = vas.add_parser(name, help=f"{name} a policy")
        x.add_argument("vault")
        x.add_argument("policy")

    po = sub.add_parser("policies", help="backup policies: list, show, create, delete")
    pos = po.add_subparsers(dest="policy_cmd")
    pos.add_parser("list", help="the project's policies (the default)")
    pos.add_parser("show", help="one policy").add_argument("policy", help="name or uuid")
    pos.add_parser("delete", help="a policy no vault follows").add_argument("policy")
    pc = pos.add_parser("create", help="a schedule (RRULEs) and what to keep")
    pc.add_argument("name")
    pc.add_argument(
        "--rrule", action="append", required=True, help="e.g. 'FREQ=DAILY;BYHOUR=2;BYMINUTE=0' (repeat; RFC 5545)"
    )
    pc.add_argument("--keep", type=int, default=-1, metavar="N", help="keep the N newest backups (-1: no count limit)")
    pc.add_argument("--days", type=int, default=-1, metavar="N", help="keep backups N days (-1: no age limit)")
    for key, what in (("day", "daily"), ("week", "weekly"), ("month", "monthly"), ("year", "yearly")):
        pc.add_argument(
            f"--{what}", dest=f"{key}_backups", type=int, default=0, metavar="N", help=f"keep N {what} backups"
        )
    pc.add_argument("--timezone", help="for --daily .. --yearly: UTC+08:00 or an IANA name")
    pc.add_argument(
        "--full-every", type=int, default=-1, metavar="N", help="a full backup after N incrementals (-1: never)"
    )
    pc.add_argument(
        "--bandwidth-limit", type=refs.size_arg, default=0, metavar="BYTES", help="per backup, per second (50M, 1G)"
    )
    pc.add_argument("--disabled", action="store_true", help="created switched off")

    cp = sub.add_parser("checkpoints", help="back up a vault now, or show a checkpoint")
    cps = cp.add_subparsers(dest="cp_cmd", required=True)
    cps.add_parser("create").add_argument("vault", help="name or uuid")
    cps.add_parser("show").add_argument("checkpoint")


COMMANDS = {"vaults": cmd_vaults, "policies": cmd_policies, "checkpoints": cmd_checkpoints}
