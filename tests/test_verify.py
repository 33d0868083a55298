"""Is everything there? `verify`, `repair` and `run`'s own read-back, against the fake PostHog's query API.

Loss after a 200 is made the way it happens in the field: a front answers
capture's `{"status": "Ok"}` and forwards nothing (as when hobby's Kafka
expires events ingestion never read, or a quota drops them), so the
connector moves its cursor believing PostHog has the events.
"""

from __future__ import annotations

import json
from collections import Counter
from datetime import datetime, timedelta

import pytest

from connector.readback import Counts
from connector.store import Delivery
from connector.verify import judge

from .fakes.posthog_query import QueryApi
from .pg_fixtures import pg_server, pg_url  # noqa: F401
from .fakes.proxy import Front, Reply
from .harness import HOUR, START, connector_env, free_port, get, populate, run, spawn, status, wait_until

PERSONAL_KEY = "phx_personal_key_7c1d2e"
LIAR = Reply(200, b'{"status":"Ok"}', "application/json")


@pytest.fixture
def api(ph):
    ph.api = QueryApi(ph, personal_api_key=PERSONAL_KEY, project_id=7)
    return ph.api


def env_for(amp, ph, tmp_path, **overrides):
    return connector_env(amp, ph, tmp_path, **{"POSTHOG_PERSONAL_API_KEY": PERSONAL_KEY, **overrides})


def verify(env, *args):
    code, out = run(["verify", "--json", "--grace-minutes", "0", *args], env)
    lines = [json.loads(line) for line in out.splitlines()]
    return code, [l for l in lines if "hour" in l], [l for l in lines if "day" in l], lines[-1] if lines else {}


def imported(ph, hour: datetime) -> list:
    tag = hour.strftime("%Y-%m-%dT%H")
    return [e for e in ph.events if e.properties.get("$amplitude_export_hour") == tag]


# -- judging, pure -------------------------------------------------------------

D1, D2 = START.date(), (START - timedelta(days=1)).date()
NOW = START + 5 * HOUR
GRACE = timedelta(minutes=60)

JUDGED = [
    ("all there is whole", {D1: 10}, {D1: Counts(10, 10)}, NOW, ("whole", 10, 0, 0, 0)),
    ("a missing event makes the hour short", {D1: 10}, {D1: Counts(9, 9)}, NOW, ("short", 9, 1, 0, 0)),
    ("duplicates are neither missing nor extra", {D1: 10}, {D1: Counts(15, 10)}, NOW, ("whole", 10, 0, 0, 5)),
    ("per day: one day short, another over, is short and extra", {D1: 5, D2: 5},
     {D1: Counts(4, 4), D2: Counts(6, 6)}, NOW, ("short", 10, 1, 1, 0)),
    ("uuids beyond the delivery are extra", {D1: 2}, {D1: Counts(3, 3)}, NOW, ("whole", 3, 0, 1, 0)),
    ("within the grace period it is pending", {D1: 10}, {}, START + HOUR + timedelta(minutes=30),
     ("pending", 0, 10, 0, 0)),
    ("an empty hour is whole", {}, {}, NOW, ("whole", 0, 0, 0, 0)),
]


@pytest.mark.parametrize("name, days, found, now, expected", JUDGED, ids=[c[0] for c in JUDGED])
def test_judge(name, days, found, now, expected):
    verdict = judge(Delivery(START, days, START + HOUR), found, now, GRACE)
    assert (verdict.state, verdict.found, verdict.missing, verdict.extra, verdict.duplicates) == expected
    assert verdict.delivered == sum(days.values())


# -- verify ---------------------------------------------------------------------

def test_a_clean_import_verifies_whole_hour_by_hour(amp, ph, api, tmp_path):
    populate(amp, hours=3)
    env = env_for(amp, ph, tmp_path)
    assert run(["sync"], env)[0] == 0
    code, hours, days, total = verify(env)
    assert code == 0
    assert [h["hour"] for h in hours] == [(START + i * HOUR).isoformat() for i in range(3)]
    for h in hours:
        at = datetime.fromisoformat(h["hour"])
        assert h["state"] == "whole" and h["delivered"] == h["found"] == len(imported(ph, at)) > 0
    assert days == [{"day": "2025-07-01", **total["total"]}]
    assert total["total"]["missing"] == 0 and total["total"]["whole"] == 3
    assert total["persons"]["checked"] > 0 and total["persons"]["not_merged"] == []
    assert api.queries, "PostHog's query API was asked"


