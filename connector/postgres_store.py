"""The PostgreSQL state store: many syncs in one database, each worked under a lease.

Guarantees are those of `store.StateStore`, for every sync separately: each
row carries its sync's id, so one database holds the cursors, merge
histories, group digests, rejections and totals of as many syncs as there
are Amplitude projects.

The lease is the sync's row in `connector_syncs`: holder id, expiry and fence
token, after PostHog's importer (`posthog_batchimport` leased with `FOR UPDATE
SKIP LOCKED`, writes conditional on the lease). Every time it is read or
compared, the expiry is the DATABASE's clock (`now()`), never this machine's:

- `acquire()` takes the row only when its lease ran out or was released
  (`FOR UPDATE SKIP LOCKED`: a standby never waits behind the holder), sets
  this connector as holder, the expiry to now() + lease, and increments the fence.
- a daemon thread renews every lease/3 on its own connection; a renewal that
  finds the lease expired or taken stops and marks the lease lost.
- every write (merges, group digests, rejections, the first cursor, errors,
  the hour's commit) runs in one transaction that first checks holder, fence
  and expiry on the row (`FOR SHARE`, so no takeover can commit in between)
  and raises `LeaseLost` when they do not match: nothing of it is written.
  The commit also requires the cursor to still be at the hour it commits (or
  no cursor stored yet), so no hour is ever committed twice.
- reads inside an hour refuse (`LeaseLost`) once this connector knows it lost
  the lease or its last successful renewal is a whole lease length old, so a
  connector resumed after a pause stops at its next block instead of sending
  the rest of an hour someone else now owns.
- sessions set `idle_in_transaction_session_timeout` to lease/3: a holder frozen
  (SIGSTOP, a partition) inside a transaction loses its session and its row
  lock instead of blocking the takeover.

The schema is created and migrated here (`migrate`), versioned in
`connector_schema_version`, under a transaction-level advisory lock, so two
connectors starting at once on an empty database create it once. Readers
(`status`, `rejected`, dry runs) create nothing and read a missing schema or
sync as empty. Connections are opened lazily and again after the server dropped
them: a read or write cut off by a restart is retried on a new connection for
up to one lease (each is safe to repeat, see `_Link`); then, or for any other
failure, it is `StoreUnavailable` (retryable) at run time, and at start a
`ConfigError` naming STATE_STORE_URL. The URL's password is masked in every
message (`store_url.scrub`).
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from contextlib import contextmanager
from datetime import date, datetime, timedelta, timezone
from typing import Callable, Iterable, Iterator, Mapping, TypeVar

import psycopg

from .errors import ConfigError, LeaseLost, Problem, StateError, StoreUnavailable
from .hours import iso_hour
from .lease import LeaseState, Renewer, holder_id, renew_interval
from .store import DEFAULT_LEASE, TOTALS, Delivery, EmptyStore, HourCounts, SyncInfo, Totals, Verdict
from .store_url import masked, scrub
from .translate import Rejection

log = logging.getLogger("connector.store")
T = TypeVar("T")

VARIABLE = "STATE_STORE_URL"
# pg_advisory_xact_lock key for migrations: any constant no other program is likely to use.
SCHEMA_LOCK_KEY = 7_236_001_555_012_026_011

# (version, statements). Append only: a released version is never edited.
MIGRATIONS: tuple[tuple[int, tuple[str, ...]], ...] = (
    (1, (
        """CREATE TABLE connector_syncs (
               id serial PRIMARY KEY,
               name text NOT NULL UNIQUE,
               cursor_hour timestamptz,
               last_error text,
               holder text,
               fence bigint NOT NULL DEFAULT 0,
               lease_expires timestamptz,
               created_at timestamptz NOT NULL DEFAULT now(),
               updated_at timestamptz NOT NULL DEFAULT now())""",
        """CREATE TABLE connector_counters (
               sync_id integer NOT NULL, name text NOT NULL, value bigint NOT NULL,
               PRIMARY KEY (sync_id, name))""",
        """CREATE TABLE connector_merges (
               sync_id integer NOT NULL, device_id text NOT NULL, user_id text NOT NULL,
               hour timestamptz NOT NULL, PRIMARY KEY (sync_id, device_id))""",
        """CREATE TABLE connector_groups_sent (
               sync_id integer NOT NULL, group_type text NOT NULL, group_key text NOT NULL,
               digest text NOT NULL, PRIMARY KEY (sync_id, group_type, group_key))""",
        """CREATE TABLE connector_rejections (
               id bigserial PRIMARY KEY, sync_id integer NOT NULL, hour timestamptz NOT NULL,
               reason text NOT NULL, detail text NOT NULL, raw bytea NOT NULL,
               batch text NOT NULL)""",
        "CREATE INDEX connector_rejections_sync_hour ON connector_rejections (sync_id, hour)",
    )),
    (2, (
        # What each delivered hour must find in PostHog (a row with day NULL: an empty hour),
        # and the read-back's last verdict per hour.
        """CREATE TABLE connector_deliveries (
               sync_id integer NOT NULL, hour timestamptz NOT NULL, day date, events integer NOT NULL,
               delivered_at timestamptz NOT NULL)""",
        "CREATE INDEX connector_deliveries_sync_hour ON connector_deliveries (sync_id, hour)",
        """CREATE TABLE connector_verdicts (
               sync_id integer NOT NULL, hour timestamptz NOT NULL, state text NOT NULL,
               delivered integer NOT NULL, found integer NOT NULL, missing integer NOT NULL,
               extra integer NOT NULL, duplicates integer NOT NULL, checked_at timestamptz NOT NULL,
               repairs integer NOT NULL, PRIMARY KEY (sync_id, hour))""",
        "CREATE INDEX connector_merges_sync_hour ON connector_merges (sync_id, hour)",
    )),
)
LATEST_VERSION = MIGRATIONS[-1][0]
TABLES = ("connector_syncs", "connector_counters", "connector_merges", "connector_groups_sent",
          "connector_rejections", "connector_deliveries", "connector_verdicts", "connector_schema_version")

_FENCE = ("SELECT 1 FROM connector_syncs WHERE id = %s AND holder = %s AND fence = %s "
          "AND lease_expires > now() FOR SHARE")


def migrate(conn: psycopg.Connection) -> int:
    """Bring the schema to LATEST_VERSION; idempotent and safe to run concurrently.

    Returns the version found before migrating (0: no schema). A schema newer than
    this connector knows is refused: an old connector must not write into it.
    """
    with conn.transaction():
        # Serialises concurrent starts: the second waits here, then finds the schema made.
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK_KEY,))
        conn.execute("CREATE TABLE IF NOT EXISTS connector_schema_version ("
                     "version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())")
        found = conn.execute("SELECT coalesce(max(version), 0) FROM connector_schema_version").fetchone()[0]
        _refuse_newer(found)
        for version, statements in MIGRATIONS:
            if version > found:
                for statement in statements:
                    conn.execute(statement)
                conn.execute("INSERT INTO connector_schema_version (version) VALUES (%s)", (version,))
    return found


def _refuse_newer(version: int) -> None:
    if version > LATEST_VERSION:
        raise StateError(f"the state store's schema is version {version}, newer than this connector knows "
                         f"({LATEST_VERSION}): upgrade the connector")


class _Link:
    """One connection, opened on first use and again after the server dropped it.

    `run(work)` retries `work` on a new connection while the connection is lost
    (a server restart, a network cut), for up to `retry_for` seconds, unless the
    caller says not to (`retry=False`, at start: an unreachable store is reported
    at once). Every work given is safe to repeat: a transaction the server dropped
    was rolled back, and one whose COMMIT landed just before the connection went
    finds its own effect the second time (inserts that do nothing, the commit's
    cursor already moved by this holder). Then, or when time is up, psycopg
    errors leave as `StoreUnavailable` (unreachable, restarting, timed out: retry
    later) or `StateError` (anything else), their text scrubbed of the password
    and not chained, so no traceback can carry the original text either.
    """

    def __init__(self, url: str, *, connect_timeout: float, statement_timeout: float, idle_timeout: float,
                 retry_for: float = 0.0, sleep: Callable[[float], None] = time.sleep):
        self._url = url
        self._retry_for = retry_for
        self._sleep = sleep
        self._connect_timeout = max(1, round(connect_timeout))
        self._settings = {
            "TimeZone": "UTC",
            "statement_timeout": f"{int(statement_timeout * 1000)}ms",
            "lock_timeout": f"{int(statement_timeout * 1000)}ms",
            "idle_in_transaction_session_timeout": f"{max(1000, int(idle_timeout * 1000))}ms",
        }
        self._conn: psycopg.Connection | None = None

    def _connect(self) -> psycopg.Connection:
        # TCP keepalives and tcp_user_timeout notice a partitioned server within
        # seconds; without them a read could wait for the kernel's minutes-long retries.
        conn = psycopg.connect(self._url, autocommit=True, connect_timeout=self._connect_timeout,
                               application_name="amplitude-posthog-connector", keepalives=1,
                               keepalives_idle=5, keepalives_interval=2, keepalives_count=3,
                               tcp_user_timeout=self._connect_timeout * 1000)
        for name, value in self._settings.items():
            conn.execute("SELECT set_config(%s, %s, false)", (name, value))
        return conn

    def run(self, work: Callable[[psycopg.Connection], T], *, retry: bool = True) -> T:
        deadline = time.monotonic() + (self._retry_for if retry else 0.0)
        pause = 0.1
        while True:
            try:
                if self._conn is None or self._conn.closed:
                    self._conn = self._connect()
                return work(self._conn)
            except psycopg.OperationalError as exc:
                lost = self._conn is None or self._conn.closed or self._conn.broken
                self.drop()
                if lost and time.monotonic() + pause < deadline:
                    log.info("state store connection lost; retrying", extra={"error": self.describe(exc)})
                    self._sleep(pause)
                    pause = min(2 * pause, 2.0)
                    continue
                raise StoreUnavailable(f"the PostgreSQL state store did not answer: {self.describe(exc)}",
                                       cause="store") from None
            except psycopg.Error as exc:
                if self._conn is not None and self._conn.broken:
                    self.drop()
                raise StateError(f"the PostgreSQL state store refused: {self.describe(exc)}") from None

    def describe(self, exc: BaseException) -> str:
        return scrub(" ".join(str(exc).split()), self._url) or type(exc).__name__

    def drop(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:  # noqa: BLE001 - closing a broken connection may fail too
                pass
            self._conn = None


class _Refused(Exception):
    """The lease check in a write's transaction found another holder, fence or an expiry."""


