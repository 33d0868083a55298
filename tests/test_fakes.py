"""The fakes behave as shared/reference/FACTS.md says Amplitude and PostHog do.

These tests guard the test infrastructure itself: if a fake drifts from the
real services, connector tests built on it prove nothing.
"""

from __future__ import annotations

import gzip
import io
import json
import re
import statistics
import subprocess
import sys
import threading
import time
import zipfile
import zlib
from collections import Counter, defaultdict
from datetime import datetime, timedelta, timezone
from pathlib import Path
from random import Random

import pytest
import requests

from tests.fakes.amplitude import NOT_FOUND_BODY, FakeAmplitude, format_hour
from tests.fakes.posthog import FakePostHog, is_illegal_merge_id
from tests.fakes.records import KEYS, make_population, make_record

KEY, SECRET = "amp-key", "amp-secret"
PH_KEY = "phc_fake"
H0 = datetime(2025, 7, 1, tzinfo=timezone.utc)
TIME_RE = re.compile(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}(\.\d{6})?")
REPO = Path(__file__).resolve().parent.parent


def hour(n: int) -> datetime:
    return H0 + timedelta(hours=n)


def parse_amp_time(value: str) -> datetime:
    return datetime.fromisoformat(value).replace(tzinfo=timezone.utc)


def records_for(n: int, h: datetime, seed: int = 1) -> list[dict]:
    return list(make_population(Random(seed), n, [h]))


# ---- records ----------------------------------------------------------------------
def test_records_have_exactly_the_sample_keys_in_order(samples):
    assert len(KEYS) == 55
    assert tuple(samples[0]) == KEYS
    recs = list(make_population(Random(3), 300, [hour(0), hour(1)]))
    assert all(tuple(r) == KEYS for r in recs)


def test_records_are_deterministic_per_seed():
    a = list(make_population(Random(7), 200, [hour(0)]))
    b = list(make_population(Random(7), 200, [hour(0)]))
    c = list(make_population(Random(8), 200, [hour(0)]))
    assert json.dumps(a) == json.dumps(b)
    assert [r["uuid"] for r in a] != [r["uuid"] for r in c]


def test_web_record_puts_browser_in_os_fields_and_page_properties():
    rng = Random(1)
    web = make_record(rng, hour=hour(5), user_id=None, device_id="d1", platform="Web",
                      session_id=1751331600000, event_type="[Amplitude] Page Viewed", seq=1)
    assert web["os_name"] in {"Chrome", "Chrome Mobile", "Safari", "Mobile Safari", "Firefox", "Edge"}
    assert web["device_family"] in {"Mac OS X", "Windows", "Linux", "Android", "iOS", "Chrome OS"}
    for prop in ("[Amplitude] Page URL", "[Amplitude] Page Domain", "[Amplitude] Page Path",
                 "[Amplitude] Page Title", "referrer", "referring_domain"):
        assert prop in web["event_properties"]
    ios = make_record(rng, hour=hour(5), user_id="u1", device_id="D1", platform="iOS",
                      session_id=-1, event_type="Screen: Home", seq=2)
    assert (ios["os_name"], ios["platform"]) == ("ios", "iOS")
    assert 5 <= len(ios["event_properties"]) <= 15
    android = make_record(rng, hour=hour(5), user_id="u1", device_id="a1", platform="Android",
                          session_id=-1, event_type="Screen: Home", seq=3)
    assert android["os_name"] == "android" and android["device_brand"]
    with pytest.raises(KeyError):
        make_record(rng, hour=hour(5), user_id="u", device_id="d", platform="iOS",
                    session_id=-1, event_type="x", seq=1, not_a_key=1)


def test_record_times_sizes_and_value_types():
    recs = list(make_population(Random(2), 2000, [hour(9)]))
    for r in recs:
        for key in ("event_time", "server_upload_time", "server_received_time", "processed_time"):
            assert TIME_RE.fullmatch(r[key]), r[key]
        upload = parse_amp_time(r["server_upload_time"])
        assert hour(9) <= upload < hour(10)
        assert parse_amp_time(r["event_time"]) < upload
    sizes = [len(json.dumps(r, separators=(",", ":"), ensure_ascii=False)) for r in recs]
    assert 1500 <= statistics.median(sizes) <= 2000
    kinds = {type(v) for r in recs for v in r["event_properties"].values()}
    assert {str, int, float, bool} <= kinds
    assert any("EMPTY" in r["user_properties"].values() for r in recs)
    assert any(r["groups"] == {"company": [c]} for r in recs for c in ("acme", "globex", "initech"))


