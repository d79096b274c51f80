"""What every blockferry-ctl command uses: the settings that must be set,
output as a table or JSON, objects found by name or uuid, and long
operations followed as tasks."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from typing import Any

from agent.cli import refs
from agent.ctl.rest import Controller
from agent.errors import InvalidArgument, NotFound


def pick(kind: str, items: Iterable[dict], ref: str, uuid_key: str, name_key: str) -> dict:
    """The one item whose uuid is `ref`, or the one named `ref`; several
    with that name is an error that lists their uuids."""
    items = list(items)
    for x in items:
        if x[uuid_key] == ref:
            return x
    named = [x for x in items if x[name_key] == ref]
    if not named:
        raise NotFound(f"{kind}: no {kind.replace('_', ' ')} {ref!r}", field=kind)
    if len(named) > 1:
        raise InvalidArgument(
            f"{kind}: {len(named)} are named {ref!r}; give the uuid ({', '.join(x[uuid_key] for x in named)})",
            field=kind,
        )
    return named[0]


def need(value: str, what: str) -> str:
    if not value:
        raise InvalidArgument(
            f"{what}: not set; give --{what}, ${'BLOCKFERRY_' + what.upper()}, or {what} in the config file",
            field=what,
        )
    return value


def out(args, rows: list[tuple], headers: tuple, raw: Any) -> None:
    if args.json:
        print(json.dumps(raw, indent=None, sort_keys=True))
    else:
        print(refs.table(headers, rows))


class Ctx:
    def __init__(self, ctl: Controller, args):
        self.ctl, self.args = ctl, args
        self.cluster = ctl.settings.cluster
        self.tenant = ctl.settings.tenant

    def ref(self) -> dict:
        return {"cluster_uuid": need(self.cluster, "cluster"), "tenant": need(self.tenant, "tenant")}

    def volume(self, name_or_uuid: str) -> dict:
        """A volume of the tenant by uuid, or by a name only one has."""
        if refs.is_uuid(name_or_uuid):
            return self.ctl.call("POST", "/v1/volume/share/get", body={**self.ref(), "volume_uuid": name_or_uuid})[
                "volume"
            ]
        listed = self.ctl.call("POST", "/v1/volume/share/list", body={**self.ref(), "filter_name": name_or_uuid})
        return pick("volume", (x["volume"] for x in listed["list"]), name_or_uuid, "UUID", "Name")

    def snapshot(self, vol: dict, name_or_uuid: str) -> dict:
        snaps = self.ctl.call("POST", "/v1/volume/share/snapshot/list", body={**self.ref(), "volume_uuid": vol["UUID"]})
        for s in snaps["list"]:
            if name_or_uuid in (s["UUID"], s["Name"]):
                return s
        raise NotFound(f"snapshot: volume {vol['Name']} has no snapshot {name_or_uuid!r}", field="snapshot")

    def pool(self, ref: str) -> dict:
        pools = self.ctl.call("POST", "/v1/pool/share/list", body={"cluster_uuid": need(self.cluster, "cluster")})
        return pick("pool", (x["pool"] for x in pools["infos"]), ref, "UUID", "Name")

    def backup_point(self, ref: str) -> dict:
        params = {"cluster_uuid": need(self.cluster, "cluster")}
        bps = self.ctl.call("GET", "/v1/volume/internal/backuppoint/list", params=params)["list"]
        return pick("backup_point", bps, ref, "UUID", "Name")

    def vault(self, ref: str) -> dict:
        vaults = self.ctl.call("GET", f"/v3/{need(self.tenant, 'tenant')}/vaults")["vaults"]
        return pick("vault", vaults, ref, "id", "name")

    def policy(self, ref: str) -> dict:
        policies = self.ctl.call("GET", f"/v3/{need(self.tenant, 'tenant')}/policies")["policies"]
        return pick("policy", policies, ref, "id", "name")

    def task(self, data: dict) -> int:
        """Follow the task of a long operation (unless --no-wait)."""
        tid = data["task_id"]
        if not self.args.wait:
            print(json.dumps(data) if self.args.json else tid)
            return 0
        t = self.ctl.follow(tid, quiet=self.args.json)
        if self.args.json:
            print(json.dumps(t, sort_keys=True))
        elif t["status"] != "success":
            err = t.get("error_info") or {}
            print(f"blockferry-ctl: task {tid} {t['status']}: {err.get('code')}: {err.get('message')}", file=sys.stderr)
        else:
            print(f"task {tid} {t['status']}")
        return 0 if t["status"] == "success" else 1
