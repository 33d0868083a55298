"""The state store's contract, held against both backends: SQLite and a real PostgreSQL.

Every test here runs twice (`[sqlite]`, `[postgres]`) through `open_store`, the
way the connector opens its store. What only one backend does (SQLite's file
modes and full disk, PostgreSQL's leases and migrations) is tested in
tests/test_store.py and tests/test_postgres_store.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psycopg
import pytest

from connector.errors import LeaseLost, StateError
from connector.store import DryRunStore, HourCounts, StateStore, open_store
from connector.translate import Rejection

from .pg_fixtures import pg_server, pg_url  # noqa: F401

H = datetime(2025, 7, 1, 9, tzinfo=timezone.utc)
HOUR = timedelta(hours=1)
ROOT = Path(__file__).resolve().parent.parent
SYNC = "contract sync"


@dataclass
class Backend:
    kind: str
    url: str
    opened: list = field(default_factory=list)

    def open(self, *, readonly: bool = False, sync: str = SYNC, acquire: bool = True) -> StateStore:
        store = open_store(self.url, readonly=readonly, sync=sync, lease=timedelta(seconds=30))
        self.opened.append(store)
        if acquire and not readonly:
            assert store.acquire().held
        return store

    def exists(self) -> bool:
        """Whether anything of a store was created."""
        if self.kind == "sqlite":
            return any(Path(self.url).parent.iterdir())
        with psycopg.connect(self.url) as conn:
            return conn.execute("SELECT count(*) FROM pg_tables WHERE tablename LIKE 'connector%'").fetchone()[0] > 0


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request, tmp_path):
    if request.param == "sqlite":
        state_dir = tmp_path / "state"
        state_dir.mkdir()
        b = Backend("sqlite", str(state_dir / "state.sqlite"))
    else:
        b = Backend("postgres", request.getfixturevalue("pg_url"))
    yield b
    for store in reversed(b.opened):
        store.close()


def test_a_new_store_reads_as_empty(backend):
    store = backend.open()
    assert store.cursor() is None and store.last_error() is None
    assert store.rejections() == []
    totals = store.totals()
    assert set(totals.counters.values()) == {0} and totals.rejected_by_reason == {}
    assert store.linked_users(["d"]) == {} and store.group_digests([("t", "k")]) == {}


def test_the_first_cursor_is_stored_once(backend):
    store = backend.open()
    assert store.start_at(H) == H
    assert store.start_at(H + 5 * HOUR) == H, "a stored cursor wins over a later START_DATE"
    assert store.cursor() == H


def test_commit_advances_the_cursor_with_the_hours_counts(backend):
    store = backend.open()
    store.start_at(H)
    with store.hour(H) as txn:
        txn.record_merges([("dev1", "user1")])
        txn.record_rejections([Rejection("no_usable_id", "both ids unusable", b"{}")])
        txn.commit(H + HOUR, HourCounts(events_read=3, events_sent=2, merges_sent=1, rejected=1))
    assert store.cursor() == H + HOUR
    with store.hour(H + HOUR) as txn:
        assert txn.linked_users(["dev1", "dev2"]) == {"dev1": "user1"}
    totals = store.totals()
    assert totals.counters["events_sent"] == 2 and totals.counters["merges_recorded"] == 1
    assert totals.counters["hours_done"] == 1 and totals.counters["hours_empty"] == 0
    assert totals.rejected_by_reason == {"no_usable_id": 1}
    assert [r.raw for _, r in store.rejections(hour=H)] == [b"{}"]


def test_the_first_commit_stores_the_cursor_when_none_was_stored(backend):
    store = backend.open()
    with store.hour(H) as txn:  # the loop stores no cursor before its first hour commits
        txn.commit(H + HOUR, HourCounts(events_read=1))
    assert store.cursor() == H + HOUR and store.totals().counters["hours_done"] == 1


def test_an_unfinished_hour_keeps_the_cursor_and_its_redo_starts_clean(backend):
    store = backend.open()
    store.start_at(H)
    with pytest.raises(RuntimeError):
        with store.hour(H) as txn:
            txn.record_merges([("dev1", "user1")])  # PostHog accepted this merge
            txn.record_rejections([Rejection("x", "", b"raw")])
            raise RuntimeError("PostHog went away")
    assert store.cursor() == H
    assert store.totals().counters["merges_recorded"] == 1, "an accepted merge stays recorded: never sent twice"
    assert store.totals().counters["hours_done"] == 0
    with store.hour(H) as txn:
        assert store.rejections(hour=H) == [], "the redo starts without the unfinished attempt's rejections"
        assert txn.linked_users(["dev1"]) == {"dev1": "user1"}


def test_a_device_keeps_its_first_user_and_group_digests_are_replaced(backend):
    store = backend.open()
    store.start_at(H)
    with store.hour(H) as txn:
        txn.record_merges([("dev1", "user1"), ("dev2", "user2")])
        txn.record_merges([("dev1", "someone-else")])  # recording again is safe and changes nothing
        txn.record_group_digests({("company", "acme"): "d1", ("team", "x"): "d2"})
        txn.record_group_digests({("company", "acme"): "d3"})
        assert txn.group_digests([("company", "acme"), ("team", "x"), ("team", "y")]) == {
            ("company", "acme"): "d3", ("team", "x"): "d2"}
        txn.commit(H + HOUR, HourCounts())
    assert store.linked_users(["dev1", "dev2", "dev3"]) == {"dev1": "user1", "dev2": "user2"}
    assert store.totals().counters["merges_recorded"] == 2


def test_rejections_keep_their_raw_bytes_in_order_and_filter_by_hour_and_reason(backend):
    store = backend.open()
    store.start_at(H)
    raws = [b"\xff\xfe not utf-8", "héllo".encode(), b"x" * 70_000]
    with store.hour(H) as txn:
        txn.record_rejections([Rejection("bad_json", "line 1", raws[0]), Rejection("no_usable_id", "", raws[1])])
        txn.commit(H + HOUR, HourCounts(rejected=2))
    with store.hour(H + HOUR) as txn:
        txn.record_rejections([Rejection("bad_json", "line 9", raws[2])])
        txn.commit(H + 2 * HOUR, HourCounts(rejected=1))
    assert [(at, r.raw) for at, r in store.rejections()] == [(H, raws[0]), (H, raws[1]), (H + HOUR, raws[2])]
    assert [r.detail for _, r in store.rejections(reason="bad_json")] == ["line 1", "line 9"]
    assert [r.reason for _, r in store.rejections(hour=H + HOUR)] == ["bad_json"]
    assert len(store.rejections(limit=1)) == 1
    assert store.totals().rejected_by_reason == {"bad_json": 2, "no_usable_id": 1}


def test_the_last_error_is_kept_until_an_hour_commits(backend):
    store = backend.open()
    store.start_at(H)
    store.record_error("PostHogUnavailable: 503")
    assert store.last_error() == "PostHogUnavailable: 503"
    with store.hour(H) as txn:
        txn.commit(H + HOUR, HourCounts())
    assert store.last_error() is None
    store.record_error("x")
    store.record_error(None)
    assert store.last_error() is None


def test_everything_survives_closing_and_reopening(backend):
    store = backend.open()
    store.start_at(H)
    with store.hour(H) as txn:
        txn.record_merges([("d", "u")])
        txn.record_group_digests({("g", "k"): "digest"})
        txn.record_rejections([Rejection("r", "", b"raw")])
        txn.commit(H + HOUR, HourCounts(events_read=5, events_sent=5))
    store.record_error("boom")
    store.close()
    again = backend.open()
    assert again.cursor() == H + HOUR and again.last_error() == "boom"
    assert again.linked_users(["d"]) == {"d": "u"} and again.group_digests([("g", "k")]) == {("g", "k"): "digest"}
    assert again.totals().counters["events_sent"] == 5 and len(again.rejections()) == 1


def test_a_reader_sees_the_writer_and_cannot_write(backend):
    writer = backend.open()
    writer.start_at(H)
    reader = backend.open(readonly=True)
    assert reader.cursor() == H
    with pytest.raises(StateError, match="read-only"):
        reader.start_at(H)
    with pytest.raises(StateError, match="read-only"):
        with reader.hour(H):
            pass
    assert not reader.lease_state().held


def test_a_reader_of_a_store_never_written_creates_nothing(backend):
    reader = backend.open(readonly=True)
    assert reader.cursor() is None and reader.totals().counters["hours_done"] == 0
    assert reader.rejections() == [] and reader.syncs() == [] and reader.last_error() is None
    reader.close()
    assert not backend.exists()


def test_a_second_writer_on_the_same_sync_cannot_write(backend):
    first = backend.open()
    first.start_at(H)
    try:
        second = backend.open(acquire=False)
    except StateError as exc:  # SQLite: refused at open by the flock
        assert "another connector" in str(exc)
        return
    state = second.acquire()
    assert not state.held and state.holder == first.lease_state().holder
    with pytest.raises(LeaseLost):
        second.start_at(H + HOUR)
    with pytest.raises(LeaseLost):
        second.record_error("the standby's error")
    with pytest.raises(LeaseLost):
        with second.hour(H) as txn:
            txn.commit(H + HOUR, HourCounts())
    assert first.cursor() == H and first.last_error() is None


def test_closing_the_writer_lets_the_next_one_work(backend):
    first = backend.open()
    first.start_at(H)
    first.close()
    second = backend.open()
    with second.hour(H) as txn:
        txn.commit(H + HOUR, HourCounts())
    assert second.cursor() == H + HOUR


def test_the_writer_holds_the_lease_and_syncs_lists_it(backend):
    store = backend.open()
    store.start_at(H)
    with store.hour(H) as txn:
        txn.commit(H + HOUR, HourCounts(events_read=1))
    state = store.lease_state()
    assert state.held and state.sync == SYNC and state.acquisitions == 1
    [info] = backend.open(readonly=True).syncs()
    assert (info.name, info.cursor, info.hours_done, info.last_error) == (SYNC, H + HOUR, 1, None)
    assert info.lease_active in (True, None), "None: a reader cannot see SQLite's flock"


def test_a_dry_run_over_the_store_changes_nothing(backend):
    store = backend.open()
    store.start_at(H)
    store.close()
    dry = DryRunStore(backend.open(readonly=True))
    assert dry.lease_state().held, "a dry run needs no lease"
    with dry.hour(H) as txn:
        txn.record_merges([("d", "u")])
        assert txn.linked_users(["d"]) == {"d": "u"}
        txn.commit(H + HOUR, HourCounts(events_read=1))
    assert dry.cursor() == H + HOUR
    real = backend.open(readonly=True)
    assert real.cursor() == H and real.linked_users(["d"]) == {} and real.totals().counters["hours_done"] == 0


def test_a_killed_writer_keeps_every_committed_write(backend):
    script = f"""
