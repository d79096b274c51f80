"""Which backups a policy keeps: a pure function of the backups, the rule
and the current time (seed 003's operation_definition).

Rules, each of which may keep a backup; a backup is kept if any rule keeps
it, and deleted otherwise:
- count:     max_backups >= 1 keeps the newest max_backups;
- duration:  retention_duration_days >= 1 keeps those created less than that
             many days (of 24 hours) before now;
- long-term: day/week/month/year_backups = N keeps the newest backup of each
             of the N newest calendar days (ISO weeks from Monday, months,
             years) that hold a backup, in the policy's timezone;
- latest:    the newest backup is always kept (a policy never deletes the
             last restore point of a volume).
Deleting needs a limit: when neither max_backups nor retention_duration_days
is set (both -1, the seed's default), nothing is deleted, whatever the
long-term counts say (the seed: "the backups will be retained permanently").

Backups are judged per volume: the caller groups them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from agent.errors import InvalidArgument

_OFFSET = re.compile(r"^UTC\s*(?:([+-])(\d{1,2})(?::?(\d{2}))?)?$", re.IGNORECASE)


def parse_timezone(value: str, field_name: str = "timezone") -> tzinfo:
    """ "UTC+08:00" (the seed's form: a fixed offset) or an IANA zone name
    such as "Europe/Berlin" (which follows daylight saving time)."""
    text = (value or "").strip()
    m = _OFFSET.match(text)
    if m:
        if not m.group(1):
            return UTC
        hours, minutes = int(m.group(2)), int(m.group(3) or 0)
        if hours > 14 or minutes > 59 or (hours == 14 and minutes):
            raise InvalidArgument(f"{field_name}: {value!r} is out of range (UTC-14:00 to UTC+14:00)", field=field_name)
        delta = timedelta(hours=hours, minutes=minutes)
        return timezone(-delta if m.group(1) == "-" else delta)
    if text and re.fullmatch(r"[A-Za-z0-9_+\-]+(/[A-Za-z0-9_+\-]+)*", text):
        try:
            return ZoneInfo(text)
        except (ZoneInfoNotFoundError, ValueError):
            pass
    raise InvalidArgument(f"{field_name}: {value!r} is neither UTC±HH:MM nor a known IANA zone name", field=field_name)


@dataclass(frozen=True)
class Rule:
    max_backups: int = -1
    retention_duration_days: int = -1
    day_backups: int = 0
    week_backups: int = 0
    month_backups: int = 0
    year_backups: int = 0
    tz: tzinfo = UTC

    @property
    def deletes(self) -> bool:
        return self.max_backups >= 1 or self.retention_duration_days >= 1


@dataclass(frozen=True)
class Backup:
    id: str
    created_at: datetime  # timezone-aware


@dataclass(frozen=True)
class Decision:
    keep: dict[str, tuple[str, ...]] = field(default_factory=dict)  # id -> the rules that keep it
    delete: tuple[str, ...] = ()

    def counts(self) -> dict[str, int]:
        """Kept and deleted, and how many each rule kept (a task's summary)."""
        out = {"kept": len(self.keep), "deleted": len(self.delete)}
        for reasons in self.keep.values():
            for r in reasons:
                out[f"kept_by_{r}"] = out.get(f"kept_by_{r}", 0) + 1
        return out


def _period(kind: str, local: datetime) -> tuple:
    if kind == "day":
        return (local.year, local.month, local.day)
    if kind == "week":
        iso = local.isocalendar()
        return (iso.year, iso.week)
    if kind == "month":
        return (local.year, local.month)
    return (local.year,)


def decide(backups: Iterable[Backup], rule: Rule, now: datetime) -> Decision:
    """Keep or delete each backup (of one volume) under the rule at `now`."""
    ordered: Sequence[Backup] = sorted(backups, key=lambda b: (b.created_at, b.id), reverse=True)  # newest first
    if any(b.created_at.tzinfo is None for b in ordered) or now.tzinfo is None:
        raise ValueError("retention needs timezone-aware times")
    reasons: dict[str, list[str]] = {b.id: [] for b in ordered}
    if not rule.deletes:
        return Decision({b.id: ("no_limit",) for b in ordered}, ())
    if ordered:
        reasons[ordered[0].id].append("latest")
    if rule.max_backups >= 1:
        for b in ordered[: rule.max_backups]:
            reasons[b.id].append("count")
    if rule.retention_duration_days >= 1:
        horizon = now - timedelta(days=rule.retention_duration_days)
        for b in ordered:
            if b.created_at > horizon:
                reasons[b.id].append("duration")
    for kind, n in (
        ("day", rule.day_backups),
        ("week", rule.week_backups),
        ("month", rule.month_backups),
        ("year", rule.year_backups),
    ):
        if n <= 0:
            continue
        seen: set[tuple] = set()
        for b in ordered:  # newest first: the first backup seen in a period is its latest
            p = _period(kind, b.created_at.astimezone(rule.tz))
            if p not in seen:
                if len(seen) == n:
                    break
                seen.add(p)
                reasons[b.id].append(kind)
    keep = {i: tuple(r) for i, r in reasons.items() if r}
    delete = tuple(b.id for b in ordered if not reasons[b.id])
    return Decision(keep, delete)
