"""The PostgreSQL store on a real server: schema, many syncs, leases, fencing, outages, masking."""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta, timezone

import psycopg
import pytest

from connector.config import load_config
from connector.errors import ConfigError, LeaseLost, StateError, StoreUnavailable
from connector.postgres_store import _FENCE, LATEST_VERSION, TABLES, PostgresStore, check_store, migrate
from connector.store import HourCounts
from connector.store_url import masked, passwords, scrub
from connector.translate import Rejection

from .harness import wait_until
from .pg_fixtures import pg_database, pg_server, pg_url  # noqa: F401

H = datetime(2025, 7, 1, 9, tzinfo=timezone.utc)
HOUR = timedelta(hours=1)


@pytest.fixture
def stores():
    """Open PostgresStores, closed after the test: `stores(url, sync, **kw)`."""
    opened = []

    def make(url, sync="s", **kw):
        kw.setdefault("lease", timedelta(seconds=30))
        store = PostgresStore(url, sync, **kw)
        opened.append(store)
        return store

    yield make
    for store in reversed(opened):
        store.close()


def sql(url: str, query: str, params=None):
    with psycopg.connect(url) as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else None


def lease_ran_out(url: str, sync: str = "s") -> bool:
    """By the database's clock, as the store decides."""
    return sql(url, "SELECT lease_expires <= now() FROM connector_syncs WHERE name = %s", (sync,))[0][0]


# -- schema ------------------------------------------------------------------------


def test_the_schema_is_created_once_versioned_and_migrating_again_changes_nothing(pg_url, stores):
    stores(pg_url).close()
    stores(pg_url, "other").close()
    assert sql(pg_url, "SELECT version FROM connector_schema_version ORDER BY version") == [
        (v,) for v in range(1, LATEST_VERSION + 1)], "each version applied once"
    tables = {t for (t,) in sql(pg_url, "SELECT tablename FROM pg_tables WHERE tablename LIKE 'connector%'")}
    assert tables == set(TABLES)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        assert migrate(conn) == LATEST_VERSION, "already there: nothing to do"
    assert sql(pg_url, "SELECT version FROM connector_schema_version ORDER BY version") == [
        (v,) for v in range(1, LATEST_VERSION + 1)], "each version applied once"


def test_connectors_starting_together_on_an_empty_database_make_one_schema_and_one_sync(pg_url, stores):
    barrier = threading.Barrier(8)
    errors, opened = [], []

    def start():
        barrier.wait()
        try:
            opened.append(stores(pg_url))
        except Exception as exc:  # noqa: BLE001 - collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    assert sql(pg_url, "SELECT version FROM connector_schema_version ORDER BY version") == [
        (v,) for v in range(1, LATEST_VERSION + 1)], "each version applied once"
    assert sql(pg_url, "SELECT name FROM connector_syncs") == [("s",)]
    held = [s for s in opened if s.acquire().held]
    assert len(held) == 1, "one holder"


def test_a_schema_newer_than_the_connector_is_refused(pg_url, stores):
    stores(pg_url).close()
    sql(pg_url, "INSERT INTO connector_schema_version (version) VALUES (%s)", (LATEST_VERSION + 1,))
    for readonly in (False, True):
        with pytest.raises(ConfigError, match="newer than this connector"):
            stores(pg_url, readonly=readonly)


# -- many syncs ----------------------------------------------------------------------


def test_syncs_in_one_database_keep_their_own_state_and_are_worked_in_parallel(pg_url, stores):
    a, b = stores(pg_url, "project A"), stores(pg_url, "project B")
    assert a.acquire().held and b.acquire().held, "different syncs: one lease each"
    a.start_at(H)
    b.start_at(H + 10 * HOUR)
    with a.hour(H) as txn:
        txn.record_merges([("device", "user-a")])
        txn.record_group_digests({("company", "acme"): "a"})
        txn.record_rejections([Rejection("no_usable_id", "", b"a")])
        txn.commit(H + HOUR, HourCounts(events_read=7))
    b.record_error("b failed")
    assert (a.cursor(), b.cursor()) == (H + HOUR, H + 10 * HOUR)
    assert b.linked_users(["device"]) == {} and b.group_digests([("company", "acme")]) == {}
    assert b.rejections() == [] and b.totals().counters["events_read"] == 0
    assert (a.last_error(), b.last_error()) == (None, "b failed")
    with b.hour(H + 10 * HOUR) as txn:
        txn.record_merges([("device", "user-b")])  # the same device id in another project
    assert a.linked_users(["device"]) == {"device": "user-a"} and b.linked_users(["device"]) == {"device": "user-b"}
    listed = {s.name: s for s in stores(pg_url, readonly=True).syncs()}
    assert set(listed) == {"project A", "project B"}
    assert listed["project A"].hours_done == 1 and listed["project B"].last_error == "b failed"
    assert all(s.lease_active for s in listed.values())