def test_population_mixes_platforms_and_logs_anonymous_devices_in():
    recs = list(make_population(Random(4), 6000, [hour(0), hour(1), hour(2)]))
    assert len(recs) == 6000
    assert len({r["uuid"] for r in recs}) == 6000
    share = Counter(r["platform"] for r in recs)
    assert 0.2 < share["Web"] / len(recs) < 0.4
    by_device: dict[str, list] = defaultdict(list)
    for r in recs:
        by_device[r["device_id"]].append(r["user_id"])
    # anonymous first, then the same device logged in: the device/user pairs
    logged_in_later = [ids for ids in by_device.values()
                       if ids[0] is None and any(u is not None for u in ids)]
    assert len(logged_in_later) >= 10
    devices_of: dict[str, set] = defaultdict(set)
    for r in recs:
        if r["user_id"]:
            devices_of[r["user_id"]].add(r["device_id"])
    assert any(len(d) >= 2 for d in devices_of.values())
    # hours come out in order, sessions belong to a device
    assert [r["server_upload_time"][:13] for r in recs] == sorted(r["server_upload_time"][:13] for r in recs)
    assert any(r["event_type"] == "session_start" for r in recs)


# ---- fake Amplitude -----------------------------------------------------------------
@pytest.fixture
def amp():
    with FakeAmplitude(KEY, SECRET) as fake:
        yield fake


def export(amp: FakeAmplitude, start: datetime | str, end: datetime | str, auth=(KEY, SECRET),
           **kw) -> requests.Response:
    params = {"start": start if isinstance(start, str) else format_hour(start),
              "end": end if isinstance(end, str) else format_hour(end)}
    return requests.get(f"{amp.base_url}/api/2/export", params=params, auth=auth,
                        timeout=kw.pop("timeout", 10), **kw)


def unzip(content: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(content)) as zf:
        return {name: gzip.decompress(zf.read(name)) for name in zf.namelist()}


def test_start_equals_end_is_one_hour_and_ranges_include_both_ends(amp):
    for n in range(3):
        amp.add_records(hour(n), records_for(20, hour(n), seed=n))
    one = unzip(export(amp, hour(1), hour(1)).content)
    assert list(one) == ["636686/636686_2025-07-01_1#1.json.gz"]
    two = unzip(export(amp, hour(1), hour(2)).content)
    assert sorted(two) == ["636686/636686_2025-07-01_1#1.json.gz",
                           "636686/636686_2025-07-01_2#1.json.gz"]


def test_archive_is_a_real_zip_of_gzip_ndjson(amp):
    recs = records_for(50, hour(4))
    assert amp.add_records(hour(4), recs, members=3) == 50
    resp = export(amp, hour(4), hour(4))
    assert resp.headers["Content-Type"] == "application/zip"
    assert resp.content[:4] == b"PK\x03\x04"
    assert int(resp.headers["Content-Length"]) == len(resp.content)
    members = unzip(resp.content)
    assert len(members) == 3
    lines = []
    for name in sorted(members, key=lambda n: int(n.split("#")[1].split(".")[0])):
        assert not members[name].endswith(b"\n")  # the last line has no newline
        lines.extend(members[name].split(b"\n"))
    assert [json.loads(line) for line in lines] == recs
    assert amp.build_archive([hour(4)]) == resp.content  # same bytes without HTTP


def test_member_names_are_not_zero_padded_and_archive_order_is_not_natural(amp):
    for n in range(12):
        amp.add_records(hour(n), records_for(11, hour(n), seed=n), members=11 if n == 3 else 1)
    names = list(unzip(export(amp, hour(0), hour(11)).content))
    assert "636686/636686_2025-07-01_10#1.json.gz" in names
    assert "636686/636686_2025-07-01_3#10.json.gz" in names
    assert "636686/636686_2025-07-01_03#1.json.gz" not in names
    assert names == sorted(names)  # plain string order: _10 before _2
    assert names.index("636686/636686_2025-07-01_10#1.json.gz") < names.index(
        "636686/636686_2025-07-01_2#1.json.gz")


