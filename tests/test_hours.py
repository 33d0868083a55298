"""The hour plan, from a table with a fixed clock. Each case is named by what it proves."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from connector.config import load_config
from connector.hours import HOUR, first_cursor, floor_hour, hour_param, hour_range, iso_hour, parse_hour, plan

BASE = {"AMPLITUDE_API_KEY": "k", "AMPLITUDE_SECRET_KEY": "s", "POSTHOG_PROJECT_API_KEY": "p",
        "POSTHOG_HOST": "https://ph.example.com"}
NOW = datetime(2025, 7, 3, 12, 30, tzinfo=timezone.utc)


def at(day: int, hour: int) -> datetime:
    return datetime(2025, 7, day, hour, tzinfo=timezone.utc)


# (case, settings, stored cursor, expected: cursor, limit, backlog, next_due_at, finished)
PLANS = [
    ("nothing stored: the cursor is START_DATE", {"START_DATE": "2025-07-03T05"}, None,
     (at(3, 5), at(3, 9), 4, at(3, 9), False)),
    ("an hour is due once it ended EXPORT_DELAY_HOURS ago", {"START_DATE": "2025-07-03T08"}, None,
     (at(3, 8), at(3, 9), 1, at(3, 12), False)),
    ("the hour after the last due one is not due yet", {"START_DATE": "2025-07-03T09"}, None,
     (at(3, 9), at(3, 9), 0, at(3, 13), False)),
    ("a stored cursor wins over START_DATE", {"START_DATE": "2025-07-01"}, at(3, 7),
     (at(3, 7), at(3, 9), 2, at(3, 11), False)),
    ("no START_DATE: the newest due hour, live only", {}, None,
     (at(3, 8), at(3, 9), 1, at(3, 12), False)),
    ("a longer delay makes fewer hours due", {"START_DATE": "2025-07-03T05", "EXPORT_DELAY_HOURS": "6"}, None,
     (at(3, 5), at(3, 6), 1, at(3, 12), False)),
    ("END_DATE caps what is due", {"START_DATE": "2025-07-03T05", "END_DATE": "2025-07-03T07"}, None,
     (at(3, 5), at(3, 7), 2, at(3, 9), False)),
    ("reaching END_DATE finishes", {"START_DATE": "2025-07-03T05", "END_DATE": "2025-07-03T07"}, at(3, 7),
     (at(3, 7), at(3, 7), 0, None, True)),
    ("a cursor past the due limit has no backlog", {}, at(3, 11),
     (at(3, 11), at(3, 9), 0, at(3, 15), False)),
    ("a zero delay makes the last finished hour due", {"START_DATE": "2025-07-03T11", "EXPORT_DELAY_HOURS": "0"}, None,
     (at(3, 11), at(3, 12), 1, at(3, 12), False)),
]


@pytest.mark.parametrize("name, settings, stored, expected", PLANS, ids=[c[0] for c in PLANS])
def test_plan(name, settings, stored, expected):
    config = load_config({**BASE, **settings})
    p = plan(config, stored, NOW)
    cursor, limit, backlog, next_due, finished = expected
    assert (p.cursor, p.limit, p.backlog, p.next_due_at, p.finished) == (cursor, limit, backlog, next_due, finished)
    assert p.due() == [cursor + i * HOUR for i in range(backlog)]
    assert p.lag == max(timedelta(0), NOW - cursor)


def test_due_hours_are_limited_and_in_order():
    p = plan(load_config({**BASE, "START_DATE": "2025-07-03T00"}), None, NOW)
    assert p.backlog == 9
    assert p.due(3) == [at(3, 0), at(3, 1), at(3, 2)]
    assert p.due(0) == [] and p.due(50) == p.due()


def test_first_cursor_reads_the_clock_only_without_start_date():
    assert first_cursor(load_config({**BASE, "START_DATE": "2024-01-01"}), NOW) == datetime(2024, 1, 1, tzinfo=timezone.utc)
    assert first_cursor(load_config(BASE), NOW) == at(3, 8)
    assert first_cursor(load_config(BASE), NOW + 3 * HOUR) == at(3, 11)


def test_as_dict_is_what_status_prints():
    p = plan(load_config({**BASE, "START_DATE": "2025-07-03T05"}), None, NOW)
    assert p.as_dict() == {"cursor": "2025-07-03T05:00:00+00:00", "next_due_at": "2025-07-03T09:00:00+00:00",
                           "backlog_hours": 4, "lag_seconds": int((NOW - at(3, 5)).total_seconds()), "finished": False}


@pytest.mark.parametrize("text, hour", [
    ("2025-07-01", at(1, 0)), ("2025-07-01T05", at(1, 5)), ("2025-07-01 05", at(1, 5)), ("20250701T05", at(1, 5)),
    ("2025-07-01T05:59:59", at(1, 5)), ("2025-07-01T05:30:00+02:00", at(1, 3)), ("2025-07-01T05:30:00Z", at(1, 5)),
])
def test_parse_hour_accepts_every_form_the_connector_prints(text, hour):
    assert parse_hour(text) == hour


@pytest.mark.parametrize("text", ["yesterday", "2025-13-01", "2025/07/01", "", "2025-07-01T25"])
def test_parse_hour_refuses_anything_else(text):
    with pytest.raises(ValueError):
        parse_hour(text)


def test_helpers_agree_with_each_other():
    h = at(1, 9)
    assert hour_param(h) == "20250701T09" and parse_hour(hour_param(h)) == h
    assert iso_hour(h) == "2025-07-01T09:00:00Z" and parse_hour(iso_hour(h)) == h
    assert floor_hour(h + timedelta(minutes=59, seconds=59)) == h
    assert list(hour_range(h, h + 3 * HOUR)) == [h, h + HOUR, h + 2 * HOUR]
    assert list(hour_range(h, h)) == []
