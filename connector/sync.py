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
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Callable

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
        stop_at = self.start() + max_hours * HOUR if max_hours is not None else None
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

    def _deliver(self, hour: datetime, archive: Archive | None) -> HourReport:
        if self._stop.is_set():
            raise Interrupted("stop requested")
        started = time.monotonic()
        try:
            with self._store.hour(hour) as writer:
                counts = self._send_hour(hour, archive, writer)
                writer.commit(hour + HOUR, counts)
        except ConnectorError as exc:
            if not isinstance(exc, Interrupted):
                self._metrics.hours.labels("failed").inc()
            raise
        report = HourReport(hour, counts, time.monotonic() - started)
        self._after_hour(report)
        return report

    def _send_hour(self, hour: datetime, archive: Archive | None, writer: HourWriter) -> HourCounts:
        historical = self._clock() - (hour + HOUR) > HISTORICAL_AGE
        ctx = TranslateContext(hour, self._config.events_to_ignore)
        counts = HourCounts()
        blocks = archive.blocks(hour) if archive is not None else ()
        for translated in self._translator.map(blocks, ctx, historical):
            if self._stop.is_set():
                raise Interrupted(f"stop requested during hour {hour_param(hour)}")
            result = translated.result
            counts.events_read += result.read
            counts.ignored += result.ignored
            self._reject(writer, result.rejections, counts)
            self._send_identities(translated, writer, historical, counts)
            self._send_events(translated, writer, counts)
            self._metrics.events_read.inc(result.read)
            self._metrics.events_ignored.inc(result.ignored)
        return counts

    def _send_identities(self, translated: TranslatedBlock, writer: HourWriter, historical: bool,
                         counts: HourCounts) -> None:
        identities = plan_identities(translated.result.merges, translated.result.groups, writer)
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

    def _send_events(self, translated: TranslatedBlock, writer: HourWriter, counts: HourCounts) -> None:
        first = 0
        for batch in translated.batches():
            refused = self._sink.send(batch)
            self._reject(writer, [Rejection(r.reason, r.detail, translated.line_of(first + r.index)) for r in refused],
                         counts)
            counts.events_sent += batch.count - len(refused)
            self._metrics.events_sent.inc(batch.count - len(refused))
            first += batch.count
            self._on_progress()

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