def test_raw_lines_and_extra_files_are_served_as_given(amp):
    amp.add_records(hour(0), [b'{"ok":1}', b'{"broken": ', b"\xff\xfe not utf-8", "{\"s\":2}"])
    amp.add_file(hour(0), "manifest.txt", b"not json")
    resp = export(amp, hour(0), hour(0))
    with zipfile.ZipFile(io.BytesIO(resp.content)) as zf:
        assert zf.read("636686/manifest.txt") == b"not json"
        data = gzip.decompress(zf.read("636686/636686_2025-07-01_0#1.json.gz"))
    assert data == b'{"ok":1}\n{"broken": \n\xff\xfe not utf-8\n{"s":2}'


def test_no_data_is_404_with_amplitudes_body(amp):
    amp.add_records(hour(0), records_for(5, hour(0)))
    resp = export(amp, hour(1), hour(5))
    assert (resp.status_code, resp.content) == (404, NOT_FOUND_BODY)
    assert resp.content == b"Raw data files were not found."


def test_auth_wrong_keys_403_missing_401(amp):
    amp.add_records(hour(0), records_for(5, hour(0)))
    wrong = export(amp, hour(0), hour(0), auth=(KEY, "nope"))
    assert (wrong.status_code, wrong.text) == (403, "Invalid API Key")
    assert export(amp, hour(0), hour(0), auth=None).status_code == 401
    assert export(amp, hour(0), hour(0)).status_code == 200
    assert [r.status for r in amp.requests] == [403, 401, 200]


@pytest.mark.parametrize("start,end", [("2025-07-01T00", "20250701T00"), ("20250701T24", "20250701T24"),
                                        ("20250701T05", "20250701T04"), ("20250701", "20250701T01"),
                                        ("20240101T00", "20250701T00")])
def test_malformed_or_inverted_ranges_are_400(amp, start, end):
    amp.add_records(hour(0), records_for(5, hour(0)))
    assert export(amp, start, end).status_code == 400


def test_too_large_exports_are_400():
    with FakeAmplitude(KEY, SECRET, max_hours_per_request=2, too_large_hours={hour(5)}) as amp:
        for n in range(7):
            amp.add_records(hour(n), records_for(3, hour(n)))
        assert export(amp, hour(0), hour(2)).status_code == 400  # 3 hours > 2
        assert export(amp, hour(0), hour(1)).status_code == 200
        assert export(amp, hour(4), hour(5)).status_code == 400  # contains the huge hour
        assert export(amp, hour(5), hour(5)).status_code == 400  # it cannot be split
        assert export(amp, hour(6), hour(6)).status_code == 200


def test_status_faults_are_a_fifo_then_normal_service(amp):
    amp.add_records(hour(0), records_for(5, hour(0)))
    amp.inject("status", times=2, code=429, headers={"Retry-After": "7"})
    amp.inject("status", code=504, body=b"Gateway Timeout")
    first = export(amp, hour(0), hour(0))
    assert (first.status_code, first.headers["Retry-After"]) == (429, "7")
    assert export(amp, hour(0), hour(0)).status_code == 429
    assert export(amp, hour(0), hour(0)).text == "Gateway Timeout"
    assert export(amp, hour(0), hour(0)).status_code == 200
    assert [r.status for r in amp.requests] == [429, 429, 504, 200]
    with pytest.raises(ValueError):
        amp.inject("no_such_fault")


def test_reset_mid_body_breaks_the_download_and_the_server_recovers(amp):
    amp.add_records(hour(0), records_for(300, hour(0)))
    amp.inject("reset_mid_body")
    with pytest.raises(requests.exceptions.RequestException):
        export(amp, hour(0), hour(0))
    assert export(amp, hour(0), hour(0)).content == amp.build_archive([hour(0)])


def test_stall_times_out_the_client_and_does_not_block_shutdown():
    amp = FakeAmplitude(KEY, SECRET).start()
    amp.add_records(hour(0), records_for(5, hour(0)))
    amp.inject("stall", seconds=120)
    with pytest.raises(requests.exceptions.ConnectionError):  # requests' read timeout
        export(amp, hour(0), hour(0), timeout=0.3)
    started = time.monotonic()
    amp.close()
    assert time.monotonic() - started < 5


