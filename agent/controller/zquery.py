"""ZStack's query conditions (seed 004's `q=`), applied to inventories.

A condition is `field OP value` with OP one of `=`, `!=`, `>`, `<`, `>=`,
`<=`, `?=` (in: a comma-separated list), `!?=` (not in), `~=` (like: `%`
any run of characters, `_` any one), `!~=` (not like), or `field is null`
/ `field not null`. A list field (attachedZoneUuids) meets `=` when it
holds the value, `?=` when it holds one of them. Numbers compare as
numbers, dates as times (ZStack's "Apr 11, 2018 2:50:54 PM" or ISO 8601),
uuids with or without dashes, the rest as strings. `sort=+field` or `-field` orders the result.
"""

from __future__ import annotations

import re
import uuid as uuidlib
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from agent.errors import InvalidArgument

_COND = re.compile(r"^([A-Za-z][A-Za-z0-9_.]*)(!\?=|!~=|>=|<=|!=|\?=|~=|=|>|<)(.*)$", re.S)
_NULL = re.compile(r"^([A-Za-z][A-Za-z0-9_.]*)\s+(is null|not null)$")
_ZDATE = "%b %d, %Y %I:%M:%S %p"


@dataclass(frozen=True)
class Condition:
    field: str
    op: str
    value: Any  # a parsed value, a list of them (in, not in), or a compiled like pattern


def _date(text: str, field: str) -> float:
    for parse in (lambda t: datetime.strptime(t, _ZDATE), datetime.fromisoformat):
        try:
            return parse(text.strip()).timestamp()
        except ValueError:
            continue
    raise InvalidArgument(
        f"q: {field}: {text!r} is not a date (like 'Apr 11, 2018 2:50:54 PM' or 2018-04-11T14:50:54)", field="q"
    )


def uuid_text(text: str) -> str:
    """ZStack writes uuids as 32 hex digits; ours have dashes: either is taken."""
    t = text.strip().lower()
    if len(t) == 32 and all(c in "0123456789abcdef" for c in t):
        return str(uuidlib.UUID(t))
    return t


def _value(text: str, kind: Any, field: str) -> Any:
    if kind == "uuid":
        return uuid_text(text)
    if kind is int:
        try:
            return int(text)
        except ValueError:
            raise InvalidArgument(f"q: {field}: {text!r} is not a whole number", field="q") from None
    if kind == "date":
        return _date(text, field)
    return text


def parse(text: str, fields: dict[str, Any], name: str = "q") -> Condition:
    """One condition, checked against the queryable fields (name: kind,
    kind one of str, "uuid", int, "date", list)."""
    m = _NULL.match(text.strip())
    if m:
        field, op, raw = m.group(1), m.group(2), ""
    else:
        m = _COND.match(text)
        if not m:
            raise InvalidArgument(
                f"{name}: {text!r} is not a condition (field=value, field!=value, field>value, field?=a,b, "
                "field~=pat%, field is null, ...)",
                field=name,
            )
        field, op, raw = m.group(1), m.group(2), m.group(3)
    if field not in fields:
        raise InvalidArgument(f"{name}: {field!r} cannot be queried (fields: {', '.join(sorted(fields))})", field=name)
    kind = fields[field]
    if op in ("is null", "not null"):
        return Condition(field, op, None)
    if op in ("?=", "!?="):
        return Condition(field, op, [_value(x, kind, field) for x in raw.split(",")])
    if op in ("~=", "!~="):
        pattern = "".join(".*" if c == "%" else "." if c == "_" else re.escape(c) for c in raw)
        return Condition(field, op, re.compile(f"^{pattern}$", re.S))
    if op in (">", "<", ">=", "<=") and kind in (str, "uuid", list):
        raise InvalidArgument(f"{name}: {field} is text; compare it with =, !=, ?=, ~=", field=name)
    return Condition(field, op, _value(raw, kind, field))


def _comparable(value: Any, kind: Any) -> Any:
    if kind == "date" and isinstance(value, str):
        return datetime.strptime(value, _ZDATE).timestamp()
    return value


def _meets(have: Any, c: Condition, kind: Any) -> bool:
    if c.op == "is null":
        return have is None or have == "" or have == []
    if c.op == "not null":
        return not (have is None or have == "" or have == [])
    if kind is list:
        items = [str(x) for x in have or []]
        if c.op in ("=", "!="):
            return (c.value in items) == (c.op == "=")
        if c.op in ("?=", "!?="):
            return any(x in items for x in c.value) == (c.op == "?=")
        return any(c.value.match(x) for x in items) == (c.op == "~=")
    have = _comparable(have, kind)
    if c.op == "=":
        return bool(have == c.value)
    if c.op == "!=":
        return bool(have != c.value)
    if c.op == "?=":
        return have in c.value
    if c.op == "!?=":
        return have not in c.value
    if c.op == "~=":
        return c.value.match(str(have)) is not None
    if c.op == "!~=":
        return c.value.match(str(have)) is None
    if have is None:
        return False
    return bool({">": have > c.value, "<": have < c.value, ">=": have >= c.value, "<=": have <= c.value}[c.op])


def matches(row: dict[str, Any], conditions: list[Condition], fields: dict[str, Any]) -> bool:
    """True when the row meets every condition."""
    return all(_meets(row.get(c.field), c, fields[c.field]) for c in conditions)


def sort(rows: list[dict[str, Any]], spec: str, fields: dict[str, Any], name: str = "sort") -> list[dict[str, Any]]:
    """Rows ordered by `+field` (ascending, the default; a `+` sent
    unencoded arrives as a space) or `-field`."""
    desc = spec.startswith("-")
    field = spec.lstrip("+- ")
    if field not in fields or fields[field] is list:
        raise InvalidArgument(
            f"{name}: {spec!r}: sort by +field or -field, field one of "
            f"{', '.join(sorted(f for f, k in fields.items() if k is not list))}",
            field=name,
        )
    kind = fields[field]

    def key(row: dict[str, Any]) -> Any:
        value = _comparable(row.get(field), kind)
        return value if kind is int or kind == "date" else str(value or "")

    return sorted(rows, key=key, reverse=desc)
