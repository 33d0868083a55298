"""PostHog sink: sends batches to `{host}/batch/` and confirms each one.

The wire contract comes from the `posthog` package (its `/batch/` endpoint,
user agent and request shape), but the package's client is not used to send:
`Posthog.capture()` overwrites `$os` with this machine's, drops events silently
when its queue fills or a batch fails, and `batch_post` re-serializes every event
and stamps `sent_at`, which makes PostHog shift timestamps by this machine's
clock error. Here every batch is confirmed: `send` returns only when PostHog
accepted each event, or says which ones it refused and why.

What PostHog's answers mean (each attempt; `retry.retrying` repeats the
transient ones with backoff). Only answers that prove they are capture's count:
capture answers success with JSON `{"status": "Ok"}` (older PostHog: `{"status": 1}`)
and refuses with a plain-text message of its own (rust/capture/src/api.rs;
older PostHog: a JSON `validation_error`).

| answer                                        | meaning                                                  |
|-----------------------------------------------|----------------------------------------------------------|
| 200 with capture's success JSON               | accepted                                                 |
| 200 with anything else (HTML, empty, ...)     | `EndpointRefused`: not capture (a login wall, a default site); stop, keep the cursor |
| 400 / 413 in capture's own words              | split in halves until the offending events are alone; those are refused, the rest delivered |
| 400 / 413 in other words (a proxy's page)     | `EndpointRefused`: stop, keep the cursor (a proxy's limits; BATCH_SIZE) |
| every event of a batch refused alone          | `EndpointRefused`: PostHog (or a proxy) refuses everything |
| 3xx                                           | `WrongEndpoint`: never followed (a redirected POST loses its body, and another host must not get the key); names the Location |
| 401 / 403                                     | `AuthError`: fix POSTHOG_PROJECT_API_KEY                 |
| 404                                           | `WrongEndpoint`: POSTHOG_HOST does not serve /batch/     |
| 408, 429, 5xx, timeouts, refused connections  | `PostHogUnavailable`: retry (Retry-After honoured)       |

A timeout is a deadline for the whole request (`deadline.py`), so a peer that
trickles bytes cannot hold a request longer than POSTHOG_TIMEOUT_SECONDS.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Callable, Protocol
from urllib.parse import urljoin, urlsplit

import requests
from posthog.request import EVENTS_ENDPOINT, USER_AGENT

from . import deadline
from .batches import Batch, make_batch
from .clock import http_date
from .config import Secret
from .errors import AuthError, EndpointRefused, Interrupted, PostHogUnavailable, WrongEndpoint
from .redact import Redactor, snippet
from .retry import Backoff, retry_after_seconds, retrying

# The first words of capture's refusals (rust/capture/src/api.rs, CaptureError's messages).
_CAPTURE_REFUSALS = (
    "failed to decode request", "failed to parse request", "failed to hydrate events", "request holds no event",
    "request missing data payload", "event submitted with", "event submitted without", "maximum event size exceeded",
    "invalid event could not be processed", "replay event",
)


def capture_accepted(response: requests.Response) -> bool:
    """True when a 200 is capture's own success answer."""
    try:
        body = response.json()
    except ValueError:
        return False
    return isinstance(body, dict) and body.get("status") in (1, "Ok")


def capture_refusal(response: requests.Response) -> str | None:
    """Capture's own words when it refused the request; None when the answer is not capture's."""
    text = response.text.strip()
    if text.startswith(_CAPTURE_REFUSALS):
        return text
    if "json" in response.headers.get("Content-Type", ""):
        try:
            body = json.loads(text)
        except ValueError:
            return None
        if isinstance(body, dict) and body.get("type") == "validation_error" and body.get("detail"):
            return str(body["detail"])
    return None


