"""The connector end to end: real HTTP servers on 127.0.0.1, real SQLite, the real CLI."""

from __future__ import annotations

import json
from collections import Counter
from datetime import datetime, timedelta, timezone

import orjson
import pytest

from connector.translate import TranslateContext, translate_record

from .fakes.amplitude import FakeAmplitude
from .fakes.posthog import FakePostHog
from .harness import AMP_KEY, AMP_SECRET, HOUR, PH_KEY, START, connector_env, populate, run, status

IGNORED = {"session_start", "session_end"}


def expected_events(records: list[dict]) -> dict[str, dict]:
    """uuid -> the event the connector must deliver for each importable record."""
    out = {}
    for rec in records:
        if rec["event_type"] in IGNORED:
            continue
        hour = datetime.strptime(rec["server_upload_time"][:13], "%Y-%m-%d %H").replace(tzinfo=timezone.utc)
        event = translate_record(rec, TranslateContext(hour, frozenset(IGNORED))).event
        out[event["uuid"]] = event
    return out


def delivered(ph) -> list:
    return [e for e in ph.events if e.event not in ("$create_alias", "$groupidentify")]


def test_every_event_arrives_exactly_as_translated(amp, ph, tmp_path):
    records = populate(amp, hours=3)
    code, _ = run(["sync"], connector_env(amp, ph, tmp_path))
    assert code == 0
    want = expected_events(records)
    got = {e.uuid: e for e in delivered(ph)}
    assert set(got) == set(want)
    assert len(delivered(ph)) == len(want), "each event exactly once"
    for uuid, event in want.items():
        stored = got[uuid]
        assert stored.event == event["event"]
        assert stored.distinct_id == event["distinct_id"]
        assert dict(stored.properties) == event["properties"]
        assert stored.timestamp == datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00"))
        assert "$python_version" not in stored.properties and stored.properties.get("$os") != "Linux"


def test_timestamps_do_not_depend_on_clocks(amp, tmp_path):
    records = populate(amp, hours=1)
    with FakePostHog(PH_KEY, clock_skew=timedelta(hours=-7)) as skewed:
        assert run(["sync"], connector_env(amp, skewed, tmp_path, END_DATE=(START + HOUR).strftime("%Y-%m-%dT%H")))[0] == 0
        want = expected_events(records)
        for e in delivered(skewed):
            assert e.sent_at is None
            assert e.timestamp == datetime.fromisoformat(want[e.uuid]["timestamp"].replace("Z", "+00:00"))


def test_merges_are_sent_once_user_as_target_and_persons_join(amp, ph, tmp_path):
    records = populate(amp, hours=3)
    env = connector_env(amp, ph, tmp_path)
    assert run(["sync"], env)[0] == 0
    merges = [e for e in ph.events if e.event == "$create_alias"]
    pairs = Counter((e.distinct_id, e.properties["alias"]) for e in merges)
    assert pairs and max(pairs.values()) == 1, "each pair merged once"
    assert not ph.refused_merges
    user_ids = {r["user_id"] for r in records if r["user_id"]}
    for user, device in pairs:
        assert user in user_ids, "the user is the merge target"
        assert ph.person_of(user) == ph.person_of(device)
    # A user's second and third devices join the same person.
    devices_by_user: dict[str, set] = {}
    for user, device in pairs:
        devices_by_user.setdefault(user, set()).add(device)
    multi = [u for u, d in devices_by_user.items() if len(d) > 1]
    assert multi, "the data set has users with several devices"
    for user in multi:
        assert len({ph.person_of(d) for d in devices_by_user[user]} | {ph.person_of(user)}) == 1
    # A merge carries the instant of the earliest event that showed the pair in
    # the hour it was first seen (one block per hour at this size).
    by_hour: dict[tuple[str, str], dict[str, datetime]] = {}
    for e in delivered(ph):
        device, user = e.properties.get("$amplitude_device_id"), e.properties.get("$amplitude_user_id")
        if user and device:
            hours = by_hour.setdefault((user, device), {})
            hour = e.properties["server_upload_time"][:13]
            hours[hour] = min(hours.get(hour, e.timestamp), e.timestamp)
    for e in merges:
        hours = by_hour[(e.distinct_id, e.properties["alias"])]
        assert e.timestamp == hours[min(hours)]
    assert status(env)["totals"]["merges_sent"] == len(merges)