def test_broken_200_bodies(amp):
    amp.add_records(hour(0), records_for(40, hour(0)), members=2)
    for fault in ("html_200", "truncated_zip", "corrupt_gzip_member", "empty_200"):
        amp.inject(fault)
    html = export(amp, hour(0), hour(0))
    assert html.status_code == 200 and not html.content.startswith(b"PK\x03\x04")
    truncated = export(amp, hour(0), hour(0))
    assert truncated.status_code == 200 and truncated.content.startswith(b"PK\x03\x04")
    with pytest.raises(zipfile.BadZipFile):
        zipfile.ZipFile(io.BytesIO(truncated.content))
    corrupt = export(amp, hour(0), hour(0))
    with zipfile.ZipFile(io.BytesIO(corrupt.content)) as zf:
        assert zf.testzip() is None  # the zip itself is fine
        first, last = zf.namelist()
        gzip.decompress(zf.read(first))
        with pytest.raises((OSError, EOFError, zlib.error)):
            gzip.decompress(zf.read(last))
    empty = export(amp, hour(0), hour(0))
    assert (empty.status_code, empty.content) == (200, b"")


def test_wait_for_requests_wakes_on_a_request_and_times_out(amp):
    amp.add_records(hour(0), records_for(5, hour(0)))
    worker = threading.Thread(target=export, args=(amp, hour(0), hour(0)))
    worker.start()
    assert amp.wait_for_requests(1, timeout=5)[0].status == 200
    worker.join()
    with pytest.raises(TimeoutError):
        amp.wait_for_requests(2, timeout=0.05)


def test_large_archive_streams(amp):
    recs = make_population(Random(5), 20_000, [hour(0)])
    assert amp.add_records(hour(0), recs) == 20_000  # a generator: streamed to disk
    resp = export(amp, hour(0), hour(0), stream=True)
    buf = io.BytesIO()
    for chunk in resp.iter_content(1 << 16):
        buf.write(chunk)
    (data,) = unzip(buf.getvalue()).values()
    assert data.count(b"\n") == 19_999


# ---- fake PostHog -------------------------------------------------------------------
FIXED_NOW = datetime(2025, 7, 10, 12, 0, tzinfo=timezone.utc)


@pytest.fixture
def ph():
    with FakePostHog(PH_KEY) as fake:
        yield fake


def ev(distinct_id="user-1", name="pageview", **extra) -> dict:
    return {"event": name, "distinct_id": distinct_id, "properties": extra.pop("properties", {}),
            **extra}


def post(ph: FakePostHog, batch=None, *, body: bytes | None = None, api_key=PH_KEY,
         headers=None, session=None, timeout=10, **payload) -> requests.Response:
    if body is None:
        body = json.dumps({"api_key": api_key, "batch": batch, **payload}).encode()
    return (session or requests).post(f"{ph.base_url}/batch/", data=body, timeout=timeout,
                                      headers={"Content-Type": "application/json", **(headers or {})})


def test_valid_batch_is_stored_with_200(ph):
    u = "0190b1a2-0000-4000-8000-000000000001"
    resp = post(ph, [ev(uuid=u, timestamp="2025-07-01T10:00:00Z", properties={"a": 1}),
                     ev("user-2")], historical_migration=True)
    assert (resp.status_code, resp.headers["Content-Type"], resp.content) == (200, "application/json", b'{"status":"Ok"}')
    first, second = ph.events
    assert (first.event, first.distinct_id, first.uuid) == ("pageview", "user-1", u)
    assert first.properties == {"a": 1}
    assert first.timestamp == datetime(2025, 7, 1, 10, tzinfo=timezone.utc)
    assert first.historical_migration and second.historical_migration
    with pytest.raises(AttributeError):
        first.event = "changed"  # frozen
    assert ph.uuids() == [u, None]
    assert ph.requests[0].n_events == 2


def test_wrong_or_missing_api_key_is_401(ph):
    wrong, missing = post(ph, [ev()], api_key="phc_other"), post(ph, body=json.dumps({"batch": [ev()]}).encode())
    assert (wrong.status_code, wrong.text) == (401, "API key is not valid: unknown project API key")
    assert (missing.status_code, missing.text) == (401, "event submitted without an api_key")
    assert wrong.headers["Content-Type"].startswith("text/plain")
    assert ph.events == []


@pytest.mark.parametrize("bad", [
    {"event": "x", "properties": {}},  # no distinct_id
    {"event": "x", "distinct_id": ""},
    {"event": "x", "distinct_id": None},
    {"distinct_id": "u"},  # no event name
    {"event": "", "distinct_id": "u"},
    {"event": "x", "distinct_id": "u", "uuid": "not-a-uuid"},
])
def test_one_bad_event_rejects_the_whole_batch(ph, bad):
    resp = post(ph, [ev("a"), bad, ev("b")])
    assert resp.status_code == 400
    assert resp.headers["Content-Type"].startswith("text/plain")
    assert resp.text.startswith(("failed to parse request", "event submitted with"))
    assert "1" not in resp.text, "capture never names the offending event's index"
    assert ph.events == []


