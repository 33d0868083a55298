"""The embedded state store: one SQLite file, one writer at a time.

Guarantees are those of `store.StateStore`. One writer is enforced by a `flock`
on `<state>.lock`, which is also the file's lease: taken when the store opens
(a second writer is refused there), held until it closes, so `acquire()` has
nothing left to do. One file holds one sync. Readers (`status`, `rejected`)
take no lock and write nothing. Merge records and rejections are written with synchronous=NORMAL (a
power cut can only make them be sent again, which PostHog deduplicates); the
cursor commit switches to FULL, because the cursor is the promise that an hour
was delivered.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
from contextlib import contextmanager
from datetime import date, datetime
from typing import Callable, Iterable, Iterator, Mapping
from urllib.parse import quote

from .errors import StateError
from .hours import iso_hour, parse_hour
from .lease import LeaseState
from .store import TOTALS, Delivery, EmptyStore, HourCounts, SyncInfo, Totals, Verdict
from .translate import Rejection

# SQLite's default limit on bound parameters is 32766 since 3.32; stay well below.
_LOOKUP_CHUNK = 900

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS merges (device_id TEXT PRIMARY KEY, user_id TEXT NOT NULL, hour TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS groups_sent (group_type TEXT, group_key TEXT, digest TEXT NOT NULL,
                                       PRIMARY KEY (group_type, group_key)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS rejections (id INTEGER PRIMARY KEY, hour TEXT NOT NULL, reason TEXT NOT NULL,
                                       detail TEXT NOT NULL, raw BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS rejections_hour ON rejections (hour);
CREATE TABLE IF NOT EXISTS deliveries (hour TEXT NOT NULL, day TEXT NOT NULL, events INTEGER NOT NULL,
                                       delivered_at TEXT NOT NULL, PRIMARY KEY (hour, day)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS verdicts (hour TEXT PRIMARY KEY, state TEXT NOT NULL, delivered INTEGER NOT NULL,
                                     found INTEGER NOT NULL, missing INTEGER NOT NULL, extra INTEGER NOT NULL,
                                     duplicates INTEGER NOT NULL, checked_at TEXT NOT NULL,
                                     repairs INTEGER NOT NULL) WITHOUT ROWID;
"""
_TABLES = {"meta", "counters", "merges", "rejections"}


def sqlite_path(url: str) -> str:
    """STATE_STORE_URL -> a file path: `sqlite:///rel.db` is relative, `sqlite:////abs.db` absolute."""
    return url[len("sqlite:///"):] if url.startswith("sqlite:///") else url


def _uri(path: str, mode: str) -> str:
    # A path may hold '?' or '#', which a URI would read as its query or fragment.
    return f"file:{quote(os.path.abspath(path))}?mode={mode}"


@contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """One explicit transaction (the connection runs in autocommit mode)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _file_identity(path: str) -> tuple[int, int]:
    info = os.stat(path)
    return info.st_dev, info.st_ino


class SQLiteStore:
    """SQLite-backed state. `readonly=True` reads next to a running connector."""

    def __init__(self, path: str, *, readonly: bool = False, sync: str = "default"):
        self.path = path
        self.sync = sync
        self._lock_fd: int | None = None
        self._conn: sqlite3.Connection | None = None
        try:
            if readonly:
                self._open_readonly()
            else:
                self._open_writer()
        except sqlite3.Error as exc:
            self.close()
            raise StateError(f"cannot use the state file {path}: {exc}") from exc
        except OSError as exc:
            self.close()
            raise StateError(f"cannot use the state file {path}: {exc.strerror or exc}") from exc

    def _open_readonly(self) -> None:
        if not os.path.exists(self.path):
            return  # reads as an empty store: nothing has run yet
        self._conn = sqlite3.connect(_uri(self.path, "ro"), uri=True, isolation_level=None)
        self._conn.execute("PRAGMA query_only = ON")
        self._conn.execute("PRAGMA busy_timeout = 5000")
        tables = {row[0] for row in self._conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not tables:
            self._conn.close()
            self._conn = None  # created but not initialised: a connector is starting
        elif not _TABLES <= tables:
            raise StateError(f"the state file {self.path} is not initialised yet: a connector is starting, try again")

    def _open_writer(self) -> None:
        directory = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(directory):
            raise StateError(f"the directory of the state file {self.path} does not exist")
        self._lock()
        # Owner-only from the start: the store holds raw records and user ids.
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._identity = _file_identity(self.path)
        self._conn.execute("PRAGMA journal_mode = WAL")
        self._conn.execute("PRAGMA synchronous = NORMAL")
        self._conn.execute("PRAGMA busy_timeout = 5000")
        self._conn.executescript(_SCHEMA)

    def _lock(self) -> None:
        lock_path = self.path + ".lock"
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StateError(
                f"another connector is already using the state file {self.path} (lock {lock_path} is held); "
                "two connectors on one state would send everything twice"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    # -- reads ---------------------------------------------------------------

    def _meta(self, key: str) -> str | None:
        if self._conn is None:
            return None
        row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def cursor(self) -> datetime | None:
        value = self._meta("cursor")
        return parse_hour(value) if value else None

    def linked_users(self, devices: Iterable[str]) -> dict[str, str]:
        if self._conn is None:
            return {}
        devices = list(devices)
        found: dict[str, str] = {}
        for i in range(0, len(devices), _LOOKUP_CHUNK):
            chunk = devices[i : i + _LOOKUP_CHUNK]
            marks = ",".join("?" * len(chunk))
            found.update(self._conn.execute(f"SELECT device_id, user_id FROM merges WHERE device_id IN ({marks})", chunk))
        return found

    def group_digests(self, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], str]:
        if self._conn is None:
            return {}
        out = {}
        for group_type, group_key in keys:
            row = self._conn.execute(
                "SELECT digest FROM groups_sent WHERE group_type = ? AND group_key = ?", (group_type, group_key)
            ).fetchone()
            if row:
                out[(group_type, group_key)] = row[0]
        return out

    def totals(self) -> Totals:
        if self._conn is None:
            return EmptyStore().totals()
        stored = dict(self._conn.execute("SELECT name, value FROM counters"))
        counters = {name: stored.get(name, 0) for name in TOTALS}
        counters["merges_recorded"] = self._conn.execute("SELECT count(*) FROM merges").fetchone()[0]
        by_reason = dict(self._conn.execute("SELECT reason, count(*) FROM rejections GROUP BY reason ORDER BY reason"))
        return Totals(counters, by_reason)

    def rejections(self, hour: datetime | None = None, reason: str | None = None,
                   limit: int = 100) -> list[tuple[datetime, Rejection]]:
        if self._conn is None:
            return []
        sql = "SELECT hour, reason, detail, raw FROM rejections WHERE 1=1"
        params: list = []
        if hour is not None:
            sql += " AND hour = ?"
            params.append(iso_hour(hour))
        if reason is not None:
            sql += " AND reason = ?"
            params.append(reason)
        sql += " ORDER BY id LIMIT ?"
        params.append(limit)
        return [(parse_hour(h), Rejection(r, d, bytes(raw))) for h, r, d, raw in self._conn.execute(sql, params)]

    def last_error(self) -> str | None:
        return self._meta("last_error")

    def _bounds(self, start: datetime | None, stop: datetime | None) -> tuple[str, str]:
        cursor = self.cursor()
        ends = [t for t in (stop, cursor) if t is not None]
        return (iso_hour(start) if start else "", iso_hour(min(ends)) if ends else "")

    def deliveries(self, start: datetime | None = None, stop: datetime | None = None) -> list[Delivery]:
        if self._conn is None:
            return []
        low, high = self._bounds(start, stop)
        by_hour: dict[str, tuple[dict[date, int], str]] = {}
        for hour, day, events, at in self._conn.execute(
            "SELECT hour, day, events, delivered_at FROM deliveries WHERE hour >= ? AND hour < ? ORDER BY hour, day",
            (low, high),
        ):
            days, _ = by_hour.setdefault(hour, ({}, at))
            if day:
                days[date.fromisoformat(day)] = events
        return [Delivery(parse_hour(h), days, datetime.fromisoformat(at)) for h, (days, at) in by_hour.items()]

    def verdicts(self, start: datetime | None = None, stop: datetime | None = None) -> dict[datetime, Verdict]:
        if self._conn is None:
            return {}
        low = iso_hour(start) if start else ""
        high = iso_hour(stop) if stop else "~"
        rows = self._conn.execute(
            "SELECT hour, state, delivered, found, missing, extra, duplicates, checked_at, repairs FROM verdicts "
            "WHERE hour >= ? AND hour < ? ORDER BY hour", (low, high))
        return {parse_hour(r[0]): Verdict(parse_hour(r[0]), r[1], r[2], r[3], r[4], r[5], r[6],
                                          datetime.fromisoformat(r[7]), r[8]) for r in rows}

    def merge_sample(self, limit: int, recorded_before: datetime) -> list[tuple[str, str]]:
        if self._conn is None:
            return []
        before = iso_hour(recorded_before)
        total = self._conn.execute("SELECT count(*) FROM merges WHERE hour < ?", (before,)).fetchone()[0]
        step = max(1, total // max(1, limit))
        # Every step-th merge in key order: spread over the history, the same sample each time.
        return list(self._conn.execute(
            "SELECT device_id, user_id FROM (SELECT device_id, user_id, row_number() OVER (ORDER BY device_id) AS n "
            "FROM merges WHERE hour < ?) WHERE n % ? = 0 LIMIT ?", (before, step, limit)))

    def merges_of(self, hour: datetime) -> dict[str, str]:
        if self._conn is None:
            return {}
        return dict(self._conn.execute("SELECT device_id, user_id FROM merges WHERE hour = ?", (iso_hour(hour),)))

    def syncs(self) -> list[SyncInfo]:
        if self._conn is None:
            return []
        return [SyncInfo(self.sync, self.cursor(), holder=None, lease_expires_at=None,
                         # A reader cannot probe the flock without racing a starting writer.
                         lease_active=True if self._lock_fd is not None else None, hours_done=self.totals().counters["hours_done"],
                         last_error=self.last_error())]

    # -- the lease: the flock -------------------------------------------------

    def lease_state(self) -> LeaseState:
        held = self._lock_fd is not None
        return LeaseState(self.sync, held=held, holder=f"pid {os.getpid()} (flock)" if held else None,
                          expires_at=None, acquisitions=int(held))

    def acquire(self) -> LeaseState:
        return self.lease_state()  # taken at open, or refused there

    # -- writes --------------------------------------------------------------

    def _writer(self) -> sqlite3.Connection:
        if self._conn is None or self._lock_fd is None:
            raise StateError(f"the state file {self.path} was opened read-only")
        return self._conn

    def start_at(self, hour: datetime) -> datetime:
        self._write("INSERT OR IGNORE INTO meta (key, value) VALUES ('cursor', ?)", (iso_hour(hour),))
        return self.cursor() or hour

    @contextmanager
    def hour(self, hour: datetime) -> Iterator["_SQLiteHour"]:
        conn = self._writer()
        try:
            with _transaction(conn):
                conn.execute("DELETE FROM rejections WHERE hour = ?", (iso_hour(hour),))
        except sqlite3.Error as exc:
            raise StateError(f"cannot write the state file {self.path}: {exc}") from exc
        writer = _SQLiteHour(self, conn, hour, self._check_file)
        try:
            yield writer
        except sqlite3.Error as exc:
            self._rollback()
            raise StateError(f"cannot write the state file {self.path}: {exc}") from exc
        except BaseException:
            self._rollback()
            raise

    def _check_file(self) -> None:
        """A state file deleted or replaced under a running connector would take
        every later commit with it: refuse to commit into a file nobody will read."""
        try:
            same = _file_identity(self.path) == self._identity
        except FileNotFoundError:
            same = False
        if not same:
            raise StateError(f"the state file {self.path} was deleted or replaced while the connector ran; not advancing")

    def _rollback(self) -> None:
        if self._conn is not None and self._conn.in_transaction:
            try:
                self._conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass

    def _write(self, sql: str, params: tuple) -> None:
        try:
            self._writer().execute(sql, params)
        except sqlite3.Error as exc:
            raise StateError(f"cannot write the state file {self.path}: {exc}") from exc

    def record_verdicts(self, verdicts: Iterable[Verdict]) -> None:
        rows = [(iso_hour(v.hour), v.state, v.delivered, v.found, v.missing, v.extra, v.duplicates,
                 v.checked_at.isoformat(), v.repairs) for v in verdicts]
        try:
            with _transaction(self._writer()):
                self._writer().executemany("INSERT OR REPLACE INTO verdicts VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
        except sqlite3.Error as exc:
            raise StateError(f"cannot write the state file {self.path}: {exc}") from exc

    def record_error(self, message: str | None) -> None:
        if message is None:
            self._write("DELETE FROM meta WHERE key = 'last_error'", ())
        else:
            self._write("INSERT OR REPLACE INTO meta (key, value) VALUES ('last_error', ?)", (message,))

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


class _SQLiteHour:
    """Writes of one attempt at an hour; see `store.HourWriter` for what is durable when."""

    def __init__(self, store: SQLiteStore, conn: sqlite3.Connection, hour: datetime, check_file: Callable[[], None]):
        self._store = store
        self._conn = conn
        self._hour = iso_hour(hour)
        self._check_file = check_file

    def linked_users(self, devices: Iterable[str]) -> dict[str, str]:
        return self._store.linked_users(devices)

    def group_digests(self, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], str]:
        return self._store.group_digests(keys)

    def record_merges(self, pairs: Iterable[tuple[str, str]]) -> None:
        with _transaction(self._conn):
            self._conn.executemany(
                "INSERT OR IGNORE INTO merges (device_id, user_id, hour) VALUES (?, ?, ?)",
                ((device, user, self._hour) for device, user in pairs),
            )

    def record_group_digests(self, digests: dict[tuple[str, str], str]) -> None:
        with _transaction(self._conn):
            self._conn.executemany(
                "INSERT OR REPLACE INTO groups_sent (group_type, group_key, digest) VALUES (?, ?, ?)",
                ((t, k, d) for (t, k), d in digests.items()),
            )

    def record_rejections(self, rejections: Iterable[Rejection]) -> None:
        with _transaction(self._conn):
            self._conn.executemany(
                "INSERT INTO rejections (hour, reason, detail, raw) VALUES (?, ?, ?, ?)",
                ((self._hour, r.reason, r.detail, r.raw) for r in rejections),
            )

    def record_delivery(self, days: Mapping[date, int], delivered_at: datetime) -> None:
        # An hour with no event keeps one row (day "") so it still counts as delivered.
        rows = [(self._hour, d.isoformat(), n, delivered_at.isoformat()) for d, n in sorted(days.items()) if n] or [
            (self._hour, "", 0, delivered_at.isoformat())]
        with _transaction(self._conn):
            self._conn.execute("DELETE FROM deliveries WHERE hour = ?", (self._hour,))
            self._conn.executemany("INSERT INTO deliveries VALUES (?, ?, ?, ?)", rows)

    def commit(self, next_cursor: datetime, counts: HourCounts) -> None:
        self._check_file()
        self._conn.execute("PRAGMA synchronous = FULL")
        try:
            with _transaction(self._conn):
                self._conn.executemany(
                    "INSERT INTO counters (name, value) VALUES (?, ?) "
                    "ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
                    counts.increments().items(),
                )
                self._conn.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES ('cursor', ?)", (iso_hour(next_cursor),)
                )
                self._conn.execute("DELETE FROM meta WHERE key = 'last_error'")
        finally:
            self._conn.execute("PRAGMA synchronous = NORMAL")
