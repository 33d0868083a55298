"""The time the connector plans by: this machine's clock, checked against the servers'.

Whether an hour is due decides whether Amplitude's answer for it is final: an
hour asked for too early answers 404 (or misses rows), and taking that as
empty loses the hour for good. So the connector does not trust its own clock
alone. Every answer from Amplitude and PostHog carries a `Date`; `ServerClock`
keeps the latest offset of each (server minus local) and plans by the most
cautious of them: `now()` is this machine's time, or a server's time plus
TOLERANCE when that server's clock is behind by more than TOLERANCE. A clock
that is behind never makes an hour due early; a clock ahead is caught.

`skews()` reports each server's offset; `disagrees()` says when any is beyond
TOLERANCE, which the loop logs, shows in `status` and in `/metrics`.
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime, timedelta, timezone
from email.utils import parsedate_to_datetime
from typing import Callable

# HTTP dates have one-second resolution and answers take time to arrive:
# offsets this small are noise, and nothing here is finer than an hour anyway.
TOLERANCE = timedelta(minutes=5)

log = logging.getLogger("connector.clock")


def http_date(value: str | None) -> datetime | None:
    """An HTTP `Date` header as an aware UTC datetime; None if absent or unreadable."""
    if not value:
        return None
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return when.astimezone(timezone.utc) if when.tzinfo else when.replace(tzinfo=timezone.utc)


class ServerClock:
    """Now, as cautious as the servers' clocks require. Thread-safe (downloads run ahead)."""

    def __init__(self, local: Callable[[], datetime], tolerance: timedelta = TOLERANCE):
        self._local = local
        self._tolerance = tolerance
        self._offsets: dict[str, timedelta] = {}
        self._lock = threading.Lock()

    def observe(self, source: str, served_at: datetime) -> None:
        """`source` (e.g. "amplitude") answered with this `Date`. Logs when its clock
        starts or stops disagreeing with this machine's."""
        offset = served_at - self._local()
        with self._lock:
            before = self._offsets.get(source)
            self._offsets[source] = offset
        was_off = before is not None and abs(before) > self._tolerance
        if abs(offset) > self._tolerance and not was_off:
            log.warning("clocks disagree: hours are judged by the more cautious clock", extra={
                "server": source, "server_ahead_s": round(offset.total_seconds()),
                "tolerance_s": int(self._tolerance.total_seconds())})
        elif was_off and abs(offset) <= self._tolerance:
            log.info("clocks agree again", extra={"server": source})

    def now(self) -> datetime:
        local = self._local()
        with self._lock:
            behind = min(self._offsets.values(), default=timedelta(0))
        if behind < -self._tolerance:
            return local + behind + self._tolerance
        return local

    def __call__(self) -> datetime:
        return self.now()

    def skews(self) -> dict[str, float]:
        """Seconds each server's clock is ahead (+) or behind (-) this machine's."""
        with self._lock:
            return {source: round(offset.total_seconds(), 1) for source, offset in self._offsets.items()}

    def disagrees(self) -> dict[str, float]:
        """The skews beyond the tolerance (empty when the clocks agree)."""
        limit = self._tolerance.total_seconds()
        return {source: skew for source, skew in self.skews().items() if abs(skew) > limit}
