"""Backup policies (seed 003, `policies`): validation of the request body
and the schedule, which dateutil's rrule computes.

A pattern is the seed's RFC 2445 subset: FREQ (DAILY or WEEKLY), BYDAY
(MO..SU), BYHOUR (0-23), BYMINUTE (0-59) and INTERVAL, in UTC (the seed:
"14:00 (UTC+8) every day" is BYHOUR=6). At most 24 patterns; together they
may fire at most 24 times a day and never less than an hour apart.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from dateutil.rrule import rrule, rruleset, rrulestr

from agent.controller.retention import Rule, parse_timezone
from agent.controller.validate import bad

MAX_PATTERNS = 24
MAX_PER_DAY = 24
MIN_GAP = timedelta(hours=1)
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_KEYS = {"FREQ", "BYDAY", "BYHOUR", "BYMINUTE", "INTERVAL"}
_DAYS = {"MO", "TU", "WE", "TH", "FR", "SA", "SU"}
# A fixed Monday: the schedule's shape is checked over its first weeks.
_EPOCH = datetime(2024, 1, 1, tzinfo=UTC)


def _ints(value: str, lo: int, hi: int, field_name: str, key: str) -> list[int]:
    try:
        out = [int(v) for v in value.split(",")]
    except ValueError:
        raise bad(field_name, f"{key}={value!r}: not a list of integers") from None
    if not out or any(not lo <= v <= hi for v in out):
        raise bad(field_name, f"{key}={value!r}: values must be {lo} to {hi}")
    return out


def parse_pattern(text: str, field_name: str) -> rrule:
    """One pattern, checked against the subset before dateutil sees it."""
    if not isinstance(text, str) or not text.strip():
        raise bad(field_name, "must be a non-empty string such as FREQ=DAILY;BYHOUR=14;BYMINUTE=00")
    parts: dict[str, str] = {}
    for item in text.strip().rstrip(";").split(";"):
        key, sep, value = item.partition("=")
        key = key.strip().upper()
        if not sep or not value.strip():
            raise bad(field_name, f"{item!r} is not KEY=VALUE")
        if key not in _KEYS:
            raise bad(field_name, f"{key} is not supported (only FREQ, BYDAY, BYHOUR, BYMINUTE and INTERVAL)")
        if key in parts:
            raise bad(field_name, f"{key} is given twice")
        parts[key] = value.strip().upper()
    freq = parts.get("FREQ")
    if freq not in ("DAILY", "WEEKLY"):
        raise bad(field_name, f"FREQ must be DAILY or WEEKLY, not {freq!r}" if freq else "FREQ is required")
    if "BYDAY" in parts and any(d not in _DAYS for d in parts["BYDAY"].split(",")):
        raise bad(field_name, f"BYDAY={parts['BYDAY']!r}: days are MO, TU, WE, TH, FR, SA and SU")
    if "BYHOUR" not in parts or "BYMINUTE" not in parts:
        raise bad(field_name, "BYHOUR and BYMINUTE are required (the time of day, UTC)")
    _ints(parts["BYHOUR"], 0, 23, field_name, "BYHOUR")
    _ints(parts["BYMINUTE"], 0, 59, field_name, "BYMINUTE")
    if "INTERVAL" in parts:
        _ints(parts["INTERVAL"], 1, 1000, field_name, "INTERVAL")
    canonical = ";".join(f"{k}={parts[k]}" for k in ("FREQ", "INTERVAL", "BYDAY", "BYHOUR", "BYMINUTE") if k in parts)
    return rrulestr(canonical, dtstart=_EPOCH)


def schedule(patterns: list[str], start: datetime) -> rruleset:
    """The union of the patterns, anchored at `start` (a policy's start_time:
    INTERVAL counts days or weeks from there)."""
    rs = rruleset()
    for i, p in enumerate(patterns):
        rs.rrule(
            parse_pattern(p, f"trigger.properties.pattern[{i}]").replace(dtstart=start.replace(second=0, microsecond=0))
        )
    return rs


def check_patterns(patterns: Any, field_name: str = "trigger.properties.pattern") -> list[str]:
    if not isinstance(patterns, list) or not patterns:
        raise bad(field_name, "must be a non-empty list of patterns")
    if len(patterns) > MAX_PATTERNS:
        raise bad(field_name, f"{len(patterns)} patterns; at most {MAX_PATTERNS}")
    for i, p in enumerate(patterns):
        parse_pattern(p, f"{field_name}[{i}]")
    # the shape: over four weeks, never closer than an hour, at most 24 a day
    rs = schedule(patterns, _EPOCH)
    times = rs.between(_EPOCH, _EPOCH + timedelta(weeks=4), inc=True)
    per_day: dict[Any, int] = {}
    for t in times:
        per_day[t.date()] = per_day.get(t.date(), 0) + 1
    if max(per_day.values(), default=0) > MAX_PER_DAY:
        raise bad(field_name, f"fires {max(per_day.values())} times a day; at most {MAX_PER_DAY}")
    for a, b in zip(times, times[1:], strict=False):
        if b - a < MIN_GAP:
            raise bad(field_name, f"runs at {a:%a %H:%M} and {b:%a %H:%M} UTC are less than an hour apart")
    if not times:
        raise bad(field_name, "never fires")
    return [str(p).strip() for p in patterns]


@dataclass
class OperationDefinition:
    max_backups: int = -1
    retention_duration_days: int = -1
    day_backups: int = 0
    week_backups: int = 0
    month_backups: int = 0
    year_backups: int = 0
    timezone: str = ""
    full_backup_interval: int = -1
    bandwidth_limit: int = 0  # beyond the seed: bytes per second for each backup the policy makes; 0: none
    # beyond the seed: every backup copied to a second backup point (off-site), whose
    # copies have their own retention (-1 and -1: kept for good)
    copy_backup_point_id: str = ""
    copy_max_backups: int = -1
    copy_retention_duration_days: int = -1

    def copy_rule(self) -> Rule:
        """The copies' retention: by count and age only, in UTC."""
        return Rule(self.copy_max_backups, self.copy_retention_duration_days, 0, 0, 0, 0, UTC)

    def rule(self) -> Rule:
        tz = parse_timezone(self.timezone, "operation_definition.timezone") if self.timezone else UTC
        return Rule(
            self.max_backups,
            self.retention_duration_days,
            self.day_backups,
            self.week_backups,
            self.month_backups,
            self.year_backups,
            tz,
        )

    def to_json(self) -> dict:
        d = asdict(self)
        if not self.timezone:
            d.pop("timezone")
        if not self.bandwidth_limit:
            d.pop("bandwidth_limit")
        if not self.copy_backup_point_id:
            for k in ("copy_backup_point_id", "copy_max_backups", "copy_retention_duration_days"):
                d.pop(k)
        return d


