"""Connectors as real processes on one real PostgreSQL: failover, pauses, restarts, bad URLs.

Each test runs `python -m connector` processes (tests/harness.py `spawn`) against
the fake Amplitude and PostHog servers and a PostgreSQL server of its own
(tests/pgserver.py), and checks the delivery guarantee from what PostHog
received and what the database holds.
"""

from __future__ import annotations

import json
import re
import signal
import threading
import time
import urllib.request
from datetime import timedelta

import psycopg
import pytest

from connector.postgres_store import LATEST_VERSION
from connector.lease import takeover_bound
from connector.store_url import passwords

from .fakes.posthog import FakePostHog
from .harness import (AMP_KEY, AMP_SECRET, HOUR, PH_KEY, START, check_delivery, connector_env, free_port,
                      populate, run, spawn, wait_until)
from .pg_fixtures import pg_database, pg_server, pg_url  # noqa: F401

LEASE = 3  # seconds: the shortest LEASE_SECONDS allows, so takeovers are quick
IDENTITY_EVENTS = ("$create_alias", "$groupidentify")
SECRETS = (AMP_KEY, AMP_SECRET, PH_KEY)


def pg_env(amp, ph, tmp_path, url: str, hours: int, **overrides: str) -> dict[str, str]:
    settings = {"STATE_STORE_URL": url, "LEASE_SECONDS": str(LEASE), "POLL_INTERVAL_MINUTES": "0.05",
                "END_DATE": (START + hours * HOUR).strftime("%Y-%m-%dT%H"), **overrides}
    return connector_env(amp, ph, tmp_path, **settings)


def query(url: str, sql: str, params=None) -> list[tuple]:
    with psycopg.connect(url, connect_timeout=5) as conn:
        return conn.execute(sql, params).fetchall()


def sync_row(url: str) -> tuple | None:
    """(holder, lease active by the database's clock, cursor, hours done) of the only sync, or None."""
    try:
        rows = query(url, "SELECT s.holder, coalesce(s.lease_expires > now(), false), s.cursor_hour, "
                          "coalesce(c.value, 0) FROM connector_syncs s LEFT JOIN connector_counters c "
                          "ON c.sync_id = s.id AND c.name = 'hours_done'")
    except psycopg.Error:  # no schema yet, or the server is restarting
        return None
    assert len(rows) <= 1
    return rows[0] if rows else None


def holder_pid(url: str) -> int | None:
    row = sync_row(url)
    return int(row[0].split(":")[1]) if row and row[0] and row[1] else None


def cursor_is(url: str, hour) -> bool:
    row = sync_row(url)
    return bool(row and row[2] == hour)


def expected_uuids(amp, tmp_path, env) -> set[str]:
    """What one clean sync delivers (SQLite, a PostHog of its own)."""
    clean = tmp_path / "clean"
    clean.mkdir()
    with FakePostHog(PH_KEY) as probe:
        code, _ = run(["sync"], {**env, "POSTHOG_HOST": probe.base_url, "STATE_STORE_URL": str(clean / "s.sqlite"),
                                 "MAX_EVENTS_PER_SECOND": "0"})
        assert code == 0
        return {e.uuid for e in probe.events}


def sent_events(ph) -> int:
    return sum(1 for e in ph.events if e.event not in IDENTITY_EVENTS)


def metrics(port: int) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            return response.read().decode()
    except OSError:
        return None


def metric(text: str | None, name: str) -> float | None:
    match = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text or "", re.MULTILINE)
    return float(match.group(1)) if match else None