import os
from datetime import datetime, timedelta, timezone
from connector.store import HourCounts, open_store
H = datetime(2025, 7, 1, 9, tzinfo=timezone.utc)
s = open_store({backend.url!r}, sync={SYNC!r})
assert s.acquire().held
s.start_at(H)
with s.hour(H) as t:
    t.record_merges([("d", "u")]); t.commit(H + timedelta(hours=1), HourCounts())
with s.hour(H + timedelta(hours=1)) as t:
    t.record_merges([("d2", "u2")])
    os.kill(os.getpid(), 9)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert result.returncode == -9, result.stderr
    store = backend.open(readonly=True)
    assert store.cursor() == H + HOUR
    assert store.totals().counters["merges_recorded"] == 2


# -- what the read-back needs (verify) ------------------------------------------------

def test_deliveries_are_kept_per_hour_and_day_and_replaced_by_a_redo(backend):
    from datetime import date

    store = backend.open()
    store.start_at(H)
    at = H + 4 * HOUR
    with store.hour(H) as txn:
        txn.record_delivery({date(2025, 7, 1): 5, date(2025, 6, 30): 2}, at)
        txn.commit(H + HOUR, HourCounts(events_read=7, events_sent=7))
    with store.hour(H + HOUR) as txn:
        txn.record_delivery({}, at)  # an empty hour still counts as delivered
        txn.commit(H + 2 * HOUR, HourCounts())
    with store.hour(H + 2 * HOUR) as txn:
        txn.record_delivery({date(2025, 7, 1): 9}, at)  # not committed: not a delivered hour yet
    [first, empty] = store.deliveries()
    assert (first.hour, dict(first.days), first.delivered_at, first.events) == (
        H, {date(2025, 7, 1): 5, date(2025, 6, 30): 2}, at, 7)
    assert (empty.hour, dict(empty.days)) == (H + HOUR, {})
    with store.hour(H) as txn:  # a repair replaces the hour's record
        txn.record_delivery({date(2025, 7, 1): 6}, at + HOUR)
    [again] = store.deliveries(H, H + HOUR)
    assert dict(again.days) == {date(2025, 7, 1): 6} and again.delivered_at == at + HOUR
    assert store.deliveries(H + HOUR) == [empty]


