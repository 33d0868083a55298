"""The state store: cursor, merge history, group state, rejected records, totals.

`StateStore` is what the sync loop needs; `open_store(url)` picks the backend:
`sqlite_store.SQLiteStore`, the embedded default, or
`postgres_store.PostgresStore` for a `postgresql://` URL, where one database
holds many syncs, each under its name. Per hour, the loop writes through an
`HourWriter`, whose guarantees are deliberately split:

- merges, group digests and rejections are durable as soon as they are
  written, and safe to write again: a merge PostHog accepted is recorded at
  once, so a crash later in the hour never sends it a second time; a redone
  hour first drops the rejections of its unfinished attempt;
- only `commit` is the hour's atomic step: the cursor moves to the next hour
  together with the hour's counts, and only after PostHog accepted every
  event, merge and group update of the hour.

One connector at a time works a sync: it holds the sync's lease (see
`lease`). SQLite's lease is its `flock`, held from open to close; PostgreSQL's
is a row with an expiry that the holder renews. Every write checks the lease in
its own transaction and raises `LeaseLost` when this connector no longer holds
it, so after a takeover the old holder cannot commit anything.

`DryRunStore` reads a real store and keeps its own writes in memory, so a dry
run sees the real cursor and merge history and changes nothing.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass, field, fields
from datetime import date, datetime, timedelta
from typing import TYPE_CHECKING, Iterable, Iterator, Mapping, Protocol
from urllib.parse import urlsplit

from .lease import LeaseState
from .store_url import is_postgres
from .translate import Rejection

if TYPE_CHECKING:
    from .config import Config

DEFAULT_LEASE = timedelta(seconds=30)


@dataclass
class HourCounts:
    """What one hour did; the store keeps their sums as the totals."""

    events_read: int = 0
    events_sent: int = 0
    merges_sent: int = 0
    groups_sent: int = 0
    rejected: int = 0
    ignored: int = 0
    merge_conflicts: int = 0

    @property
    def empty(self) -> bool:
        return self.events_read == 0

    def increments(self) -> dict[str, int]:
        """The totals this hour adds to, by counter name (TOTALS)."""
        return {**asdict(self), "hours_done": 1, "hours_empty": int(self.empty)}


# Every counter in the totals, in the order `status` prints them.
TOTALS = tuple(f.name for f in fields(HourCounts)) + ("hours_done", "hours_empty")


@dataclass(frozen=True)
class Delivery:
    """What PostHog must hold for one delivered hour: its events by UTC day of their timestamp."""

    hour: datetime
    days: Mapping[date, int]
    delivered_at: datetime

    @property
    def events(self) -> int:
        return sum(self.days.values())


@dataclass(frozen=True)
class Verdict:
    """One hour read back from PostHog (`verify.judge` decides it)."""

    hour: datetime
    state: str  # "whole", "short" (events missing) or "pending" (within the grace period)
    delivered: int  # events the connector delivered
    found: int  # distinct uuids PostHog holds for them
    missing: int
    extra: int  # distinct uuids beyond what was delivered
    duplicates: int  # rows sharing a uuid, not yet merged by PostHog (not missing, not extra)
    checked_at: datetime
    repairs: int = 0  # times the hour was re-imported to mend it


@dataclass
class Totals:
    counters: dict[str, int] = field(default_factory=dict)  # TOTALS, plus merges_recorded
    rejected_by_reason: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class SyncInfo:
    """One sync of a store, as `status --all` lists it."""

    name: str
    cursor: datetime | None  # None: created, no first cursor decided yet
    holder: str | None  # the connector holding (or last holding) the lease; None for SQLite's flock
    lease_expires_at: datetime | None  # by the database's clock; None: released, or a flock
    lease_active: bool | None  # someone holds it now, by the database's clock; None: cannot tell (a flock)
    hours_done: int
    last_error: str | None


class HourWriter(Protocol):
    """The writes of one attempt at an hour (see the module doc for what is durable when)."""

    def linked_users(self, devices: Iterable[str]) -> dict[str, str]:
        """device_id -> user_id for the devices already merged, this hour's included."""

    def record_merges(self, pairs: Iterable[tuple[str, str]]) -> None:
        """Record (device_id, user_id) merges PostHog has accepted. Durable at once."""

    def group_digests(self, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], str]:
        """(group_type, group_key) -> digest of the properties last sent, this hour's included."""

    def record_group_digests(self, digests: dict[tuple[str, str], str]) -> None:
        """Record group updates PostHog has accepted. Durable at once."""

    def record_rejections(self, rejections: Iterable[Rejection]) -> None:
        """Keep records not delivered, with their reason. Durable at once."""

    def record_delivery(self, days: Mapping[date, int], delivered_at: datetime) -> None:
        """What PostHog accepted for this hour, by event day, replacing an earlier delivery's
        (a redo, a repair). Durable at once; judged by `verify` only once the hour is committed."""

    def commit(self, next_cursor: datetime, counts: HourCounts) -> None:
        """Move the cursor and add the hour's counts to the totals, atomically."""