class Connector:
    """`python -m connector run` as a process whose JSON log lines are read as they
    come (a thread drains stderr), so a test can wait for one while it runs."""

    def __init__(self, env: dict[str, str], port: int | None = None):
        self.port = port
        self.proc = spawn(["run"], {**env, "HEALTH_PORT": str(port)} if port else env)
        self.pid = self.proc.pid
        self._lines: list[dict] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            if line.startswith("{"):
                with self._cond:
                    self._lines.append(json.loads(line))
                    self._cond.notify_all()

    @property
    def logs(self) -> list[dict]:
        with self._cond:
            return list(self._lines)

    def wait_for_log(self, predicate, timeout: float, what: str) -> dict:
        with self._cond:
            if not self._cond.wait_for(lambda: any(predicate(l) for l in self._lines), timeout):
                raise AssertionError(f"timed out waiting for {what}; logs: {self._lines[-5:]}")
            return next(l for l in self._lines if predicate(l))

    def metrics(self) -> str | None:
        return metrics(self.port)

    def stop(self) -> int:
        """SIGTERM (after SIGCONT, should it be paused); its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        finally:
            self.proc.kill()
            self.proc.wait()
            self._reader.join(timeout=10)
        return self.proc.returncode


def stop(*connectors: Connector | None) -> list[int]:
    return [c.stop() for c in connectors if c is not None]


def on_event_request(ph, url: str, min_events: int, action) -> list:
    """Run `action()` once, inside the first request that brings PostHog to `min_events`
    events, before PostHog answers it: the sender is then certainly mid-hour, since
    it cannot commit the hour without that answer. Returns [the stored cursor then]."""
    done: list = []

    def on_request(request):
        if not done and request.n_events and sent_events(ph) >= min_events:
            row = sync_row(url)
            done.append(row[2] if row else None)  # None: no hour committed yet
            action()

    ph.on_request = on_request
    return done


def test_the_standby_takes_over_within_the_bound_when_the_holder_is_killed_mid_hour(amp, ph, tmp_path, pg_url):
    hours = 3
    populate(amp, hours=hours, events_per_hour=300)
    env = pg_env(amp, ph, tmp_path, pg_url, hours, MAX_EVENTS_PER_SECOND="200", BATCH_SIZE="25", LOG_LEVEL="INFO")
    expected = expected_uuids(amp, tmp_path, env)
    killed: list[float] = []
    holder = Connector({**env, "MAX_EVENTS_PER_SECOND": "20"})  # slow until the standby is ready
    standby = None
    try:
        wait_until(lambda: holder_pid(pg_url) == holder.pid, 30, "the first connector to hold the lease")
        standby = Connector(env, port=free_port())
        wait_until(lambda: metric(standby.metrics(), "connector_lease_held") == 0.0, 30, "the second to stand by")
        assert run(["sync"], env)[0] == 1, "a one-shot sync meanwhile is refused: the sync is being worked"
        at = on_event_request(ph, pg_url, sent_events(ph) + 10,
                              lambda: (holder.proc.kill(), killed.append(time.monotonic())))
        holder.proc.wait(timeout=30)
        wait_until(lambda: holder_pid(pg_url) == standby.pid, 30, "the standby to take over")
        took = time.monotonic() - killed[0]
        assert took <= takeover_bound(timedelta(seconds=LEASE)).total_seconds() + 1.0, f"took over after {took:.1f}s"
        assert (at[0] or START) == START, "killed mid-way through the first hour"
        wait_until(lambda: cursor_is(pg_url, START + hours * HOUR), 60, "the standby to finish the import")
        text = standby.metrics()
        assert metric(text, "connector_lease_held") == 1.0
        assert metric(text, "connector_lease_takeovers_total") == 1.0
        assert metric(text, "connector_lease_renewals_total") >= 1.0
        assert re.search(r'connector_lease_info\{[^}]*role="held"[^}]*\} 1\.0', text)
    finally:
        ph.on_request = None
        codes = stop(standby)
        holder.proc.kill()
        holder.stop()
    assert codes == [0]
    logs = standby.logs
    standby_logs = [l for l in logs if l["message"].startswith("standby:")]
    assert len(standby_logs) == 1, "logged once"
    assert standby_logs[0]["holder"].split(":")[1] == str(holder.pid), "naming the holder"
    assert any(l["message"].startswith("lease acquired") and l["takeover"] for l in logs)
    assert sync_row(pg_url)[3] == hours, "each hour committed once"
    check_delivery(ph, expected)


def test_a_holder_paused_past_its_lease_cannot_commit_after_the_takeover(amp, ph, tmp_path, pg_url):
    hours = 2
    populate(amp, hours=hours, events_per_hour=300)
    env = pg_env(amp, ph, tmp_path, pg_url, hours, BATCH_SIZE="25", LOG_LEVEL="INFO")
    expected = expected_uuids(amp, tmp_path, env)
    paused = Connector({**env, "MAX_EVENTS_PER_SECOND": "100"}, port=free_port())
    other = None
    try:
        wait_until(lambda: holder_pid(pg_url) == paused.pid, 30, "the first connector to hold the lease")
        # Frozen while it sends the first hour's events (one block): its next store
        # call, once resumed, is that hour's commit.
        at = on_event_request(ph, pg_url, 20, lambda: paused.proc.send_signal(signal.SIGSTOP))
        other = Connector(env)
        wait_until(lambda: holder_pid(pg_url) == other.pid, 30, "the other connector to take over")
        assert (at[0] or START) == START
        wait_until(lambda: cursor_is(pg_url, START + hours * HOUR), 60, "the new holder to finish the import")
        paused.proc.send_signal(signal.SIGCONT)
        # Resumed, it sends the rest of its hour (same uuids), is refused its commit, stands by.
        refused = paused.wait_for_log(lambda l: l["message"].startswith("standby:"), 30, "the resumed one to stand by")
        # Its first write of the hour after the takeover (the hour's delivery record, then its commit) is refused.
        assert re.search(r"(the commit of hour 2025-07-01T10:00:00Z|recording the delivery) was refused",
                         refused["reason"]), refused
        assert refused["level"] == "WARNING" and refused["holder"].split(":")[1] == str(other.pid)
        assert any(l["message"] == "lease ran out before it could be renewed" for l in paused.logs), \
            "resumed, its renewal thread found the lease gone at once"
        text = paused.metrics()
        assert metric(text, "connector_lease_held") == 0.0
        assert re.search(rf'connector_lease_info\{{[^}}]*holder="[^"]*:{other.pid}:[^"]*"[^}}]*role="standby"', text)
    finally:
        ph.on_request = None
        codes = stop(paused, other)
    assert codes == [0, 0]
    row = sync_row(pg_url)
    assert row[2] == START + hours * HOUR and row[3] == hours, "the new holder's work stands: each hour once"
    check_delivery(ph, expected)


def test_a_postgres_restart_mid_hour_loses_nothing_and_commits_each_hour_once(amp, ph, tmp_path, pg_server, pg_url):
    hours = 3
    populate(amp, hours=hours, events_per_hour=300)
    env = pg_env(amp, ph, tmp_path, pg_url, hours, BATCH_SIZE="25", LOG_LEVEL="INFO", LEASE_SECONDS="30")
    expected = expected_uuids(amp, tmp_path, env)
    at = on_event_request(ph, pg_url, 40, pg_server.restart)  # while the connector waits for PostHog's answer
    connector = Connector(env)
    try:
        wait_until(lambda: cursor_is(pg_url, START + hours * HOUR), 90, "the import to finish")
    finally:
        ph.on_request = None
        codes = stop(connector)
    assert codes == [0]
    assert (at[0] or START) == START, "restarted mid-way through the first hour"
    assert any(l["message"] == "state store connection lost; retrying" for l in connector.logs)
    assert sync_row(pg_url)[3] == hours, "each hour committed once"
    check_delivery(ph, expected)


def test_two_connectors_starting_at_once_on_an_empty_database_make_one_schema_and_one_holder(amp, ph, tmp_path,
                                                                                            pg_url):
    hours = 2
    populate(amp, hours=hours, events_per_hour=200)
    env = pg_env(amp, ph, tmp_path, pg_url, hours, LOG_LEVEL="INFO")
    first, second = Connector(env), Connector(env)
    try:
        wait_until(lambda: cursor_is(pg_url, START + hours * HOUR), 60, "the import to finish")
        assert holder_pid(pg_url) in (first.pid, second.pid)
    finally:
        codes = stop(first, second)
    assert codes == [0, 0]
    assert query(pg_url, "SELECT version FROM connector_schema_version ORDER BY version") == [
        (v,) for v in range(1, LATEST_VERSION + 1)], "each version applied once"
    assert len(query(pg_url, "SELECT id FROM connector_syncs")) == 1
    roles = sorted(("held" if any(l["message"].startswith("lease acquired") for l in c.logs) else "") +
                   ("standby" if any(l["message"].startswith("standby:") for l in c.logs) else "")
                   for c in (first, second))
    assert roles == ["held", "standby"], "one worked, the other stood by"
    uuids = ph.uuids()
    assert len(uuids) == len(set(uuids)), "only one connector sent: nothing twice"
    assert sync_row(pg_url)[3] == hours


@pytest.mark.parametrize("command", ["run", "sync", "status"])
@pytest.mark.parametrize("case", ["unreachable", "wrong password", "missing database"])
def test_an_unusable_store_at_start_exits_2_naming_the_variable_with_the_password_masked(amp, ph, tmp_path, pg_server,
                                                                                         pg_url, case, command):
    auth, rest = pg_url.split("//", 1)[1].split("@", 1)
    user = auth.split(":", 1)[0]
    url = {
        "unreachable": pg_url.replace(f":{pg_server.port}/", f":{free_port()}/"),
        "wrong password": pg_url.replace(auth, f"{user}:not-the-pass-5a1"),
        "missing database": pg_url.rsplit("/", 1)[0] + "/missing_db",
    }[case]
    env = pg_env(amp, ph, tmp_path, url, 1)
    proc = spawn([command], env)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, err
    [line] = [json.loads(l) for l in err.splitlines()]
    assert line["message"] == "configuration error"
    [problem] = line["problems"]
    assert problem["variable"] == "STATE_STORE_URL" and ":***@" in problem["problem"]
    for secret in passwords(url) + passwords(pg_url) + SECRETS:
        assert secret not in out + err
    assert query(pg_url, "SELECT count(*) FROM pg_tables WHERE tablename LIKE 'connector%'") == [(0,)], "nothing made"
    assert ph.requests == [] and amp.requests == []


def test_status_shows_this_sync_and_all_lists_every_sync_with_cursor_and_lag(amp, ph, tmp_path, pg_url):
    populate(amp, hours=3)
    env = pg_env(amp, ph, tmp_path, pg_url, 3)
    assert run(["sync"], {**env, "SYNC_NAME": "project A"})[0] == 0
    assert run(["sync", "--hours", "1"], {**env, "SYNC_NAME": "project B"})[0] == 0
    code, out = run(["status"], {**env, "SYNC_NAME": "project B"})
    assert code == 0
    state = json.loads(out)
    assert state["sync"] == "project B" and state["cursor"] == (START + HOUR).isoformat()
    assert state["lease"]["active"] is False, "released when the sync exited"
    assert state["state"].count("***") == 1
    code, out = run(["status", "--all"], env)
    assert code == 0
    listed = {s["sync"]: s for s in json.loads(out)["syncs"]}
    assert set(listed) == {"project A", "project B"}
    assert listed["project A"]["cursor"] == (START + 3 * HOUR).isoformat() and listed["project A"]["hours_done"] == 3
    assert listed["project B"]["lag_seconds"] > listed["project A"]["lag_seconds"] > 0
    for secret in passwords(pg_url):
        assert secret not in out
    code, out = run(["check"], env)
    assert json.loads(out)["state"]["ok"] is True and json.loads(out)["state"]["schema_version"] == LATEST_VERSION


def test_no_command_shows_the_store_password_even_when_postgres_goes_away(amp, ph, tmp_path, pg_server, pg_url):
    populate(amp, hours=2, events_per_hour=200)
    env = pg_env(amp, ph, tmp_path, pg_url, 2, LOG_LEVEL="DEBUG", BATCH_SIZE="25")
    output = []
    for args in (["check"], ["status"], ["status", "--all"], ["sync", "--dry-run"], ["sync", "--hours", "1"],
                 ["rejected"]):
        proc = spawn(args, env)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, (args, err)
        output.append(out + err)
    # `run` while PostgreSQL goes away for longer than the lease: retries, failures, a
    # lost lease, then the rest of the import once it is back.
    at = on_event_request(ph, pg_url, sent_events(ph) + 20, lambda: pg_server.stop())
    connector = Connector({**env, "MAX_EVENTS_PER_SECOND": "100"})
    try:
        wait_until(lambda: at, 30, "the connector to be sending when PostgreSQL stops")
        connector.wait_for_log(lambda l: l["message"] == "sync failed; retrying later", 30, "a failed tick")
        pg_server.start()
        wait_until(lambda: cursor_is(pg_url, START + 2 * HOUR), 60, "the import to finish")
    finally:
        ph.on_request = None
        if not pg_server.is_running():
            pg_server.start()
        codes = stop(connector)
    assert codes == [0]
    output.append(json.dumps(connector.logs))
    text = "\n".join(output)
    assert "StoreUnavailable" in text and ":***@" in text
    for secret in passwords(pg_url) + SECRETS:
        assert secret not in text
