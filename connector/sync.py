"""The sync loop: the cursor walks Amplitude's hours, oldest first.

An hour H is due once it ended `exportDelayHours` ago (H + 1h + delay <= now)
and is before `endDate`. For each due hour, in order: download its export (the
next window downloads in the background meanwhile), translate it, send merges,
group updates and events, and only when PostHog accepted all of them commit the
cursor (H + 1h), the merge history and the hour's rejections in one transaction.
Anything that goes wrong before that commit leaves the cursor at H, and the
whole hour is redone later with the same uuids, which PostHog deduplicates.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from multiprocessing import get_context
from typing import Callable, Iterable, Iterator

import orjson

from .batches import MAX_BATCH_EVENTS, make_batches
from .config import Config
from .errors import ConnectorError, HourTooLarge, Interrupted, OperatorActionNeeded
from .export import Archive, ExportClient, OversizedLine, RangeTooLarge, hour_param
from .metrics import Metrics
from .sink import Sink
from .store import HourStats, HourTransaction, StateStore, StoredRejection
from .worker import Translated, init_worker, translate_and_encode
from .translate import (
    BlockResult,
    GroupUpdate,
    Merge,
    TranslateContext,
    group_uuid,
    merge_uuid,
    properties_digest,
    translate_block,
)

HOUR = timedelta(hours=1)
# PostHog routes events older than this to its historical lane.
HISTORICAL_AGE = timedelta(hours=48)
MAX_WINDOW_HOURS = 6

log = logging.getLogger("connector.sync")


def floor_hour(moment: datetime) -> datetime:
    return moment.astimezone(timezone.utc).replace(minute=0, second=0, microsecond=0)


def due_limit(config: Config, now: datetime) -> datetime:
    """The first hour that is not due at `now`: hour H is due once H + 1h + delay <= now,
    and only before END_DATE."""
    limit = floor_hour(now - config.export_delay)
    if config.end_hour is not None:
        limit = min(limit, config.end_hour)
    return limit


@dataclass
class HourReport:
    hour: datetime
    stats: HourStats
    seconds: float


class Translator:
    """Maps blocks to `Translated`, in order, inline or on a pool of processes."""

    def __init__(self, workers: int, api_key: str, batch_size: int = MAX_BATCH_EVENTS):
        self._api_key = api_key
        self._batch_size = batch_size
        self._workers = workers
        self._pool = (
            ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=init_worker)
            if workers > 1
            else None
        )

    def map(
        self, items: Iterable[bytes | OversizedLine], ctx: TranslateContext, historical: bool
    ) -> Iterator[tuple[bytes | OversizedLine, Translated | None]]:
        if self._pool is None:
            for item in items:
                if isinstance(item, OversizedLine):
                    yield item, None
                else:
                    yield item, translate_and_encode(item, ctx, self._api_key, historical, self._batch_size)
            return
        # Keep every worker busy while the main thread sends, but hold only a
        # bounded number of blocks in memory.
        inflight: deque[tuple[bytes | OversizedLine, Future | None]] = deque()
        try:
            for item in items:
                if isinstance(item, OversizedLine):
                    inflight.append((item, None))
                else:
                    inflight.append((item, self._pool.submit(
                        translate_and_encode, item, ctx, self._api_key, historical, self._batch_size, False
                    )))
                while len(inflight) > 2 * self._workers:
                    block, future = inflight.popleft()
                    yield block, future.result() if future else None
            while inflight:
                block, future = inflight.popleft()
                yield block, future.result() if future else None
        finally:
            for _, future in inflight:
                if future:
                    future.cancel()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


class Prefetch:
    """A download running in a daemon thread, so a stopping process never waits for it."""

    def __init__(self, download: Callable[[datetime, datetime], tuple[Archive | None, datetime]], start: datetime, end: datetime):
        self._done = threading.Event()
        self._value: tuple[Archive | None, datetime] | None = None
        self._error: BaseException | None = None
        self._discarded = False
        self._lock = threading.Lock()
        threading.Thread(target=self._run, args=(download, start, end), name="export-prefetch", daemon=True).start()

    def _run(self, download, start, end) -> None:
        try:
            value = download(start, end)
        except BaseException as exc:  # handed to whoever asks for the result
            self._error = exc
        else:
            with self._lock:
                if self._discarded and value[0] is not None:
                    value[0].close()
                self._value = value
        self._done.set()

    def result(self) -> tuple[Archive | None, datetime]:
        self._done.wait()
        if self._error is not None:
            raise self._error
        assert self._value is not None
        return self._value

    def discard(self) -> None:
        """Drop the download; its archive is deleted whenever it arrives."""
        with self._lock:
            self._discarded = True
            if self._value is not None and self._value[0] is not None:
                self._value[0].close()


class Syncer:
    """Processes due hours. Everything it touches is injected.

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

    # -- the plan -------------------------------------------------------------

    def due_limit(self, now: datetime) -> datetime:
        return due_limit(self._config, now)

    def cursor(self) -> datetime:
        """The stored cursor; on the very first run, startDate or the newest ready hour."""
        cursor = self._store.cursor()
        if cursor is None:
            start = self._config.start_hour or floor_hour(self._clock() - self._config.export_delay) - HOUR
            self._store.set_initial_cursor(start)
            cursor = self._store.cursor() or start
        return cursor

    def backlog(self, now: datetime | None = None) -> int:
        now = now or self._clock()
        return max(0, int((self.due_limit(now) - self.cursor()) / HOUR))

    def finished(self) -> bool:
        """True when endDate is set and the cursor reached it: nothing will ever be due."""
        end = self._config.end_hour
        return end is not None and self.cursor() >= end

    # -- the work -------------------------------------------------------------

    def sync_due(self, max_hours: int | None = None) -> list[HourReport]:
        """Deliver every due hour (at most `max_hours`), oldest first.

        Raises on the first hour that fails; the hours before it stay delivered.
        """
        reports: list[HourReport] = []
        ahead: tuple[datetime, Prefetch] | None = None
        stop_at = self.cursor() + max_hours * HOUR if max_hours is not None else None
        try:
            while not self._stop.is_set():
                cursor = self.cursor()
                limit = self.due_limit(self._clock())
                if stop_at is not None:
                    limit = min(limit, stop_at)
                self._update_gauges(cursor)
                if cursor >= limit:
                    break
                window_end = min(cursor + (MAX_WINDOW_HOURS - 1) * HOUR, limit - HOUR)
                if ahead and ahead[0] == cursor:
                    future = ahead[1]
                else:
                    self._discard(ahead)
                    future = Prefetch(self._download, cursor, window_end)
                ahead = None
                archive, last = future.result()
                try:
                    if last + HOUR < limit:
                        next_end = min(last + MAX_WINDOW_HOURS * HOUR, limit - HOUR)
                        ahead = (last + HOUR, Prefetch(self._download, last + HOUR, next_end))
                    for hour in _hours(cursor, last):
                        if self._stop.is_set():
                            raise Interrupted("stop requested")
                        try:
                            reports.append(self._process_hour(hour, archive))
                        except ConnectorError as exc:
                            if not isinstance(exc, Interrupted):
                                self._metrics.hours.labels("failed").inc()
                            raise
                finally:
                    if archive is not None:
                        archive.close()
        finally:
            self._discard(ahead)
        if self._stop.is_set():
            raise Interrupted("stop requested")
        return reports

    def _discard(self, ahead: tuple[datetime, "Prefetch"] | None) -> None:
        if ahead is not None:
            ahead[1].discard()

    def _download(self, start: datetime, end: datetime) -> tuple[Archive | None, datetime]:
        """The archive for start..end and the last hour it really covers.

        Amplitude's 400 on a range splits it: the first hour is fetched alone and
        the rest is planned again. A single hour that still gets 400 stops the sync.
        """
        try:
            archive = self._export.download(start, end)
        except RangeTooLarge:
            if start == end:
                raise HourTooLarge(
                    f"Amplitude refuses to export hour {hour_param(start)} (400: over its 4 GB export limit). "
                    "It cannot be imported through the Export API: export it with Amplitude's Amazon S3 export "
                    "and import it separately. The cursor stays at this hour; nothing after it is imported until then."
                ) from None
            return self._download(start, start)
        if archive is not None:
            self._metrics.export_bytes.inc(archive.size)
            if start != end:
                try:
                    for hour in _hours(start, end):
                        archive.members_for(hour)
                except RangeTooLarge:
                    archive.close()
                    return self._download(start, start)
        return archive, end

    def _process_hour(self, hour: datetime, archive: Archive | None) -> HourReport:
        started = time.monotonic()
        now = self._clock()
        historical = now - (hour + HOUR) > HISTORICAL_AGE
        ctx = TranslateContext(hour, self._config.events_to_ignore)
        counts = dict.fromkeys(
            ("events_read", "events_sent", "merges_sent", "groups_sent", "rejected", "ignored", "merge_conflicts"), 0
        )
        blocks: Iterable[bytes | OversizedLine] = archive.blocks(hour) if archive is not None else ()
        with self._store.hour(hour) as txn:
            for block, translated in self._translator.map(blocks, ctx, historical):
                if self._stop.is_set():
                    raise Interrupted(f"stop requested during hour {hour_param(hour)}")
                if translated is None:
                    assert isinstance(block, OversizedLine)
                    counts["events_read"] += 1
                    self._reject(txn, hour, [StoredRejection(hour, "too_large", f"the line is {block.length} bytes", block.prefix)], counts)
                    continue
                assert isinstance(block, bytes)
                result = translated.result
                counts["events_read"] += result.read
                counts["ignored"] += result.ignored
                self._reject(
                    txn, hour, [StoredRejection(hour, r.reason, r.detail, r.raw) for r in result.rejections], counts
                )
                merge_events, new_links = self._plan_merges(result.merges, txn, counts)
                group_events, new_digests = self._plan_groups(result.groups, txn)
                if merge_events or group_events:
                    key = self._config.posthog_project_api_key.reveal()
                    for batch in make_batches(key, merge_events + group_events, historical, max_events=self._config.batch_size):
                        refused = self._sink.send(batch)
                        if refused:
                            # Merges and group updates are built here from valid ids; a refusal
                            # means PostHog changed its rules: stop rather than lose persons.
                            raise OperatorActionNeeded(f"PostHog refused a merge or group event: {refused[0].detail}")
                    # Recorded only now that PostHog has accepted them.
                    txn.link(new_links)
                    txn.set_group_digests(new_digests)
                    counts["merges_sent"] += len(new_links)
                    counts["groups_sent"] += len(new_digests)
                    self._metrics.merges_sent.inc(len(new_links))
                offset = 0
                again: BlockResult | None = None

                def rebuilt() -> BlockResult:
                    nonlocal again
                    if again is None:
                        again = translate_block(block, ctx) if not result.lines else result
                    return again

                for batch in translated.batches:
                    first = offset
                    refused = self._sink.send(batch, lambda: rebuilt().events[first : first + batch.count])
                    if refused:
                        lines = block.split(b"\n")
                        self._reject(
                            txn,
                            hour,
                            [StoredRejection(hour, r.reason, r.detail, lines[rebuilt().lines[first + r.index]]) for r in refused],
                            counts,
                        )
                    counts["events_sent"] += batch.count - len(refused)
                    self._metrics.events_sent.inc(batch.count - len(refused))
                    offset += batch.count
                    self._on_progress()
                self._metrics.events_read.inc(result.read)
                self._metrics.events_ignored.inc(result.ignored)
            stats = HourStats(**counts, empty=counts["events_read"] == 0)
            txn.commit(hour + HOUR, stats)
        seconds = time.monotonic() - started
        self._after_hour(hour, stats, seconds)
        return HourReport(hour, stats, seconds)

    def _reject(self, txn: HourTransaction, hour: datetime, rejections: list[StoredRejection], counts: dict) -> None:
        if not rejections:
            return
        txn.reject(rejections)
        counts["rejected"] += len(rejections)
        for r in rejections:
            self._metrics.events_rejected.labels(r.reason).inc()

    def _plan_merges(
        self, merges: list[Merge], txn: HourTransaction, counts: dict
    ) -> tuple[list[bytes], list[tuple[str, str]]]:
        """Merge events for device/user pairs never merged before, and those pairs.

        `merges` holds each pair of a block once, in order of first appearance,
        with its earliest timestamp. A device already merged into another user
        is not merged again: it is counted.
        """
        if not merges:
            return [], []
        first: dict[str, Merge] = {}
        for merge in merges:
            first.setdefault(merge.device_id, merge)
        known = txn.linked_users(first)
        new = [m for device, m in first.items() if device not in known]
        linked = {**known, **{m.device_id: m.user_id for m in new}}
        conflicts = sum(1 for m in merges if linked[m.device_id] != m.user_id)
        counts["merge_conflicts"] += conflicts
        self._metrics.merge_conflicts.inc(conflicts)
        events = [
            orjson.dumps(
                {
                    "event": "$create_alias",
                    "distinct_id": m.user_id,
                    "uuid": merge_uuid(m.device_id, m.user_id),
                    # No later than the earliest event of this block that showed the pair.
                    "timestamp": m.timestamp,
                    "properties": {
                        "alias": m.device_id,
                        "distinct_id": m.user_id,
                        "$lib": "amplitude-posthog-connector",
                        "$geoip_disable": True,
                        "$ignore_sent_at": True,
                    },
                }
            )
            for m in new
        ]
        return events, [(m.device_id, m.user_id) for m in new]

    def _plan_groups(
        self, updates: list[GroupUpdate], txn: HourTransaction
    ) -> tuple[list[bytes], dict[tuple[str, str], str]]:
        """`$groupidentify` events for groups whose properties changed since last sent."""
        if not updates:
            return [], {}
        latest = {(u.group_type, u.group_key): u for u in updates}
        known = txn.group_digests(latest)
        digests = {key: properties_digest(u.properties) for key, u in latest.items()}
        changed = {key: digest for key, digest in digests.items() if known.get(key) != digest}
        events = [
            orjson.dumps(
                {
                    "event": "$groupidentify",
                    "distinct_id": f"${group_type}_{group_key}",
                    "uuid": group_uuid(group_type, group_key, digest, latest[(group_type, group_key)].timestamp),
                    "timestamp": latest[(group_type, group_key)].timestamp,
                    "properties": {
                        "$group_type": group_type,
                        "$group_key": group_key,
                        "$group_set": latest[(group_type, group_key)].properties,
                        "$lib": "amplitude-posthog-connector",
                        "$geoip_disable": True,
                        "$ignore_sent_at": True,
                    },
                }
            )
            for (group_type, group_key), digest in changed.items()
        ]
        return events, changed

    def _after_hour(self, hour: datetime, stats: HourStats, seconds: float) -> None:
        self._metrics.hours.labels("empty" if stats.empty else "done").inc()
        self._seconds_per_hour = (
            seconds if self._seconds_per_hour is None else 0.8 * self._seconds_per_hour + 0.2 * seconds
        )
        backlog = self.backlog()
        self._update_gauges(hour + HOUR)
        self._on_progress()
        log.info(
            "hour delivered",
            extra={
                "hour": hour.strftime("%Y-%m-%dT%H:00Z"),
                "events": stats.events_read,
                "sent": stats.events_sent,
                "rejected": stats.rejected,
                "ignored": stats.ignored,
                "merges": stats.merges_sent,
                "merge_conflicts": stats.merge_conflicts,
                "groups": stats.groups_sent,
                "duration_s": round(seconds, 3),
                "events_per_s": round(stats.events_read / seconds, 1) if seconds > 0 else None,
                "backlog_hours": backlog,
                "eta_s": round(backlog * self._seconds_per_hour) if backlog else 0,
            },
        )

    def _update_gauges(self, cursor: datetime) -> None:
        now = self._clock()
        self._metrics.cursor.set(cursor.timestamp())
        self._metrics.lag.set(max(0.0, (now - cursor).total_seconds()))
        self._metrics.backlog.set(max(0, int((self.due_limit(now) - cursor) / HOUR)))


def _hours(start: datetime, end: datetime) -> Iterator[datetime]:
    hour = start
    while hour <= end:
        yield hour
        hour += HOUR
