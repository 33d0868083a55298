"""Issue 9, end to end: imported data as PostHog's own ingestion would hold it.

The real CLI runs against the fakes; the assertions read what the fake PostHog
stored after doing what PostHog's capture and ingestion do (tests/fakes/posthog.py):
the person's properties, the groups that exist, each event's address.

The tests run on loopback, where the connector's own address (127.0.0.1) is
also the address `capture_internal` asks for. So the fake PostHog here sees
every request come from CONNECTOR_HOST instead: an event that leaks the
connector's address shows it in `$ip`, and the test GeoIP table places it in
Iceland, so a person located from it shows that too.
"""

from __future__ import annotations

import json
import uuid as uuidlib
from collections import defaultdict
from datetime import datetime, timedelta, timezone
from random import Random

import orjson
import pytest

from connector.identities import plan_identities
from connector.translate import (MAX_EVENT_BYTES, GroupUpdate, TranslateContext, kafka_message_bytes,
                                 properties_digest, translate_record)

from .fakes.posthog import FakePostHog, kafka_message_size
from .fakes.records import make_population, make_record
from .harness import HOUR, PH_KEY, START, connector_env, populate, run, status

CONNECTOR_HOST = "100.64.0.7"  # the test GeoIP table's Iceland
LOCALHOST = "127.0.0.1"
ONE_HOUR = {"END_DATE": (START + HOUR).strftime("%Y-%m-%dT%H")}


@pytest.fixture
def ph():
    with FakePostHog(PH_KEY, client_ip=CONNECTOR_HOST) as server:
        yield server


def serve(amp, records: list[dict]) -> None:
    """Give each record to the fake Amplitude under its upload hour."""
    by_hour: dict[datetime, list[dict]] = defaultdict(list)
    for rec in records:
        hour = datetime.strptime(rec["server_upload_time"][:13], "%Y-%m-%d %H").replace(tzinfo=timezone.utc)
        by_hour[hour].append(rec)
    for hour, recs in by_hour.items():
        amp.add_records(hour, recs)


def event_of(rng: Random, hour=START, *, user="user-1", device="device-1", event_type="Viewed Drop", seq=1,
             platform="Web", **overrides) -> dict:
    return make_record(rng, hour=hour, user_id=user, device_id=device, platform=platform,
                       session_id=int(hour.timestamp() * 1000) - 60_000, event_type=event_type, seq=seq, **overrides)


def imported(ph) -> list:
    return [e for e in ph.events if e.event not in ("$create_alias", "$groupidentify")]


# ---- persons ------------------------------------------------------------------------------
def test_the_person_keeps_company_gets_first_touch_and_geography(amp, ph, tmp_path):
    rng = Random(1)
    user_properties = {"company": "acme", "plan": "pro", "initial_utm_source": "newsletter",
                       "initial_referrer": "https://news.example/", "initial_utm_medium": "EMPTY"}
    records = [event_of(rng, seq=i, ip_address="198.51.100.20",  # Berlin in the test GeoIP table
                        user_properties=user_properties, groups={"company": ["acme"]},
                        group_properties={"company": {"acme": {"tier": "gold", "seats": 40}}})
               for i in range(3)]
    serve(amp, records)
    assert run(["sync"], connector_env(amp, ph, tmp_path, **ONE_HOUR))[0] == 0
    person = ph.person_properties("user-1")
    assert person["company"] == "acme", "setGroup's user property survives: group properties stay off the person"
    assert person["plan"] == "pro"
    assert person["$initial_utm_source"] == "newsletter" and person["$initial_referrer"] == "https://news.example/"
    assert "initial_utm_source" not in person, "one name per first-touch property: PostHog's"
    assert person["$geoip_country_code"] == person["$initial_geoip_country_code"] == "DE"
    assert person["$geoip_city_name"] == "Berlin" and person["$geoip_time_zone"] == "Europe/Berlin"
    # event properties under PostHog's names are lifted onto the person by PostHog itself
    assert person["$initial_browser"] == records[0]["os_name"] and person["$initial_os"] == records[0]["device_family"]
    country = {r["uuid"]: r["country"] for r in records}
    assert len(imported(ph)) == 3
    assert all(e.ingested["$geoip_country_code"] == "DE" and e.ingested["country"] == country[e.uuid]
               for e in imported(ph)), "PostHog's GeoIP places the event; Amplitude's country stays as it was"


def test_without_an_address_the_person_gets_amplitudes_place_and_never_the_connectors(amp, ph, tmp_path):
    rng = Random(2)
    serve(amp, [event_of(rng, seq=i, ip_address=None, city="Austin", region="Texas", country="United States")
                for i in range(3)])
    assert run(["sync"], connector_env(amp, ph, tmp_path, **ONE_HOUR))[0] == 0
    person = ph.person_properties("user-1")
    assert person["$geoip_country_code"] == person["$initial_geoip_country_code"] == "US"
    assert person["$geoip_city_name"] == "Austin" and person["$initial_geoip_subdivision_1_name"] == "Texas"
    for event in ph.events:
        assert event.ip == LOCALHOST and event.ingested["$ip"] == LOCALHOST, event.event
        assert "$geoip_time_zone" not in event.ingested, "PostHog's GeoIP never ran on 127.0.0.1 (Sweden)"
    assert {e.ingested["$geoip_country_code"] for e in imported(ph)} == {"US"}