def test_invalid_json_and_empty_batch_are_400(ph):
    assert post(ph, body=b'{"api_key": "phc_fake", "batch": [').status_code == 400
    assert post(ph, []).status_code == 400
    assert ph.events == []


def test_gzip_by_header_or_by_magic(ph):
    body = gzip.compress(json.dumps({"api_key": PH_KEY, "batch": [ev("gz")]}).encode())
    assert post(ph, body=body, headers={"Content-Encoding": "gzip"}).status_code == 200
    assert post(ph, body=body).status_code == 200  # no header, gzip magic
    assert [e.distinct_id for e in ph.events] == ["gz", "gz"]
    assert [r.content_encoding for r in ph.requests] == ["gzip", None]


def test_body_over_20_mb_decompressed_is_413(ph):
    huge = json.dumps({"api_key": PH_KEY, "batch": [ev(properties={"x": "y" * (21 << 20)})]})
    resp = post(ph, body=gzip.compress(huge.encode(), compresslevel=1),
                headers={"Content-Encoding": "gzip"})
    assert resp.status_code == 413
    assert ph.events == []


@pytest.mark.parametrize("blob", ['"' * 300_000, "z" * (1 << 20)],
                         ids=["quotes double when escaped into the envelope", "over 1 MB as it is"])
def test_event_over_the_kafka_limit_fails_the_request_after_the_events_before_it(ph, blob):
    big = ev("big", properties={"blob": blob})
    assert len(json.dumps(big)) < 1_000_000 or blob[0] == "z"  # the first is under 1 MB until escaped
    resp = post(ph, [ev("before"), big, ev("after")])
    assert (resp.status_code, resp.text) == (413, "maximum event size exceeded: Event rejected by kafka during send")
    assert resp.headers["Content-Type"].startswith("text/plain")
    assert [e.distinct_id for e in ph.events] == ["before"], "written before the failure; never after it"
    assert [d.distinct_id for d in ph.dropped] == ["big"] and ph.dropped[0].size > 1_000_000


def test_an_event_just_under_the_kafka_limit_is_stored(ph):
    resp = post(ph, [ev("fits", properties={"blob": "z" * 990_000})])
    assert resp.status_code == 200 and [e.distinct_id for e in ph.events] == ["fits"]


def test_distinct_id_is_stringified_and_cut_to_200_chars(ph):
    post(ph, [ev("x" * 250), ev(12345)])
    assert [e.distinct_id for e in ph.events] == ["x" * 200, "12345"]


def test_timestamps_follow_the_sent_at_rule_on_a_skewed_server_clock():
    with FakePostHog(PH_KEY, clock=lambda: FIXED_NOW, clock_skew=timedelta(hours=-3)) as ph:
        server_now = FIXED_NOW - timedelta(hours=3)
        assert ph.now() == server_now
        t = "2025-07-01T10:00:00+00:00"
        post(ph, [ev("skewed", timestamp=t),
                  ev("ignored", timestamp="2025-07-01T12:00:00+02:00",
                     properties={"$ignore_sent_at": True}),
                  ev("no-ts")],
             sent_at="2025-07-01T10:10:00Z")
        post(ph, [ev("plain", timestamp=t),
                  ev("future", timestamp=(server_now + timedelta(hours=24)).isoformat()),
                  ev("near-future", timestamp=(server_now + timedelta(hours=22)).isoformat())])
        stored = {e.distinct_id: e.timestamp for e in ph.events}
    assert stored["skewed"] == server_now - timedelta(minutes=10)  # now + (ts - sent_at)
    assert stored["ignored"] == datetime(2025, 7, 1, 10, tzinfo=timezone.utc)
    assert stored["no-ts"] == server_now
    assert stored["plain"] == datetime(2025, 7, 1, 10, tzinfo=timezone.utc)
    assert stored["future"] == server_now  # over 23 h ahead: clamped
    assert stored["near-future"] == server_now + timedelta(hours=22)