def test_rerun_sends_nothing_and_a_fresh_state_resends_identical_events(amp, ph, tmp_path):
    populate(amp, hours=2)
    env = connector_env(amp, ph, tmp_path, END_DATE=(START + 2 * HOUR).strftime("%Y-%m-%dT%H"))
    assert run(["sync"], env)[0] == 0
    first = [(e.uuid, e.event, e.distinct_id, e.timestamp) for e in ph.events]
    assert run(["sync"], env)[0] == 0
    assert len(ph.events) == len(first), "a re-run with the same state sends nothing"
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    assert run(["sync"], connector_env(amp, ph, fresh, END_DATE=env["END_DATE"]))[0] == 0
    second = [(e.uuid, e.event, e.distinct_id, e.timestamp) for e in ph.events[len(first):]]
    assert sorted(second) == sorted(first), "a re-import repeats the same uuids, so PostHog deduplicates"


def test_restart_resumes_at_the_cursor(amp, ph, tmp_path):
    populate(amp, hours=3)
    env = connector_env(amp, ph, tmp_path)
    assert run(["sync", "--hours", "1"], env)[0] == 0
    assert status(env)["cursor"] == (START + HOUR).isoformat()
    after_first = len(ph.events)
    assert run(["sync"], env)[0] == 0
    assert status(env)["cursor"] == (START + 3 * HOUR).isoformat()
    uuids = Counter(ph.uuids())
    assert max(uuids.values()) == 1, "no hour was sent twice"
    requested = [(r.start, r.end) for r in amp.requests]
    hours = [h for s, e in requested for h in _span(s, e)]
    assert len(hours) == len(set(hours)) == 3, "windows never overlap and never leave a gap"
    assert after_first < len(ph.events)


def _span(start, end):
    """Hours start..end inclusive; accepts the Export API's YYYYMMDDTHH strings."""
    if isinstance(start, str):
        start, end = (datetime.strptime(v, "%Y%m%dT%H").replace(tzinfo=timezone.utc) for v in (start, end))
    hour = start
    while hour <= end:
        yield hour
        hour += HOUR


def test_backfill_asks_several_hours_at_once_and_splits_on_400(ph, tmp_path):
    with FakeAmplitude(AMP_KEY, AMP_SECRET, max_hours_per_request=2) as amp:
        records = populate(amp, hours=5)
        env = connector_env(amp, ph, tmp_path, END_DATE=(START + 5 * HOUR).strftime("%Y-%m-%dT%H"))
        assert run(["sync"], env)[0] == 0
        assert {e.uuid for e in delivered(ph)} == set(expected_events(records))
        statuses = Counter(r.status for r in amp.requests)
        assert statuses[400] >= 1, "a too-wide range was refused and split"
        ok = [(r.start, r.end) for r in amp.requests if r.status == 200]
        covered = [h for s, e in ok for h in _span(s, e)]
        assert sorted(covered) == [START + i * HOUR for i in range(5)]


def test_single_hour_over_the_limit_stops_with_a_clear_error(ph, tmp_path):
    too_big = START + HOUR
    with FakeAmplitude(AMP_KEY, AMP_SECRET, too_large_hours=[too_big]) as amp:
        populate(amp, hours=3)
        env = connector_env(amp, ph, tmp_path)
        code, _ = run(["sync"], env)
        assert code == 1
        state = status(env)
        assert state["cursor"] == too_big.isoformat(), "hours before it are delivered; it is never skipped"
        assert "20250701T11" in state["last_error"] and "S3" in state["last_error"]


def test_empty_hours_advance_the_cursor(amp, ph, tmp_path):
    amp.add_records(START + 2 * HOUR, [])  # nothing at all: 404 for every range
    env = connector_env(amp, ph, tmp_path)
    assert run(["sync"], env)[0] == 0
    state = status(env)
    assert state["cursor"] == (START + 3 * HOUR).isoformat()
    assert state["totals"]["hours_empty"] == 3 and not ph.events


def test_hours_not_yet_due_are_never_asked(amp, ph, tmp_path):
    now = datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0)
    env = connector_env(amp, ph, tmp_path, START_DATE=(now - 6 * HOUR).strftime("%Y-%m-%dT%H"), END_DATE="",
                        EXPORT_DELAY_HOURS="3")
    assert run(["sync"], env)[0] == 0
    asked = [h for r in amp.requests for h in _span(r.start, r.end)]
    assert asked and max(asked) <= now - 4 * HOUR, "an hour is due only once it ended exportDelayHours ago"
    assert status(env)["cursor"] == (now - 3 * HOUR).isoformat()


