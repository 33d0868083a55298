"""A hostile network and a careless operator: can the cursor move past data PostHog did not store?

Every case runs the real CLI (in this process or as a real process) against
real sockets on 127.0.0.1: fake Amplitude and PostHog (tests/fakes), and the
fronts of tests/fakes/proxy.py standing in for redirects, proxies and
slow-loris peers. Each asserts that the cursor stayed, nothing was marked
delivered or rejected that was not, and the message names what to fix.
"""

from __future__ import annotations

import base64
import json
import os
import random
import signal
import socket
import subprocess
import time
from datetime import datetime, timedelta, timezone

import pytest
import requests

from connector.config import Secret
from connector.errors import PostHogUnavailable
from connector.retry import Backoff
from connector.sink import PostHogSink
from connector.batches import make_batch

from .fakes.amplitude import FakeAmplitude
from .fakes.posthog import FakePostHog
from .fakes.proxy import LOGIN_PAGE, NGINX_400, NGINX_404, NGINX_413, Front, Reply, Trickle
from .harness import (AMP_KEY, AMP_SECRET, HOUR, PH_KEY, START, connector_env,
                      free_port, get, populate, run, spawn, status, wait_until)

SECRETS = (AMP_KEY, AMP_SECRET, PH_KEY, base64.b64encode(f"{AMP_KEY}:{AMP_SECRET}".encode()).decode())
ONE_HOUR = (START + HOUR).strftime("%Y-%m-%dT%H")