def test_events_lost_after_a_200_are_found_by_hour_repaired_and_verified_whole(amp, ph, api, tmp_path):
    populate(amp, hours=3)
    env = env_for(amp, ph, tmp_path)
    lost = START + HOUR
    assert run(["sync", "--hours", "1"], env)[0] == 0
    with Front(LIAR) as liar:
        assert run(["sync", "--hours", "1"], {**env, "POSTHOG_HOST": liar.base_url})[0] == 0
        assert liar.requests, "the hour went to the front, which said Ok"
    assert run(["sync"], env)[0] == 0
    assert status(env)["cursor"] == (START + 3 * HOUR).isoformat()
    before = Counter(ph.uuids())

    code, hours, _, total = verify(env)
    assert code == 1
    short = [h for h in hours if h["state"] == "short"]
    assert [h["hour"] for h in short] == [lost.isoformat()], "the lost hour is named"
    assert short[0]["missing"] == short[0]["delivered"] > 0 and short[0]["found"] == 0
    assert total["persons"]["not_merged"], "its merges were lost too"

    code, out = run(["repair", "--hours", f"{lost:%Y-%m-%dT%H}..{lost:%Y-%m-%dT%H}", "--json", "--grace-minutes", "0"], env)
    assert code == 0, out
    [repaired] = [json.loads(line) for line in out.splitlines() if "hour" in json.loads(line)]
    assert repaired["state"] == "whole" and repaired["repairs"] == 1
    assert status(env)["cursor"] == (START + 3 * HOUR).isoformat(), "a repair never moves the cursor"
    again = set(Counter(ph.uuids()) - before)
    merges = {e.uuid for e in ph.events if e.event == "$create_alias"}
    groups = {e.uuid for e in ph.events if e.event == "$groupidentify"}
    assert again - merges - groups == {e.uuid for e in imported(ph, lost)}, "exactly the lost hour was sent again"
    assert again & merges, "with the merges first sent in it"
    latest = {}
    for e in ph.events:
        if e.event == "$groupidentify":
            latest[e.properties["$group_key"]] = e
    assert all(latest[e.properties["$group_key"]].uuid == e.uuid for e in ph.events
               if e.uuid in again & groups), "a repair re-sends a group's state only when it is the latest sent"
    assert max(Counter(e.uuid for e in imported(ph, lost)).values()) == 1

    code, hours, _, total = verify(env)
    assert code == 0 and all(h["state"] == "whole" for h in hours)
    assert total["persons"]["not_merged"] == [], "the repair sent the hour's merges again"
    assert status(env)["verification"]["hours_verified"] == 3


def test_duplicates_of_one_uuid_are_not_reported_missing_or_extra(amp, ph, api, tmp_path):
    populate(amp, hours=1)
    env = env_for(amp, ph, tmp_path, END_DATE=(START + HOUR).strftime("%Y-%m-%dT%H"))
    assert run(["sync"], env)[0] == 0
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    assert run(["sync"], {**env, "STATE_STORE_URL": str(fresh / "state.sqlite")})[0] == 0  # everything sent twice
    code, [hour], _, _ = verify(env)
    assert code == 0
    assert hour["state"] == "whole" and hour["missing"] == hour["extra"] == 0
    assert hour["duplicates"] == hour["delivered"] > 0


def test_an_hour_within_the_grace_period_is_pending(amp, ph, api, tmp_path):
    populate(amp, hours=1)
    env = env_for(amp, ph, tmp_path, END_DATE=(START + HOUR).strftime("%Y-%m-%dT%H"))
    assert run(["sync"], env)[0] == 0
    code, out = run(["verify", "--json"], env)  # the default grace: 60 minutes
    assert code == 0
    assert json.loads(out.splitlines()[0])["state"] == "pending"


def test_a_readable_table_by_default(amp, ph, api, tmp_path):
    populate(amp, hours=2)
    env = env_for(amp, ph, tmp_path)
    assert run(["sync", "--hours", "2"], env)[0] == 0
    code, out = run(["verify", "--grace-minutes", "0"], env)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["hour", "delivered", "found", "missing", "extra", "dupes", "state"]
    assert lines[1].startswith("2025-07-01T10:00Z") and lines[1].endswith("whole")
    assert lines[3].startswith("2025-07-01 (day)") and lines[4].startswith("total")


def test_a_wrong_personal_key_is_a_clear_error_that_never_shows_the_key(amp, ph, api, tmp_path, capsys):
    populate(amp, hours=1)
    env = env_for(amp, ph, tmp_path, POSTHOG_PERSONAL_API_KEY="phx_wrong_key_9f8e7d")
    assert run(["sync", "--hours", "1"], env)[0] == 0
    code, out = run(["verify"], env)
    err = capsys.readouterr().err
    assert code == 2
    assert "POSTHOG_PERSONAL_API_KEY" in err and "phx_wrong_key_9f8e7d" not in err + out


def test_without_the_key_verify_says_what_to_set(amp, ph, tmp_path, capsys):
    code, _ = run(["verify"], connector_env(amp, ph, tmp_path))
    assert code == 2
    [problem] = json.loads(capsys.readouterr().err.strip().splitlines()[-1])["problems"]
    assert problem["variable"] == "POSTHOG_PERSONAL_API_KEY" and "query:read" in problem["problem"]
    assert "POSTHOG_API_HOST" in problem["problem"]


def test_without_the_key_everything_else_works_as_before(amp, ph, tmp_path):
    populate(amp, hours=1)
    env = connector_env(amp, ph, tmp_path, END_DATE=(START + HOUR).strftime("%Y-%m-%dT%H"))
    assert run(["sync"], env)[0] == 0
    assert status(env)["verification"] is None


