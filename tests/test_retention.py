"""Retention as a pure function: table-driven cases (DST changes, month
ends, leap years, fixed offsets) and hypothesis invariants."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.controller.retention import Backup, Rule, _period, decide, parse_timezone
from agent.errors import InvalidArgument

UTC = UTC
BERLIN = ZoneInfo("Europe/Berlin")
NOW = datetime(2028, 3, 10, 12, 0, tzinfo=UTC)


def b(name: str, when: datetime) -> Backup:
    return Backup(name, when)


def kept(backups, rule, now=NOW) -> set[str]:
    d = decide(backups, rule, now)
    assert set(d.keep) | set(d.delete) == {x.id for x in backups} and not set(d.keep) & set(d.delete)
    return set(d.keep)


def test_no_limit_keeps_everything_whatever_the_long_term_counts():
    bs = [b(f"b{i}", NOW - timedelta(days=i)) for i in range(30)]
    assert kept(bs, Rule()) == {x.id for x in bs}
    assert kept(bs, Rule(day_backups=2, tz=UTC)) == {x.id for x in bs}
    assert decide(bs, Rule(), NOW).keep["b7"] == ("no_limit",)


def test_count_keeps_the_newest():
    bs = [b(f"b{i}", NOW - timedelta(hours=i)) for i in range(10)]
    assert kept(bs, Rule(max_backups=3)) == {"b0", "b1", "b2"}
    assert kept(bs, Rule(max_backups=99999)) == {x.id for x in bs}


def test_duration_counts_whole_days_of_24_hours_back_from_now():
    bs = [
        b("young", NOW - timedelta(days=2, hours=23)),
        b("edge", NOW - timedelta(days=3)),
        b("old", NOW - timedelta(days=3, seconds=1)),
    ]
    assert kept(bs, Rule(retention_duration_days=3)) == {"young"}


def test_the_latest_backup_is_kept_even_when_older_than_the_duration():
    bs = [b("a", NOW - timedelta(days=40)), b("b", NOW - timedelta(days=50))]
    d = decide(bs, Rule(retention_duration_days=7), NOW)
    assert d.keep == {"a": ("latest",)} and d.delete == ("b",)


def test_any_rule_keeps_a_backup_and_reasons_are_listed():
    bs = [b("new", NOW - timedelta(hours=1)), b("mid", NOW - timedelta(days=2)), b("old", NOW - timedelta(days=9))]
    d = decide(bs, Rule(max_backups=1, retention_duration_days=3), NOW)
    assert d.keep == {"new": ("latest", "count", "duration"), "mid": ("duration",)}
    assert d.delete == ("old",)
    assert d.counts() == {"kept": 2, "deleted": 1, "kept_by_latest": 1, "kept_by_count": 1, "kept_by_duration": 2}


def test_daily_keeps_the_last_backup_of_each_of_the_newest_days_that_have_one():
    day = datetime(2028, 3, 1, tzinfo=UTC)
    bs = [
        b("d1-early", day.replace(hour=1)),
        b("d1-late", day.replace(hour=23)),
        b("d3", day + timedelta(days=2, hours=5)),
        b("d6", day + timedelta(days=5, hours=5)),
    ]
    assert kept(bs, Rule(max_backups=1, day_backups=2, tz=UTC)) == {"d6", "d3"}
    assert kept(bs, Rule(max_backups=1, day_backups=3, tz=UTC)) == {"d6", "d3", "d1-late"}


def test_days_are_local_days_of_a_fixed_offset():
    # 2028-03-01 17:00 UTC is 2028-03-02 01:00 at UTC+08:00: a different day there
    bs = [b("x", datetime(2028, 3, 1, 15, 0, tzinfo=UTC)), b("y", datetime(2028, 3, 1, 17, 0, tzinfo=UTC))]
    assert kept(bs, Rule(max_backups=1, day_backups=5, tz=UTC)) == {"y"}
    assert kept(bs, Rule(max_backups=1, day_backups=5, tz=parse_timezone("UTC+08:00"))) == {"x", "y"}


def test_dst_spring_forward_day_is_one_day_of_23_hours():
    # Europe/Berlin, 2028-03-26: 02:00 CET -> 03:00 CEST. 00:30 local and 23:30 local are the same day,
    # 22 hours apart in UTC.
    first = datetime(2028, 3, 26, 0, 30, tzinfo=BERLIN)
    last = datetime(2028, 3, 26, 23, 30, tzinfo=BERLIN)
    nxt = datetime(2028, 3, 27, 0, 10, tzinfo=BERLIN)
    assert last.astimezone(UTC) - first.astimezone(UTC) == timedelta(hours=22)
    bs = [b("first", first.astimezone(UTC)), b("last", last.astimezone(UTC)), b("next", nxt.astimezone(UTC))]
    assert kept(bs, Rule(max_backups=1, day_backups=2, tz=BERLIN), now=nxt.astimezone(UTC)) == {"next", "last"}


def test_dst_fall_back_repeated_hour_is_one_day_and_the_later_instant_wins():
    # Europe/Berlin, 2028-10-29: 03:00 CEST -> 02:00 CET; 02:30 happens twice.
    cest = datetime(2028, 10, 29, 0, 30, tzinfo=UTC)  # 02:30 CEST
    cet = datetime(2028, 10, 29, 1, 30, tzinfo=UTC)  # 02:30 CET, one hour later
    assert cest.astimezone(BERLIN).strftime("%H:%M") == cet.astimezone(BERLIN).strftime("%H:%M") == "02:30"
    bs = [b("cest", cest), b("cet", cet), b("before", datetime(2028, 10, 28, 12, tzinfo=UTC))]
    assert kept(bs, Rule(max_backups=1, day_backups=2, tz=BERLIN), now=cet) == {"cet", "before"}


def test_month_ends_and_leap_day():
    bs = [
        b("jan31", datetime(2028, 1, 31, 23, 59, tzinfo=UTC)),
        b("feb28", datetime(2028, 2, 28, 12, tzinfo=UTC)),
        b("feb29", datetime(2028, 2, 29, 23, 0, tzinfo=UTC)),
        b("mar1", datetime(2028, 3, 1, 0, 0, tzinfo=UTC)),
    ]
    assert kept(bs, Rule(max_backups=1, month_backups=3, tz=UTC)) == {"mar1", "feb29", "jan31"}
    assert kept(bs, Rule(max_backups=1, day_backups=2, tz=UTC)) == {"mar1", "feb29"}
    # at UTC+08:00 the leap-day backup falls on March 1st, and January's on February 1st
    plus8 = parse_timezone("UTC+08:00")
    assert kept(bs, Rule(max_backups=1, month_backups=2, tz=plus8)) == {"mar1", "feb28"}


def test_weeks_are_iso_weeks_from_monday_across_a_year_end():
    # 2027-12-31 is a Friday of ISO week 2027-W52; 2028-01-03 is the Monday of 2028-W01
    bs = [
        b("fri", datetime(2027, 12, 31, 10, tzinfo=UTC)),
        b("sun", datetime(2028, 1, 2, 10, tzinfo=UTC)),
        b("mon", datetime(2028, 1, 3, 10, tzinfo=UTC)),
    ]
    assert kept(bs, Rule(max_backups=1, week_backups=2, tz=UTC)) == {"mon", "sun"}
    assert kept(bs, Rule(max_backups=1, year_backups=2, tz=UTC)) == {"mon", "fri"}


@pytest.mark.parametrize(
    "value, offset", [("UTC+08:00", 8 * 60), ("UTC-05:30", -330), ("UTC", 0), ("utc+8", 8 * 60), ("UTC+0800", 8 * 60)]
)
def test_fixed_offsets(value, offset):
    assert parse_timezone(value).utcoffset(None) == timedelta(minutes=offset)


@pytest.mark.parametrize(
    "value", ["", "UTC+15:00", "UTC+08:61", "GMT+8", "Mars/Olympus", "../etc/passwd", "Europe/Berlin; DROP"]
)
def test_bad_timezones_name_the_field(value):
    with pytest.raises(InvalidArgument) as e:
        parse_timezone(value, "operation_definition.timezone")
    assert "operation_definition.timezone" in e.value.message


TIMES = st.datetimes(min_value=datetime(2026, 1, 1), max_value=datetime(2030, 12, 31), timezones=st.just(UTC))
RULES = st.builds(
    Rule,
    max_backups=st.one_of(st.just(-1), st.integers(1, 20)),
    retention_duration_days=st.one_of(st.just(-1), st.integers(1, 400)),
    day_backups=st.integers(0, 10),
    week_backups=st.integers(0, 6),
    month_backups=st.integers(0, 4),
    year_backups=st.integers(0, 3),
    tz=st.sampled_from(
        [UTC, BERLIN, ZoneInfo("America/New_York"), ZoneInfo("Australia/Lord_Howe"), parse_timezone("UTC+05:45")]
    ),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(TIMES, max_size=60, unique=True), RULES)
def test_invariants(times, rule):
    backups = [Backup(f"b{i}", t) for i, t in enumerate(times)]
    now = max(times, default=datetime(2031, 1, 1, tzinfo=UTC)) + timedelta(hours=1)
    d = decide(backups, rule, now)
    ids = {x.id for x in backups}
    assert set(d.keep) | set(d.delete) == ids and not set(d.keep) & set(d.delete)
    if not backups:
        return
    newest = max(backups, key=lambda x: (x.created_at, x.id))
    assert newest.id in d.keep  # the latest is always kept
    if not rule.deletes:
        assert not d.delete
        return
    long_term = rule.day_backups + rule.week_backups + rule.month_backups + rule.year_backups
    if rule.retention_duration_days < 1:  # only counts bound what is kept
        assert len(d.keep) <= max(rule.max_backups, 1) + long_term
    if rule.max_backups >= 1 and not long_term and rule.retention_duration_days < 1:
        assert len(d.keep) == min(rule.max_backups, len(backups))  # never more than max
    by_id = {x.id: x for x in backups}
    for i, reasons in d.keep.items():  # every kept backup is justified by a rule that holds
        x = by_id[i]
        for r in reasons:
            if r == "duration":
                assert now - x.created_at < timedelta(days=rule.retention_duration_days)
            elif r == "count":
                assert sum(y.created_at > x.created_at for y in backups) < rule.max_backups
            elif r == "latest":
                assert x is newest
            else:  # the newest backup of its period
                p = _period(r, x.created_at.astimezone(rule.tz))
                assert all(
                    _period(r, y.created_at.astimezone(rule.tz)) != p or (y.created_at, y.id) <= (x.created_at, x.id)
                    for y in backups
                )
    for i in d.delete:  # a deleted backup is kept by no rule
        x = by_id[i]
        if rule.retention_duration_days >= 1:
            assert now - x.created_at >= timedelta(days=rule.retention_duration_days)
        if rule.max_backups >= 1:
            assert sum((y.created_at, y.id) > (x.created_at, x.id) for y in backups) >= rule.max_backups