def redirect_hint(response: requests.Response, url: str, endpoint: str) -> str:
    """What to set instead, from a redirect's Location (the base URL, without `endpoint`)."""
    location = urljoin(url, response.headers.get("Location", ""))
    parts = urlsplit(location)
    base = location[: -len(endpoint)] if parts.path.endswith(endpoint) else f"{parts.scheme}://{parts.netloc}"
    return base.rstrip("/")


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
        on_date: Callable[[datetime], None] = lambda served_at: None,
    ):
        self._session = deadline.install(session)
        self._url = host.rstrip("/") + EVENTS_ENDPOINT
        self._api_key = api_key
        self._redact = Redactor([api_key.reveal()])
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._backoff = backoff
        self._timeout = timeout
        self._limiter = limiter or RateLimiter(0)
        self._on_retry = on_retry
        self._on_accepted = on_accepted
        self._on_date = on_date
        self._headers = {
            "Content-Type": "application/json",
            "Content-Encoding": "gzip",
            "User-Agent": f"{USER_AGENT} amplitude-posthog-connector",
        }

    def send(self, batch: Batch) -> list[Refused]:
        """Deliver `batch`; return the events PostHog refused for good (usually none)."""
        self._limiter.acquire(batch.count)
        refused = self._send(batch, 0)
        if batch.count > 1 and len(refused) == batch.count:
            raise EndpointRefused(
                f"PostHog's /batch/ refused each of the {batch.count} events of a batch on its own "
                f"({refused[0].detail}): it refuses everything, so nothing is marked rejected and the cursor stays. "
                "Check POSTHOG_HOST and any proxy in front of PostHog"
            )
        return refused

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

    def _post(self, body: bytes, content_type: str = "application/json", encoding: str = "gzip") -> requests.Response:
        headers = {**self._headers, "Content-Type": content_type, "Content-Encoding": encoding}
        try:
            with deadline.whole_request(self._timeout):
                response = self._session.post(self._url, data=body, headers=headers, timeout=self._timeout,
                                              allow_redirects=False)
        except requests.Timeout:
            raise PostHogUnavailable(f"PostHog gave no complete answer within {self._timeout:g} s", cause="timeout") from None
        except requests.RequestException as exc:
            raise PostHogUnavailable(f"cannot reach PostHog ({type(exc).__name__})", cause="connection") from None
        served_at = http_date(response.headers.get("Date"))
        if served_at is not None:
            self._on_date(served_at)
        return response

    def _attempt(self, body: bytes) -> tuple[int, str]:
        """One POST: (status, capture's words) for accepted or refused; raises for everything else."""
        response = self._post(body)
        status = response.status_code
        if status == 200:
            if capture_accepted(response):
                return 200, ""
            raise EndpointRefused(
                f"{self._url} answered 200 with something that is not PostHog's capture answer "
                f"({self._describe(response)}): a login wall or another site in front of PostHog? Nothing counts "
                "as delivered; the cursor stays"
            )
        if status in (400, 413):
            words = capture_refusal(response)
            if words is None:
                raise EndpointRefused(
                    f"{self._url} answered {status} with something that is not PostHog's ({self._describe(response)}): "
                    + ("a proxy in front of PostHog limits request bodies: raise its limit (PostHog takes 20 MB) or "
                       "lower BATCH_SIZE" if status == 413 else
                       "a proxy in front of PostHog refuses the requests (headers or body too large?): check it, "
                       "or lower BATCH_SIZE")
                    + ". Nothing is marked rejected; the cursor stays"
                )
            return status, self._redact(words)
        if 300 <= status < 400:
            base = redirect_hint(response, self._url, EVENTS_ENDPOINT)
            raise WrongEndpoint(
                f"PostHog answered {status} redirecting {self._url} to {response.headers.get('Location', '?')}: "
                f"a POST is never followed (it would lose its body, and another host must not get the project key). "
                f"Set POSTHOG_HOST={base}"
            )
        if status in (401, 403):
            raise AuthError(
                f"PostHog refused the project API key ({status}): check POSTHOG_PROJECT_API_KEY and POSTHOG_HOST"
            )
        if status == 404:
            raise WrongEndpoint(f"{self._url} answered 404: POSTHOG_HOST must be where PostHog's capture serves "
                                f"{EVENTS_ENDPOINT} (on a self-hosted PostHog: the proxy, or http://capture:3000)")
        cause = "rate_limited" if status == 429 else "server_error"
        raise PostHogUnavailable(f"PostHog answered {status}", retry_after_seconds(response.headers.get("Retry-After")), cause=cause)

    def _describe(self, response: requests.Response) -> str:
        kind = response.headers.get("Content-Type", "no content type")
        return f"{kind}, {len(response.content)} bytes: {snippet(response.text, self._redact, 80)!r}"

    def probe(self) -> dict:
        """For `check`: POST an empty batch, which capture refuses in its own words
        ("request holds no event"). Anything else says what POSTHOG_HOST reaches."""
        body = json.dumps({"api_key": self._api_key.reveal(), "batch": []}).encode()
        result: dict = {"url": self._url}
        try:
            response = self._post(body, encoding="identity")
        except PostHogUnavailable as exc:
            return {**result, "ok": False, "error": str(exc)}
        status = result["status"] = response.status_code
        if status in (400, 200) and (capture_refusal(response) is not None or capture_accepted(response)):
            return {**result, "ok": True}
        result["ok"] = False
        if status in (401, 403):
            result["hint"] = "PostHog refused the project API key: check POSTHOG_PROJECT_API_KEY"
        elif 300 <= status < 400:
            result["hint"] = (f"redirects to {response.headers.get('Location', '?')}; POSTs are not followed: "
                              f"set POSTHOG_HOST={redirect_hint(response, self._url, EVENTS_ENDPOINT)}")
        elif status >= 500:
            result["hint"] = "PostHog is failing (5xx); try again later"
        else:
            result["hint"] = (f"POSTHOG_HOST answers {EVENTS_ENDPOINT} with something that is not PostHog's capture "
                              f"service ({self._describe(response)}). On a self-hosted PostHog, capture is served by "
                              "the proxy or http://capture:3000, not by http://web:8000")
        return result


class PrintSink:
    """`sync --dry-run`: writes each event as a JSON line and accepts everything."""

    def __init__(self, out):
        self._out = out

    def send(self, batch: Batch) -> list[Refused]:
        for event in batch.events():
            self._out.write(event.decode("utf-8") + "\n")
        return []