def test_historical_flag_only_for_hours_older_than_48h(amp, ph, tmp_path):
    now = datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0)
    old, recent = now - 60 * HOUR, now - 5 * HOUR
    populate(amp, hours=1, start=old, seed=1)
    populate(amp, hours=1, start=recent, seed=2)
    env = connector_env(amp, ph, tmp_path, START_DATE=old.strftime("%Y-%m-%dT%H"), END_DATE="", EXPORT_DELAY_HOURS="3")
    assert run(["sync"], env)[0] == 0
    by_flag = Counter(
        (e.historical_migration, e.timestamp > now - 48 * HOUR) for e in delivered(ph)
        if e.properties.get("server_upload_time", "").startswith((old.strftime("%Y-%m-%d %H"), recent.strftime("%Y-%m-%d %H")))
    )
    assert by_flag[(True, False)] > 0 and by_flag[(False, True)] > 0
    assert by_flag[(False, False)] == 0


@pytest.mark.parametrize("hours", [None, 1], ids=["every due hour", "--hours 1"])
def test_dry_run_previews_exactly_what_sync_sends_and_changes_nothing(amp, ph, tmp_path, hours):
    populate(amp, hours=3)
    env = connector_env(amp, ph, tmp_path)
    limit = ["--hours", str(hours)] if hours else []
    code, out = run(["sync", "--dry-run", *limit], env)
    assert code == 0
    printed = [json.loads(line) for line in out.splitlines()]
    assert not ph.requests, "a dry run sends nothing"
    assert not (tmp_path / "state.sqlite").exists(), "a dry run stores nothing"
    assert status(env)["cursor"] == START.isoformat()
    assert run(["sync", *limit], env)[0] == 0
    assert printed == [dict(e.raw) for e in ph.events], "the same events, in the same order, as the real sync"
    assert {e.properties["server_upload_time"][:13] for e in delivered(ph)} == (
        {"2025-07-01 10"} if hours else {"2025-07-01 10", "2025-07-01 11", "2025-07-01 12"})


def test_bad_records_are_rejected_listed_and_the_rest_delivered(amp, ph, tmp_path):
    records = populate(amp, hours=1, members=1)
    good = [orjson.dumps(r) for r in records]
    bad = [b'{"event_type": "broken', b'{"event_type":"x","user_id":null,"device_id":null,"uuid":"0d4c7d5e-0000-4000-8000-000000000001","event_time":"2025-07-01 10:00:00"}',
           b"\xff\xfe not utf-8"]
    amp.add_records(START, bad)
    env = connector_env(amp, ph, tmp_path, END_DATE=(START + HOUR).strftime("%Y-%m-%dT%H"))
    assert run(["sync"], env)[0] == 0
    assert {e.uuid for e in delivered(ph)} == set(expected_events(records))
    state = status(env)
    assert state["rejected_by_reason"] == {"invalid_json": 1, "no_usable_id": 1, "invalid_utf8": 1}
    code, out = run(["rejected"], env)
    listed = [json.loads(line) for line in out.splitlines()]
    assert {r["reason"] for r in listed} == {"invalid_json", "no_usable_id", "invalid_utf8"}
    assert all(r["hour"] == START.isoformat() for r in listed)
    assert any(r.get("raw_base64") for r in listed), "raw bytes kept even when not UTF-8"
    assert len(good) == len(records)


def test_worker_processes_give_the_same_result(amp, ph, tmp_path):
    records = populate(amp, hours=2, events_per_hour=1500)
    env = connector_env(amp, ph, tmp_path, WORKERS="2", END_DATE=(START + 2 * HOUR).strftime("%Y-%m-%dT%H"))
    assert run(["sync"], env)[0] == 0
    assert Counter(e.uuid for e in delivered(ph)) == Counter(expected_events(records).keys())


def test_wrong_amplitude_keys_exit_2_naming_keys_and_region(amp, ph, tmp_path, capsys):
    populate(amp, hours=1)
    env = connector_env(amp, ph, tmp_path, AMPLITUDE_SECRET_KEY="wrong-secret-123")
    code, _ = run(["sync"], env)
    assert code == 2
    err = capsys.readouterr().err
    assert "AMPLITUDE_SECRET_KEY" in err and "AMPLITUDE_REGION" in err
    assert "wrong-secret-123" not in err
    assert status(env)["cursor"] == START.isoformat()