def test_verdicts_keep_the_latest_per_hour(backend):
    from connector.store import Verdict

    store = backend.open()
    store.start_at(H)
    first = Verdict(H, "short", 10, 7, 3, 0, 1, H + 5 * HOUR, 0)
    store.record_verdicts([first, Verdict(H + HOUR, "whole", 4, 4, 0, 0, 0, H + 5 * HOUR, 0)])
    store.record_verdicts([Verdict(H, "pending", 0, 0, 0, 0, 0, H + 6 * HOUR, 1)])
    verdicts = store.verdicts()
    assert verdicts[H] == Verdict(H, "pending", 0, 0, 0, 0, 0, H + 6 * HOUR, 1)
    assert list(store.verdicts(H + HOUR)) == [H + HOUR]


def test_merges_of_an_hour_and_a_spread_sample(backend):
    store = backend.open()
    store.start_at(H)
    with store.hour(H) as txn:
        txn.record_merges([(f"d{i:03}", f"u{i:03}") for i in range(100)])
        txn.commit(H + HOUR, HourCounts())
    with store.hour(H + HOUR) as txn:
        txn.record_merges([("late-device", "late-user")])
        txn.commit(H + 2 * HOUR, HourCounts())
    assert store.merges_of(H + HOUR) == {"late-device": "late-user"}
    assert len(store.merges_of(H)) == 100
    sample = store.merge_sample(10, H + HOUR)
    assert len(sample) == 10 and ("late-device", "late-user") not in sample
    assert sample == store.merge_sample(10, H + HOUR), "the same sample each time"
    assert sample[0] != ("d000", "u000") or sample[-1][0] > "d090", "spread over the history"