def test_no_event_carries_the_connectors_address(amp, ph, tmp_path):
    records = list(make_population(Random(8), 300, [START, START + HOUR]))
    for rec in records[::4]:  # some Amplitude projects collect no addresses
        rec["ip_address"] = None
    serve(amp, records)
    env = connector_env(amp, ph, tmp_path, END_DATE=(START + 2 * HOUR).strftime("%Y-%m-%dT%H"))
    assert run(["sync"], env)[0] == 0
    by_uuid = {r["uuid"]: r for r in records}
    assert {e.event for e in ph.events} >= {"$create_alias", "$groupidentify"}, "connector-built events too"
    for event in ph.events:
        assert event.ingested["$ip"] != CONNECTOR_HOST, event.event
        assert event.ingested.get("$geoip_country_code") not in ("IS", "SE"), "never placed by a wrong address"
        rec = by_uuid.get(event.uuid)
        if rec is not None and rec["ip_address"]:
            assert event.ingested["$ip"] == rec["ip_address"]
        else:
            assert (event.ip, event.ingested["$ip"]) == (LOCALHOST, LOCALHOST)


# ---- groups -------------------------------------------------------------------------------
def test_every_key_of_every_group_type_exists_with_its_properties(amp, ph, tmp_path):
    rng = Random(3)
    first = event_of(rng, seq=1, groups={"company": ["acme", "globex"], "team": "blue"},
                     group_properties={"company": {"acme": {"plan": "pro"}}})
    later = event_of(rng, START + HOUR, seq=2, user="user-2", device="device-2",
                     groups={"company": ["acme"], "team": ["blue", "red"]}, group_properties={})
    changed = event_of(rng, START + 2 * HOUR, seq=3, groups={"company": "acme"},
                       group_properties={"company": {"acme": {"plan": "enterprise"}}})
    serve(amp, [first, later, changed])
    assert run(["sync"], connector_env(amp, ph, tmp_path))[0] == 0
    assert ph.groups() == {("company", "acme"): {"plan": "enterprise"}, ("company", "globex"): {},
                           ("team", "blue"): {}, ("team", "red"): {}}
    sent = [(e.properties["$group_type"], e.properties["$group_key"], e.properties["$group_set"], e.distinct_id)
            for e in ph.events if e.event == "$groupidentify"]
    assert sent == [("company", "acme", {"plan": "pro"}, "user-1"), ("company", "globex", {}, "user-1"),
                    ("team", "blue", {}, "user-1"),
                    ("team", "red", {}, "user-2"),  # acme and blue seen again without properties: no change
                    ("company", "acme", {"plan": "enterprise"}, "user-1")]
    assert ph.person_of("$company_acme") is None, "no phantom person for the group"
    assert [e.properties["$groups"] for e in imported(ph)] == [
        {"company": "acme", "team": "blue"}, {"company": "acme", "team": "blue"}, {"company": "acme"}]


class _Writer:
    """Just the lookups plan_identities makes."""

    def __init__(self, digests: dict):
        self.digests = digests

    def linked_users(self, devices):
        return {}

    def group_digests(self, keys):
        return {k: v for k, v in self.digests.items() if k in keys}


def _update(props):
    return GroupUpdate("company", "acme", props, "2025-07-01T10:00:00Z", "user-1")


PLANS = [  # (case, digest already sent or None, updates of a block, the $group_set sent or None)
    ("a group first seen without properties is created empty", None, [None], {}),
    ("a group first seen with properties is created with them", None, [{"plan": "pro"}], {"plan": "pro"}),
    ("a known group seen without properties is not a change", "sent", [None], None),
    ("a known group with the same properties is not a change", "pro", [{"plan": "pro"}], None),
    ("a known group with other properties is updated", "pro", [{"plan": "team"}], {"plan": "team"}),
    ("the block's last properties win over a later sighting", None, [{"plan": "a"}, {"plan": "b"}, None], {"plan": "b"}),
]


@pytest.mark.parametrize("name, known, updates, group_set", PLANS, ids=[c[0] for c in PLANS])
def test_group_update_planning(name, known, updates, group_set):
    digests = {}
    if known == "sent":
        digests[("company", "acme")] = properties_digest({})
    elif known == "pro":
        digests[("company", "acme")] = properties_digest({"plan": "pro"})
    plan = plan_identities([], [_update(p) for p in updates], _Writer(digests))
    sent = [json.loads(e)["properties"]["$group_set"] for e in plan.events]
    assert sent == ([] if group_set is None else [group_set])
    assert list(plan.digests) == ([] if group_set is None else [("company", "acme")])