def test_real_posthog_client_lands_events(ph):
    from posthog import Posthog

    client = Posthog(PH_KEY, host=ph.base_url, sync_mode=True, gzip=True,
                     historical_migration=True)
    try:
        u = "0190b1a2-0000-4000-8000-0000000000aa"
        client.capture("Signed Up", distinct_id="user-9", properties={"plan": "pro"},
                       timestamp=datetime(2025, 7, 1, 9, tzinfo=timezone.utc), uuid=u)
        client.alias(previous_id="user-9", distinct_id="device-9")
    finally:
        client.shutdown()
    captured, alias = ph.wait_for_events(2, timeout=5)
    assert (captured.event, captured.distinct_id, captured.uuid) == ("Signed Up", "user-9", u)
    assert captured.properties["plan"] == "pro" and captured.historical_migration
    # the client always sends sent_at: the stored time is only as good as both clocks
    assert captured.sent_at is not None
    assert abs(captured.timestamp - datetime(2025, 7, 1, 9, tzinfo=timezone.utc)) < timedelta(seconds=5)
    assert ph.requests[0].content_encoding == "gzip"
    assert ph.requests[0].user_agent.startswith("posthog-python/")
    # alias(previous_id=A, distinct_id=B) sends distinct_id=A, alias=B
    assert (alias.event, alias.distinct_id, alias.properties["alias"]) == \
        ("$create_alias", "user-9", "device-9")
    assert ph.person_of("device-9") == ph.person_of("user-9") is not None


def test_merge_direction_user_absorbs_devices_not_the_reverse(ph):
    post(ph, [ev("device-1"), ev("device-2"), ev("user-1")])
    assert len({ph.person_of(d) for d in ("device-1", "device-2", "user-1")}) == 3
    post(ph, [ev("user-1", "$create_alias", properties={"alias": "device-1"})])
    assert ph.person_of("device-1") == ph.person_of("user-1")
    assert ph.is_identified("user-1")
    # wrong way round for the second device: user-1's person is identified
    post(ph, [ev("device-2", "$create_alias", properties={"alias": "user-1"})])
    assert ph.person_of("device-2") != ph.person_of("user-1")
    assert [(m.distinct_id, m.other_id, m.reason) for m in ph.refused_merges] == \
        [("device-2", "user-1", "cannot_merge_already_identified")]
    # the right way round merges it
    post(ph, [ev("user-1", "$identify", properties={"$anon_distinct_id": "device-2"})])
    assert ph.person_of("device-2") == ph.person_of("user-1") == ph.person_of("device-1")


def test_illegal_ids_are_ingested_but_never_merged(ph):
    assert is_illegal_merge_id("Anonymous") and is_illegal_merge_id('"null"')
    assert is_illegal_merge_id("0") and not is_illegal_merge_id("user-0")
    post(ph, [ev("user-1", "$identify", properties={"$anon_distinct_id": "undefined"})])
    assert len(ph.events) == 1
    assert ph.refused_merges[0].reason == "cannot_merge_with_illegal_distinct_id"
    assert ph.person_of("undefined") is None


# ---- fake PostHog: ingestion ------------------------------------------------------------
CONNECTOR_HOST = "100.64.0.7"  # in the test GeoIP table as Iceland: a leak would show


@pytest.fixture
def ph_at():
    """A fake PostHog that sees every request come from CONNECTOR_HOST."""
    with FakePostHog(PH_KEY, client_ip=CONNECTOR_HOST) as fake:
        yield fake


def test_envelope_ip_is_the_client_unless_capture_internal_and_a_falsy_ip_is_filled(ph_at):
    post(ph_at, [ev("plain"), ev("internal", properties={"capture_internal": True}),
                 ev("own", properties={"$ip": "203.0.113.5"}), ev("empty", properties={"$ip": ""}),
                 ev("null", properties={"$ip": None})])
    got = {e.distinct_id: (e.ip, e.ingested.get("$ip")) for e in ph_at.events}
    assert got == {"plain": (CONNECTOR_HOST, CONNECTOR_HOST), "internal": ("127.0.0.1", "127.0.0.1"),
                   "own": (CONNECTOR_HOST, "203.0.113.5"), "empty": (CONNECTOR_HOST, CONNECTOR_HOST),
                   "null": (CONNECTOR_HOST, CONNECTOR_HOST)}
    assert ph_at.events[0].properties == {}, "properties stay as sent; ingested is what PostHog holds"


def test_without_client_ip_the_envelope_has_the_tcp_peer(ph):
    post(ph, [ev("peer")])
    assert ph.events[0].ip == "127.0.0.1"


