"""Policy bodies and schedules (seed 003): every constraint, with errors
that name the field; the schedule as dateutil computes it."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from agent.controller.policy import check_patterns, check_policy, schedule
from agent.errors import InvalidArgument

SEED = {
    "policy": {
        "enabled": True,
        "name": "policy001",
        "operation_definition": {
            "day_backups": 0,
            "month_backups": 0,
            "retention_duration_days": 1,
            "timezone": "UTC+08:00",
            "week_backups": 0,
            "year_backups": 0,
        },
        "operation_type": "backup",
        "trigger": {"properties": {"pattern": ["FREQ=WEEKLY;BYDAY=MO,TU,WE,TH,FR,SA,SU;BYHOUR=14;BYMINUTE=00"]}},
    }
}


def body(**changes) -> dict:
    import copy

    b = copy.deepcopy(SEED)
    for path, value in changes.items():
        d = b["policy"]
        keys = path.split("__")
        for k in keys[:-1]:
            d = d[k]
        if value is KeyError:
            d.pop(keys[-1], None)
        else:
            d[keys[-1]] = value
    return b


def test_the_seed_example_is_valid():
    p = check_policy(SEED)
    assert p["name"] == "policy001" and p["operation_definition"].retention_duration_days == 1
    assert p["operation_definition"].rule().tz.utcoffset(None).total_seconds() == 8 * 3600


def test_the_schedule_follows_the_patterns_in_utc():
    rs = schedule(
        ["FREQ=WEEKLY;BYDAY=MO,WE;BYHOUR=14;BYMINUTE=30", "FREQ=DAILY;INTERVAL=1;BYHOUR=6;BYMINUTE=00"],
        datetime(2026, 11, 23, 0, 0, tzinfo=UTC),
    )  # a Monday
    got = rs.between(datetime(2026, 11, 23, tzinfo=UTC), datetime(2026, 11, 26, tzinfo=UTC))
    assert [t.strftime("%a %H:%M") for t in got] == ["Mon 06:00", "Mon 14:30", "Tue 06:00", "Wed 06:00", "Wed 14:30"]
    every_other = schedule(["FREQ=DAILY;INTERVAL=2;BYHOUR=1;BYMINUTE=0"], datetime(2026, 11, 23, tzinfo=UTC))
    assert [
        t.day for t in every_other.between(datetime(2026, 11, 23, tzinfo=UTC), datetime(2026, 11, 30, tzinfo=UTC))
    ] == [23, 25, 27, 29]


@pytest.mark.parametrize(
    "change, field",
    [
        ({"name": ""}, "policy.name"),
        ({"name": "a" * 65}, "policy.name"),
        ({"name": "bad name"}, "policy.name"),
        ({"operation_type": "replication"}, "policy.operation_type"),
        ({"enabled": "yes"}, "policy.enabled"),
        ({"operation_definition": KeyError}, "operation_definition"),
        ({"operation_definition__max_backups": 0}, "operation_definition.max_backups"),
        ({"operation_definition__max_backups": 100000}, "operation_definition.max_backups"),
        ({"operation_definition__max_backups": "5"}, "operation_definition.max_backups"),
        ({"operation_definition__retention_duration_days": -2}, "operation_definition.retention_duration_days"),
        ({"operation_definition__day_backups": 101}, "operation_definition.day_backups"),
        ({"operation_definition__week_backups": -1}, "operation_definition.week_backups"),
        ({"operation_definition__full_backup_interval": 101}, "operation_definition.full_backup_interval"),
        ({"operation_definition__full_backup_interval": -2}, "operation_definition.full_backup_interval"),
        (
            {"operation_definition__month_backups": 3, "operation_definition__timezone": KeyError},
            "operation_definition.timezone",
        ),
        ({"operation_definition__timezone": "UTC+25:00"}, "operation_definition.timezone"),
        ({"operation_definition__surprise": 1}, "operation_definition"),
        ({"trigger": KeyError}, "policy.trigger.properties"),
        ({"trigger__properties__pattern": []}, "policy.trigger.properties.pattern"),
        (
            {"trigger__properties__pattern": ["FREQ=DAILY;BYHOUR=1;BYMINUTE=0"] * 25},
            "policy.trigger.properties.pattern",
        ),
        ({"trigger__properties__pattern": ["FREQ=HOURLY;BYHOUR=1;BYMINUTE=0"]}, "policy.trigger.properties.pattern[0]"),
        ({"trigger__properties__pattern": ["FREQ=DAILY;BYHOUR=24;BYMINUTE=0"]}, "policy.trigger.properties.pattern[0]"),
        ({"trigger__properties__pattern": ["FREQ=DAILY;BYHOUR=1;BYMINUTE=60"]}, "policy.trigger.properties.pattern[0]"),
        (
            {"trigger__properties__pattern": ["FREQ=WEEKLY;BYDAY=XX;BYHOUR=1;BYMINUTE=0"]},
            "policy.trigger.properties.pattern[0]",
        ),
        (
            {"trigger__properties__pattern": ["FREQ=DAILY;BYHOUR=1;BYMINUTE=0;COUNT=3"]},
            "policy.trigger.properties.pattern[0]",
        ),
        ({"trigger__properties__pattern": ["FREQ=DAILY;BYHOUR=1"]}, "policy.trigger.properties.pattern[0]"),
        ({"trigger__properties__pattern": ["FREQ=DAILY;BYHOUR=1;BYMINUTE=0,30"]}, "policy.trigger.properties.pattern"),
        (
            {"trigger__properties__pattern": ["FREQ=DAILY;BYHOUR=1;BYMINUTE=0", "FREQ=DAILY;BYHOUR=1;BYMINUTE=59"]},
            "policy.trigger.properties.pattern",
        ),
        (
            {"trigger__properties__pattern": ["FREQ=DAILY;INTERVAL=0;BYHOUR=1;BYMINUTE=0"]},
            "policy.trigger.properties.pattern[0]",
        ),
    ],
)
def test_every_bad_field_is_refused_by_name(change, field):
    with pytest.raises(InvalidArgument) as e:
        check_policy(body(**change))
    assert e.value.field == field and e.value.message.startswith(field), e.value.message


def test_twenty_four_hourly_runs_are_the_most_a_day_may_hold():
    hourly = "FREQ=DAILY;BYHOUR=" + ",".join(map(str, range(24))) + ";BYMINUTE=0"
    assert check_patterns([hourly]) == [hourly]


def test_an_update_may_carry_only_some_fields():
    assert check_policy({"policy": {"enabled": False}}, partial=True) == {"enabled": False}
    with pytest.raises(InvalidArgument):
        check_policy({"policy": {"name": "bad name"}}, partial=True)