# ---- control keys and special names -------------------------------------------------------
def test_process_person_profile_from_amplitude_does_not_turn_person_processing_off(amp, ph, tmp_path):
    rng = Random(4)
    serve(amp, [event_of(rng, event_properties={"$process_person_profile": False, "$set": {"plan": "hijacked"}},
                         user_properties={"plan": "pro"})])
    assert run(["sync"], connector_env(amp, ph, tmp_path, **ONE_HOUR))[0] == 0
    (event,) = imported(ph)
    assert event.person_processing and event.properties["$amplitude_$process_person_profile"] is False
    assert ph.person_properties("user-1")["plan"] == "pro"
    assert ph.person_of("device-1") == ph.person_of("user-1"), "and the device merged into the user"
    assert not [w for w in ph.warnings if "process_person_profile" in w.type]


@pytest.mark.parametrize("special", ["$merge_dangerously", "$create_alias", "$identify"])
def test_a_special_event_name_from_amplitude_fuses_no_persons(amp, ph, tmp_path, special):
    """Amplitude rows named like PostHog's merge events, naming another user as the one
    to merge: PostHog would fuse the two people (`$merge_dangerously` even when both
    are identified). The name and the merge keys both move aside; either alone would
    fuse them in the fake, which merges exactly as PostHog's person-merge-service does."""
    rng = Random(5)
    other = {"alias": "user-2", "$anon_distinct_id": "user-2", "distinct_id": "user-2"}
    serve(amp, [event_of(rng, seq=1, user="user-2", device="device-2"),
                event_of(rng, seq=2, event_type=special, event_properties=other)])
    assert run(["sync"], connector_env(amp, ph, tmp_path, **ONE_HOUR))[0] == 0
    assert ph.person_of("user-1") != ph.person_of("user-2") and ph.person_of("user-2") is not None
    assert not ph.refused_merges, "no merge was even attempted"
    (renamed,) = [e for e in imported(ph) if e.distinct_id == "user-1"]
    assert renamed.event == ("$set" if special == "$identify" else "$amplitude_" + special)
    assert renamed.properties["$amplitude_alias"] == "user-2" and "alias" not in renamed.properties


# ---- size ---------------------------------------------------------------------------------
def test_an_event_over_capturess_kafka_limit_is_rejected_before_sending(amp, ph, tmp_path):
    rng = Random(6)
    quotes = event_of(rng, seq=1, event_properties={"blob": '"' * 300_000})  # 600 KB as JSON, 1.2 MB escaped
    others = [event_of(rng, seq=i) for i in range(2, 6)]
    serve(amp, [others[0], quotes, *others[1:]])
    env = connector_env(amp, ph, tmp_path, **ONE_HOUR)
    assert run(["sync"], env)[0] == 0
    assert status(env)["rejected_by_reason"] == {"too_large": 1}
    code, out = run(["rejected"], env)
    (listed,) = [json.loads(line) for line in out.splitlines()]
    assert listed["reason"] == "too_large" and quotes["uuid"] in listed.get("raw", "")
    assert {r.status for r in ph.requests} == {200}, "never sent: no 413, no bisection"
    assert not ph.dropped and quotes["uuid"] not in ph.uuids()
    assert {o["uuid"] for o in others} <= set(ph.uuids())


def test_the_connectors_size_bound_covers_what_capture_measures():
    rng = Random(7)
    ctx = TranslateContext(START)
    for blob in ('"' * 200_000, "\\" * 150_000, "é" * 300_000, "x" * 900_000):
        event = translate_record(event_of(rng, event_properties={"blob": blob}), ctx).event
        data = orjson.dumps(event)  # as translate_block serializes it
        bound = kafka_message_bytes(data, event["distinct_id"], event["event"])
        actual = kafka_message_size(event, event["distinct_id"], event["uuid"], "2001:db8::ffff:ffff:ffff:ffff",
                                    "phc_" + "x" * 60, datetime.now(timezone.utc), True)
        assert actual <= bound <= actual + 2048, (blob[:3], actual, bound)
    assert MAX_EVENT_BYTES == 1_000_000


# ---- sessions and provenance ----------------------------------------------------------------
def test_sessions_are_dated_at_their_start_and_events_say_where_they_came_from(amp, ph, tmp_path):
    records = populate(amp, hours=2, events_per_hour=150)
    env = connector_env(amp, ph, tmp_path, END_DATE=(START + 2 * HOUR).strftime("%Y-%m-%dT%H"))
    assert run(["sync"], env)[0] == 0
    by_uuid = {r["uuid"]: r for r in records}
    sessions = 0
    for event in imported(ph):
        rec = by_uuid[event.uuid]
        assert event.properties["analytics_source"] == "amplitude"
        assert event.properties["$amplitude_export_hour"] == rec["server_upload_time"][:13].replace(" ", "T")
        if "$session_id" in event.properties:
            sessions += 1
            started = uuidlib.UUID(event.properties["$session_id"]).int >> 80
            assert started == rec["session_id"]
            assert timedelta(hours=-1) <= event.timestamp - datetime.fromtimestamp(started / 1000, timezone.utc) \
                <= timedelta(hours=48)
    assert sessions > 100
    assert all(e.properties["analytics_source"] == "amplitude" for e in ph.events)