def _utc(moment: datetime | None) -> datetime | None:
    return moment.astimezone(timezone.utc) if moment is not None else None


class PostgresStore:
    """PostgreSQL-backed state for the sync named `sync`; see the module doc.

    `holder` (default: host:pid:random), `monotonic` (when this connector last
    renewed, for its own view of the lease) and `renew` (run the renewal thread)
    are injectable for tests.
    """

    def __init__(self, url: str, sync: str, *, readonly: bool = False, lease: timedelta = DEFAULT_LEASE,
                 holder: str | None = None, monotonic: Callable[[], float] = time.monotonic, renew: bool = True):
        self.sync = sync
        self.shown_url = masked(url)
        self._url = url
        self._readonly = readonly
        self._lease = lease
        self._interval = renew_interval(lease)
        self._holder = holder or holder_id()
        self._monotonic = monotonic
        self._renew_enabled = renew
        # A restart or a short cut is ridden out within the hour for up to a lease;
        # longer, the lease is gone anyway and the hour fails (StoreUnavailable).
        self._main = _Link(url, connect_timeout=10, statement_timeout=max(60.0, lease.total_seconds()),
                           idle_timeout=self._interval, retry_for=lease.total_seconds())
        self._side = _Link(url, connect_timeout=self._interval, statement_timeout=self._interval,
                           idle_timeout=self._interval)
        self._sync_id: int | None = None
        self._state_lock = threading.Lock()
        self._held = False
        self._fence = 0
        self._deadline = 0.0
        self._seen_holder: str | None = None
        self._seen_expires: datetime | None = None
        self._renewals = self._acquisitions = self._takeovers = 0
        self._renewer: Renewer | None = None
        try:
            self._open()
        except (StoreUnavailable, StateError) as exc:
            self._main.drop()
            raise ConfigError([Problem(VARIABLE, f"{VARIABLE}: cannot use the PostgreSQL state store "
                                                 f"{self.shown_url}: {_reason(exc)}")]) from None

    def _open(self) -> None:
        if self._readonly:
            self._main.run(self._check_schema, retry=False)
            self._sync_id = self._find_sync(retry=False)
            return
        self._main.run(migrate, retry=False)

        def create(conn: psycopg.Connection) -> int:
            # DO NOTHING, not an upsert: it must not lock (or rewrite) the row a holder works under.
            conn.execute("INSERT INTO connector_syncs (name) VALUES (%s) ON CONFLICT (name) DO NOTHING", (self.sync,))
            return conn.execute("SELECT id FROM connector_syncs WHERE name = %s", (self.sync,)).fetchone()[0]

        self._sync_id = self._main.run(create, retry=False)

    @staticmethod
    def _check_schema(conn: psycopg.Connection) -> None:
        if conn.execute("SELECT to_regclass('connector_schema_version')").fetchone()[0] is not None:
            _refuse_newer(conn.execute("SELECT coalesce(max(version), 0) FROM connector_schema_version").fetchone()[0])

    def _find_sync(self, retry: bool = True) -> int | None:
        def find(conn: psycopg.Connection) -> int | None:
            if conn.execute("SELECT to_regclass('connector_syncs')").fetchone()[0] is None:
                return None
            row = conn.execute("SELECT id FROM connector_syncs WHERE name = %s", (self.sync,)).fetchone()
            return row[0] if row else None

        return self._main.run(find, retry=retry)

    def _id(self) -> int | None:
        """The sync's row id; a reader looks again, as a writer may have created it since."""
        if self._sync_id is None and self._readonly:
            self._sync_id = self._find_sync()
        return self._sync_id

    # -- the lease -----------------------------------------------------------

    def lease_state(self) -> LeaseState:
        with self._state_lock:
            held = self._held_now()
            return LeaseState(self.sync, held=held, holder=self._holder if held else self._seen_holder,
                              expires_at=self._seen_expires, fence=self._fence, renewals=self._renewals,
                              acquisitions=self._acquisitions, takeovers=self._takeovers)

    def _held_now(self) -> bool:
        # Our own view: the database extended the lease to (its now) + lease at some
        # moment after we sent the renewal, so `sent + lease` is never later than the
        # real expiry. Only durations of this machine's monotonic clock are compared.
        return self._held and self._monotonic() < self._deadline

    def acquire(self) -> LeaseState:
        if self._readonly:
            raise StateError("the state store was opened read-only")
        if self.lease_state().held:
            return self.lease_state()
        sent = self._monotonic()
        row = self._main.run(lambda conn: conn.execute(
            """WITH candidate AS (
                   SELECT id, holder AS previous_holder, lease_expires AS previous_expires
                   FROM connector_syncs
                   WHERE id = %(id)s AND (lease_expires IS NULL OR lease_expires <= now() OR holder = %(holder)s)
                   FOR UPDATE SKIP LOCKED)
               UPDATE connector_syncs AS s
               SET holder = %(holder)s, fence = s.fence + 1, lease_expires = now() + %(lease)s, updated_at = now()
               FROM candidate WHERE s.id = candidate.id
               RETURNING s.fence, s.lease_expires, candidate.previous_holder, candidate.previous_expires""",
            {"id": self._sync_id, "holder": self._holder, "lease": self._lease}).fetchone())
        if row is None:
            seen = self._main.run(lambda conn: conn.execute(
                "SELECT holder, lease_expires FROM connector_syncs WHERE id = %s", (self._sync_id,)).fetchone())
            with self._state_lock:
                self._seen_holder, self._seen_expires = seen[0], _utc(seen[1])
            return self.lease_state()
        fence, expires, previous, previous_expires = row
        with self._state_lock:
            self._held, self._fence, self._deadline = True, fence, sent + self._lease.total_seconds()
            self._seen_holder, self._seen_expires = self._holder, _utc(expires)
            self._acquisitions += 1
            # Released leases have no expiry: taking one over is a failover only when
            # another connector held it and let it run out.
            self._takeovers += int(previous is not None and previous != self._holder
                                   and previous_expires is not None)
        if self._renew_enabled:
            self._stop_renewer()
            self._renewer = Renewer(self._renew, self._interval).start()
        return self.lease_state()

    def _renew(self) -> bool:
        """One renewal (the Renewer's thread); False once the lease is gone."""
        sent = self._monotonic()
        with self._state_lock:
            if not self._held_now():
                self._held = False
                log.warning("lease ran out before it could be renewed", extra={"sync": self.sync})
                return False
            fence = self._fence
        try:
            row = self._side.run(lambda conn: conn.execute(
                "UPDATE connector_syncs SET lease_expires = now() + %s "
                "WHERE id = %s AND holder = %s AND fence = %s AND lease_expires > now() RETURNING lease_expires",
                (self._lease, self._sync_id, self._holder, fence)).fetchone())
        except (StoreUnavailable, StateError) as exc:
            log.warning("cannot renew the lease; trying again", extra={"sync": self.sync, "error": str(exc)})
            return True  # the lease still runs until its deadline; the next attempt may reach the server
        with self._state_lock:
            if fence != self._fence:
                return False  # acquired again meanwhile: that acquisition renews on its own thread
            if row is None:
                self._held = False
                log.warning("lease lost: another connector holds it or it ran out", extra={"sync": self.sync})
                return False
            self._deadline = sent + self._lease.total_seconds()
            self._seen_expires = _utc(row[0])
            self._renewals += 1
        return True

    def _stop_renewer(self) -> None:
        if self._renewer is not None:
            self._renewer.stop()
            self._renewer = None

    def _lost(self, fence: int, what: str) -> LeaseLost:
        """Mark the lease lost (it was refused in the database) and describe who holds it now."""
        with self._state_lock:
            if fence == self._fence:
                self._held = False
        try:
            holder, expires = self._main.run(lambda conn: conn.execute(
                "SELECT holder, lease_expires FROM connector_syncs WHERE id = %s", (self._sync_id,)).fetchone())
            with self._state_lock:
                self._seen_holder, self._seen_expires = holder, _utc(expires)
            now = f" (it is held by {holder})" if holder and holder != self._holder else ""
        except (StoreUnavailable, StateError):
            now = ""
        return LeaseLost(f"this connector ({self._holder}) does not hold the lease of sync {self.sync!r}{now}: "
                         f"{what} refused, nothing of it written")

    def check_lease(self) -> None:
        """Raise LeaseLost when this connector knows it does not hold the lease (no I/O)."""
        with self._state_lock:
            held, fence = self._held_now(), self._fence
        if not held:
            raise self._lost(fence, "the hour's next block was")

    # -- fenced writes --------------------------------------------------------

    def _writer_fence(self) -> int:
        if self._readonly:
            raise StateError("the state store was opened read-only")
        with self._state_lock:
            return self._fence

    def _fenced(self, fence: int, what: str, work: Callable[[psycopg.Connection], T]) -> T:
        """`work` in one transaction that first checks holder, fence and expiry on the sync's row."""
        def transaction(conn: psycopg.Connection) -> T:
            with conn.transaction():
                if conn.execute(_FENCE, (self._sync_id, self._holder, fence)).fetchone() is None:
                    raise _Refused()
                return work(conn)

        try:
            return self._main.run(transaction)
        except _Refused:
            raise self._lost(fence, what) from None

    def start_at(self, hour: datetime) -> datetime:
        fence = self._writer_fence()
        self._fenced(fence, "storing the first cursor was", lambda conn: conn.execute(
            "UPDATE connector_syncs SET cursor_hour = %s, updated_at = now() WHERE id = %s AND cursor_hour IS NULL",
            (hour, self._sync_id)))
        return self.cursor() or hour

    @contextmanager
    def hour(self, hour: datetime) -> Iterator["_PostgresHour"]:
        fence = self._writer_fence()
        self._fenced(fence, f"starting hour {iso_hour(hour)} was", lambda conn: conn.execute(
            "DELETE FROM connector_rejections WHERE sync_id = %s AND hour = %s", (self._sync_id, hour)))
        # Each write of the hour is its own transaction: nothing to roll back on the way out.
        yield _PostgresHour(self, hour, fence)

    def record_error(self, message: str | None) -> None:
        fence = self._writer_fence()
        if message is None and not self.lease_state().held:
            return  # clearing is the holder's business: its next commit clears it anyway
        self._fenced(fence, "recording the last error was", lambda conn: conn.execute(
            "UPDATE connector_syncs SET last_error = %s, updated_at = now() WHERE id = %s",
            (message, self._sync_id)))

    def _commit(self, hour: datetime, fence: int, next_cursor: datetime, counts: HourCounts) -> None:
        attempts = 0

        def transaction(conn: psycopg.Connection) -> str | None:
            nonlocal attempts
            attempts += 1
            with conn.transaction():
                moved = conn.execute(
                    "UPDATE connector_syncs SET cursor_hour = %s, last_error = NULL, updated_at = now() "
                    "WHERE id = %s AND holder = %s AND fence = %s AND lease_expires > now() "
                    # No cursor yet: the loop stores none before the first hour's commit.
                    "AND (cursor_hour = %s OR cursor_hour IS NULL) "
                    "RETURNING id", (next_cursor, self._sync_id, self._holder, fence, hour)).fetchone()
                if moved is None:
                    holder, row_fence, active, cursor = conn.execute(
                        "SELECT holder, fence, lease_expires > now(), cursor_hour FROM connector_syncs WHERE id = %s",
                        (self._sync_id,)).fetchone()
                    if holder == self._holder and row_fence == fence and active:
                        if attempts > 1 and cursor is not None and _utc(cursor) == next_cursor:
                            return None  # the attempt the lost connection cut off did land
                        return (f"the cursor of sync {self.sync!r} is at {iso_hour(_utc(cursor)) if cursor else None}, "
                                f"not at {iso_hour(hour)}: not committing that hour again")
                    raise _Refused()
                names, values = zip(*counts.increments().items())
                conn.execute(
                    "INSERT INTO connector_counters (sync_id, name, value) "
                    "SELECT %s, n, v FROM unnest(%s::text[], %s::bigint[]) AS t(n, v) "
                    "ON CONFLICT (sync_id, name) DO UPDATE SET value = connector_counters.value + EXCLUDED.value",
                    (self._sync_id, list(names), list(values)))
                return None

        try:
            problem = self._main.run(transaction)
        except _Refused:
            raise self._lost(fence, f"the commit of hour {iso_hour(hour)} was") from None
        if problem:
            raise StateError(problem)

    # -- reads -----------------------------------------------------------------

    def _read(self, work: Callable[[psycopg.Connection, int], T], empty: T) -> T:
        sync_id = self._id()
        if sync_id is None:
            return empty
        return self._main.run(lambda conn: work(conn, sync_id))

    def cursor(self) -> datetime | None:
        row = self._read(lambda conn, i: conn.execute(
            "SELECT cursor_hour FROM connector_syncs WHERE id = %s", (i,)).fetchone(), None)
        return _utc(row[0]) if row else None

    def linked_users(self, devices: Iterable[str]) -> dict[str, str]:
        devices = list(devices)
        if not devices:
            return {}
        return self._read(lambda conn, i: dict(conn.execute(
            "SELECT device_id, user_id FROM connector_merges WHERE sync_id = %s AND device_id = ANY(%s)",
            (i, devices)).fetchall()), {})

    def group_digests(self, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], str]:
        keys = list(keys)
        if not keys:
            return {}
        rows = self._read(lambda conn, i: conn.execute(
            "SELECT g.group_type, g.group_key, g.digest FROM connector_groups_sent g "
            "JOIN unnest(%s::text[], %s::text[]) AS k(t, k) ON g.group_type = k.t AND g.group_key = k.k "
            "WHERE g.sync_id = %s", ([t for t, _ in keys], [k for _, k in keys], i)).fetchall(), [])
        return {(t, k): d for t, k, d in rows}

    def totals(self) -> Totals:
        def read(conn: psycopg.Connection, i: int) -> Totals:
            stored = dict(conn.execute("SELECT name, value FROM connector_counters WHERE sync_id = %s", (i,)).fetchall())
            counters = {name: int(stored.get(name, 0)) for name in TOTALS}
            counters["merges_recorded"] = conn.execute(
                "SELECT count(*) FROM connector_merges WHERE sync_id = %s", (i,)).fetchone()[0]
            by_reason = dict(conn.execute(
                "SELECT reason, count(*) FROM connector_rejections WHERE sync_id = %s GROUP BY reason ORDER BY reason",
                (i,)).fetchall())
            return Totals(counters, by_reason)

        return self._read(read, EmptyStore().totals())

    def rejections(self, hour: datetime | None = None, reason: str | None = None,
                   limit: int = 100) -> list[tuple[datetime, Rejection]]:
        def read(conn: psycopg.Connection, i: int) -> list[tuple[datetime, Rejection]]:
            sql = "SELECT hour, reason, detail, raw FROM connector_rejections WHERE sync_id = %s"
            params: list = [i]
            if hour is not None:
                sql += " AND hour = %s"
                params.append(hour)
            if reason is not None:
                sql += " AND reason = %s"
                params.append(reason)
            sql += " ORDER BY id LIMIT %s"
            params.append(limit)
            return [(_utc(h), Rejection(r, d, bytes(raw))) for h, r, d, raw in conn.execute(sql, params).fetchall()]

        return self._read(read, [])

    def last_error(self) -> str | None:
        row = self._read(lambda conn, i: conn.execute(
            "SELECT last_error FROM connector_syncs WHERE id = %s", (i,)).fetchone(), None)
        return row[0] if row else None

    def deliveries(self, start: datetime | None = None, stop: datetime | None = None) -> list[Delivery]:
        def read(conn: psycopg.Connection, i: int) -> list[Delivery]:
            rows = conn.execute(
                "SELECT d.hour, d.day, d.events, d.delivered_at FROM connector_deliveries d "
                "JOIN connector_syncs s ON s.id = d.sync_id "
                "WHERE d.sync_id = %s AND d.hour < s.cursor_hour AND d.hour >= coalesce(%s::timestamptz, '-infinity') "
                "AND d.hour < coalesce(%s::timestamptz, 'infinity') ORDER BY d.hour, d.day", (i, start, stop)).fetchall()
            by_hour: dict[datetime, tuple[dict[date, int], datetime]] = {}
            for hour, day, events, at in rows:
                days, _ = by_hour.setdefault(_utc(hour), ({}, _utc(at)))
                if day is not None:
                    days[day] = events
            return [Delivery(hour, days, at) for hour, (days, at) in by_hour.items()]

        return self._read(read, [])

    def verdicts(self, start: datetime | None = None, stop: datetime | None = None) -> dict[datetime, Verdict]:
        def read(conn: psycopg.Connection, i: int) -> dict[datetime, Verdict]:
            rows = conn.execute(
                "SELECT hour, state, delivered, found, missing, extra, duplicates, checked_at, repairs "
                "FROM connector_verdicts WHERE sync_id = %s AND hour >= coalesce(%s::timestamptz, '-infinity') "
                "AND hour < coalesce(%s::timestamptz, 'infinity') ORDER BY hour", (i, start, stop)).fetchall()
            return {_utc(r[0]): Verdict(_utc(r[0]), *r[1:7], _utc(r[7]), r[8]) for r in rows}

        return self._read(read, {})

    def record_verdicts(self, verdicts: Iterable[Verdict]) -> None:
        verdicts = list(verdicts)
        if not verdicts:
            return
        fence = self._writer_fence()
        columns = [[v.hour for v in verdicts], [v.state for v in verdicts], [v.delivered for v in verdicts],
                   [v.found for v in verdicts], [v.missing for v in verdicts], [v.extra for v in verdicts],
                   [v.duplicates for v in verdicts], [v.checked_at for v in verdicts], [v.repairs for v in verdicts]]
        self._fenced(fence, "recording verdicts was", lambda conn: conn.execute(
            "INSERT INTO connector_verdicts (sync_id, hour, state, delivered, found, missing, extra, duplicates, "
            "checked_at, repairs) SELECT %s, * FROM unnest(%s::timestamptz[], %s::text[], %s::int[], %s::int[], "
            "%s::int[], %s::int[], %s::int[], %s::timestamptz[], %s::int[]) "
            "ON CONFLICT (sync_id, hour) DO UPDATE SET state = EXCLUDED.state, delivered = EXCLUDED.delivered, "
            "found = EXCLUDED.found, missing = EXCLUDED.missing, extra = EXCLUDED.extra, "
            "duplicates = EXCLUDED.duplicates, checked_at = EXCLUDED.checked_at, repairs = EXCLUDED.repairs",
            (self._sync_id, *columns)))

    def merge_sample(self, limit: int, recorded_before: datetime) -> list[tuple[str, str]]:
        def read(conn: psycopg.Connection, i: int) -> list[tuple[str, str]]:
            total = conn.execute("SELECT count(*) FROM connector_merges WHERE sync_id = %s AND hour < %s",
                                 (i, recorded_before)).fetchone()[0]
            step = max(1, total // max(1, limit))
            # Every step-th merge in key order: spread over the history, the same sample each time.
            return [tuple(row) for row in conn.execute(
                "SELECT device_id, user_id FROM (SELECT device_id, user_id, row_number() OVER (ORDER BY device_id) AS n "
                "FROM connector_merges WHERE sync_id = %s AND hour < %s) t WHERE n %% %s = 0 LIMIT %s",
                (i, recorded_before, step, limit)).fetchall()]

        return self._read(read, [])

    def merges_of(self, hour: datetime) -> dict[str, str]:
        return self._read(lambda conn, i: dict(conn.execute(
            "SELECT device_id, user_id FROM connector_merges WHERE sync_id = %s AND hour = %s", (i, hour)).fetchall()), {})

    def syncs(self) -> list[SyncInfo]:
        def read(conn: psycopg.Connection) -> list[SyncInfo]:
            if conn.execute("SELECT to_regclass('connector_syncs')").fetchone()[0] is None:
                return []
            rows = conn.execute(
                "SELECT s.name, s.cursor_hour, s.holder, s.lease_expires, coalesce(s.lease_expires > now(), false), "
                "coalesce(c.value, 0), s.last_error FROM connector_syncs s "
                "LEFT JOIN connector_counters c ON c.sync_id = s.id AND c.name = 'hours_done' ORDER BY s.name").fetchall()
            return [SyncInfo(name, _utc(cursor), holder, _utc(expires), active, int(done), error)
                    for name, cursor, holder, expires, active, done, error in rows]

        return self._main.run(read)

    # -- closing -----------------------------------------------------------------

    def close(self) -> None:
        """Stop renewing and release the lease, so a standby takes over at its next poll."""
        self._stop_renewer()
        with self._state_lock:
            held, fence, self._held = self._held, self._fence, False
        if held and not self._readonly:
            # On the side connection: the main one may be mid-statement when a signal
            # interrupted the hour.
            try:
                self._side.run(lambda conn: conn.execute(
                    "UPDATE connector_syncs SET lease_expires = NULL, updated_at = now() "
                    "WHERE id = %s AND holder = %s AND fence = %s", (self._sync_id, self._holder, fence)))
            except (StoreUnavailable, StateError) as exc:
                log.warning("could not release the lease; it runs out by itself",
                            extra={"sync": self.sync, "error": str(exc)})
        self._main.drop()
        self._side.drop()


def check_store(url: str) -> dict:
    """What `check` reports: the server answers, the schema's version, and whether this
    role can write there (or create the tables). Creates nothing."""
    result: dict = {"store": masked(url)}
    link = _Link(url, connect_timeout=10, statement_timeout=10, idle_timeout=10)

    def probe(conn: psycopg.Connection) -> tuple[bool, int | None, bool]:
        if conn.execute("SELECT to_regclass('connector_schema_version')").fetchone()[0] is None:
            return False, None, bool(conn.execute(
                "SELECT coalesce(has_schema_privilege(current_schema(), 'CREATE'), false)").fetchone()[0])
        writable = all(conn.execute(f"SELECT has_table_privilege(%s, '{privilege}')", (table,)).fetchone()[0]
                       for table in TABLES for privilege in ("SELECT", "INSERT", "UPDATE", "DELETE"))
        if not conn.execute("SELECT has_table_privilege('connector_schema_version', 'SELECT')").fetchone()[0]:
            return True, None, False
        version = conn.execute("SELECT coalesce(max(version), 0) FROM connector_schema_version").fetchone()[0]
        return True, version, writable

    try:
        exists, version, writable = link.run(probe, retry=False)
    except (StoreUnavailable, StateError) as exc:
        return {"ok": False, **result, "error": _reason(exc)}
    finally:
        link.drop()
    result.update(schema_version=version, writable=writable)
    if not writable:
        result["error"] = ("this role cannot create the connector's tables in the database's current schema"
                           if version is None and not exists else "this role cannot write the connector's tables")
    elif (version or 0) > LATEST_VERSION:
        result["error"] = f"schema version {version} is newer than this connector ({LATEST_VERSION}): upgrade it"
    return {"ok": "error" not in result, **result}


def _reason(exc: Exception) -> str:
    text = str(exc)
    for prefix in ("the PostgreSQL state store did not answer: ", "the PostgreSQL state store refused: "):
        text = text.removeprefix(prefix)
    return text


class _PostgresHour:
    """Writes of one attempt at an hour, each fenced with the fence the hour started under."""

    def __init__(self, store: PostgresStore, hour: datetime, fence: int):
        self._store = store
        self._hour = hour
        self._fence = fence

    def linked_users(self, devices: Iterable[str]) -> dict[str, str]:
        self._store.check_lease()
        return self._store.linked_users(devices)

    def group_digests(self, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], str]:
        self._store.check_lease()
        return self._store.group_digests(keys)

    def record_merges(self, pairs: Iterable[tuple[str, str]]) -> None:
        pairs = list(pairs)
        if not pairs:
            return
        store = self._store
        store._fenced(self._fence, "recording merges was", lambda conn: conn.execute(
            "INSERT INTO connector_merges (sync_id, device_id, user_id, hour) "
            "SELECT %s, d, u, %s FROM unnest(%s::text[], %s::text[]) AS t(d, u) "
            "ON CONFLICT (sync_id, device_id) DO NOTHING",
            (store._sync_id, self._hour, [d for d, _ in pairs], [u for _, u in pairs])))

    def record_group_digests(self, digests: dict[tuple[str, str], str]) -> None:
        if not digests:
            return
        store = self._store
        store._fenced(self._fence, "recording group updates was", lambda conn: conn.execute(
            "INSERT INTO connector_groups_sent (sync_id, group_type, group_key, digest) "
            "SELECT %s, t, k, d FROM unnest(%s::text[], %s::text[], %s::text[]) AS x(t, k, d) "
            "ON CONFLICT (sync_id, group_type, group_key) DO UPDATE SET digest = EXCLUDED.digest",
            (store._sync_id, [t for t, _ in digests], [k for _, k in digests], list(digests.values()))))

    def record_rejections(self, rejections: Iterable[Rejection]) -> None:
        rejections = list(rejections)
        if not rejections:
            return
        store = self._store
        # The batch token makes a repeat (after a lost connection) a no-op: the rows
        # are kept once even when the first attempt's COMMIT did land.
        batch = secrets.token_hex(8)
        store._fenced(self._fence, "recording rejections was", lambda conn: conn.execute(
            "INSERT INTO connector_rejections (sync_id, hour, reason, detail, raw, batch) "
            "SELECT %(sync)s, %(hour)s, r, d, w, %(batch)s "
            "FROM unnest(%(reasons)s::text[], %(details)s::text[], %(raws)s::bytea[]) WITH ORDINALITY AS x(r, d, w, n) "
            "WHERE NOT EXISTS (SELECT 1 FROM connector_rejections "
            "                  WHERE sync_id = %(sync)s AND hour = %(hour)s AND batch = %(batch)s) "
            "ORDER BY n",
            {"sync": store._sync_id, "hour": self._hour, "batch": batch, "reasons": [r.reason for r in rejections],
             "details": [r.detail for r in rejections], "raws": [r.raw for r in rejections]}))

    def record_delivery(self, days: Mapping[date, int], delivered_at: datetime) -> None:
        store = self._store
        kept = sorted((d, n) for d, n in days.items() if n) or [(None, 0)]  # an empty hour keeps one row

        def replace(conn: psycopg.Connection) -> None:
            conn.execute("DELETE FROM connector_deliveries WHERE sync_id = %s AND hour = %s", (store._sync_id, self._hour))
            conn.execute(
                "INSERT INTO connector_deliveries (sync_id, hour, day, events, delivered_at) "
                "SELECT %s, %s, d, n, %s FROM unnest(%s::date[], %s::int[]) AS x(d, n)",
                (store._sync_id, self._hour, delivered_at, [d for d, _ in kept], [n for _, n in kept]))

        store._fenced(self._fence, "recording the delivery was", replace)

    def commit(self, next_cursor: datetime, counts: HourCounts) -> None:
        self._store._commit(self._hour, self._fence, next_cursor, counts)
