"""The SQLite state store: atomic hours, one writer, owner-only, clear errors."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import pytest

from connector.errors import StateError
from connector.store import HourStats, SQLiteStore, StoredRejection

H = datetime(2025, 7, 1, 9, tzinfo=timezone.utc)


def test_commit_advances_cursor_merges_and_rejections_together(tmp_path):
    store = SQLiteStore(str(tmp_path / "s.sqlite"))
    store.set_initial_cursor(H)
    with store.hour(H) as txn:
        txn.link([("dev1", "user1")])
        txn.reject([StoredRejection(H, "no_usable_id", "both ids unusable", b"{}")])
        txn.commit(H + timedelta(hours=1), HourStats(events_read=3, events_sent=2, merges_sent=1, rejected=1))
    assert store.cursor() == H + timedelta(hours=1)
    with store.hour(H + timedelta(hours=1)) as txn:
        assert txn.linked_users(["dev1", "dev2"]) == {"dev1": "user1"}
    totals = store.totals()
    assert totals.counters["events_sent"] == 2 and totals.counters["merges_recorded"] == 1
    assert totals.rejected_by_reason == {"no_usable_id": 1}
    assert [r.raw for r in store.rejections(hour=H)] == [b"{}"]


def test_an_unfinished_hour_keeps_the_cursor_and_its_redo_starts_clean(tmp_path):
    store = SQLiteStore(str(tmp_path / "s.sqlite"))
    store.set_initial_cursor(H)
    with pytest.raises(RuntimeError):
        with store.hour(H) as txn:
            txn.link([("dev1", "user1")])  # PostHog accepted this merge
            txn.reject([StoredRejection(H, "x", "", b"raw")])
            raise RuntimeError("PostHog went away")
    assert store.cursor() == H
    assert store.totals().counters["merges_recorded"] == 1, "an accepted merge stays recorded: never sent twice"
    with store.hour(H) as txn:
        assert store.rejections(hour=H) == [], "the redo starts without the unfinished attempt's rejections"
        assert txn.linked_users(["dev1"]) == {"dev1": "user1"}


def test_a_killed_writer_keeps_every_committed_write(tmp_path):
    path = tmp_path / "s.sqlite"
    script = f"""
import os
from datetime import datetime, timedelta, timezone
from connector.store import SQLiteStore, HourStats
H = datetime(2025, 7, 1, 9, tzinfo=timezone.utc)
s = SQLiteStore({str(path)!r})
s.set_initial_cursor(H)
with s.hour(H) as t:
    t.link([("d", "u")]); t.commit(H + timedelta(hours=1), HourStats())
with s.hour(H + timedelta(hours=1)) as t:
    t.link([("d2", "u2")])
    os.kill(os.getpid(), 9)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert result.returncode == -9
    store = SQLiteStore(str(path))
    assert store.cursor() == H + timedelta(hours=1)
    assert store.totals().counters["merges_recorded"] == 2


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
    writer.set_initial_cursor(H)
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
    store.set_initial_cursor(H)
    store.close()
    # A read-only mount behaves like this for root too.
    store = SQLiteStore(str(path))
    store._conn.execute("PRAGMA query_only = ON")
    with pytest.raises(StateError, match="cannot write"):
        with store.hour(H) as txn:
            txn.commit(H + timedelta(hours=1), HourStats())
    store._conn.execute("PRAGMA query_only = OFF")
    assert store.cursor() == H


def test_full_disk_is_a_clear_error_and_the_cursor_stays(tmp_path):
    store = SQLiteStore(str(tmp_path / "s.sqlite"))
    store.set_initial_cursor(H)
    pages = store._conn.execute("PRAGMA page_count").fetchone()[0]
    # SQLite answers SQLITE_FULL exactly as on a full disk once the file may not grow.
    store._conn.execute(f"PRAGMA max_page_count = {pages}")
    with pytest.raises(StateError, match="full"):
        with store.hour(H) as txn:
            txn.reject([StoredRejection(H, "r", "", b"x" * 200_000)])
            txn.commit(H + timedelta(hours=1), HourStats())
    assert store.cursor() == H


def test_deleted_state_file_while_stopped_starts_over_cleanly(tmp_path):
    path = tmp_path / "s.sqlite"
    store = SQLiteStore(str(path))
    store.set_initial_cursor(H)
    store.close()
    for f in tmp_path.iterdir():
        f.unlink()
    fresh = SQLiteStore(str(path))
    assert fresh.cursor() is None


def test_state_file_deleted_while_running_refuses_to_advance(tmp_path):
    path = tmp_path / "s.sqlite"
    store = SQLiteStore(str(path))
    store.set_initial_cursor(H)
    path.unlink()
    with pytest.raises(StateError, match="deleted or replaced"):
        with store.hour(H) as txn:
            txn.commit(H + timedelta(hours=1), HourStats())
    assert not path.exists()