class StateStore(Protocol):
    def cursor(self) -> datetime | None:
        """The stored cursor; None before the first sync decided where to start."""

    def start_at(self, hour: datetime) -> datetime:
        """Store the first cursor unless one exists; return the stored cursor."""

    def hour(self, hour: datetime) -> AbstractContextManager[HourWriter]:
        """The writer for one attempt at `hour`; leaving without `commit` keeps the cursor."""

    def linked_users(self, devices: Iterable[str]) -> dict[str, str]:
        """device_id -> user_id for the devices already merged."""

    def group_digests(self, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], str]:
        """(group_type, group_key) -> digest of the properties last sent."""

    def totals(self) -> Totals: ...

    def rejections(self, hour: datetime | None = None, reason: str | None = None,
                   limit: int = 100) -> list[tuple[datetime, Rejection]]: ...

    def deliveries(self, start: datetime | None = None, stop: datetime | None = None) -> list[Delivery]:
        """Delivered hours in [start, stop) (before the cursor), oldest first."""

    def verdicts(self, start: datetime | None = None, stop: datetime | None = None) -> dict[datetime, Verdict]:
        """The last verdict of each hour in [start, stop)."""

    def record_verdicts(self, verdicts: Iterable[Verdict]) -> None:
        """Keep each hour's latest verdict (replacing the one before)."""

    def merge_sample(self, limit: int, recorded_before: datetime) -> list[tuple[str, str]]:
        """Up to `limit` (device_id, user_id) merges of hours before `recorded_before`, spread
        over the whole history."""

    def merges_of(self, hour: datetime) -> dict[str, str]:
        """device_id -> user_id for the merges first sent with this hour (a repair sends them again)."""

    def record_error(self, message: str | None) -> None:
        """Keep the last error for `status`; None clears it."""

    def last_error(self) -> str | None: ...

    def acquire(self) -> LeaseState:
        """Take the sync's lease unless another connector holds it; the state either way."""

    def lease_state(self) -> LeaseState:
        """The lease as this connector last knew it; no I/O (safe from the metrics thread)."""

    def syncs(self) -> list[SyncInfo]:
        """Every sync the store holds, by name."""

    def close(self) -> None:
        """Release the lease (if held) and the store's resources."""


def open_store(url: str, *, readonly: bool = False, sync: str = "default",
               lease: timedelta = DEFAULT_LEASE) -> StateStore:
    """The store named by STATE_STORE_URL: a file path, `sqlite:///path`, or
    `postgresql://user:password@host:5432/db`, for the sync named `sync`.

    `readonly` opens it for `status` and listings next to a running connector:
    no lock or lease, no writes; a store that does not exist yet reads as empty.
    A writer does not hold the lease of a PostgreSQL sync until `acquire()`.
    """
    if is_postgres(url):
        from .postgres_store import PostgresStore

        return PostgresStore(url, sync, readonly=readonly, lease=lease)
    from .sqlite_store import SQLiteStore, sqlite_path

    return SQLiteStore(sqlite_path(url), readonly=readonly, sync=sync)


def sync_name(config: "Config") -> str:
    """SYNC_NAME, or one derived from what identifies the sync without a secret:
    `<Amplitude host> to <PostHog host>`. Two Amplitude projects in one region
    sent to one PostHog derive the same name, so they need a SYNC_NAME each."""
    if config.sync_name:
        return config.sync_name
    return f"{_host(config.export_url)} to {_host(config.posthog_host)}"


def _host(url: str) -> str:
    # hostname and port only: a URL's userinfo may hold credentials.
    parts = urlsplit(url)
    return (parts.hostname or "") + (f":{parts.port}" if parts.port else "")


def open_configured_store(config: "Config", *, readonly: bool = False) -> StateStore:
    """`open_store` for this configuration's store, sync name and lease length."""
    return open_store(config.state_store_url, readonly=readonly, sync=sync_name(config), lease=config.lease)


