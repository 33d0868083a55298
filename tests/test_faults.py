"""Faults at both boundaries, on real sockets: what the connector does, proven."""

from __future__ import annotations

import json
import random
import ssl
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import orjson
import pytest
import requests

from connector.batches import make_batch
from connector.config import Secret
from connector.errors import AuthError, ExportUnavailable
from connector.export import ExportClient
from connector.retry import Backoff
from connector.sink import PostHogSink

from .fakes.amplitude import FakeAmplitude
from .fakes.posthog import FakePostHog
from .harness import AMP_KEY, AMP_SECRET, HOUR, PH_KEY, START, connector_env, populate, run, spawn, status

FAST = Backoff(base=0.01, cap=0.05, attempts=4)


class Sleeps:
    """Stands in for the stop-aware sleep: records each delay, never waits."""

    def __init__(self, on_sleep=None):
        self.calls: list[float] = []
        self._on_sleep = on_sleep

    def __call__(self, seconds: float) -> bool:
        self.calls.append(seconds)
        if self._on_sleep:
            self._on_sleep(len(self.calls))
        return False


def export_client(amp, sleeps, *, timeout=(5.0, 5.0), secret=AMP_SECRET, backoff=FAST) -> ExportClient:
    return ExportClient(requests.Session(), amp.base_url + "/api/2/export", Secret(AMP_KEY), Secret(secret),
                        region="US", sleep=sleeps, rng=random.Random(1), backoff=backoff, timeout=timeout)


def read_all(archive) -> list[bytes]:
    lines = []
    for block in archive.blocks(archive.start):
        lines.extend(block.lines.split(b"\n"))
    return lines


# -- Amplitude side -----------------------------------------------------------

TRANSIENT_EXPORT_FAULTS = [
    ("429 without Retry-After", "status", {"code": 429}),
    ("500", "status", {"code": 500}),
    ("502", "status", {"code": 502}),
    ("503", "status", {"code": 503}),
    ("504 on a large hour", "status", {"code": 504}),
    ("connection reset mid-body", "reset_mid_body", {}),
    ("200 with an HTML error page", "html_200", {}),
    ("200 with a truncated zip", "truncated_zip", {}),
    ("empty 200", "empty_200", {}),
]


@pytest.mark.parametrize("name, fault, kw", TRANSIENT_EXPORT_FAULTS, ids=[f[0] for f in TRANSIENT_EXPORT_FAULTS])
def test_transient_export_faults_are_retried_with_backoff(amp, name, fault, kw):
    populate(amp, hours=1)
    amp.inject(fault, **kw)
    sleeps = Sleeps()
    with export_client(amp, sleeps).download(START, START)[0] as archive:
        lines = read_all(archive)
    assert len(lines) == 200
    assert len(amp.requests) == 2 and len(sleeps.calls) == 1


def test_retry_after_is_honoured(amp):
    populate(amp, hours=1)
    amp.inject("status", code=429, headers={"Retry-After": "7"})
    sleeps = Sleeps()
    with export_client(amp, sleeps).download(START, START)[0]:
        pass
    assert sleeps.calls[0] >= 7


def test_a_read_that_stalls_past_the_timeout_is_retried(amp):
    populate(amp, hours=1)
    amp.inject("stall", seconds=3)
    sleeps = Sleeps()
    with export_client(amp, sleeps, timeout=(2.0, 0.5)).download(START, START)[0] as archive:
        assert len(read_all(archive)) == 200
    assert len(sleeps.calls) == 1


def test_backoff_grows_and_gives_up_with_a_retryable_error(amp):
    amp.inject("status", times=10, code=503)
    sleeps = Sleeps()
    backoff = Backoff(base=1.0, cap=100.0, attempts=5)
    with pytest.raises(ExportUnavailable, match="failed 5 times"):
        export_client(amp, sleeps, backoff=backoff).download(START, START)
    assert len(sleeps.calls) == 4
    # Full jitter below an exponentially growing ceiling.
    for attempt, delay in enumerate(sleeps.calls):
        assert 0 <= delay <= 2**attempt