# -- leases ---------------------------------------------------------------------------


def test_a_lease_that_ran_out_is_taken_over_with_a_new_fence(pg_url, stores):
    short = timedelta(seconds=1)
    a = stores(pg_url, lease=short, renew=False)
    b = stores(pg_url, lease=short, renew=False)
    first = a.acquire()
    assert first.held and first.fence == 1
    standby = b.acquire()
    assert not standby.held and standby.holder == first.holder
    wait_until(lambda: lease_ran_out(pg_url), 10, "the lease to run out")
    taken = b.acquire()
    assert taken.held and taken.fence == 2 and taken.takeovers == 1 and taken.acquisitions == 1
    assert sql(pg_url, "SELECT holder, fence FROM connector_syncs")[0] == (taken.holder, 2)


def test_every_write_of_a_connector_that_lost_its_lease_is_refused(pg_url, stores):
    short = timedelta(seconds=1)
    # A frozen monotonic clock: `a` believes its lease never runs out, so only the
    # database's check can stop it (as for a process paused longer than its lease).
    a = stores(pg_url, lease=short, renew=False, monotonic=lambda: 0.0)
    b = stores(pg_url, lease=short, renew=False)
    assert a.acquire().held
    a.start_at(H)
    hour = a.hour(H)
    txn = hour.__enter__()  # the old holder's hour, begun before it lost the lease
    txn.record_merges([("accepted-before", "u")])
    wait_until(lambda: lease_ran_out(pg_url), 10, "the lease to run out")

    def every_write():
        yield "merges", lambda: txn.record_merges([("late", "u")])
        yield "groups", lambda: txn.record_group_digests({("g", "k"): "late"})
        yield "rejections", lambda: txn.record_rejections([Rejection("r", "", b"late")])
        yield "commit", lambda: txn.commit(H + HOUR, HourCounts(events_read=1))
        yield "error", lambda: a.record_error("late error")
        yield "cursor", lambda: a.start_at(H + 5 * HOUR)
        yield "hour", lambda: a.hour(H + HOUR).__enter__()

    for name, write in every_write():  # expired, nobody took over yet: refused too
        with pytest.raises(LeaseLost):
            write()
    assert b.acquire().held
    for name, write in every_write():  # and after the takeover
        with pytest.raises(LeaseLost, match="does not hold the lease"):
            write()
    reader = stores(pg_url, readonly=True)
    assert reader.cursor() == H and reader.last_error() is None
    assert reader.linked_users(["accepted-before", "late"]) == {"accepted-before": "u"}
    assert reader.group_digests([("g", "k")]) == {} and reader.rejections() == []
    assert reader.totals().counters["hours_done"] == 0
    with b.hour(H) as new:  # the new holder's work stands
        new.commit(H + HOUR, HourCounts(events_read=1))
    assert reader.cursor() == H + HOUR and reader.totals().counters["hours_done"] == 1


def test_reads_in_an_hour_stop_once_the_connector_knows_its_lease_ran_out(pg_url, stores):
    now = [100.0]
    a = stores(pg_url, lease=timedelta(seconds=10), renew=False, monotonic=lambda: now[0])
    assert a.acquire().held
    a.start_at(H)
    with a.hour(H) as txn:
        assert txn.linked_users(["d"]) == {}
        now[0] += 10.0  # a whole lease without a renewal (a pause, a partition)
        assert not a.lease_state().held
        with pytest.raises(LeaseLost):
            txn.linked_users(["d"])
        with pytest.raises(LeaseLost):
            txn.group_digests([("g", "k")])


def test_the_holder_renews_its_lease_and_keeps_it_past_its_length(pg_url, stores):
    lease = timedelta(seconds=1.5)
    a = stores(pg_url, lease=lease)
    b = stores(pg_url, lease=lease)
    started = time.monotonic()
    assert a.acquire().held
    wait_until(lambda: a.lease_state().renewals >= 4, 10, "four renewals")
    assert time.monotonic() - started > lease.total_seconds()
    assert not b.acquire().held and not lease_ran_out(pg_url)
    assert a.lease_state().held