def test_geoip_resolves_ip_onto_event_and_person_as_the_transformation_does(ph_at):
    post(ph_at, [ev("u1", properties={"$ip": "198.51.100.20"})])
    (event,) = ph_at.events
    assert event.ingested["$geoip_country_code"] == "DE" and event.ingested["$geoip_city_name"] == "Berlin"
    person = ph_at.person_properties("u1")
    assert person["$geoip_country_code"] == "DE" and person["$initial_geoip_country_code"] == "DE"
    assert person["$geoip_time_zone"] == "Europe/Berlin"
    # keys the lookup lacks are written as null too
    assert "$geoip_city_confidence" in person and person["$geoip_city_confidence"] is None
    assert "$geoip_city_confidence" not in event.ingested


@pytest.mark.parametrize("props, country", [
    ({"$ip": "203.0.113.9", "$geoip_disable": True}, None),
    ({"$ip": "10.1.2.3"}, None),  # not in the table
    ({"capture_internal": True}, "SE"),  # 127.0.0.1 is looked up as 89.160.20.129
    ({"capture_internal": True, "$geoip_disable": True}, None),
    ({}, "IS"),  # the client's own address
], ids=["disabled", "unknown address", "127.0.0.1 becomes Sweden", "127.0.0.1 with geoip off", "client address"])
def test_geoip_skips_and_spoofs_as_the_transformation_does(ph_at, props, country):
    post(ph_at, [ev("u1", properties=props)])
    assert ph_at.events[0].ingested.get("$geoip_country_code") == country
    assert (ph_at.person_properties("u1") or {}).get("$initial_geoip_country_code") == country


def without_geoip(props: dict | None) -> dict | None:
    """A person's properties less what GeoIP wrote (the fake's 127.0.0.1 peer resolves to Sweden)."""
    return None if props is None else {k: v for k, v in props.items() if "geoip_" not in k}


def test_person_properties_set_set_once_unset_and_lifted_event_properties(ph):
    post(ph, [ev("u1", properties={"$set": {"plan": "free", "a": 1}, "$set_once": {"first": "x"},
                                   "$browser": "Chrome", "utm_source": "ads", "$os_name": "iOS"})])
    post(ph, [ev("u1", properties={"$set": {"plan": "pro"}, "$set_once": {"first": "y"}, "$unset": ["a"],
                                   "$browser": "Firefox", "utm_source": "mail"})])
    assert without_geoip(ph.person_properties("u1")) == {
        "plan": "pro", "first": "x", "$browser": "Firefox", "$initial_browser": "Chrome",
        "utm_source": "mail", "$initial_utm_source": "ads", "$os": "iOS", "$initial_os": "iOS"}
    assert ph.person_properties("nobody") is None


def test_merged_persons_combine_properties_the_target_winning(ph):
    post(ph, [ev("device", properties={"$set": {"plan": "free", "device_only": 1}}),
              ev("user", properties={"$set": {"plan": "pro"}})])
    post(ph, [ev("user", "$create_alias", properties={"alias": "device"})])
    assert without_geoip(ph.person_properties("device")) == without_geoip(ph.person_properties("user")) \
        == {"plan": "pro", "device_only": 1}


def test_groups_exist_only_after_a_groupidentify_with_type_and_key(ph):
    post(ph, [ev("u1", properties={"$groups": {"company": "acme"}}),
              ev("u1", "$groupidentify", properties={"$group_type": "company"}),  # no key: nothing
              ev("u1", "$groupidentify", properties={"$group_type": "company", "$group_key": "globex",
                                                     "$group_set": {"plan": "pro"}, "$set": {"x": 1}})])
    assert ph.groups() == {("company", "globex"): {"plan": "pro"}}
    post(ph, [ev("u1", "$groupidentify", properties={"$group_type": "company", "$group_key": "globex",
                                                     "$group_set": {"seats": 5}})])
    assert ph.groups() == {("company", "globex"): {"plan": "pro", "seats": 5}}
    assert "x" not in ph.person_properties("u1"), "a $groupidentify never changes the person"