def no_secret_in(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, "a secret (or its base64 Basic form) was printed"


def nothing_moved(env: dict) -> dict:
    state = status(env)
    assert state["cursor"] == START.isoformat(), "the cursor moved past data PostHog did not store"
    assert state["totals"]["hours_done"] == 0 and state["rejected_by_reason"] == {}
    return state


def last_json(err: str) -> dict:
    return json.loads([line for line in err.splitlines() if line.startswith("{")][-1])


# -- PostHog: redirects -------------------------------------------------------

@pytest.mark.parametrize("code", [301, 302, 307, 308])
def test_a_redirect_is_never_followed_and_names_the_location(amp, ph, tmp_path, capsys, code):
    populate(amp, hours=1)
    with Front(Reply(code, b"", headers={"Location": f"{ph.base_url}/batch/"})) as front:
        env = connector_env(amp, ph, tmp_path, POSTHOG_HOST=front.base_url, END_DATE=ONE_HOUR)
        code_, _ = run(["sync"], env)
        err = capsys.readouterr().err
        assert code_ == 2
        assert f"POSTHOG_HOST={ph.base_url}" in err, "the message names the URL to put in POSTHOG_HOST"
        assert not ph.requests, "the redirect target never received the body or the project key"
        assert [r.method for r in front.requests.snapshot()] == ["POST"], "asked once, not followed"
        nothing_moved(env)
        code_, out = run(["check"], env)
        assert code_ == 1 and f"POSTHOG_HOST={ph.base_url}" in json.loads(out)["posthog"]["hint"]
        no_secret_in(err + out)


# -- PostHog: answers that are not capture's -------------------------------------

NOT_CAPTURE = [
    ("a 200 login page", Reply(200, LOGIN_PAGE), 1, "not PostHog's capture answer"),
    ("an empty 200", Reply(200, b"", "text/plain"), 1, "not PostHog's capture answer"),
    ("a 200 JSON that is not capture's", Reply(200, b'{"ok": true}', "application/json"), 1, "not PostHog's capture"),
    ("nginx 400 header too large", Reply(400, NGINX_400), 1, "BATCH_SIZE"),
    ("nginx 413 body limit", Reply(413, NGINX_413), 1, "BATCH_SIZE"),
    ("a proxy's 404 page", Reply(404, NGINX_404), 2, "POSTHOG_HOST"),
]


@pytest.mark.parametrize("name, reply, exit_code, words", NOT_CAPTURE, ids=[c[0] for c in NOT_CAPTURE])
def test_an_answer_that_is_not_captures_never_counts(amp, ph, tmp_path, name, reply, exit_code, words):
    populate(amp, hours=1)
    with Front(reply) as front:
        env = connector_env(amp, ph, tmp_path, POSTHOG_HOST=front.base_url, END_DATE=ONE_HOUR)
        proc = spawn(["sync"], {**env, "LOG_LEVEL": "INFO"})
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == exit_code, err
        assert words in err
        state = nothing_moved(env)
        if exit_code == 1:
            assert words in state["last_error"], "status shows why"
        _, out = run(["check"], env)
        result = json.loads(out)["posthog"]
        assert result["ok"] is False
        if reply.status in (200, 400, 404):
            assert "capture" in result["hint"], "check says POSTHOG_HOST is not PostHog's capture service"
        no_secret_in(err + out)


def test_every_event_refused_alone_is_a_broken_endpoint_not_rejections(amp, tmp_path):
    populate(amp, hours=1)
    # PostHog's own 413 ("maximum event size exceeded") for any request: each event alone is refused too.
    with FakePostHog(PH_KEY, max_body_bytes=100) as tiny:
        env = connector_env(amp, tiny, tmp_path, END_DATE=ONE_HOUR, BATCH_SIZE="8")
        assert run(["sync"], env)[0] == 1
        state = nothing_moved(env)
        assert "refused each of the" in state["last_error"] and not tiny.events


def test_one_event_refused_alone_is_still_a_rejection(amp, ph, tmp_path):
    records = populate(amp, hours=1)
    victim = next(r for r in records if r["event_type"] not in ("session_start", "session_end"))
    ph.refuse_uuids = {victim["uuid"]}
    env = connector_env(amp, ph, tmp_path, END_DATE=ONE_HOUR, BATCH_SIZE="20")
    assert run(["sync"], env)[0] == 0
    assert status(env)["rejected_by_reason"] == {"posthog_rejected": 1}


# -- Amplitude: 404s and redirects that are not Amplitude's ----------------------------

def test_a_base_url_with_the_export_path_is_refused_before_anything_runs(amp, ph, tmp_path, capsys):
    env = connector_env(amp, ph, tmp_path, AMPLITUDE_BASE_URL=amp.base_url + "/api/2/export")
    assert run(["sync"], env)[0] == 2
    assert "AMPLITUDE_BASE_URL" in capsys.readouterr().err
    assert not amp.requests


@pytest.mark.parametrize("reply", [Reply(404, NGINX_404), Reply(404, b"Not Found", "text/plain"),
                                   Reply(302, b"", headers={"Location": "https://login.example.com/"})],
                         ids=["a proxy's HTML 404", "a bare 404", "a redirect"])
def test_only_amplitudes_own_404_is_an_empty_hour(ph, tmp_path, capsys, reply):
    with Front(reply) as front:
        env = connector_env(front, ph, tmp_path, END_DATE=ONE_HOUR)
        assert run(["sync"], env)[0] == 2
        err = capsys.readouterr().err
        assert "AMPLITUDE_BASE_URL" in err
        state = nothing_moved(env)
        assert state["totals"]["hours_empty"] == 0
        code, out = run(["check"], env)
        assert code == 1 and json.loads(out)["amplitude"]["ok"] is False and "hint" in json.loads(out)["amplitude"]
        no_secret_in(err + out)


def test_a_wrong_path_proxy_404_answered_for_every_hour_commits_nothing_as_empty(amp, ph, tmp_path):
    env = connector_env(amp, ph, tmp_path, AMPLITUDE_BASE_URL=amp.base_url + "/wrong-prefix")
    assert run(["sync"], env)[0] == 2
    assert status(env)["totals"]["hours_empty"] == 0


# -- clocks ------------------------------------------------------------------------

def test_servers_clock_behind_ours_stops_not_yet_due_hours_from_counting_as_empty(ph, tmp_path):
    """This machine's clock two days ahead, seen through Amplitude's Date header."""
    now = datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0)
    start = now - 6 * HOUR
    with FakeAmplitude(AMP_KEY, AMP_SECRET, clock_skew=timedelta(days=-2)) as amp:
        populate(amp, hours=1, start=start)
        env = connector_env(amp, ph, tmp_path, START_DATE=start.strftime("%Y-%m-%dT%H"), END_DATE="")
        code, _ = run(["sync"], env)
        assert code == 1
        state = status(env)
        assert state["cursor"] == start.isoformat(), "an hour due only by this machine's clock is not committed"
        assert state["totals"]["hours_empty"] == 0 and "clock" in state["last_error"]
        assert not ph.events


