"""PostHog sink: sends serialized events to `{host}/batch/` and confirms each batch.

The wire contract comes from the `posthog` package (its `/batch/` endpoint,
user agent and request shape), but the package's client is not used to send:
`Posthog.capture()` overwrites `$os` with this machine's, drops events silently
when its queue fills or a batch fails, and `batch_post` re-serializes every event
and stamps `sent_at`, which makes PostHog shift timestamps by this machine's
clock error. Here every batch is confirmed: `send` returns only when PostHog
accepted each event, or says which ones it refused and why.

- 200: accepted.
- 400 / 413: the batch is split in halves until the offending events are
  alone; those are returned as rejected, the rest is delivered.
- 401 / 403 / 404: `AuthError` / `ConfigError` (fix POSTHOG_* settings).
- 408, 429, 5xx, timeouts, refused connections: retried with backoff
  (Retry-After honoured); after the last attempt `PostHogUnavailable`.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import requests
from posthog.request import EVENTS_ENDPOINT, USER_AGENT

from .batches import Batch, encode_batch
from .config import Secret
from .errors import AuthError, ConfigError, Interrupted, PostHogUnavailable
from .export import Backoff, retry_after_seconds

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


Events = Callable[[], Sequence[bytes]]


class Sink(Protocol):
    def send(self, batch: Batch, events: Events | None = None) -> list["Refused"]:
        """Deliver the batch; return the events refused for good. `events()` gives the
        batch's events when the batch carries only its body and must be split."""


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
        on_request: Callable[[int, int], None] = lambda events, nbytes: None,
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
        self._on_request = on_request
        self._headers = {
            "Content-Type": "application/json",
            "Content-Encoding": "gzip",
            "User-Agent": f"{USER_AGENT} amplitude-posthog-connector",
        }

    def send(self, batch: Batch, events: Events | None = None) -> list[Refused]:
        """Deliver `batch`; return the events PostHog refused for good (usually none)."""
        self._limiter.acquire(batch.count)
        return self._send(batch, 0, events)

    def _send(self, batch: Batch, offset: int, events: Events | None = None) -> list[Refused]:
        body = batch.body if batch.body is not None else encode_batch(self._api_key.reveal(), batch.events, batch.historical)
        status, text = self._post(body, batch.count)
        if status == 200:
            return []
        if status in (400, 413):
            reason = "posthog_rejected" if status == 400 else "too_large"
            if batch.count == 1:
                return [Refused(offset, reason, f"PostHog answered {status}: {text[:300]}")]
            whole = batch.events or (tuple(events()) if events else ())
            if len(whole) != batch.count:
                raise AssertionError("a refused batch must come with its events to be split")
            half = batch.count // 2
            first = Batch(whole[:half], batch.historical)
            second = Batch(whole[half:], batch.historical)
            return self._send(first, offset) + self._send(second, offset + half)
        raise AssertionError(status)  # _post raises for every other status

    def _post(self, body: bytes, events: int) -> tuple[int, str]:
        last: PostHogUnavailable | None = None
        for attempt in range(self._backoff.attempts):
            if attempt:
                assert last is not None
                self._on_retry(last.cause)
                if self._sleep(self._backoff.delay(attempt - 1, self._rng, last.retry_after)):
                    raise Interrupted("stopping during a PostHog retry")
            try:
                response = self._session.post(self._url, data=body, headers=self._headers, timeout=self._timeout)
            except requests.Timeout:
                last = PostHogUnavailable("PostHog did not answer in time", cause="timeout")
                continue
            except requests.RequestException as exc:
                last = PostHogUnavailable(f"cannot reach PostHog ({type(exc).__name__})", cause="connection")
                continue
            status = response.status_code
            self._on_request(events, len(body))
            if status in (200, 400, 413):
                return status, response.text
            if status in (401, 403):
                raise AuthError(
                    f"PostHog refused the project API key ({status}): check POSTHOG_PROJECT_API_KEY and POSTHOG_HOST"
                )
            if status == 404:
                raise ConfigError(f"PostHog answered 404 for {EVENTS_ENDPOINT}: check that POSTHOG_HOST is PostHog's base URL")
            cause = "rate_limited" if status == 429 else "server_error"
            last = PostHogUnavailable(
                f"PostHog answered {status}", retry_after_seconds(response.headers.get("Retry-After")), cause=cause
            )
        assert last is not None
        raise PostHogUnavailable(f"PostHog did not accept a batch after {self._backoff.attempts} attempts; last: {last}", cause=last.cause)


class PrintSink:
    """`sync --dry-run`: writes each event as a JSON line and accepts everything."""

    def __init__(self, out):
        self._out = out

    def send(self, batch: Batch, events: Events | None = None) -> list[Refused]:
        for event in batch.events or (events() if events else ()):
            self._out.write(event.decode("utf-8") + "\n")
        return []
