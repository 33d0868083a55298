"""The image end to end, the way a user runs it.

    docker build -t IMAGE .
    docker run --env-file .env -v connector-data:/data IMAGE        # CMD: run

Here: the ``image`` fixture builds the real Dockerfile, ``run_container`` runs
it detached with an env file and a named volume on the host network, against
a FakeAmplitude and a FakePostHog on 127.0.0.1. Needs podman
(``.ci/install-container-tools.sh``); skipped without it.

The tests of the first group share one container (module fixtures) and run in
file order: delivery, health, ``status`` inside it, user and file modes, then
``podman stop`` and a new container on the same volume.
"""

from __future__ import annotations

import json
import re
import socket
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from random import Random

import pytest

from ..fakes.amplitude import FakeAmplitude, parse_hour
from ..fakes.posthog import CapturedEvent, FakePostHog
from ..fakes.records import make_population
from ..harness import AMP_KEY, AMP_SECRET, HOUR, PH_KEY, START
from .conftest import (have_podman, is_running, logs, podman, run_container, run_once,
                       stop_container, write_env_file)
from .conftest import healthcheck as run_healthcheck

pytestmark = [
    pytest.mark.container,
    pytest.mark.skipif(not have_podman(), reason="podman not installed (run .ci/install-container-tools.sh)"),
]

UID = 10001  # the image's USER
IGNORED = {"session_start", "session_end"}  # EVENTS_TO_IGNORE's default
SYNTHETIC = {"$create_alias", "$groupidentify"}  # built by the connector, not counted as events_sent
SECRETS = (AMP_KEY, AMP_SECRET, PH_KEY)
STOP_GRACE = 10  # podman stop's default
HOURS, EVENTS_PER_HOUR = 3, 200
END = START + HOURS * HOUR
STATE_FILE = "/data/connector-state.sqlite"  # STATE_STORE_URL's default, relative to WORKDIR /data


# --------------------------------------------------------------------------- helpers


def hour_str(hour: datetime) -> str:
    return hour.strftime("%Y-%m-%dT%H")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str) -> tuple[int, str] | None:
    """(status, body), or None while nothing listens."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return None


def wait_until(predicate, timeout: float, what: str, cid: str | None = None):
    """Poll a container-side condition with a deadline; fail early if the container died."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if cid is not None and not is_running(cid):
            pytest.fail(f"container exited while waiting for {what}\n{tail(cid)}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}" + (f"\n{tail(cid)}" if cid else ""))
        time.sleep(0.2)


def wait_for_events(ph: FakePostHog, n: int, cid: str, timeout: float) -> list[CapturedEvent]:
    """PostHog's event log (event-based), checking between slices that the container lives."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return ph.wait_for_events(n, timeout=2)
        except TimeoutError:
            if not is_running(cid):
                pytest.fail(f"container exited with {len(ph.events)}/{n} events delivered\n{tail(cid)}")
            if time.monotonic() > deadline:
                pytest.fail(f"{len(ph.events)}/{n} events after {timeout}s\n{tail(cid)}")


def tail(cid: str, lines: int = 40) -> str:
    return "container log (tail):\n" + "\n".join(logs(cid).splitlines()[-lines:])


def metric(text: str, name: str) -> float | None:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(match.group(1)) if match else None


def metrics(port: int) -> str:
    got = http_get(f"http://127.0.0.1:{port}/metrics")
    assert got and got[0] == 200, got
    return got[1]


def wait_for_cursor(port: int, hour: datetime, cid: str, timeout: float = 60) -> None:
    """The cursor gauge is set after the hour's commit: the hour is durably done."""
    wait_until(lambda: (http_get(f"http://127.0.0.1:{port}/metrics") or (0, ""))[0] == 200
               and metric(metrics(port), "connector_cursor_timestamp_seconds") == hour.timestamp(),
               timeout, f"cursor {hour_str(hour)} on /metrics", cid)


def exec_status(cid: str) -> dict:
    """`python -m connector status` inside the running container."""
    return json.loads(podman("exec", cid, "python", "-m", "connector", "status").stdout)


def real(events: list[CapturedEvent]) -> list[CapturedEvent]:
    """Events translated from Amplitude records (no merges or group updates)."""
    return [e for e in events if e.event not in SYNTHETIC]


def importable(records: list[dict]) -> set[str]:
    return {r["uuid"].lower() for r in records if r["event_type"] not in IGNORED}


def in_hour(records: list[dict], hour: datetime) -> list[dict]:
    return [r for r in records if r["server_upload_time"].startswith(hour.strftime("%Y-%m-%d %H"))]


def add_hour(amp: FakeAmplitude, records: list[dict], hour: datetime) -> list[dict]:
    """Upload ``hour``'s share of a population to the fake Export API (as harness.populate)."""
    mine = in_hour(records, hour)
    amp.add_records(hour, mine, members=2)
    return mine