def test_wrong_keys_name_the_keys_and_the_region(amp):
    with pytest.raises(AuthError) as info:
        export_client(amp, Sleeps(), secret="not-the-secret").download(START, START)
    message = str(info.value)
    assert "AMPLITUDE_API_KEY" in message and "AMPLITUDE_REGION" in message and "EU" in message
    assert "not-the-secret" not in message


def test_corrupt_gzip_member_fails_the_hour_and_the_next_attempt_delivers_it(amp, ph, tmp_path):
    records = populate(amp, hours=1, members=3)
    amp.inject("corrupt_gzip_member")
    env = connector_env(amp, ph, tmp_path, END_DATE=(START + HOUR).strftime("%Y-%m-%dT%H"))
    assert run(["sync"], env)[0] == 1
    state = status(env)
    assert state["cursor"] == START.isoformat() and "corrupt" in state["last_error"]
    assert run(["sync"], env)[0] == 0
    importable = {r["uuid"] for r in records if r["event_type"] not in ("session_start", "session_end")}
    assert importable <= set(ph.uuids())
    assert status(env)["last_error"] is None


def test_tls_verification_stays_on(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)

    class Ok(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Ok)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = ExportClient(requests.Session(), f"https://127.0.0.1:{server.server_port}/api/2/export",
                              Secret(AMP_KEY), Secret(AMP_SECRET), region="US", sleep=Sleeps(),
                              backoff=Backoff(0.01, 0.01, 2))
        with pytest.raises(ExportUnavailable, match="SSLError|connection"):
            client.download(START, START)
    finally:
        server.shutdown()


# -- PostHog side -------------------------------------------------------------


def events(n: int) -> tuple[bytes, ...]:
    return tuple(
        orjson.dumps({"event": "e", "distinct_id": f"u{i}", "uuid": f"00000000-0000-4000-8000-{i:012d}",
                      "timestamp": "2025-07-01T10:00:00Z", "properties": {"pad": "x" * 2000, "$ignore_sent_at": True}})
        for i in range(n)
    )


def sink(ph, sleeps, *, timeout=5.0) -> PostHogSink:
    return PostHogSink(requests.Session(), ph.base_url, Secret(PH_KEY), sleep=sleeps, rng=random.Random(1),
                       backoff=Backoff(base=0.01, cap=0.05, attempts=6), timeout=timeout)


def test_503_storm_is_ridden_out(ph):
    ph.inject("status", times=4, code=503)
    sleeps = Sleeps()
    assert sink(ph, sleeps).send(make_batch(PH_KEY, events(10), True)) == []
    assert len(ph.events) == 10 and len(sleeps.calls) == 4


def test_429_retry_after_is_honoured(ph):
    ph.inject("status", code=429, headers={"Retry-After": "3"})
    sleeps = Sleeps()
    sink(ph, sleeps).send(make_batch(PH_KEY, events(3), True))
    assert sleeps.calls[0] >= 3 and len(ph.events) == 3


def test_connection_refused_while_posthog_restarts(ph):
    ph.stop()
    sleeps = Sleeps(on_sleep=lambda n: ph.start() if n == 2 else None)
    assert sink(ph, sleeps).send(make_batch(PH_KEY, events(5), True)) == []
    assert len(ph.events) == 5 and len(sleeps.calls) == 2


def test_slow_posthog_times_out_and_is_retried_with_the_same_uuids(ph):
    ph.inject("delay", seconds=1.5)
    sleeps = Sleeps()
    assert sink(ph, sleeps, timeout=0.5).send(make_batch(PH_KEY, events(4), True)) == []
    ph.wait_for_events(8, timeout=10)  # the slow request is ingested too, later
    uuids = ph.uuids()
    assert len(set(uuids)) == 4, "a re-send repeats the same uuids: PostHog deduplicates"


def test_one_bad_event_is_isolated_and_the_rest_delivered(ph):
    batch = events(40)
    ph.refuse_uuids = {orjson.loads(batch[17])["uuid"]}
    refused = sink(ph, Sleeps()).send(make_batch(PH_KEY, batch, True))
    assert [r.index for r in refused] == [17] and refused[0].reason == "posthog_rejected"
    assert len(ph.events) == 39 and len(set(ph.uuids())) == 39