def _int(d: dict, key: str, default: int, lo: int, hi: int, *, allow_minus_one: bool = False) -> int:
    f = f"operation_definition.{key}"
    v = d.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad(f, f"{v!r} is not an integer")
    if allow_minus_one and v == -1:
        return v
    if not lo <= v <= hi:
        raise bad(f, f"{v} is out of range ({'-1 or ' if allow_minus_one else ''}{lo} to {hi})")
    return v


def check_operation_definition(d: Any) -> OperationDefinition:
    if not isinstance(d, dict):
        raise bad("operation_definition", "must be an object")
    unknown = set(d) - {f.name for f in OperationDefinition.__dataclass_fields__.values()}
    if unknown:
        raise bad("operation_definition", f"unknown field(s) {', '.join(sorted(unknown))}")
    od = OperationDefinition(
        max_backups=_int(d, "max_backups", -1, 1, 99999, allow_minus_one=True),
        retention_duration_days=_int(d, "retention_duration_days", -1, 1, 99999, allow_minus_one=True),
        day_backups=_int(d, "day_backups", 0, 0, 100),
        week_backups=_int(d, "week_backups", 0, 0, 100),
        month_backups=_int(d, "month_backups", 0, 0, 100),
        year_backups=_int(d, "year_backups", 0, 0, 100),
        full_backup_interval=_int(d, "full_backup_interval", -1, -1, 100),
        bandwidth_limit=_int(d, "bandwidth_limit", 0, 0, 1 << 40),
        copy_max_backups=_int(d, "copy_max_backups", -1, 1, 99999, allow_minus_one=True),
        copy_retention_duration_days=_int(d, "copy_retention_duration_days", -1, 1, 99999, allow_minus_one=True),
    )
    copy_to = d.get("copy_backup_point_id")
    if copy_to not in (None, ""):
        if not isinstance(copy_to, str) or not _UUID.match(copy_to.lower()):
            raise bad("operation_definition.copy_backup_point_id", f"{copy_to!r} is not a backup point uuid")
        od.copy_backup_point_id = copy_to.lower()
    elif "copy_max_backups" in d or "copy_retention_duration_days" in d:
        raise bad(
            "operation_definition.copy_backup_point_id",
            "required with copy_max_backups or copy_retention_duration_days",
        )
    tz = d.get("timezone")
    if tz not in (None, ""):
        if not isinstance(tz, str):
            raise bad("operation_definition.timezone", f"{tz!r} is not a string")
        parse_timezone(tz, "operation_definition.timezone")
        od.timezone = tz
    if any((od.day_backups, od.week_backups, od.month_backups, od.year_backups)) and not od.timezone:
        raise bad(
            "operation_definition.timezone",
            "required when day_backups, week_backups, month_backups or year_backups is set",
        )
    return od


def check_policy(body: Any, *, partial: bool = False) -> dict:
    """The fields of a PolicyCreate (or, partial=True, a PolicyUpdate) body,
    checked; returns only the fields given."""
    if not isinstance(body, dict) or not isinstance(body.get("policy"), dict):
        raise bad("policy", 'the body must be {"policy": {...}}')
    p = body["policy"]
    out: dict = {}
    if "name" in p or not partial:
        name = p.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise bad("policy.name", f"{name!r}: 1 to 64 letters, digits, '_' or '-'")
        out["name"] = name
    if "enabled" in p:
        if not isinstance(p["enabled"], bool):
            raise bad("policy.enabled", f"{p['enabled']!r} is not true or false")
        out["enabled"] = p["enabled"]
    if "operation_type" in p or not partial:
        if p.get("operation_type") != "backup":
            raise bad("policy.operation_type", f"{p.get('operation_type')!r}: only 'backup' is supported")
        out["operation_type"] = "backup"
    if "operation_definition" in p or not partial:
        out["operation_definition"] = check_operation_definition(p.get("operation_definition"))
    if "trigger" in p or not partial:
        trig = p.get("trigger")
        props = trig.get("properties") if isinstance(trig, dict) else None
        if not isinstance(props, dict):
            raise bad("policy.trigger.properties", 'required: {"properties": {"pattern": [...]}}')
        out["patterns"] = check_patterns(props.get("pattern"), "policy.trigger.properties.pattern")
    return out