def env_for(amp: FakeAmplitude, ph: FakePostHog, end: datetime, port: int, **overrides: str) -> dict[str, str]:
    """What a user's .env holds; everything else stays at the image's defaults."""
    return {
        "AMPLITUDE_API_KEY": AMP_KEY,
        "AMPLITUDE_SECRET_KEY": AMP_SECRET,
        "AMPLITUDE_BASE_URL": amp.base_url,
        "POSTHOG_HOST": ph.base_url,
        "POSTHOG_PROJECT_API_KEY": PH_KEY,
        "START_DATE": hour_str(START),
        "END_DATE": hour_str(end),
        "MAX_EVENTS_PER_SECOND": "0",
        "HEALTH_PORT": str(port),  # host network: not the image's 8000, which may be taken
        **overrides,
    }


def requested_hours(requests) -> list[tuple[datetime, datetime]]:
    return [(parse_hour(r.start), parse_hour(r.end)) for r in requests]


# --------------------------------------------------------------------------- one container, then another


@dataclass
class FirstRun:
    cid: str
    port: int
    volume: str
    records: list[dict]  # the whole population, HOURS + 1 hours
    expected: set[str]  # importable uuids of the first HOURS hours
    events: list[CapturedEvent] = field(default_factory=list)  # PostHog's log once END was reached
    seconds: float = 0.0


@pytest.fixture(scope="module")
def amp():
    with FakeAmplitude(AMP_KEY, AMP_SECRET) as server:
        yield server


@pytest.fixture(scope="module")
def ph():
    with FakePostHog(PH_KEY) as server:
        yield server


@pytest.fixture(scope="module")
def first(image, amp, ph) -> FirstRun:
    """`podman run -d --env-file .env -v VOL:/data IMAGE` until END_DATE is reached."""
    hours = [START + i * HOUR for i in range(HOURS + 1)]
    records = list(make_population(Random(7), len(hours) * EVENTS_PER_HOUR, hours))
    uploaded = [r for h in hours[:HOURS] for r in add_hour(amp, records, h)]  # the last hour comes later
    expected = importable(uploaded)
    port = free_port()
    volume = f"connector-e2e-{uuid.uuid4().hex[:8]}"
    t0 = time.monotonic()
    cid = run_container(f"{volume}-first", env_for(amp, ph, END, port), volume)
    wait_for_events(ph, len(expected), cid, timeout=120)
    wait_for_cursor(port, END, cid)
    return FirstRun(cid, port, volume, records, expected, ph.events, time.monotonic() - t0)


@pytest.fixture(scope="module")
def stopped(first) -> tuple[int, float]:
    """`podman stop` (SIGTERM, 10 s grace) of the first container: (exit code, seconds)."""
    return stop_container(first.cid, timeout=STOP_GRACE)


def test_every_importable_event_arrives_once(first, amp):
    sent = real(first.events)
    uuids = [e.uuid for e in sent]
    assert len(first.expected) > HOURS * EVENTS_PER_HOUR // 2  # sanity: session markers are a minority
    missing, extra = first.expected - set(uuids), set(uuids) - first.expected
    assert not missing and not extra, f"{len(missing)} missing, {len(extra)} unexpected\n{tail(first.cid)}"
    assert len(uuids) == len(set(uuids)), "a clean run sends each event once"
    assert not any(e.event in IGNORED for e in first.events)
    assert any(e.event == "$create_alias" for e in first.events), "devices were merged into their users"
    # every export request stayed inside START_DATE..END_DATE
    requests = amp.requests
    assert requests and all(r.status == 200 for r in requests), requests
    assert all(START <= s <= e < END for s, e in requested_hours(requests)), requests
    print(f"first run: {len(first.events)} events ({len(sent)} + merges) in {first.seconds:.1f}s")


def test_healthz_metrics_and_healthcheck(first):
    code, body = wait_until(lambda: http_get(f"http://127.0.0.1:{first.port}/healthz"), 20,
                            "/healthz", first.cid)
    assert code == 200 and json.loads(body)["status"] == "ok", body
    text = metrics(first.port)
    assert metric(text, "connector_events_sent_total") == len(real(first.events)), text
    assert metric(text, 'connector_hours_total{outcome="done"}') == HOURS, text
    assert metric(text, "connector_backlog_hours") == 0, text
    assert run_healthcheck(first.cid) == 0, "podman healthcheck run"


def test_status_inside_the_container(first):
    status = exec_status(first.cid)
    assert status["cursor"] == END.isoformat(), status
    assert status["finished"] is True and status["backlog_hours"] == 0, status
    assert status["totals"]["events_sent"] == len(real(first.events)), status
    assert status["totals"]["hours_done"] == HOURS, status
    assert status["last_error"] is None, status
    assert status["state"].endswith("connector-state.sqlite")


