"""The state store: cursor, merge history, group state, rejected records, totals.

`StateStore` is the protocol the sync loop needs; `SQLiteStore` is the embedded
default. Everything an hour changes is written inside one `HourTransaction` and
becomes visible (and durable) only at `commit`, together with the cursor: a
crash before that loses the hour's merge records and rejections too, and the
hour is redone from scratch.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable, Iterable, Iterator, Protocol

from .errors import StateError

# SQLite's default limit on bound parameters is 32766 since 3.32; stay well below.
_LOOKUP_CHUNK = 900


@dataclass(frozen=True)
class HourStats:
    """What an hour contributed to the totals."""

    events_read: int = 0
    events_sent: int = 0
    merges_sent: int = 0
    groups_sent: int = 0
    rejected: int = 0
    ignored: int = 0
    merge_conflicts: int = 0
    empty: bool = False


@dataclass(frozen=True)
class StoredRejection:
    hour: datetime
    reason: str
    detail: str
    raw: bytes


@dataclass
class Totals:
    counters: dict[str, int] = field(default_factory=dict)
    rejected_by_reason: dict[str, int] = field(default_factory=dict)


class HourTransaction(Protocol):
    def linked_users(self, devices: Iterable[str]) -> dict[str, str]:
        """device_id -> user_id for the devices already merged."""

    def link(self, pairs: Iterable[tuple[str, str]]) -> None:
        """Record merges PostHog has accepted. Call only after it did."""

    def group_digests(self, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], str]:
        """(group_type, group_key) -> digest of the properties last sent."""

    def set_group_digests(self, digests: dict[tuple[str, str], str]) -> None: ...

    def reject(self, rejections: Iterable[StoredRejection]) -> None: ...

    def commit(self, next_cursor: datetime, stats: HourStats) -> None:
        """Advance the cursor and make the hour's records durable, atomically."""


class StateStore(Protocol):
    def cursor(self) -> datetime | None: ...

    def set_initial_cursor(self, hour: datetime) -> None: ...

    def hour(self, hour: datetime) -> AbstractContextManager[HourTransaction]: ...

    def totals(self) -> Totals: ...

    def rejections(self, hour: datetime | None = None, reason: str | None = None, limit: int = 100) -> list[StoredRejection]: ...

    def record_error(self, message: str | None) -> None: ...

    def last_error(self) -> str | None: ...

    def close(self) -> None: ...


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


def _hour_text(hour: datetime) -> str:
    return hour.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:00:00Z")