# -- run verifies and repairs on its own -------------------------------------------------

def test_run_finds_a_lost_hour_repairs_it_and_reports_it(amp, ph, api, tmp_path):
    populate(amp, hours=3)
    env = env_for(amp, ph, tmp_path, VERIFY_GRACE_MINUTES="0", POLL_INTERVAL_MINUTES="0.05", LOG_LEVEL="INFO")
    with Front(LIAR) as liar:
        assert run(["sync", "--hours", "1"], {**env, "POSTHOG_HOST": liar.base_url})[0] == 0
    assert not imported(ph, START), "the first hour is lost"
    port = free_port()
    proc = spawn(["run"], {**env, "HEALTH_PORT": str(port)})
    try:
        wait_until(lambda: (status(env)["verification"] or {}).get("hours_verified") == 3, 60, "every hour verified")
        assert imported(ph, START), "run repaired the lost hour"
        metrics = get(f"http://127.0.0.1:{port}/metrics")[1]
        assert 'connector_hours_verified{state="whole"} 3.0' in metrics
        assert get(f"http://127.0.0.1:{port}/healthz")[0] == 200
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    assert any(json.loads(line).get("message") == "hour short in PostHog; repairing" for line in err.splitlines()
               if line.startswith("{"))
    assert status(env)["verification"]["hours_short"] == 0


def test_run_reports_an_hour_that_stays_short(amp, ph, api, tmp_path):
    populate(amp, hours=1)
    env = env_for(amp, ph, tmp_path, VERIFY_GRACE_MINUTES="0", POLL_INTERVAL_MINUTES="0.05", REPAIR_ATTEMPTS="0",
                  END_DATE=(START + HOUR).strftime("%Y-%m-%dT%H"))
    with Front(LIAR) as liar:
        assert run(["sync"], {**env, "POSTHOG_HOST": liar.base_url})[0] == 0
    port = free_port()
    proc = spawn(["run"], {**env, "HEALTH_PORT": str(port)})
    try:
        wait_until(lambda: (status(env)["verification"] or {}).get("hours_short") == 1, 60, "the short hour reported")
        state = status(env)["verification"]
        assert state["events_missing"] > 0 and state["last_verified_hour"] is None
        metrics = get(f"http://127.0.0.1:{port}/metrics")[1]
        assert 'connector_hours_verified{state="short"} 1.0' in metrics
        assert f"connector_events_missing {float(state['events_missing'])}" in metrics
        assert get(f"http://127.0.0.1:{port}/healthz")[0] == 200, "healthz stays healthy: the metric is what alerts"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_check_reaches_the_query_api_when_a_personal_key_is_set(amp, ph, api, tmp_path):
    code, out = run(["check"], env_for(amp, ph, tmp_path))
    result = json.loads(out)["posthog_api"]
    assert code == 0 and result == {"url": ph.base_url, "project_id": 7, "ok": True}
    code, out = run(["check"], env_for(amp, ph, tmp_path, POSTHOG_PERSONAL_API_KEY="phx_not_this_one"))
    assert code == 1 and "POSTHOG_PERSONAL_API_KEY" in json.loads(out)["posthog_api"]["error"]
    assert "phx_not_this_one" not in out


def test_events_kafka_expired_after_a_200_are_found_and_repaired(amp, ph, api, tmp_path):
    """The fake PostHog's own fault: capture answers 200 and ingestion never reads the events."""
    populate(amp, hours=2)
    env = env_for(amp, ph, tmp_path, BATCH_SIZE="5000")
    ph.inject("lose_after_accept", times=2)  # the first hour's merges request and its events request
    assert run(["sync"], env)[0] == 0
    code, hours, _, _ = verify(env)
    assert code == 1 and [h["state"] for h in hours] == ["short", "whole", "whole"]  # the third hour is empty
    assert run(["verify", "--repair", "--grace-minutes", "0"], env)[0] == 0
    code, hours, _, total = verify(env)
    assert code == 0 and total["total"]["missing"] == 0 and total["persons"]["not_merged"] == []


def test_repair_on_postgresql_moves_no_cursor_and_verifies_whole(amp, ph, api, tmp_path, pg_url):
    populate(amp, hours=2)
    env = env_for(amp, ph, tmp_path, STATE_STORE_URL=pg_url, SYNC_NAME="verify on postgres")
    with Front(LIAR) as liar:
        assert run(["sync", "--hours", "1"], {**env, "POSTHOG_HOST": liar.base_url})[0] == 0
    assert run(["sync"], env)[0] == 0
    code, hours, _, _ = verify(env)
    assert code == 1 and [h["state"] for h in hours] == ["short", "whole", "whole"]  # the third hour is empty
    code, out = run(["repair", "--hours", START.strftime("%Y-%m-%dT%H"), "--grace-minutes", "0"], env)
    assert code == 0, out
    assert status(env)["cursor"] == (START + 3 * HOUR).isoformat()
    code, hours, _, _ = verify(env)
    assert code == 0 and [h["state"] for h in hours] == ["whole", "whole", "whole"]
    assert status(env)["verification"]["hours_verified"] == 3