def test_closing_releases_the_lease_so_the_next_holder_takes_it_at_once(pg_url, stores):
    a, b = stores(pg_url), stores(pg_url)
    assert a.acquire().held and not b.acquire().held
    a.close()
    state = b.acquire()
    assert state.held and state.takeovers == 0, "a released lease is a handover, not a failover"


def test_a_frozen_holder_inside_a_transaction_loses_its_session_and_its_row_lock(pg_url, stores):
    lease = timedelta(seconds=1.5)
    a = stores(pg_url, lease=lease, renew=False)
    b = stores(pg_url, lease=lease, renew=False)
    assert a.acquire().held
    # `a` stops in the middle of a fenced write, holding the row lock that blocks a takeover.
    a._main.run(lambda conn: (conn.execute("BEGIN"), conn.execute(_FENCE, (a._sync_id, a._holder, 1))))
    started = time.monotonic()
    wait_until(lambda: b.acquire().held, 10, "the standby to take over")
    assert time.monotonic() - started < lease.total_seconds() * 4 / 3 + 1.0


def test_an_hour_is_never_committed_twice(pg_url, stores):
    a = stores(pg_url)
    assert a.acquire().held
    a.start_at(H)
    with a.hour(H) as first, a.hour(H) as second:
        first.commit(H + HOUR, HourCounts(events_read=1))
        with pytest.raises(StateError, match="not committing that hour again"):
            second.commit(H + HOUR, HourCounts(events_read=1))
    assert a.totals().counters["hours_done"] == 1 and a.cursor() == H + HOUR


# -- outages and bad URLs ------------------------------------------------------------


def test_writes_ride_out_a_server_restart_mid_hour(pg_server, pg_url, stores):
    a = stores(pg_url)
    assert a.acquire().held
    a.start_at(H)
    with a.hour(H) as txn:
        txn.record_merges([("d1", "u1")])
        pg_server.restart()  # every connection of the store is cut
        txn.record_merges([("d2", "u2")])
        txn.record_rejections([Rejection("r", "", b"raw")])
        txn.commit(H + HOUR, HourCounts(events_read=1))
    assert a.cursor() == H + HOUR and a.totals().counters["hours_done"] == 1
    assert a.linked_users(["d1", "d2"]) == {"d1": "u1", "d2": "u2"} and len(a.rejections()) == 1
    assert a.lease_state().held


def test_a_retried_write_whose_first_attempt_landed_is_applied_once(pg_url, stores):
    a = stores(pg_url)
    assert a.acquire().held
    a.start_at(H)
    run = a._main.run

    def answer_lost(work, **kw):
        # Every write commits, then its connection drops before the answer arrives.
        first = [True]

        def landed_then_cut(conn):
            result = work(conn)
            if first[0]:
                first[0] = False
                conn.pgconn.finish()
                raise psycopg.OperationalError("server closed the connection unexpectedly")
            return result

        return run(landed_then_cut, **kw)

    a._main.run = answer_lost
    try:
        with a.hour(H) as txn:
            txn.record_rejections([Rejection("r", "", b"raw")])
            txn.record_merges([("d", "u")])
            txn.record_group_digests({("g", "k"): "x"})
            txn.commit(H + HOUR, HourCounts(events_read=1))
    finally:
        a._main.run = run
    assert len(a.rejections()) == 1 and a.linked_users(["d"]) == {"d": "u"}
    assert a.totals().counters["hours_done"] == 1 and a.cursor() == H + HOUR


def test_a_stopped_server_is_a_retryable_error_that_names_no_password(pg_server, pg_url, stores):
    a = stores(pg_url, lease=timedelta(seconds=1))  # retries for one lease, then gives up
    assert a.acquire().held
    pg_server.stop()
    try:
        with pytest.raises(StoreUnavailable) as info:
            a.start_at(H)
    finally:
        pg_server.start()
    for secret in passwords(pg_url):
        assert secret not in str(info.value)
    assert a.start_at(H) == H


