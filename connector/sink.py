"""PostHog sink: sends batches to `{host}/batch/` and confirms each one.

The wire contract comes from the `posthog` package (its `/batch/` endpoint,
user agent and request shape), but the package's client is not used to send:
`Posthog.capture()` overwrites `$os` with this machine's, drops events silently
when its queue fills or a batch fails, and `batch_post` re-serializes every event
and stamps `sent_at`, which makes PostHog shift timestamps by this machine's
clock error. Here every batch is confirmed: `send` returns only when PostHog
accepted each event, or says which ones it refused and why.

What PostHog's answers mean (each attempt; `retry.retrying` repeats the
transient ones with backoff):

| answer                                  | meaning                                                |
|-----------------------------------------|--------------------------------------------------------|
| 200                                     | accepted                                               |
| 400 / 413                               | split the batch in halves until the offending events are alone; those are refused, the rest delivered |
| 401 / 403                               | `AuthError`: fix POSTHOG_PROJECT_API_KEY               |
| 404                                     | `ConfigError`: POSTHOG_HOST is not PostHog's base URL  |
| 408, 429, 5xx, timeouts, refused connections | `PostHogUnavailable`: retry (Retry-After)         |
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Callable, Protocol

import requests
from posthog.request import EVENTS_ENDPOINT, USER_AGENT

from .batches import Batch, make_batch
from .config import Secret
from .errors import AuthError, ConfigError, Interrupted, PostHogUnavailable
from .retry import Backoff, retry_after_seconds, retrying


class RateLimiter:
    """At most `rate` events per second on average (0 = unlimited)."""

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], bool] = lambda s: False):
        self._rate = rate
        self._clock = clock
        self._sleep = sleep
        self._next = 0.0

    def acquire(self, events: int) -> None:
        if self._rate <= 0:
            return
        now = self._clock()
        start = max(now, self._next)
        self._next = start + events / self._rate
        if start > now and self._sleep(start - now):
            raise Interrupted("stopping while rate-limited")


@dataclass(frozen=True)
class Refused:
    """An event PostHog refused for good: its index in the batch and why."""

    index: int
    reason: str
    detail: str


class Sink(Protocol):
    def send(self, batch: Batch) -> list[Refused]:
        """Deliver the batch; return the events refused for good (usually none)."""


class PostHogSink:
    """Delivers batches to one PostHog project. Not thread-safe; one sender at a time."""

    def __init__(
        self,
        session: requests.Session,
        host: str,
        api_key: Secret,
        *,
        sleep: Callable[[float], bool],
        rng: random.Random | None = None,
        backoff: Backoff = Backoff(base=0.5, cap=60.0, attempts=10),
        timeout: float = 30.0,
        limiter: RateLimiter | None = None,
        on_retry: Callable[[str], None] = lambda cause: None,
        on_accepted: Callable[[], None] = lambda: None,
    ):
        self._session = session
        self._url = host.rstrip("/") + EVENTS_ENDPOINT
        self._api_key = api_key
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._backoff = backoff
        self._timeout = timeout
        self._limiter = limiter or RateLimiter(0)
        self._on_retry = on_retry
        self._on_accepted = on_accepted
        self._headers = {
            "Content-Type": "application/json",
            "Content-Encoding": "gzip",
            "User-Agent": f"{USER_AGENT} amplitude-posthog-connector",
        }

    def send(self, batch: Batch) -> list[Refused]:
        """Deliver `batch`; return the events PostHog refused for good (usually none)."""
        self._limiter.acquire(batch.count)
        return self._send(batch, 0)

    def _send(self, batch: Batch, offset: int) -> list[Refused]:
        status, text = retrying(
            lambda: self._attempt(batch.body),
            backoff=self._backoff,
            sleep=self._sleep,
            rng=self._rng,
            what="a PostHog /batch/ request",
            on_retry=self._on_retry,
        )
        if status == 200:
            self._on_accepted()
            return []
        reason = "posthog_rejected" if status == 400 else "too_large"
        if batch.count == 1:
            return [Refused(offset, reason, f"PostHog answered {status}: {text[:300]}")]
        events = batch.events()
        half = batch.count // 2
        key = self._api_key.reveal()
        first = make_batch(key, events[:half], batch.historical)
        second = make_batch(key, events[half:], batch.historical)
        return self._send(first, offset) + self._send(second, offset + half)

    def _attempt(self, body: bytes) -> tuple[int, str]:
        """One POST: (status, text) for 200/400/413; raises for everything else."""
        try:
            response = self._session.post(self._url, data=body, headers=self._headers, timeout=self._timeout)
        except requests.Timeout:
            raise PostHogUnavailable("PostHog did not answer in time", cause="timeout") from None
        except requests.RequestException as exc:
            raise PostHogUnavailable(f"cannot reach PostHog ({type(exc).__name__})", cause="connection") from None
        status = response.status_code
        if status in (200, 400, 413):
            return status, response.text
        if status in (401, 403):
            raise AuthError(
                f"PostHog refused the project API key ({status}): check POSTHOG_PROJECT_API_KEY and POSTHOG_HOST"
            )
        if status == 404:
            raise ConfigError(f"PostHog answered 404 for {EVENTS_ENDPOINT}: check that POSTHOG_HOST is PostHog's base URL")
        cause = "rate_limited" if status == 429 else "server_error"
        raise PostHogUnavailable(f"PostHog answered {status}", retry_after_seconds(response.headers.get("Retry-After")), cause=cause)

    def probe(self) -> dict:
        """For `check`: POST an empty batch. It may be refused as empty (400); only a
        wrong key, a wrong URL or a failing server fail the probe."""
        try:
            response = self._session.post(
                self._url, json={"api_key": self._api_key.reveal(), "batch": []}, timeout=self._timeout
            )
        except requests.RequestException as exc:
            return {"ok": False, "url": self._url, "error": type(exc).__name__}
        status = response.status_code
        result = {"ok": status < 500 and status not in (401, 403, 404), "status": status, "url": self._url}
        if status in (401, 403):
            result["hint"] = "check POSTHOG_PROJECT_API_KEY"
        return result


class PrintSink:
    """`sync --dry-run`: writes each event as a JSON line and accepts everything."""

    def __init__(self, out):
        self._out = out

    def send(self, batch: Batch) -> list[Refused]:
        for event in batch.events():
            self._out.write(event.decode("utf-8") + "\n")
        return []
