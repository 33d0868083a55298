"""Is everything there? Delivered hours compared with what PostHog itself holds.

For each delivered hour the store keeps how many events PostHog accepted, by
UTC day of their timestamp (`store.Delivery`). `Verifier.verify` asks PostHog
(`readback.PostHogQuery.hour_counts`, one query per run of up to
HOURS_PER_QUERY export hours) how many rows and distinct uuids it holds for the
same (export hour, day), and `judge` turns the two into a `Verdict`:

- missing = delivered minus distinct uuids found, per day (never below 0);
- extra = distinct uuids found beyond what was delivered, per day;
- duplicates = rows minus distinct uuids: a re-sent event PostHog has not
  merged yet. Neither missing nor extra;
- state: "pending" within the grace period after delivery (PostHog's
  ingestion lags: events accepted by capture wait in Kafka), else "short"
  when anything is missing, else "whole".

Persons too: `check_persons` samples merged device/user pairs and checks
that both ids resolve to one person in PostHog.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Callable, Iterable, Protocol, Sequence

from .readback import Counts
from .store import Delivery, StateStore, Verdict

HOURS_PER_QUERY = 24
PERSON_SAMPLE = 200


class Query(Protocol):
    def hour_counts(self, hours: Sequence[datetime], days: Sequence[date]) -> dict[tuple[datetime, date], Counts]: ...

    def persons(self, distinct_ids: Sequence[str]) -> dict[str, str]: ...

    def probe(self, hour: datetime) -> dict: ...


def judge(delivery: Delivery, found: dict[date, Counts], now: datetime, grace: timedelta, repairs: int = 0) -> Verdict:
    """The verdict on one delivered hour, from what PostHog holds for it by day. Pure."""
    missing = extra = distinct = duplicates = 0
    for day in set(delivery.days) | set(found):
        expected = delivery.days.get(day, 0)
        counts = found.get(day, Counts(0, 0))
        distinct += counts.distinct
        duplicates += counts.stored - counts.distinct
        missing += max(0, expected - counts.distinct)
        extra += max(0, counts.distinct - expected)
    if now - delivery.delivered_at < grace:
        state = "pending"
    else:
        state = "short" if missing else "whole"
    return Verdict(delivery.hour, state, delivery.events, distinct, missing, extra, duplicates, now, repairs)


@dataclass(frozen=True)
class PersonsReport:
    checked: int
    not_merged: list[tuple[str, str]] = field(default_factory=list)  # (device_id, user_id)


class Verifier:
    """Reads delivered hours back from PostHog and records what it found."""

    def __init__(self, store: StateStore, query: Query, clock: Callable[[], datetime], grace: timedelta):
        self._store = store
        self.query = query
        self._clock = clock
        self.grace = grace

    def verify(self, deliveries: Iterable[Delivery]) -> list[Verdict]:
        """Verdicts on these hours (not recorded: see `record`). Repairs made so far are kept."""
        deliveries = sorted(deliveries, key=lambda d: d.hour)
        if not deliveries:
            return []
        earlier = self._store.verdicts(deliveries[0].hour, deliveries[-1].hour + timedelta(hours=1))
        verdicts = []
        for start in range(0, len(deliveries), HOURS_PER_QUERY):
            chunk = deliveries[start : start + HOURS_PER_QUERY]
            days = sorted({day for d in chunk for day in d.days})
            counts = self.query.hour_counts([d.hour for d in chunk], days) if days else {}
            now = self._clock()
            for delivery in chunk:
                found = {day: c for (hour, day), c in counts.items() if hour == delivery.hour}
                previous = earlier.get(delivery.hour)
                verdicts.append(judge(delivery, found, now, self.grace, previous.repairs if previous else 0))
        return verdicts

    def mark_repaired(self, hours: Sequence[datetime]) -> None:
        """Record that these hours were imported again: pending, one repair more."""
        if not hours:
            return
        earlier = self._store.verdicts(min(hours), max(hours) + timedelta(hours=1))
        now = self._clock()
        self._store.record_verdicts([
            Verdict(hour, "pending", 0, 0, 0, 0, 0, now, (earlier[hour].repairs if hour in earlier else 0) + 1)
            for hour in hours
        ])

    def check_persons(self, sample: int = PERSON_SAMPLE) -> PersonsReport:
        """Both ids of sampled merged pairs (of hours past the grace period) resolve to one person."""
        settled = self._settled_before()
        pairs = self._store.merge_sample(sample, settled) if settled else []
        if not pairs:
            return PersonsReport(0)
        persons = self.query.persons(sorted({i for pair in pairs for i in pair}))
        wrong = [(d, u) for d, u in pairs if persons.get(d) is None or persons.get(d) != persons.get(u)]
        return PersonsReport(len(pairs), wrong)

    def _settled_before(self) -> datetime | None:
        """The first export hour whose delivery is still within the grace period (or after all)."""
        now = self._clock()
        settled = None
        for delivery in self._store.deliveries():
            if now - delivery.delivered_at < self.grace:
                return delivery.hour
            settled = delivery.hour + timedelta(hours=1)
        return settled


def summarize(verdicts: Sequence[Verdict]) -> dict:
    """Totals over verdicts: hours by state and the event counts."""
    states = {"whole": 0, "short": 0, "pending": 0}
    for v in verdicts:
        states[v.state] += 1
    return {
        "hours": len(verdicts),
        **states,
        "delivered": sum(v.delivered for v in verdicts),
        "found": sum(v.found for v in verdicts),
        "missing": sum(v.missing for v in verdicts),
        "extra": sum(v.extra for v in verdicts),
        "duplicates": sum(v.duplicates for v in verdicts),
    }