def test_runs_as_non_root_with_a_private_state_file(first):
    assert int(podman("exec", first.cid, "id", "-u").stdout) == UID
    proc1 = podman("exec", first.cid, "cat", "/proc/1/status", "/proc/1/cmdline").stdout
    uids = re.search(r"^Uid:\s+(.*)$", proc1, re.M).group(1).split()
    assert uids == [str(UID)] * 4, f"PID 1 (the connector) runs as {uids}"
    assert "connector" in proc1.split("\n")[-1], "PID 1 is the connector itself (exec form)"
    listing = podman("exec", first.cid, "python", "-c",
                     "import json, os, stat; print(json.dumps({n: [oct(stat.S_IMODE(s.st_mode)), s.st_uid] "
                     "for n in os.listdir('/data') for s in [os.stat(os.path.join('/data', n))]}))").stdout
    files = json.loads(listing)
    name = STATE_FILE.rsplit("/", 1)[1]
    assert files.get(name) == ["0o600", UID], files
    # its -wal/-shm/journal companions hold the same data
    for other, (mode, owner) in files.items():
        if other.startswith(name):
            assert (mode, owner) == ("0o600", UID), files


def test_podman_stop_exits_cleanly_within_the_grace_period(first, stopped):
    code, seconds = stopped
    assert code == 0, f"exit code {code} (137: SIGKILLed after the grace period)\n{tail(first.cid)}"
    assert seconds < STOP_GRACE / 2, f"stop took {seconds:.1f}s of the {STOP_GRACE}s grace"
    log = logs(first.cid)
    assert "END_DATE reached" in log
    assert "stopped; an unfinished hour is redone from its start" in log
    for secret in SECRETS:
        assert secret not in log
    print(f"podman stop: exit {code} in {seconds:.2f}s")


def test_a_new_container_on_the_same_volume_resumes_from_its_cursor(first, stopped, amp, ph):
    new_end = END + HOUR
    new_records = add_hour(amp, first.records, END)
    expected = importable(new_records)
    before_requests, before_events = len(amp.requests), len(ph.events)
    delivered = {e.uuid for e in ph.events}
    port = free_port()
    cid = run_container(f"{first.volume}-second", env_for(amp, ph, new_end, port), first.volume)
    wait_for_events(ph, before_events + len(expected), cid, timeout=60)
    wait_for_cursor(port, new_end, cid)

    requests = amp.requests[before_requests:]
    assert requests, "the new hour was requested"
    assert all(s >= END for s, _ in requested_hours(requests)), \
        f"an already delivered hour was exported again: {requests}"
    assert all(e < new_end for _, e in requested_hours(requests)), requests
    new = ph.events[before_events:]
    again = {e.uuid for e in new} & delivered
    assert not again, f"{len(again)} uuids delivered before were sent again"
    assert {e.uuid for e in real(new)} == expected
    assert metric(metrics(port), "connector_events_sent_total") == len(real(new))
    status = exec_status(cid)
    assert status["cursor"] == new_end.isoformat(), status
    assert status["totals"]["events_sent"] == len(real(ph.events)), status
    assert status["totals"]["hours_done"] == HOURS + 1, status

    code, seconds = stop_container(cid, timeout=STOP_GRACE)
    assert code == 0 and seconds < STOP_GRACE, (code, seconds)


# --------------------------------------------------------------------------- SIGTERM mid-hour


def test_sigterm_mid_hour_exits_cleanly_and_keeps_the_cursor(image):
    # 20 events/s in batches of 20: an hour of 400 events takes ~20 s, so the
    # stop lands while the first hour is still being sent.
    with FakeAmplitude(AMP_KEY, AMP_SECRET) as amp, FakePostHog(PH_KEY) as ph:
        hours = [START, START + HOUR]
        records = list(make_population(Random(11), 2 * 400, hours))
        for hour in hours:
            add_hour(amp, records, hour)
        first_hour = importable(in_hour(records, START))
        env = env_for(amp, ph, START + 2 * HOUR, free_port(), MAX_EVENTS_PER_SECOND="20", BATCH_SIZE="20")
        volume = f"connector-e2e-{uuid.uuid4().hex[:8]}"
        cid = run_container(f"{volume}-term", env, volume)
        # merges go first, then the events in rate-limited batches: wait for some of those
        wait_for_events(ph, 80, cid, timeout=60)
        code, seconds = stop_container(cid, timeout=STOP_GRACE)
        arrived = {e.uuid for e in real(ph.events)}

    log = logs(cid)
    assert code == 0, f"exit code {code} (137: SIGKILLed after the grace period)\n{tail(cid)}"
    assert seconds < STOP_GRACE / 2, f"stop took {seconds:.1f}s of the {STOP_GRACE}s grace"
    assert arrived & first_hour, "events of the first hour arrived before the stop"
    assert len(arrived & first_hour) < len(first_hour), \
        "the whole first hour arrived before the stop: the test did not stop mid-hour"
    assert "stopped; an unfinished hour is redone from its start" in log
    assert "hour delivered" not in log, "no hour was committed"
    # `docker run --rm -v VOL:/data --env-file .env IMAGE status`
    env_file = write_env_file(f"{volume}-status", env)
    out = run_once("status", podman_args=("--env-file", str(env_file), "-v", f"{volume}:/data")).stdout
    status = json.loads(out)
    assert status["cursor"] == START.isoformat(), f"the cursor moved past the unfinished hour: {status}"
    assert status["totals"]["hours_done"] == 0, status
    print(f"SIGTERM mid-hour: exit {code} in {seconds:.2f}s after {len(arrived)} events")