def test_a_clock_ahead_waits_and_the_hours_arrive_once_due(ph, tmp_path):
    """The connector's own clock injected two days ahead; Amplitude's answers tell the truth."""
    from connector.app import App
    from connector.config import load_config
    from connector.errors import ClockAhead

    now = datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0)
    start = now - 6 * HOUR
    with FakeAmplitude(AMP_KEY, AMP_SECRET) as amp:
        populate(amp, hours=2, start=start)  # start and start+1h are due by the real clock
        env = connector_env(amp, ph, tmp_path, START_DATE=start.strftime("%Y-%m-%dT%H"), END_DATE="")
        config = load_config(env)
        ahead = App(config, _stopper(), clock=lambda: datetime.now(timezone.utc) + timedelta(days=2))
        try:
            with pytest.raises(ClockAhead, match="clock"):
                ahead.syncer.sync_due()
            due_by_amplitude = (now - 3 * HOUR) - start  # hours that ended 3 h before Amplitude's now
            assert ahead.store.cursor() == start + due_by_amplitude // HOUR * HOUR
            assert ahead.metrics.clock_skew.labels("amplitude")._value.get() < -86_000
        finally:
            ahead.close()
        delivered_uuids = {e.uuid for e in ph.events}
        assert delivered_uuids, "the hours due by both clocks were delivered"
        # Later the clock is fixed: nothing was lost, nothing skipped as empty.
        fixed = App(config, _stopper())
        try:
            fixed.syncer.sync_due()
            assert fixed.store.totals().counters["hours_empty"] == fixed.store.totals().counters["hours_done"] - 2
        finally:
            fixed.close()


def _stopper():
    from connector.app import Stopper

    return Stopper()


# -- stalled peers ------------------------------------------------------------------

def test_a_trickling_posthog_cannot_hold_a_request_past_its_timeout():
    with Trickle(interval=0.4) as slow:
        sink = PostHogSink(requests.Session(), slow.base_url, Secret(PH_KEY), sleep=lambda s: False,
                           rng=random.Random(1), backoff=Backoff(0.01, 0.01, 3), timeout=1.0)
        started = time.monotonic()
        with pytest.raises(PostHogUnavailable, match="within 1 s"):
            sink.send(make_batch(PH_KEY, [b'{"event":"e","distinct_id":"d"}'], False))
        elapsed = time.monotonic() - started
    # The full answer would take 90 bytes x 0.4 s = 36 s per attempt.
    assert elapsed < 3 * 1.0 + 2, f"took {elapsed:.1f}s"
    assert len(slow.requests) == 3


def test_check_against_a_trickling_peer_ends_within_its_timeouts(amp, tmp_path):
    with Trickle(interval=0.4) as slow:
        env = connector_env(amp, slow, tmp_path, POSTHOG_TIMEOUT_SECONDS="1")
        started = time.monotonic()
        proc = spawn(["check"], env)
        out, err = proc.communicate(timeout=60)
        elapsed = time.monotonic() - started
    assert proc.returncode == 1 and json.loads(out)["posthog"]["ok"] is False
    assert elapsed < 15, f"check took {elapsed:.1f}s"


# -- secrets in every encoding --------------------------------------------------------

def test_a_proxy_echoing_the_request_never_prints_a_secret(ph, tmp_path):
    with Front(Reply(403, b"Forbidden by policy", "text/plain"), echo=True) as echo:
        env = connector_env(echo, ph, tmp_path, END_DATE=ONE_HOUR, LOG_LEVEL="DEBUG")
        outputs = []
        for args in (["sync"], ["check"], ["status"]):
            proc = spawn(args, env)
            out, err = proc.communicate(timeout=60)
            outputs.append(out + err)
        seen = echo.requests.snapshot()
        assert seen and seen[0].headers.get("Authorization", "").startswith("Basic "), "the proxy did see the keys"
        no_secret_in("\n".join(outputs))


# -- the operator's values -----------------------------------------------------------------

def test_a_non_utf8_env_file_is_named(tmp_path, capsys):
    env_file = tmp_path / ".env"
    env_file.write_bytes(b"POSTHOG_HOST=https://ph.example.com\nSTART_DATE=2025-07-01\xff\n")
    assert run(["--env-file", str(env_file), "status"], {})[0] == 2
    record = last_json(capsys.readouterr().err)
    assert record["problems"][0]["variable"] == "--env-file" and "line 2" in record["problems"][0]["problem"]


