"""Hours, the connector's unit of work, and the plan of which ones are due.

Amplitude's Export API serves whole hours of *upload* time, `start` and `end`
both inclusive. The connector's cursor is the first hour not yet delivered.
Hour H is due once it ended `EXPORT_DELAY_HOURS` ago (H + 1h + delay <= now)
and is before `END_DATE`.

`plan(config, cursor, now)` is the one place that turns the stored cursor and
a clock reading into what is due: `sync`, `status`, the metrics and the logs
all read the same `Plan`. Everything here is pure: the clock is an argument.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    from .config import Config

HOUR = timedelta(hours=1)


def floor_hour(moment: datetime) -> datetime:
    """The UTC hour containing `moment` (which must be timezone-aware)."""
    return moment.astimezone(timezone.utc).replace(minute=0, second=0, microsecond=0)


def hour_param(hour: datetime) -> str:
    """The Export API's `YYYYMMDDTHH`."""
    return hour.astimezone(timezone.utc).strftime("%Y%m%dT%H")


def export_hour_tag(hour: datetime) -> str:
    """`2025-07-01T10`: the `$amplitude_export_hour` every imported event of that hour carries."""
    return hour.astimezone(timezone.utc).strftime("%Y-%m-%dT%H")


def iso_hour(hour: datetime) -> str:
    """`2025-07-01T10:00:00Z`: how hours are stored and printed."""
    return hour.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:00:00Z")


def hour_range(start: datetime, stop: datetime) -> Iterator[datetime]:
    """start, start + 1h, ... up to but excluding `stop`."""
    hour = start
    while hour < stop:
        yield hour
        hour += HOUR


def parse_hour(text: str) -> datetime:
    """`YYYY-MM-DD`, `YYYY-MM-DDTHH`, `YYYYMMDDTHH` or an ISO timestamp -> the UTC hour containing it.

    A timestamp without an offset is UTC. Raises ValueError on anything else.
    """
    text = text.strip()
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
        return datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=timezone.utc)
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}[T ]\d{2}", text):
        return datetime.strptime(text[:10] + "T" + text[11:], "%Y-%m-%dT%H").replace(tzinfo=timezone.utc)
    if re.fullmatch(r"\d{8}T\d{2}", text):
        return datetime.strptime(text, "%Y%m%dT%H").replace(tzinfo=timezone.utc)
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}.*", text):
        raise ValueError(text)
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return floor_hour(moment)


def due_limit(delay: timedelta, end: datetime | None, now: datetime) -> datetime:
    """The first hour that is not due at `now`."""
    limit = floor_hour(now - delay)
    return limit if end is None else min(limit, end)


def first_cursor(config: "Config", now: datetime) -> datetime:
    """Where a sync with no stored cursor starts: START_DATE, or else the newest due hour
    (live only, no history)."""
    if config.start_date is not None:
        return config.start_date
    return due_limit(config.export_delay, None, now) - HOUR


@dataclass(frozen=True)
class Plan:
    """What is due, read from the cursor and one clock reading."""

    cursor: datetime  # the first hour not yet delivered
    limit: datetime  # the first hour not due at `now`
    now: datetime
    end: datetime | None  # END_DATE: the first hour never imported
    delay: timedelta

    @property
    def backlog(self) -> int:
        """Due hours not yet delivered."""
        return max(0, (self.limit - self.cursor) // HOUR)

    @property
    def finished(self) -> bool:
        """END_DATE is set and reached: nothing will ever be due again."""
        return self.end is not None and self.cursor >= self.end

    @property
    def next_due_at(self) -> datetime | None:
        """When the cursor's hour is (or was) due; None once finished."""
        if self.finished:
            return None
        return self.cursor + HOUR + self.delay

    @property
    def lag(self) -> timedelta:
        """How far the cursor is behind the clock."""
        return max(timedelta(0), self.now - self.cursor)

    def due(self, max_hours: int | None = None) -> list[datetime]:
        """The due hours in order, at most `max_hours`."""
        count = self.backlog if max_hours is None else min(self.backlog, max(0, max_hours))
        return [self.cursor + i * HOUR for i in range(count)]

    def as_dict(self) -> dict:
        return {
            "cursor": self.cursor.isoformat(),
            "next_due_at": self.next_due_at.isoformat() if self.next_due_at else None,
            "backlog_hours": self.backlog,
            "lag_seconds": int(self.lag.total_seconds()),
            "finished": self.finished,
        }


def plan(config: "Config", cursor: datetime | None, now: datetime) -> Plan:
    """The plan at `now` for a stored `cursor` (None: nothing stored yet, so the first cursor)."""
    start = cursor if cursor is not None else first_cursor(config, now)
    return Plan(start, due_limit(config.export_delay, config.end_date, now), now, config.end_date, config.export_delay)
