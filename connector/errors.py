"""The connector's one exception tree, split by what the caller does next.

    ConnectorError
    ├── ConfigError            fix the configuration; `sync` exits with status 2, `run` after
    │   │                      the answer persisted (see service.py)
    │   ├── AuthError          keys, project key or region are wrong (401/403)
    │   └── WrongEndpoint      a URL reaches something else: a redirect, a 404 that is not
    │                          Amplitude's or PostHog's (names the variable to fix)
    ├── RetryLater             a transient fault; the same work is retried later
    │   ├── ExportUnavailable  Amplitude answered 429/5xx/timeout/garbage
    │   ├── PostHogUnavailable PostHog answered 429/5xx/timeout or refused the connection
    │   ├── QueryUnavailable   PostHog's query API (read-back) did not answer usefully this time
    │   ├── StoreUnavailable   the PostgreSQL state store did not answer (restart, network); the hour is redone
    │   └── ClockAhead         an hour is due by this machine's clock, not by the servers'
    ├── OperatorActionNeeded   retrying the same way cannot help; a person must act
    │   ├── HourTooLarge       a single hour is over the Export API's 4 GB limit
    │   ├── StateError         the state store is missing, unwritable, full or locked
    │   ├── UnexpectedArchive  an export that does not look like Amplitude's
    │   └── EndpointRefused    /batch/ answers in words that are not capture's (a login wall's
    │                          200, a proxy's 400/413), or refuses every event alone
    ├── LeaseLost              another connector works this sync now: the hour stops, nothing of it is
    │   │                      committed, and this connector waits as a standby
    │   └── LeaseHeld          another connector held the lease already: `sync` exits 1, `run` waits as a standby
    ├── RecordRejected         one record cannot be imported; it is kept with its reason
    └── Interrupted            the process is stopping; the unfinished hour is redone next start

Messages never contain secrets: the classes take only the words they are given,
callers build them from names, never from values, and any excerpt of a server's
answer goes through `redact.Redactor` first.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence


class ConnectorError(Exception):
    """Base of every error the connector raises on purpose."""


class Problem(NamedTuple):
    """One configuration problem: the variable to fix and a sentence that names it."""

    variable: str
    text: str

    def __str__(self) -> str:
        return self.text


class ConfigError(ConnectorError):
    """The configuration is wrong. `problems` lists every problem found.

    A bare string names no single variable (`variable` is empty); callers that
    know the variable pass `Problem`s, so JSON output can name it in a field.
    """

    def __init__(self, problems: Sequence[Problem | str] | str):
        items = [problems] if isinstance(problems, str) else list(problems)
        self.problems = [p if isinstance(p, Problem) else Problem("", p) for p in items]
        super().__init__("; ".join(p.text for p in self.problems))


class AuthError(ConfigError):
    """A service refused our credentials (keys, project key, or Amplitude region)."""


class WrongEndpoint(ConfigError):
    """A configured URL reaches something that is not the service it should be."""


class RetryLater(ConnectorError):
    """A transient fault. `retry_after` is the server's hint in seconds, if any."""

    def __init__(self, message: str, retry_after: float | None = None, cause: str = "other"):
        self.retry_after = retry_after
        self.cause = cause
        super().__init__(message)


class ExportUnavailable(RetryLater):
    """The Amplitude Export API did not deliver a usable archive this time."""


class PostHogUnavailable(RetryLater):
    """PostHog did not accept a batch this time."""


class QueryUnavailable(RetryLater):
    """PostHog's query API did not answer usefully this time (429, 5xx, timeout, refused)."""


class ClockAhead(RetryLater):
    """This machine's clock says an hour is due; the server's `Date` says it is not yet."""


class StoreUnavailable(RetryLater):
    """The PostgreSQL state store could not be reached or dropped the connection mid-write.

    Nothing half-done stays: every write is one transaction, so the hour is redone
    (or, when its commit did land, the next attempt finds the cursor already past it).
    """


class OperatorActionNeeded(ConnectorError):
    """Retrying will not help; the message says what a person must do."""


class HourTooLarge(OperatorActionNeeded):
    """A single hour cannot be exported through the Export API (over 4 GB)."""


class StateError(OperatorActionNeeded):
    """The state store cannot be used (missing directory, read-only, disk full, locked)."""


class UnexpectedArchive(OperatorActionNeeded):
    """An export archive does not look like Amplitude's; nothing of its window is used."""


class EndpointRefused(OperatorActionNeeded):
    """PostHog's /batch/ refuses requests in a way that is not PostHog refusing an event."""


class LeaseLost(ConnectorError):
    """This connector no longer holds the lease of its sync (a pause or a partition
    outlasted it, and another connector may have taken over). The write that found
    out was refused in its own transaction, so nothing of the hour is committed."""


class LeaseHeld(LeaseLost):
    """Another connector holds the lease of this sync; this one never had it."""


class RecordRejected(ConnectorError):
    """One record cannot be imported. `reason` is a short stable code, e.g. `no_usable_id`."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class Interrupted(ConnectorError):
    """A stop was requested (SIGTERM/SIGINT). Nothing of the unfinished hour was committed."""