def test_413_splits_the_batch_until_it_fits():
    with FakePostHog(PH_KEY, max_body_bytes=30_000) as small:
        assert sink(small, Sleeps()).send(make_batch(PH_KEY, events(40), True)) == []
        assert len(small.events) == 40
        assert 413 in {r.status for r in small.requests}


def test_wrong_project_key_is_fatal(ph):
    bad = PostHogSink(requests.Session(), ph.base_url, Secret("phc_wrong"), sleep=Sleeps())
    with pytest.raises(AuthError, match="POSTHOG_PROJECT_API_KEY"):
        bad.send(make_batch("phc_wrong", events(2), True))
    assert not ph.events


@pytest.mark.parametrize("workers", ["1", "2"], ids=["inline", "worker processes rebuild the refused batch"])
def test_an_event_posthog_refuses_is_rejected_with_its_raw_record_and_the_hour_delivered(amp, ph, tmp_path, workers):
    records = populate(amp, hours=1, members=2)
    victim = [r for r in records if r["event_type"] not in ("session_start", "session_end")][77]
    ph.refuse_uuids = {victim["uuid"]}
    env = connector_env(amp, ph, tmp_path, END_DATE=(START + HOUR).strftime("%Y-%m-%dT%H"), BATCH_SIZE="50",
                        WORKERS=workers)
    assert run(["sync"], env)[0] == 0
    state = status(env)
    assert state["cursor"] == (START + HOUR).isoformat()
    assert state["rejected_by_reason"] == {"posthog_rejected": 1}
    _, out = run(["rejected"], env)
    listed = [json.loads(line) for line in out.splitlines()]
    assert json.loads(listed[0]["raw"])["uuid"] == victim["uuid"], "the raw Amplitude record is kept"
    importable = {r["uuid"] for r in records if r["event_type"] not in ("session_start", "session_end")}
    assert set(ph.uuids()) >= importable - {victim["uuid"]} and victim["uuid"] not in ph.uuids()


def test_natural_member_order_is_delivery_order(ph, tmp_path):
    with FakeAmplitude(AMP_KEY, AMP_SECRET) as amp:
        records = populate(amp, hours=1, events_per_hour=240, members=12)
        env = connector_env(amp, ph, tmp_path, END_DATE=(START + HOUR).strftime("%Y-%m-%dT%H"))
        assert run(["sync"], env)[0] == 0
    importable = [r["uuid"] for r in records if r["event_type"] not in ("session_start", "session_end")]
    delivered = [e.uuid for e in ph.events if e.event not in ("$create_alias", "$groupidentify")]
    assert delivered == importable, "members #1..#12 in natural order, lines in file order"


# -- secrets --------------------------------------------------------------------


def test_secrets_never_appear_in_any_output(amp, ph, tmp_path):
    populate(amp, hours=1)
    env = connector_env(amp, ph, tmp_path, END_DATE=(START + HOUR).strftime("%Y-%m-%dT%H"), LOG_LEVEL="DEBUG")
    outputs = []
    for args, overrides in [
        (["sync", "--dry-run"], {}),
        (["sync"], {}),
        (["status"], {}),
        (["rejected"], {}),
        (["check"], {}),
        (["check"], {"AMPLITUDE_SECRET_KEY": "wrong-secret-77", "POSTHOG_PROJECT_API_KEY": "phc_wrong_88"}),
        (["sync"], {"AMPLITUDE_SECRET_KEY": "wrong-secret-77"}),
        (["sync"], {"POSTHOG_HOST": "http://127.0.0.1:9", "START_DATE": "2025-06-01"}),
        (["sync"], {"POSTHOG_HOST": "not a url"}),
    ]:
        full = {**env, **overrides}
        proc = spawn(args, full)
        out, err = proc.communicate(timeout=120)
        outputs.append(out + err)
    text = "\n".join(outputs)
    assert "hour delivered" in text and "Traceback" not in text
    for secret in (AMP_KEY, AMP_SECRET, PH_KEY, "wrong-secret-77", "phc_wrong_88"):
        assert secret not in text
