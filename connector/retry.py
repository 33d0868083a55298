"""The one retry policy: exponential backoff with full jitter, Retry-After as a floor.

Both HTTP clients (the Amplitude export and the PostHog sink) run their
attempts through `retrying`. Each client decides what its own answers mean
(a small table in its module) and raises `RetryLater` for the transient ones;
everything else passes through at once.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Callable, TypeVar

from .errors import Interrupted, RetryLater

T = TypeVar("T")

# A server asking for more than this is not waited for in one go: the attempt
# after it will ask again.
MAX_RETRY_AFTER = 900.0


@dataclass(frozen=True)
class Backoff:
    """Attempt n (from 0) waits uniformly in [0, min(cap, base * 2**n)], at least Retry-After."""

    base: float = 1.0
    cap: float = 120.0
    attempts: int = 7

    def delay(self, attempt: int, rng: random.Random, retry_after: float | None = None) -> float:
        delay = rng.uniform(0, min(self.cap, self.base * 2**attempt))
        if retry_after is not None:
            delay = max(delay, min(retry_after, MAX_RETRY_AFTER))
        return delay


def retry_after_seconds(value: str | None, now: datetime | None = None) -> float | None:
    """A Retry-After header (seconds or an HTTP date) as seconds from `now`; None if absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    now = now or datetime.now(timezone.utc)
    return max(0.0, (when - now).total_seconds())


def retrying(
    attempt: Callable[[], T],
    *,
    backoff: Backoff,
    sleep: Callable[[float], bool],
    rng: random.Random,
    what: str,
    on_retry: Callable[[str], None] = lambda cause: None,
) -> T:
    """Call `attempt` until it returns, retrying on `RetryLater` up to `backoff.attempts` times.

    `sleep(seconds)` waits and returns True when the process is stopping, which
    ends the retries with `Interrupted`. After the last attempt the last error
    is raised again, as its own type, with `what` and the attempt count in front.
    """
    last: RetryLater | None = None
    for n in range(backoff.attempts):
        if last is not None:
            on_retry(last.cause)
            if sleep(backoff.delay(n - 1, rng, last.retry_after)):
                raise Interrupted(f"stopping during a retry of {what}")
        try:
            return attempt()
        except RetryLater as exc:
            last = exc
    assert last is not None, "Backoff.attempts must be at least 1"
    raise type(last)(f"{what} failed {backoff.attempts} times; last: {last}", cause=last.cause) from last