class EmptyStore:
    """What a store that was never written reads as."""

    def cursor(self) -> datetime | None:
        return None

    def totals(self) -> Totals:
        return Totals({name: 0 for name in TOTALS} | {"merges_recorded": 0}, {})

    def rejections(self, hour=None, reason=None, limit=100) -> list[tuple[datetime, Rejection]]:
        return []

    def last_error(self) -> str | None:
        return None

    def linked_users(self, devices: Iterable[str]) -> dict[str, str]:
        return {}

    def group_digests(self, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], str]:
        return {}

    def deliveries(self, start=None, stop=None) -> list[Delivery]:
        return []

    def verdicts(self, start=None, stop=None) -> dict[datetime, Verdict]:
        return {}

    def merge_sample(self, limit: int, recorded_before: datetime) -> list[tuple[str, str]]:
        return []

    def merges_of(self, hour: datetime) -> dict[str, str]:
        return {}

    def syncs(self) -> list[SyncInfo]:
        return []

    def close(self) -> None:
        pass


class DryRunStore:
    """A real store read, never written: every write stays in this object."""

    def __init__(self, real: StateStore):
        self._real = real
        self._cursor: datetime | None = None
        self._links: dict[str, str] = {}
        self._digests: dict[tuple[str, str], str] = {}

    def cursor(self) -> datetime | None:
        return self._cursor or self._real.cursor()

    def start_at(self, hour: datetime) -> datetime:
        self._cursor = self.cursor() or hour
        return self._cursor

    @contextmanager
    def hour(self, hour: datetime) -> Iterator["_DryRunHour"]:
        yield _DryRunHour(self)

    def linked_users(self, devices: Iterable[str]) -> dict[str, str]:
        return _DryRunHour(self).linked_users(devices)

    def group_digests(self, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], str]:
        return _DryRunHour(self).group_digests(keys)

    def totals(self) -> Totals:
        return self._real.totals()

    def rejections(self, hour=None, reason=None, limit=100) -> list[tuple[datetime, Rejection]]:
        return self._real.rejections(hour, reason, limit)

    def deliveries(self, start=None, stop=None) -> list[Delivery]:
        return self._real.deliveries(start, stop)

    def verdicts(self, start=None, stop=None) -> dict[datetime, Verdict]:
        return self._real.verdicts(start, stop)

    def record_verdicts(self, verdicts: Iterable[Verdict]) -> None:
        pass

    def merge_sample(self, limit: int, recorded_before: datetime) -> list[tuple[str, str]]:
        return self._real.merge_sample(limit, recorded_before)

    def merges_of(self, hour: datetime) -> dict[str, str]:
        return self._real.merges_of(hour)

    def record_error(self, message: str | None) -> None:
        pass

    def last_error(self) -> str | None:
        return self._real.last_error()

    def acquire(self) -> LeaseState:
        return self.lease_state()

    def lease_state(self) -> LeaseState:
        # A dry run writes nothing, so it needs no lease and may run next to the holder.
        real = self._real.lease_state()
        return LeaseState(real.sync, held=True, holder="dry run", expires_at=None)

    def syncs(self) -> list[SyncInfo]:
        return self._real.syncs()

    def close(self) -> None:
        self._real.close()


class _DryRunHour:
    def __init__(self, store: DryRunStore):
        self._store = store

    def linked_users(self, devices: Iterable[str]) -> dict[str, str]:
        devices = list(devices)
        found = self._store._real.linked_users(devices)
        return {**found, **{d: self._store._links[d] for d in devices if d in self._store._links}}

    def record_merges(self, pairs: Iterable[tuple[str, str]]) -> None:
        for device, user in pairs:
            self._store._links.setdefault(device, user)

    def group_digests(self, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], str]:
        keys = list(keys)
        found = self._store._real.group_digests(keys)
        return {**found, **{k: self._store._digests[k] for k in keys if k in self._store._digests}}

    def record_group_digests(self, digests: dict[tuple[str, str], str]) -> None:
        self._store._digests.update(digests)

    def record_rejections(self, rejections: Iterable[Rejection]) -> None:
        pass

    def record_delivery(self, days: Mapping[date, int], delivered_at: datetime) -> None:
        pass

    def commit(self, next_cursor: datetime, counts: HourCounts) -> None:
        self._store._cursor = next_cursor