def test_wrong_posthog_key_is_fatal_and_the_cursor_stays(amp, ph, tmp_path):
    populate(amp, hours=1)
    env = connector_env(amp, ph, tmp_path, POSTHOG_PROJECT_API_KEY="phc_wrong_key_123")
    code, _ = run(["sync"], env)
    assert code == 2
    assert status(env)["cursor"] == START.isoformat()
    assert not ph.events


def test_status_reports_backlog_lag_and_next_due(amp, ph, tmp_path):
    populate(amp, hours=3)
    env = connector_env(amp, ph, tmp_path, END_DATE="")
    assert run(["sync", "--hours", "1"], env)[0] == 0
    state = status(env)
    assert state["cursor"] == (START + HOUR).isoformat()
    assert state["backlog_hours"] > 1000  # from mid-2025 up to now
    assert state["lag_seconds"] > 0 and state["next_due_at"] is not None
    assert state["totals"]["events_sent"] == len(delivered(ph))


def test_group_properties_reach_the_group_each_time_they_change(amp, ph, tmp_path):
    from .conftest import sample_records

    base = sample_records()[2]
    tiers = ["gold", "silver", "gold"]  # back to an earlier state: still a change
    for i, tier in enumerate(tiers):
        hour = START + i * HOUR
        rec = {**base, "uuid": f"5e1f0000-0000-4000-8000-00000000000{i}", "groups": {"company": ["acme"]},
               "group_properties": {"company": {"acme": {"tier": tier}}},
               "event_time": hour.strftime("%Y-%m-%d %H:05:00.000000"),
               "server_received_time": hour.strftime("%Y-%m-%d %H:06:00.000000"),
               "server_upload_time": hour.strftime("%Y-%m-%d %H:06:00.000000")}
        amp.add_records(hour, [rec, {**rec, "uuid": f"5e1f0000-0000-4000-8000-00000000001{i}"}])
    env = connector_env(amp, ph, tmp_path)
    assert run(["sync"], env)[0] == 0
    updates = [e for e in ph.events if e.event == "$groupidentify"]
    assert [e.properties["$group_set"] for e in updates] == [{"tier": t} for t in tiers], "one update per change"
    assert len({e.uuid for e in updates}) == 3
    # the acting user's distinct_id, as PostHog's browser SDK and importer send it (no phantom person)
    assert all(e.distinct_id == base["user_id"] and e.properties["$group_key"] == "acme" for e in updates)
    assert all(e.properties["$groups"] == {"company": "acme"} for e in delivered(ph))


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: datetime):
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def test_syncer_delivers_exactly_the_hours_due_by_its_injected_clock(amp, ph, tmp_path):
    import random
    import threading

    import requests

    from connector.config import Secret, load_config
    from connector.export import ExportClient
    from connector.sink import PostHogSink
    from connector.sqlite_store import SQLiteStore
    from connector.sync import Syncer
    from connector.worker import Translator

    populate(amp, hours=4)
    config = load_config(connector_env(amp, ph, tmp_path, END_DATE=""))
    # 15:10 with a 3 h delay: 10:00 and 11:00 are due, 12:00 is not.
    clock = Clock(START + 5 * HOUR + timedelta(minutes=10))
    never = lambda seconds: False  # noqa: E731
    store = SQLiteStore(str(tmp_path / "state.sqlite"))
    syncer = Syncer(
        config, store,
        ExportClient(requests.Session(), config.export_url, Secret(AMP_KEY), Secret(AMP_SECRET), region="US",
                     sleep=never, rng=random.Random(1)),
        PostHogSink(requests.Session(), ph.base_url, Secret(PH_KEY), sleep=never),
        Translator(1, PH_KEY), clock=clock, stop=threading.Event(),
    )
    assert syncer.plan().backlog == 2 and store.cursor() is None, "planning stores nothing"
    reports = syncer.sync_due()
    assert [r.hour for r in reports] == [START, START + HOUR]
    assert store.cursor() == START + 2 * HOUR
    assert [(r.start, r.end) for r in amp.requests] == [("20250701T10", "20250701T11")]
    assert syncer.sync_due() == [], "nothing more is due at the same time"
    clock.now += HOUR
    assert [r.hour for r in syncer.sync_due()] == [START + 2 * HOUR]
    sent = {e.properties["server_upload_time"][:13] for e in delivered(ph)}
    assert sent == {"2025-07-01 10", "2025-07-01 11", "2025-07-01 12"}
    store.close()