def test_a_busy_health_port_is_a_clear_error(amp, ph, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = spawn(["run"], connector_env(amp, ph, tmp_path, HEALTH_PORT=str(port)))
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    problem = last_json(err)["problems"][0]
    assert problem["variable"] == "HEALTH_PORT" and str(port) in problem["problem"] and "Traceback" not in err


def test_health_listens_on_127_0_0_1_unless_told_otherwise(amp, ph, tmp_path):
    port = free_port()
    proc = spawn(["run"], connector_env(amp, ph, tmp_path, HEALTH_PORT=str(port)))
    try:
        wait_until(lambda: _answers(f"http://127.0.0.1:{port}/healthz"), 30, "healthz on 127.0.0.1")
        # 127.0.0.2 is this machine too, but not the address bound.
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.2", port), timeout=2).close()
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).status_code in (200, 503)
    except requests.RequestException:
        return False


def test_a_start_date_in_the_future_is_a_warning(amp, ph, tmp_path):
    future = (datetime.now(timezone.utc) + timedelta(days=3)).strftime("%Y-%m-%dT%H")
    env = connector_env(amp, ph, tmp_path, START_DATE=future, END_DATE="", LOG_LEVEL="INFO")
    proc = spawn(["sync"], env)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert any("START_DATE" in json.loads(line)["message"] and json.loads(line)["level"] == "WARNING"
               for line in err.splitlines())
    assert "START_DATE" in status(env)["warnings"][0]


@pytest.mark.parametrize("name", ["state#1.sqlite", "state?x=1.sqlite", "we ird#?.sqlite"])
def test_a_state_path_with_uri_characters_works_for_every_command(amp, ph, tmp_path, name):
    populate(amp, hours=1)
    env = connector_env(amp, ph, tmp_path, END_DATE=ONE_HOUR, STATE_STORE_URL=str(tmp_path / name))
    assert run(["sync"], env)[0] == 0
    assert status(env)["cursor"] == (START + HOUR).isoformat()
    assert run(["rejected"], env)[0] == 0
    assert run(["check"], env)[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, name + "-shm", name + "-wal", name + ".lock"])


def test_a_full_tmpdir_is_the_last_error_and_the_cursor_stays(amp, ph, tmp_path):
    populate(amp, hours=1, events_per_hour=2000)
    small = tmp_path / "tiny-tmp"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)], capture_output=True)
    if mounted.returncode != 0:
        pytest.fail(f"cannot mount a small tmpfs to fill up (needs root): {mounted.stderr.decode().strip()}")
    try:
        env = connector_env(amp, ph, tmp_path, END_DATE=ONE_HOUR, TMPDIR=str(small))
        proc = spawn(["sync"], env)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 1, err
        state = nothing_moved(env)
        assert "disk is full" in state["last_error"] and str(small) in state["last_error"]
    finally:
        subprocess.run(["umount", str(small)], check=False)


# -- services that restart -----------------------------------------------------------

def test_a_transient_401_does_not_end_run(amp, ph, tmp_path):
    populate(amp, hours=1)
    ph.inject("status", code=401, body="API key is not valid: restarting")
    port = free_port()
    env = connector_env(amp, ph, tmp_path, END_DATE=ONE_HOUR, POLL_INTERVAL_MINUTES="0.05", LOG_LEVEL="INFO",
                        HEALTH_PORT=str(port))
    proc = spawn(["run"], env)
    try:
        ph.wait_for_events(10, timeout=60)
        assert proc.poll() is None, "run kept going after one 401"
        assert 'connector_errors_total{error="AuthError"} 1.0' in get(f"http://127.0.0.1:{port}/metrics")[1]
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_a_persistent_401_ends_run_after_the_grace_period(amp, tmp_path):
    from connector import service
    from connector.app import App
    from connector.config import load_config
    from connector.errors import AuthError

    populate(amp, hours=1)

    class Clock:
        now = datetime.now(timezone.utc)

        def __call__(self):
            return self.now

    clock = Clock()
    with FakePostHog("phc_other_project") as other:
        app = App(load_config(connector_env(amp, other, tmp_path, END_DATE=ONE_HOUR)), _stopper(), clock=clock)
        try:
            loop = service.Service(app)
            loop.tick()  # 401: retried later, not fatal yet
            assert "AuthError" in app.store.last_error()
            clock.now += service.CONFIG_GRACE + timedelta(seconds=1)
            with pytest.raises(AuthError, match="POSTHOG_PROJECT_API_KEY"):
                loop.tick()
        finally:
            app.close()


# -- processes that clean up after themselves -------------------------------------------------