def _parse_hour(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:00:00Z").replace(tzinfo=timezone.utc)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS merges (device_id TEXT PRIMARY KEY, user_id TEXT NOT NULL, hour TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS groups_sent (group_type TEXT, group_key TEXT, digest TEXT NOT NULL,
                                       PRIMARY KEY (group_type, group_key)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS rejections (id INTEGER PRIMARY KEY, hour TEXT NOT NULL, reason TEXT NOT NULL,
                                       detail TEXT NOT NULL, raw BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS rejections_hour ON rejections (hour);
"""


class _SQLiteHour:
    def __init__(self, conn: sqlite3.Connection, hour: datetime, check_file: Callable[[], None]):
        self._conn = conn
        self._hour = _hour_text(hour)
        self._check_file = check_file

    def linked_users(self, devices: Iterable[str]) -> dict[str, str]:
        devices = list(devices)
        found: dict[str, str] = {}
        for i in range(0, len(devices), _LOOKUP_CHUNK):
            chunk = devices[i : i + _LOOKUP_CHUNK]
            marks = ",".join("?" * len(chunk))
            found.update(self._conn.execute(f"SELECT device_id, user_id FROM merges WHERE device_id IN ({marks})", chunk))
        return found

    def link(self, pairs: Iterable[tuple[str, str]]) -> None:
        with _transaction(self._conn):
            self._conn.executemany(
                "INSERT OR IGNORE INTO merges (device_id, user_id, hour) VALUES (?, ?, ?)",
                ((device, user, self._hour) for device, user in pairs),
            )

    def group_digests(self, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], str]:
        out = {}
        for group_type, group_key in keys:
            row = self._conn.execute(
                "SELECT digest FROM groups_sent WHERE group_type = ? AND group_key = ?", (group_type, group_key)
            ).fetchone()
            if row:
                out[(group_type, group_key)] = row[0]
        return out

    def set_group_digests(self, digests: dict[tuple[str, str], str]) -> None:
        with _transaction(self._conn):
            self._conn.executemany(
                "INSERT OR REPLACE INTO groups_sent (group_type, group_key, digest) VALUES (?, ?, ?)",
                ((t, k, d) for (t, k), d in digests.items()),
            )

    def reject(self, rejections: Iterable[StoredRejection]) -> None:
        with _transaction(self._conn):
            self._conn.executemany(
                "INSERT INTO rejections (hour, reason, detail, raw) VALUES (?, ?, ?, ?)",
                ((_hour_text(r.hour), r.reason, r.detail, r.raw) for r in rejections),
            )

    def commit(self, next_cursor: datetime, stats: HourStats) -> None:
        increments = {
            "events_read": stats.events_read,
            "events_sent": stats.events_sent,
            "merges_sent": stats.merges_sent,
            "groups_sent": stats.groups_sent,
            "rejected": stats.rejected,
            "ignored": stats.ignored,
            "merge_conflicts": stats.merge_conflicts,
            "hours_done": 1,
            "hours_empty": int(stats.empty),
        }
        self._check_file()
        # The cursor is the promise that the hour is delivered: make it durable.
        self._conn.execute("PRAGMA synchronous = FULL")
        try:
            with _transaction(self._conn):
                self._conn.executemany(
                    "INSERT INTO counters (name, value) VALUES (?, ?) "
                    "ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
                    increments.items(),
                )
                self._conn.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES ('cursor', ?)", (_hour_text(next_cursor),)
                )
                self._conn.execute("DELETE FROM meta WHERE key = 'last_error'")
        finally:
            self._conn.execute("PRAGMA synchronous = NORMAL")


class SQLiteStore:
    """SQLite-backed state. One writer at a time, enforced by a lock file.

    `readonly=True` opens an existing file for `status` and listings while a
    connector runs; it takes no lock and writes nothing.
    """

    def __init__(self, path: str, *, readonly: bool = False):
        self.path = path
        self._lock_fd: int | None = None
        try:
            if readonly:
                if not os.path.exists(path):
                    raise StateError(f"no state file at {path}: nothing has run with this STATE_STORE_URL yet")
                self._conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
                self._conn.execute("PRAGMA query_only = ON")
                self._conn.execute("PRAGMA busy_timeout = 5000")
                tables = {row[0] for row in self._conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
                if not {"meta", "counters", "merges", "rejections"} <= tables:
                    raise StateError(f"the state file {path} is not initialised yet: a connector is starting, try again")
                return
            directory = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(directory):
                raise StateError(f"the directory of the state file {path} does not exist")
            self._lock()
            # Owner-only from the start: the store holds raw records and user ids.
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            os.close(fd)
            self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._identity = _file_identity(path)
            self._conn.execute("PRAGMA journal_mode = WAL")
            # NORMAL for merges and rejections (a power cut can only make them be
            # re-sent, which PostHog deduplicates); the cursor commit switches to FULL.
            self._conn.execute("PRAGMA synchronous = NORMAL")
            self._conn.execute("PRAGMA busy_timeout = 5000")
            self._conn.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            self.close()
            raise StateError(f"cannot use the state file {path}: {exc}") from exc
        except OSError as exc:
            self.close()
            raise StateError(f"cannot use the state file {path}: {exc.strerror or exc}") from exc

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

    def _meta(self, key: str) -> str | None:
        row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def cursor(self) -> datetime | None:
        value = self._meta("cursor")
        return _parse_hour(value) if value else None

    def set_initial_cursor(self, hour: datetime) -> None:
        self._write("INSERT OR IGNORE INTO meta (key, value) VALUES ('cursor', ?)", (_hour_text(hour),))

    @contextmanager
    def hour(self, hour: datetime) -> Iterator[_SQLiteHour]:
        """The writes of one attempt at `hour`. Leaving without `commit` keeps the cursor."""
        try:
            with _transaction(self._conn):
                self._conn.execute("DELETE FROM rejections WHERE hour = ?", (_hour_text(hour),))
        except sqlite3.Error as exc:
            raise StateError(f"cannot write the state file {self.path}: {exc}") from exc
        txn = _SQLiteHour(self._conn, hour, self._check_file)
        try:
            yield txn
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
        if self._conn.in_transaction:
            try:
                self._conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass

    def _write(self, sql: str, params: tuple) -> None:
        try:
            self._conn.execute(sql, params)
        except sqlite3.Error as exc:
            raise StateError(f"cannot write the state file {self.path}: {exc}") from exc

    def totals(self) -> Totals:
        counters = dict(self._conn.execute("SELECT name, value FROM counters"))
        counters["merges_recorded"] = self._conn.execute("SELECT count(*) FROM merges").fetchone()[0]
        by_reason = dict(self._conn.execute("SELECT reason, count(*) FROM rejections GROUP BY reason ORDER BY reason"))
        return Totals(counters, by_reason)

    def rejections(self, hour: datetime | None = None, reason: str | None = None, limit: int = 100) -> list[StoredRejection]:
        sql = "SELECT hour, reason, detail, raw FROM rejections WHERE 1=1"
        params: list = []
        if hour is not None:
            sql += " AND hour = ?"
            params.append(_hour_text(hour))
        if reason is not None:
            sql += " AND reason = ?"
            params.append(reason)
        sql += " ORDER BY id LIMIT ?"
        params.append(limit)
        return [StoredRejection(_parse_hour(h), r, d, bytes(raw)) for h, r, d, raw in self._conn.execute(sql, params)]

    def record_error(self, message: str | None) -> None:
        if message is None:
            self._write("DELETE FROM meta WHERE key = 'last_error'", ())
        else:
            self._write("INSERT OR REPLACE INTO meta (key, value) VALUES ('last_error', ?)", (message,))

    def last_error(self) -> str | None:
        return self._meta("last_error")

    def close(self) -> None:
        conn = getattr(self, "_conn", None)
        if conn is not None:
            conn.close()
            self._conn = None  # type: ignore[assignment]
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def open_store(path: str, *, readonly: bool = False) -> SQLiteStore:
    """The store named by STATE_STORE_URL (already reduced to a path by config)."""
    return SQLiteStore(path, readonly=readonly)