@pytest.mark.parametrize("case", ["unreachable", "wrong password", "missing database"])
@pytest.mark.parametrize("readonly", [False, True], ids=["writer", "reader"])
def test_a_store_that_cannot_be_used_at_start_is_a_config_error_naming_the_variable(pg_server, pg_url, case,
                                                                                      readonly, stores):
    url = {
        "unreachable": pg_url.replace(f":{pg_server.port}/", ":1/"),
        "wrong password": psycopg.conninfo.make_conninfo(pg_url, password="wrong-pass-77"),
        "missing database": pg_url.rsplit("/", 1)[0] + "/no_such_db",
    }[case]
    if case == "wrong password":  # a URL, as users write them
        user = psycopg.conninfo.conninfo_to_dict(pg_url)["user"]
        url = pg_url.replace(pg_url.split("//", 1)[1].split("@", 1)[0], f"{user}:wrong-pass-77")
    with pytest.raises(ConfigError) as info:
        stores(url, readonly=readonly)
    [problem] = info.value.problems
    assert problem.variable == "STATE_STORE_URL" and problem.text.startswith("STATE_STORE_URL")
    assert masked(url) in problem.text
    for secret in passwords(url) + passwords(pg_url):
        assert secret not in problem.text
    expected = {"unreachable": "Connection refused", "wrong password": "password authentication failed",
                "missing database": "does not exist"}[case]
    assert expected in problem.text
    assert sql(pg_url, "SELECT count(*) FROM pg_tables WHERE tablename LIKE 'connector%'") == [(0,)], "nothing made"


def test_check_says_whether_this_role_can_create_the_tables(pg_server, pg_url, stores):
    result = check_store(pg_url)
    assert result["ok"] and result["schema_version"] is None and result["writable"]
    stores(pg_url).close()
    assert check_store(pg_url)["schema_version"] == LATEST_VERSION
    pg_server.create_role("visitor", "visitor-pass-1")
    try:
        visitor = psycopg.conninfo.make_conninfo(pg_url, user="visitor", password="visitor-pass-1")
        dbname = psycopg.conninfo.conninfo_to_dict(pg_url)["dbname"]
        visitor_url = f"postgresql://visitor:visitor-pass-1@127.0.0.1:{pg_server.port}/{dbname}"
        assert psycopg.connect(visitor).close() is None
        result = check_store(visitor_url)
        assert not result["ok"] and "cannot write" in result["error"] and "visitor-pass-1" not in str(result)
    finally:
        with pg_server.connect(dbname) as conn:
            conn.execute("DROP OWNED BY visitor")
        pg_server.drop_role("visitor")


# -- masking -------------------------------------------------------------------------


def test_masking_finds_the_password_however_it_is_written():
    url = "postgresql://conn:p%40ss-W0rd@db.internal:5432/state?sslmode=require"
    assert masked(url) == "postgresql://conn:***@db.internal:5432/state?sslmode=require"
    assert set(passwords(url)) == {"p%40ss-W0rd", "p@ss-W0rd"}
    assert masked("postgres://u:secret-1@h/d?password=other-2") == "postgres://u:***@h/d?password=***"
    assert masked("/data/state.sqlite") == "/data/state.sqlite"
    echoed = f'invalid dsn: "{url}"; user=conn password=p@ss-W0rd host=db; tried p@ss-W0rd twice'
    cleaned = scrub(echoed, url)
    assert "p@ss" not in cleaned and "W0rd" not in cleaned and "db.internal:5432/state" in cleaned
    assert scrub("mysql://x:hidden-9@h/d", "") == "mysql://x:***@h/d", "anything shaped like a URL password"


def test_config_accepts_postgres_urls_and_never_echoes_their_password():
    base = {"AMPLITUDE_API_KEY": "amp-key-7f3a9", "AMPLITUDE_SECRET_KEY": "amp-secret-b21c4",
            "POSTHOG_PROJECT_API_KEY": "phc_secret_98d1", "POSTHOG_HOST": "https://posthog.example.com"}
    for url in ("postgresql://u:pw-3344@db:5432/state", "postgres://u:pw-3344@db/state"):
        config = load_config({**base, "STATE_STORE_URL": url})
        assert config.state_store_url == url and "pw-3344" in config.secret_values()
        assert "pw-3344" not in repr(config) + str(config)
    for bad in ("postgresql://u:pw-3344@:5432/state", "postgresql://u:pw-3344@db:port/state"):
        with pytest.raises(ConfigError) as info:
            load_config({**base, "STATE_STORE_URL": bad})
        assert "STATE_STORE_URL" in str(info.value) and "pw-3344" not in str(info.value)
