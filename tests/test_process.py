"""The connector as a real process: signals, kills, locks, health and metrics."""

from __future__ import annotations

import json
import random
import signal
import time


from .fakes.amplitude import FakeAmplitude
from .fakes.posthog import FakePostHog
from .harness import (AMP_KEY, AMP_SECRET, HOUR, PH_KEY, START, check_delivery, connector_env, free_port, get,
                      populate, run, spawn, status, wait_until)

IGNORED = {"session_start", "session_end"}
SECRETS = (AMP_KEY, AMP_SECRET, PH_KEY)


def test_sigterm_during_a_long_hour_stops_within_seconds_and_keeps_the_cursor(amp, ph, tmp_path):
    populate(amp, hours=2, events_per_hour=600)
    # A slow PostHog rate makes the first hour take ~20 s, so the signal lands mid-hour.
    env = connector_env(amp, ph, tmp_path, MAX_EVENTS_PER_SECOND="30", LOG_LEVEL="INFO")
    proc = spawn(["run"], env)
    try:
        ph.wait_for_events(1, timeout=30)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=10)
        elapsed = time.monotonic() - started
    finally:
        proc.kill()
    out, err = proc.communicate()
    assert code == 0, err
    assert elapsed < 5, f"took {elapsed:.1f}s to stop"
    assert status(env)["cursor"] == START.isoformat(), "the unfinished hour is not committed"
    assert "redone from its start" in err
    for secret in SECRETS:
        assert secret not in out + err


def test_run_serves_health_and_metrics_and_logs_json_hours(amp, ph, tmp_path):
    populate(amp, hours=2)
    port = free_port()
    env = connector_env(amp, ph, tmp_path, HEALTH_PORT=str(port), LOG_LEVEL="INFO",
                        END_DATE=(START + 2 * HOUR).strftime("%Y-%m-%dT%H"))
    proc = spawn(["run"], env)
    try:
        wait_until(lambda: _cursor(env) == (START + 2 * HOUR).isoformat(), 30, "both hours delivered")
        code, body = wait_until(lambda: _try_get(f"http://127.0.0.1:{port}/healthz"), 10, "healthz")
        assert code == 200 and json.loads(body)["status"] == "ok"
        code, metrics = get(f"http://127.0.0.1:{port}/metrics")
        assert code == 200
        sent = len([e for e in ph.events if e.event not in ("$create_alias", "$groupidentify")])
        assert f"connector_events_sent_total {float(sent)}" in metrics
        assert 'connector_hours_total{outcome="done"} 2.0' in metrics
        assert "connector_lag_seconds" in metrics and "connector_cursor_timestamp_seconds" in metrics
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
    _, err = proc.communicate()
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    hours = [l for l in lines if l.get("message") == "hour delivered"]
    assert len(hours) == 2
    for field in ("hour", "events", "rejected", "merges", "duration_s", "events_per_s", "backlog_hours", "eta_s"):
        assert field in hours[0]
    for secret in SECRETS:
        assert secret not in err


def _cursor(env):
    """The cursor, or None while the state file does not exist or is being created."""
    code, out = run(["status"], env)
    return json.loads(out)["cursor"] if code == 0 else None


def _try_get(url):
    try:
        return get(url)
    except OSError:
        return None


def test_second_connector_on_the_same_state_refuses(amp, ph, tmp_path):
    populate(amp, hours=1, events_per_hour=600)
    env = connector_env(amp, ph, tmp_path, MAX_EVENTS_PER_SECOND="50")
    first = spawn(["run"], env)
    try:
        ph.wait_for_events(1, timeout=30)
        second = spawn(["sync"], env)
        code = second.wait(timeout=30)
        _, err = second.communicate()
        assert code == 1
        assert "another connector" in err
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=10)


def test_sigkill_at_twenty_points_loses_nothing_and_duplicates_only_identically(tmp_path):
    """Kill -9 at 20 different requests of a backfill, then a final sync."""
    hours = 6
    with FakeAmplitude(AMP_KEY, AMP_SECRET) as amp, FakePostHog(PH_KEY) as ph:
        records = populate(amp, hours=hours, events_per_hour=400, members=3)
        # Small batches give many requests, hence many different places to die.
        env = connector_env(amp, ph, tmp_path, END_DATE=(START + hours * HOUR).strftime("%Y-%m-%dT%H"), BATCH_SIZE="40")
        victim = {"proc": None, "at": None}

        def kill_at(request):
            if victim["proc"] is not None and len(ph.requests) >= victim["at"]:
                victim["proc"].kill()

        ph.on_request = kill_at
        # A clean run tells how many requests a backfill makes; kill points are drawn from it.
        clean_dir = tmp_path / "clean"
        clean_dir.mkdir()
        with FakePostHog(PH_KEY) as probe:
            assert run(["sync"], {**env, "POSTHOG_HOST": probe.base_url, "STATE_STORE_URL": str(clean_dir / "s.sqlite")})[0] == 0
            total_requests = len(probe.requests)
            expected = {e.uuid for e in probe.events}
        # 20 different kill points, as positions in the whole sequence of requests.
        # A finished backfill needs at least `total_requests` of them, so each of
        # the 20 runs dies before the work is done.
        points = sorted(random.Random(2026).sample(range(1, total_requests), 20))
        kills = 0
        for point in points:
            victim["at"] = point
            proc = spawn(["sync"], env)
            victim["proc"] = proc
            code = proc.wait(timeout=60)
            victim["proc"] = None
            proc.communicate()
            kills += code == -signal.SIGKILL
        assert kills == 20, "every run was killed mid-backfill"
        ph.on_request = None
        assert run(["sync"], env)[0] == 0
        assert status(env)["cursor"] == (START + hours * HOUR).isoformat()

        check_delivery(ph, expected)
        assert len(records) == hours * 400
