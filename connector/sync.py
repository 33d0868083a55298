"""The hour loop: plan, download, translate, plan identities, send, commit.

For each due hour, in order: its export window is downloaded (the next window
downloads in the background meanwhile), its blocks are translated, merges and
group updates PostHog has not seen yet are sent and recorded, then the events;
only when PostHog accepted all of them does the cursor move to the next hour
(`HourWriter.commit`). Anything that goes wrong before that leaves the cursor
where it was, and the whole hour is redone later with the same uuids, which
PostHog deduplicates.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Callable, Iterator

from .archive import Archive
from .batches import cut, make_batch
from .clock import TOLERANCE
from .config import Config
from .errors import ClockAhead, ConnectorError, Interrupted, OperatorActionNeeded
from .export import ExportClient, Pending, Window
from .hours import HOUR, Plan, due_limit, first_cursor, hour_param, hour_range, plan
from .identities import plan_identities
from .metrics import Metrics
from .sink import Sink
from .store import HourCounts, HourWriter, StateStore
from .translate import Rejection, TranslateContext
from .worker import TranslatedBlock, Translator

# PostHog routes events older than this to its historical lane.
HISTORICAL_AGE = timedelta(hours=48)
MAX_WINDOW_HOURS = 6

log = logging.getLogger("connector.sync")


@dataclass(frozen=True)
class HourReport:
    hour: datetime
    counts: HourCounts
    seconds: float


class Syncer:
    """Delivers due hours. Everything it touches is injected.

    `stop` is checked between blocks and wakes every wait; once set, the
    current hour is abandoned (nothing committed) and `Interrupted` is raised.
    """

    def __init__(
        self,
        config: Config,
        store: StateStore,
        export: ExportClient,
        sink: Sink,
        translator: Translator,
        *,
        clock: Callable[[], datetime],
        stop: threading.Event,
        metrics: Metrics | None = None,
        on_progress: Callable[[], None] = lambda: None,
    ):
        self._config = config
        self._store = store
        self._export = export
        self._sink = sink
        self._translator = translator
        self._clock = clock
        self._stop = stop
        self._metrics = metrics or Metrics()
        self._on_progress = on_progress
        self._seconds_per_hour: float | None = None

    def plan(self) -> Plan:
        """What is due now, from the stored cursor (or the first cursor, not yet stored)."""
        return plan(self._config, self._store.cursor(), self._clock())

    def start(self) -> datetime:
        """Decide the first cursor if none is stored yet (START_DATE, or the newest due
        hour); return the stored cursor."""
        cursor = self._store.cursor()
        return cursor if cursor is not None else self._store.start_at(first_cursor(self._config, self._clock()))

    def sync_due(self, max_hours: int | None = None) -> list[HourReport]:
        """Deliver every due hour (at most `max_hours`), oldest first.

        Raises on the first hour that fails; the hours before it stay delivered.
        """
        reports: list[HourReport] = []
        ahead: Pending | None = None
        first = self.start()  # decided once, and stored: the clock must not move a cursor never committed
        stop_at = first + max_hours * HOUR if max_hours is not None else None
        try:
            while not self._stop.is_set():
                current = self.plan()
                limit = current.limit if stop_at is None else min(current.limit, stop_at)
                self._metrics.show(current)
                cursor = current.cursor
                if cursor >= limit:
                    break
                if ahead is None or ahead.start != cursor:
                    if ahead is not None:
                        ahead.discard()
                    ahead = self._export.ahead(cursor, min(cursor + (MAX_WINDOW_HOURS - 1) * HOUR, limit - HOUR))
                window = ahead.result()
                archive, last = window.archive, window.last
                ahead = None
                try:
                    ready = self._due_by_answer(window)
                    if last + HOUR < limit and ready > last:
                        ahead = self._export.ahead(last + HOUR, min(last + MAX_WINDOW_HOURS * HOUR, limit - HOUR))
                    for hour in hour_range(cursor, min(ready, last + HOUR)):
                        reports.append(self._deliver(hour, archive))
                    if ready <= last:
                        raise ClockAhead(
                            f"hour {hour_param(max(ready, cursor))} is due by this machine's clock ({self._clock():%Y-%m-%d %H:%M} UTC) "
                            f"but not by Amplitude's, whose answer is dated {window.served_at:%Y-%m-%d %H:%M} UTC: "
                            "an hour asked for too early is missing rows for good, so it waits until it is due by "
                            "both. Check this machine's clock (NTP)",
                            cause="clock",
                        )
                finally:
                    if archive is not None:
                        archive.close()
        finally:
            if ahead is not None:
                ahead.discard()
        if self._stop.is_set():
            raise Interrupted("stop requested")
        return reports

    def _due_by_answer(self, window: Window) -> datetime:
        """The first hour of the window that is not due by the `Date` of Amplitude's own answer."""
        if window.served_at is None:
            return window.last + HOUR  # no Date to go by: the planning clock already decided
        return due_limit(self._config.export_delay, self._config.end_date, window.served_at + TOLERANCE)

    def redeliver(self, hours: list[datetime]) -> list[HourReport]:
        """Import these delivered hours again (same uuids, so PostHog deduplicates), without
        moving the cursor: each hour's delivery record is replaced, nothing else changes."""
        cursor = self._store.cursor()
        if cursor is None or any(hour >= cursor for hour in hours):
            raise OperatorActionNeeded(f"only delivered hours (before the cursor, {cursor}) can be repaired")
        reports = []
        for start, stop in _runs(sorted(set(hours))):
            hour = start
            while hour < stop:
                window = self._export.download_window(hour, min(hour + (MAX_WINDOW_HOURS - 1) * HOUR, stop - HOUR))
                try:
                    for each in hour_range(hour, window.last + HOUR):
                        reports.append(self._deliver(each, window.archive, commit=False))
                finally:
                    if window.archive is not None:
                        window.archive.close()
                hour = window.last + HOUR
        return reports

    def _deliver(self, hour: datetime, archive: Archive | None, commit: bool = True) -> HourReport:
        if self._stop.is_set():
            raise Interrupted("stop requested")
        started = time.monotonic()
        try:
            with self._store.hour(hour) as writer:
                if not commit:
                    # A repair: what was lost may include this hour's merges, so they go again
                    # (the same events, the same uuids).
                    writer = _Resending(writer, self._store.merges_of(hour))
                counts, days = self._send_hour(hour, archive, writer)
                writer.record_delivery(days, self._clock())
                if commit:
                    writer.commit(hour + HOUR, counts)
        except ConnectorError as exc:
            if not isinstance(exc, Interrupted):
                self._metrics.hours.labels("failed").inc()
            raise
        report = HourReport(hour, counts, time.monotonic() - started)
        if commit:
            self._after_hour(report)
        return report

    def _send_hour(self, hour: datetime, archive: Archive | None, writer: HourWriter) -> tuple[HourCounts, Counter]:
        """Send the hour; its counts, and the events PostHog accepted by UTC day."""
        historical = self._clock() - (hour + HOUR) > HISTORICAL_AGE
        ctx = TranslateContext(hour, self._config.events_to_ignore)
        counts = HourCounts()
        days: Counter = Counter()
        blocks = archive.blocks(hour) if archive is not None else ()
        for translated in self._translator.map(blocks, ctx, historical):
            if self._stop.is_set():
                raise Interrupted(f"stop requested during hour {hour_param(hour)}")
            result = translated.result
            counts.events_read += result.read
            counts.ignored += result.ignored
            self._reject(writer, result.rejections, counts)
            self._send_identities(translated, writer, historical, counts)
            days.update({date.fromisoformat(day): n for day, n in result.days.items()})
            for refused in self._send_events(translated, writer, counts):
                days[translated.day_of(refused)] -= 1
            self._metrics.events_read.inc(result.read)
            self._metrics.events_ignored.inc(result.ignored)
        return counts, days

    def _send_identities(self, translated: TranslatedBlock, writer: HourWriter, historical: bool,
                         counts: HourCounts) -> None:
        identities = plan_identities(translated.result.merges, translated.result.groups, writer,
                                     resend=isinstance(writer, _Resending))
        counts.merge_conflicts += identities.conflicts
        self._metrics.merge_conflicts.inc(identities.conflicts)
        if not identities.events:
            return
        key = self._config.posthog_project_api_key.reveal()
        for start, stop in cut(identities.events, self._config.batch_size):
            refused = self._sink.send(make_batch(key, identities.events[start:stop], historical))
            if refused:
                # Merges and group updates are built from valid ids; a refusal means
                # PostHog changed its rules: stop rather than lose persons.
                raise OperatorActionNeeded(f"PostHog refused a merge or group event: {refused[0].detail}")
        # Recorded only now that PostHog has accepted them.
        writer.record_merges(identities.links)
        writer.record_group_digests(identities.digests)
        counts.merges_sent += len(identities.links)
        counts.groups_sent += len(identities.digests)
        self._metrics.merges_sent.inc(len(identities.links))

    def _send_events(self, translated: TranslatedBlock, writer: HourWriter, counts: HourCounts) -> list[int]:
        """Send the block's batches; the block indexes of the events PostHog refused."""
        first = 0
        refused_at: list[int] = []
        for batch in translated.batches():
            refused = self._sink.send(batch)
            self._reject(writer, [Rejection(r.reason, r.detail, translated.line_of(first + r.index)) for r in refused],
                         counts)
            refused_at += [first + r.index for r in refused]
            counts.events_sent += batch.count - len(refused)
            self._metrics.events_sent.inc(batch.count - len(refused))
            first += batch.count
            self._on_progress()
        return refused_at

    def _reject(self, writer: HourWriter, rejections: list[Rejection], counts: HourCounts) -> None:
        if not rejections:
            return
        writer.record_rejections(rejections)
        counts.rejected += len(rejections)
        for r in rejections:
            self._metrics.events_rejected.labels(r.reason).inc()

    def _after_hour(self, report: HourReport) -> None:
        counts = report.counts
        self._metrics.hours.labels("empty" if counts.empty else "done").inc()
        previous = self._seconds_per_hour
        self._seconds_per_hour = report.seconds if previous is None else 0.8 * previous + 0.2 * report.seconds
        current = self.plan()
        self._metrics.show(current)
        self._on_progress()
        log.info(
            "hour delivered",
            extra={
                "hour": report.hour.strftime("%Y-%m-%dT%H:00Z"),
                "events": counts.events_read,
                "sent": counts.events_sent,
                "rejected": counts.rejected,
                "ignored": counts.ignored,
                "merges": counts.merges_sent,
                "merge_conflicts": counts.merge_conflicts,
                "groups": counts.groups_sent,
                "duration_s": round(report.seconds, 3),
                "events_per_s": round(counts.events_read / report.seconds, 1) if report.seconds > 0 else None,
                "backlog_hours": current.backlog,
                "eta_s": round(current.backlog * self._seconds_per_hour),
            },
        )


class _Resending:
    """An hour's writer that does not know the merges first sent with that hour, so they are sent again."""

    def __init__(self, writer: HourWriter, merges: dict[str, str]):
        self._writer = writer
        self._merges = merges

    def linked_users(self, devices):
        found = self._writer.linked_users(devices)
        return {d: u for d, u in found.items() if self._merges.get(d) != u}

    def __getattr__(self, name):
        return getattr(self._writer, name)


def _runs(hours: list[datetime]) -> Iterator[tuple[datetime, datetime]]:
    """Sorted hours as runs of consecutive ones: (first, after last)."""
    start = previous = None
    for hour in hours:
        if start is None:
            start = previous = hour
        elif hour == previous + HOUR:
            previous = hour
        else:
            yield start, previous + HOUR
            start = previous = hour
    if start is not None:
        yield start, previous + HOUR
