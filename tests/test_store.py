"""What only the SQLite store does: one writer by flock, owner-only file, clear errors about the file.

The rules both stores follow are in test_store_contract.py, run against each.
"""

from __future__ import annotations

import os
import stat
from datetime import datetime, timedelta, timezone

import pytest

from connector.errors import StateError
from connector.sqlite_store import SQLiteStore
from connector.store import HourCounts
from connector.translate import Rejection

H = datetime(2025, 7, 1, 9, tzinfo=timezone.utc)


def test_second_writer_is_refused_by_the_lock(tmp_path):
    path = str(tmp_path / "s.sqlite")
    first = SQLiteStore(path)
    with pytest.raises(StateError, match="another connector"):
        SQLiteStore(path)
    first.close()
    SQLiteStore(path).close()  # released with the first


def test_readers_need_no_lock(tmp_path):
    path = str(tmp_path / "s.sqlite")
    writer = SQLiteStore(path)
    writer.start_at(H)
    reader = SQLiteStore(path, readonly=True)
    assert reader.cursor() == H


def test_state_file_is_owner_only(tmp_path):
    path = tmp_path / "s.sqlite"
    SQLiteStore(str(path)).close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(StateError, match="does not exist"):
        SQLiteStore(str(tmp_path / "nope" / "s.sqlite"))


def test_read_only_state_file_is_a_clear_error_and_nothing_advances(tmp_path):
    path = tmp_path / "s.sqlite"
    store = SQLiteStore(str(path))
    store.start_at(H)
    store.close()
    # A read-only mount behaves like this for root too.
    store = SQLiteStore(str(path))
    store._conn.execute("PRAGMA query_only = ON")
    with pytest.raises(StateError, match="cannot write"):
        with store.hour(H) as txn:
            txn.commit(H + timedelta(hours=1), HourCounts())
    store._conn.execute("PRAGMA query_only = OFF")
    assert store.cursor() == H


def test_full_disk_is_a_clear_error_and_the_cursor_stays(tmp_path):
    store = SQLiteStore(str(tmp_path / "s.sqlite"))
    store.start_at(H)
    pages = store._conn.execute("PRAGMA page_count").fetchone()[0]
    # SQLite answers SQLITE_FULL exactly as on a full disk once the file may not grow.
    store._conn.execute(f"PRAGMA max_page_count = {pages}")
    with pytest.raises(StateError, match="full"):
        with store.hour(H) as txn:
            txn.record_rejections([Rejection("r", "", b"x" * 200_000)])
            txn.commit(H + timedelta(hours=1), HourCounts())
    assert store.cursor() == H


def test_deleted_state_file_while_stopped_starts_over_cleanly(tmp_path):
    path = tmp_path / "s.sqlite"
    store = SQLiteStore(str(path))
    store.start_at(H)
    store.close()
    for f in tmp_path.iterdir():
        f.unlink()
    fresh = SQLiteStore(str(path))
    assert fresh.cursor() is None


def test_state_file_deleted_while_running_refuses_to_advance(tmp_path):
    path = tmp_path / "s.sqlite"
    store = SQLiteStore(str(path))
    store.start_at(H)
    path.unlink()
    with pytest.raises(StateError, match="deleted or replaced"):
        with store.hour(H) as txn:
            txn.commit(H + timedelta(hours=1), HourCounts())
    assert not path.exists()