def test_process_person_profile_false_turns_person_processing_off(ph):
    post(ph, [ev("anon", properties={"$process_person_profile": False, "$set": {"plan": "pro"}}),
              ev("user-1", "$identify", properties={"$process_person_profile": False, "$anon_distinct_id": "d1"}),
              ev("user-1", "$groupidentify", properties={"$process_person_profile": False,
                                                         "$group_type": "company", "$group_key": "acme"}),
              ev("user-2", properties={"$process_person_profile": "false", "$set": {"plan": "team"}})])
    assert [e.distinct_id for e in ph.events] == ["anon", "user-2"], "person-only events are dropped"
    assert ph.person_properties("anon") is None and ph.person_of("anon") is None
    assert ph.events[0].ingested["$process_person_profile"] is False and not ph.events[0].person_processing
    assert ph.person_of("d1") is None and ph.groups() == {}
    assert without_geoip(ph.person_properties("user-2")) == {"plan": "team"}, "only a JSON false counts"
    kinds = [w.type for w in ph.warnings]
    assert kinds.count("invalid_event_when_process_person_profile_is_false") == 2
    assert "invalid_process_person_profile" in kinds


def test_lose_after_accept_answers_ok_and_stores_nothing(ph):
    ph.inject("lose_after_accept")
    lost = post(ph, [ev("u1", properties={"$set": {"plan": "pro"}})])
    assert (lost.status_code, lost.content) == (200, b'{"status":"Ok"}')
    assert ph.events == [] and ph.person_of("u1") is None
    assert post(ph, [ev("u2")]).status_code == 200 and [e.distinct_id for e in ph.events] == ["u2"]
    assert [r.status for r in ph.requests] == [200, 200]


def test_posthog_faults_status_close_and_delay(ph):
    ph.inject("status", code=503, headers={"Retry-After": "2"})
    ph.inject("close_connection")
    ph.inject("delay", seconds=0.5)
    busy = post(ph, [ev("a")])
    assert (busy.status_code, busy.headers["Retry-After"]) == (503, "2")
    with pytest.raises(requests.exceptions.ConnectionError):
        post(ph, [ev("b")])
    with pytest.raises(requests.exceptions.ReadTimeout):
        post(ph, [ev("c")], timeout=0.1)
    # the slow request was still accepted after the client gave up
    assert [e.distinct_id for e in ph.wait_for_events(1, timeout=5)] == ["c"]
    assert post(ph, [ev("d")]).status_code == 200
    assert [r.status for r in ph.wait_for_requests(4)] == [503, None, 200, 200]


def test_stop_and_start_on_the_same_port(ph):
    session = requests.Session()  # keeps a pooled keep-alive connection
    url = ph.base_url
    assert post(ph, [ev("a")], session=session).status_code == 200
    ph.stop()
    with pytest.raises(requests.exceptions.ConnectionError):
        post(ph, [ev("b")], session=session)
    ph.start()
    assert ph.base_url == url
    assert post(ph, [ev("c")], session=session).status_code == 200
    assert [e.distinct_id for e in ph.events] == ["a", "c"]


def test_wait_for_events_times_out(ph):
    with pytest.raises(TimeoutError):
        ph.wait_for_events(1, timeout=0.05)


# ---- command-line demos ---------------------------------------------------------------
def run_demo(args: list[str], tmp_path: Path):
    port_file = tmp_path / "port.json"
    proc = subprocess.Popen([sys.executable, "-m", *args, "--port", "0", "--port-file", str(port_file)],
                            cwd=REPO, stdout=subprocess.PIPE, text=True)
    first_line = proc.stdout.readline()  # printed once serving; blocks until then
    return proc, json.loads(first_line), json.loads(port_file.read_text())


def stop_demo(proc: subprocess.Popen) -> str:
    proc.terminate()
    out, _ = proc.communicate(timeout=10)
    return out


def test_amplitude_demo_process(tmp_path):
    proc, info, from_file = run_demo(
        ["tests.fakes.amplitude", "--hours", "2025-07-01T00:2025-07-01T01",
         "--events-per-hour", "30", "--seed", "1"], tmp_path)
    try:
        assert info == from_file
        resp = requests.get(f"{info['base_url']}/api/2/export",
                            params={"start": "20250701T00", "end": "20250701T01"},
                            auth=(info["api_key"], info["secret_key"]), timeout=10)
        members = unzip(resp.content)
        assert sum(data.count(b"\n") + 1 for data in members.values()) == 60
    finally:
        stop_demo(proc)


def test_posthog_demo_process(tmp_path):
    proc, info, from_file = run_demo(["tests.fakes.posthog"], tmp_path)
    try:
        assert info == from_file
        resp = requests.post(f"{info['base_url']}/batch/", timeout=10,
                             json={"api_key": info["api_key"], "batch": [ev(), ev()]})
        assert resp.status_code == 200
    finally:
        out = stop_demo(proc)
    assert re.search(r"POST /batch/ -> 200 events=2", out)