def _children(pid: int) -> set[int]:
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.add(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_workers_and_the_resource_tracker_exit_when_the_main_process_is_killed(amp, ph, tmp_path):
    populate(amp, hours=2, events_per_hour=3000)
    env = connector_env(amp, ph, tmp_path, WORKERS="3", MAX_EVENTS_PER_SECOND="200")
    proc = spawn(["sync"], env)
    try:
        ph.wait_for_events(1, timeout=60)
        children = wait_until(lambda: _children(proc.pid) if len(_children(proc.pid)) >= 4 else None, 30,
                              "3 workers and the resource tracker")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        wait_until(lambda: not any(_alive(c) for c in children), 15, "every child of the killed process to exit")
    finally:
        proc.kill()


def test_a_killed_download_leaves_nothing_behind_after_the_next_start(ph, tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    with FakeAmplitude(AMP_KEY, AMP_SECRET) as amp:
        populate(amp, hours=1, events_per_hour=3000)
        amp.inject("stall", seconds=60)  # headers and no body: the partial file stays open
        env = connector_env(amp, ph, tmp_path, END_DATE=ONE_HOUR, TMPDIR=str(tmp))
        proc = spawn(["sync"], env)
        folder = tmp / f"amplitude-posthog-connector-{os.getuid()}"
        wait_until(lambda: folder.exists() and any(folder.iterdir()), 30, "a download in progress")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        assert any(folder.iterdir()), "the killed process left its partial download"
        assert run(["sync"], env)[0] == 0
        assert list(folder.iterdir()) == [], "the next start removed it"
        assert status(env)["cursor"] == (START + HOUR).isoformat()


def test_workers_0_counts_the_cpu_limit_not_the_hosts_cores(tmp_path):
    from connector.worker import MAX_DEFAULT_WORKERS, default_workers

    (tmp_path / "cpu.max").write_text("150000 100000\n")  # a 1.5-CPU container
    assert default_workers(str(tmp_path)) == min(2, len(os.sched_getaffinity(0)))
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert 1 <= default_workers(str(tmp_path)) <= MAX_DEFAULT_WORKERS
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("50000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert default_workers(str(v1)) == 1


# -- archives that do not look like Amplitude's -------------------------------------------------

def _gz(lines: list[bytes]) -> bytes:
    import gzip

    return gzip.compress(b"\n".join(lines))


SURPRISES = [
    ("a member named for an hour outside the window",
     lambda amp: amp.add_file(START, "636686_2025-07-05_3#1.json.gz", _gz([b'{"event_type":"x"}'])), "outside"),
    ("two members with one name",
     lambda amp: [amp.add_file(START, "636686_2025-07-01_10#1.json.gz", _gz([b'{"a":1}'])) for _ in range(2)],
     "two members named"),
    ("only .json members", lambda amp: amp.add_file(START, "636686_2025-07-01_10#1.json", b'{"event_type":"x"}'),
     "form Amplitude's exports do not use"),
    ("only .jsonl.gz members", lambda amp: amp.add_file(START, "636686_2025-07-01_10#1.jsonl.gz", _gz([b"{}"])),
     "form Amplitude's exports do not use"),
]


@pytest.mark.parametrize("name, make, words", SURPRISES, ids=[c[0] for c in SURPRISES])
def test_a_surprising_archive_fails_loudly_and_keeps_the_cursor(ph, tmp_path, name, make, words):
    import warnings

    with FakeAmplitude(AMP_KEY, AMP_SECRET) as amp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate name it is told to write
        make(amp)
        env = connector_env(amp, ph, tmp_path, END_DATE=ONE_HOUR)
        assert run(["sync"], env)[0] == 1
        state = nothing_moved(env)
        assert words in state["last_error"] and state["totals"]["hours_empty"] == 0
        assert not ph.events


def test_check_prints_urls_with_passwords_masked(ph, tmp_path):
    with Front(Reply(404, b"Raw data files were not found.", "text/plain")) as amp_front:
        base = amp_front.base_url.replace("http://", "http://proxyuser:pr0xy-pass-77@")
        env = connector_env(amp_front, ph, tmp_path, AMPLITUDE_BASE_URL=base)
        code, out = run(["check"], env)
    result = json.loads(out)["amplitude"]
    assert code == 0 and result["ok"] is True
    assert "pr0xy-pass-77" not in out and "proxyuser:***@" in result["url"]
