"""Table-driven tests of the translation. Each case is named by what it proves."""

from __future__ import annotations

import copy
import uuid
from datetime import datetime, timezone

import orjson
import pytest

from connector.archive import Block
from connector.errors import RecordRejected
from connector.translate import (
    CONTROL_KEYS,
    MAX_DEPTH,
    SPECIAL_EVENTS,
    GroupUpdate,
    Ignored,
    TranslateContext,
    as_number,
    country_code,
    derived_uuid,
    group_event,
    merge_event,
    session_start,
    session_uuid,
    translate_block,
    translate_record,
    usable_id,
)

from .conftest import sample_records

HOUR = datetime(2025, 7, 1, 17, tzinfo=timezone.utc)
CTX = TranslateContext(HOUR, frozenset({"session_start", "session_end"}))
SAMPLES = sample_records()
IOS = SAMPLES[2]  # "Screen: Onboarding", iOS app, user + device
HTTP_API = SAMPLES[4]  # server-side event with event properties, session -1


def record(base: dict = IOS, **changes) -> dict:
    rec = copy.deepcopy(base)
    rec.update(changes)
    return rec


WEB = record(
    platform="Web",
    os_name="Chrome",
    os_version="122",
    device_family="Mac OS X",
    library="amplitude-ts/2.11.0",
    event_type="[Amplitude] Page Viewed",
    event_properties={
        "[Amplitude] Page URL": "https://shop.example.com/cart?x=1",
        "[Amplitude] Page Domain": "shop.example.com",
        "[Amplitude] Page Path": "/cart",
        "[Amplitude] Page Title": "Cart",
        "referrer": "https://www.google.com/",
        "referring_domain": "www.google.com",
    },
)


# (case name, input record, expected subset of the event: dotted paths -> value)
MAPPED = [
    ("event name is the event_type", IOS, {"event": "Screen: Onboarding"}),
    ("distinct_id is the user_id when usable", IOS, {"distinct_id": IOS["user_id"]}),
    ("distinct_id falls back to device_id for anonymous users", record(user_id=None), {"distinct_id": IOS["device_id"]}),
    ("placeholder user_id falls back to device_id", record(user_id="undefined"), {"distinct_id": IOS["device_id"]}),
    ("quoted placeholder user_id falls back to device_id", record(user_id='"null"'), {"distinct_id": IOS["device_id"]}),
    ("user_id over 200 characters falls back to device_id", record(user_id="u" * 201), {"distinct_id": IOS["device_id"]}),
    ("numeric user_id becomes a string", record(user_id=12345), {"distinct_id": "12345"}),
    ("uuid is Amplitude's uuid", IOS, {"uuid": IOS["uuid"]}),
    ("uppercase uuid is normalized to lowercase", record(uuid=IOS["uuid"].upper()), {"uuid": IOS["uuid"]}),
    ("timestamp is event_time as ISO UTC", IOS, {"timestamp": "2025-07-01T17:18:23.621000Z"}),
    ("timestamp without fraction is accepted", record(event_time="2025-07-01 17:18:23"), {"timestamp": "2025-07-01T17:18:23Z"}),
    ("malformed event_time falls back to client_event_time",
     record(event_time="2025:07:01 17:18:23.621000", client_event_time="2025-07-01 17:10:00.000000"),
     {"timestamp": "2025-07-01T17:10:00.000000Z"}),
    ("future event_time falls back to server_received_time",
     record(event_time="2031-01-01 00:00:00.000000", client_event_time="2031-01-01 00:00:00.000000"),
     {"timestamp": "2025-07-01T17:18:45.113000Z"}),
    ("event properties are copied as they are", HTTP_API,
     {"properties.Total Price": 10.25, "properties.Drop Type": "Pre-Order", "properties.Drop Id": 1}),
    ("other Amplitude fields are copied as properties", IOS,
     {"properties.city": "Puchong Batu Dua Belas", "properties.library": IOS["library"], "properties.event_id": 238}),
    ("null Amplitude fields are left out", IOS, {"properties.adid": KeyError}),
    ("event property wins a name clash and the field moves aside",
     record(event_properties={"city": "from the event"}),
     {"properties.city": "from the event", "properties.$amplitude_city": "Puchong Batu Dua Belas"}),
    ("mobile os_name is the OS", IOS, {"properties.$os": "iOS", "properties.$os_version": "18.5", "properties.$device_type": "Mobile"}),
    ("web os_name is the browser and device_family the OS", WEB,
     {"properties.$browser": "Chrome", "properties.$browser_version": 122, "properties.$os": "Mac OS X",
      "properties.$device_type": "Desktop"}),
    ("page views become $pageview with URL properties", WEB,
     {"event": "$pageview", "properties.$current_url": "https://shop.example.com/cart?x=1",
      "properties.$host": "shop.example.com", "properties.$pathname": "/cart",
      "properties.$referrer": "https://www.google.com/", "properties.$referring_domain": "www.google.com",
      "properties.$amplitude_event_type": "[Amplitude] Page Viewed"}),
    ("element clicks become $autocapture clicks", record(WEB, event_type="[Amplitude] Element Clicked"),
     {"event": "$autocapture", "properties.$event_type": "click"}),
    ("element changes become $autocapture changes", record(WEB, event_type="[Amplitude] Element Changed"),
     {"event": "$autocapture", "properties.$event_type": "change"}),
    ("standard properties come from Amplitude's fields", IOS,
     {"properties.$ip": "203.0.113.12", "properties.$app_version": "1.0.81",
      "properties.$amplitude_user_id": IOS["user_id"],
      "properties.$amplitude_device_id": IOS["device_id"], "properties.$device_id": IOS["device_id"],
      "properties.$amplitude_event_id": 238, "properties.$amplitude_session_id": IOS["session_id"]}),
    ("sent_at is ignored on every event", IOS, {"properties.$ignore_sent_at": True}),
    ("sent_at is ignored on events without an address too", HTTP_API, {"properties.$ignore_sent_at": True}),
    ("session_id becomes a UUIDv7 $session_id", IOS,
     {"properties.$session_id": session_uuid(IOS["session_id"], IOS["device_id"])}),
    ("session_id -1 means no session", HTTP_API, {"properties.$session_id": KeyError}),
    ("user properties go to $set without EMPTY", record(user_properties={"plan": "pro", "age": "EMPTY"}),
     {"properties.$set": {"plan": "pro"}}),
    ("first-touch properties go to $set_once under PostHog's names",
     record(user_properties={"plan": "pro", "initial_utm_source": "ads", "initial_utm_medium": "EMPTY"}),
     {"properties.$set": {"plan": "pro"}, "properties.$set_once": {"$initial_utm_source": "ads"}}),
    ("group properties never join $set, so setGroup's user property survives",
     record(user_properties={"company": "acme"}, groups={"company": ["acme"]},
            group_properties={"company": {"acme": {"tier": "gold"}}}),
     {"properties.$set": {"company": "acme"}, "properties.$groups": {"company": "acme"}}),
    ("scalar groups shape gives $groups", record(groups={"company": "acme"}), {"properties.$groups": {"company": "acme"}}),
    ("no user properties means no $set", IOS, {"properties.$set": KeyError}),
    ("Amplitude $identify becomes a $set event, never a bare $identify",
     record(event_type="$identify", user_properties={"plan": "pro"}),
     {"event": "$set", "properties.$set": {"plan": "pro"}}),
    ("no host system context is added", IOS, {"properties.$python_version": KeyError, "properties.$lib": KeyError}),
]


def _lookup(event: dict, path: str):
    node = event
    for part in path.split(".", 1)[0:1] + (path.split(".", 1)[1:] if "." in path else []):
        node = node[part]
    return node


@pytest.mark.parametrize("name, rec, expected", MAPPED, ids=[c[0] for c in MAPPED])
def test_mapping(name, rec, expected):
    event = translate_record(copy.deepcopy(rec), CTX).event
    for path, value in expected.items():
        if value is KeyError:
            with pytest.raises(KeyError):
                _lookup(event, path)
        else:
            assert _lookup(event, path) == value, path


REJECTED = [
    ("missing event_type", record(event_type=None), "missing_event_type"),
    ("blank event_type", record(event_type="  "), "missing_event_type"),
    ("no usable id at all", record(user_id=None, device_id=None), "no_usable_id"),
    ("placeholder ids on both sides", record(user_id="null", device_id="0"), "no_usable_id"),
    ("case-insensitive placeholders", record(user_id="Anonymous", device_id="UNDEFINED"), "no_usable_id"),
    ("blank ids", record(user_id=" ", device_id=""), "no_usable_id"),
    ("no valid timestamp at all",
     record(event_time="yesterday", client_event_time=None, server_received_time="2022:05:27 01:02:50.047099"),
     "invalid_timestamp"),
]


@pytest.mark.parametrize("name, rec, reason", REJECTED, ids=[c[0] for c in REJECTED])
def test_rejection(name, rec, reason):
    with pytest.raises(RecordRejected) as info:
        translate_record(rec, CTX)
    assert info.value.reason == reason


def _nested(depth: int) -> dict:
    node: dict = {"leaf": 1}
    for _ in range(depth):
        node = {"n": node}
    return node


BLOCK_REJECTED = [
    ("malformed JSON line", b'{"event_type": "x", ', "invalid_json"),
    ("invalid UTF-8", b'{"event_type": "\xff\xfe"}', "invalid_utf8"),
    ("a JSON value that is not an object", b"[1, 2, 3]", "invalid_json"),
    ("NUL character PostHog cannot store", orjson.dumps(record(event_properties={"k": "a\u0000b"})), "nul_character"),
    ("property tree nested too deep", orjson.dumps(record(event_properties={"deep": _nested(MAX_DEPTH + 5)})), "too_deep"),
    ("event over PostHog's 1 MB limit", orjson.dumps(record(event_properties={"blob": "x" * 1_100_000})), "too_large"),
    # 600 KB of JSON, but each quote is escaped again into capture's Kafka envelope: 1.2 MB there
    ("event under 1 MB whose escaped envelope is over PostHog's Kafka limit",
     orjson.dumps(record(event_properties={"blob": '"' * 300_000})), "too_large"),
]


@pytest.mark.parametrize("name, line, reason", BLOCK_REJECTED, ids=[c[0] for c in BLOCK_REJECTED])
def test_block_rejection_keeps_the_rest(name, line, reason):
    good = orjson.dumps(IOS)
    result = translate_block(Block(b"\n".join([good, line, good])), CTX)
    assert [r.reason for r in result.rejections] == [reason]
    assert result.rejections[0].raw == line
    assert result.read == 3 and len(result.events) == 2 and result.lines == [0, 2]


def test_ignored_event_types_are_counted_not_rejected():
    result = translate_block(Block(orjson.dumps(SAMPLES[0]) + b"\n" + orjson.dumps(IOS)), CTX)
    assert result.ignored == 1 and not result.rejections and len(result.events) == 1
    with pytest.raises(Ignored):
        translate_record(SAMPLES[0], CTX)


def test_sample_records_all_translate():
    block = b"\n".join(orjson.dumps(r) for r in SAMPLES)
    result = translate_block(Block(block), TranslateContext(HOUR))
    assert result.read == len(SAMPLES) and len(result.events) == len(SAMPLES) and not result.rejections
    for data, rec in zip(result.events, SAMPLES):
        event = orjson.loads(data)
        assert event["uuid"] == rec["uuid"]
        assert event["distinct_id"] == rec["user_id"]


def test_merge_pairs_user_with_device_user_is_target():
    merge = translate_record(IOS, CTX).merge
    assert merge is not None
    assert (merge.user_id, merge.device_id) == (IOS["user_id"], IOS["device_id"])
    assert merge.timestamp == "2025-07-01T17:18:23.621000Z"  # the triggering event's instant


def test_no_merge_without_both_ids():
    assert translate_record(record(user_id=None), CTX).merge is None
    assert translate_record(record(device_id="null"), CTX).merge is None


def test_missing_uuid_is_derived_deterministically():
    a = translate_record(record(uuid=None), CTX).event["uuid"]
    b = translate_record(record(uuid="not-a-uuid"), CTX).event["uuid"]
    assert a == b == derived_uuid(record(uuid=None))
    assert uuid.UUID(a).version == 5
    other = translate_record(record(uuid=None, event_id=999), CTX).event["uuid"]
    assert other != a


def test_session_uuid_is_v7_with_session_start_time_and_unique_per_device():
    start_ms = 1751390294370
    value = uuid.UUID(session_uuid(start_ms, "device-a"))
    assert value.version == 7
    assert value.int >> 80 == start_ms
    assert session_uuid(start_ms, "device-a") == str(value)
    assert session_uuid(start_ms, "device-b") != str(value)
    assert session_uuid(start_ms + 1, "device-a") != str(value)


@pytest.mark.parametrize(
    "value, usable",
    [("u1", True), ("null", False), ("NULL", True), ("Null", True), ("None", False), ("'guest'", False),
     ('"[object Object]"', False), ("nan", True), ("NaN", False), ("id", False), ("ID", False), (0, False), (42, True),
     ("0", False), (True, False), ({"a": 1}, False), ("x" * 200, True), ("x" * 201, False)],
)
def test_usable_id_follows_posthogs_refusal_list(value, usable):
    assert (usable_id(value) is not None) is usable


# ---- issue 9: as if it had always been PostHog ---------------------------------------------
NO_IP = record(ip_address=None, city="Austin", country="United States", region="Texas",
               location_lat=30.27, location_lng=-97.74)

FIDELITY = [
    # geography and addresses
    ("an Amplitude address is sent as $ip for PostHog's GeoIP to resolve", IOS,
     {"properties.$ip": "203.0.113.12", "properties.$geoip_disable": KeyError, "properties.capture_internal": KeyError}),
    ("with an address, Amplitude's place stays under its own names, not PostHog's GeoIP names", IOS,
     {"properties.city": "Puchong Batu Dua Belas", "properties.country": "Malaysia", "properties.region": "Selangor",
      "properties.$geoip_city_name": KeyError, "properties.$geoip_country_name": KeyError,
      "properties.$geoip_country_code": KeyError, "properties.$set": KeyError}),
    ("without an address, Amplitude's place fills PostHog's GeoIP names on the event", NO_IP,
     {"properties.$geoip_city_name": "Austin", "properties.$geoip_country_name": "United States",
      "properties.$geoip_country_code": "US", "properties.$geoip_subdivision_1_name": "Texas",
      "properties.$geoip_latitude": 30.27, "properties.$geoip_longitude": -97.74, "properties.country": "United States"}),
    ("without an address, the person gets $geoip_* and $initial_geoip_* as GeoIP would write them", NO_IP,
     {"properties.$set": {"$geoip_city_name": "Austin", "$geoip_country_name": "United States",
                          "$geoip_country_code": "US", "$geoip_subdivision_1_name": "Texas",
                          "$geoip_latitude": 30.27, "$geoip_longitude": -97.74},
      "properties.$set_once": {"$initial_geoip_city_name": "Austin", "$initial_geoip_country_name": "United States",
                               "$initial_geoip_country_code": "US", "$initial_geoip_subdivision_1_name": "Texas",
                               "$initial_geoip_latitude": 30.27, "$initial_geoip_longitude": -97.74}}),
    ("without an address, PostHog's GeoIP is off and capture records 127.0.0.1, not the sender", NO_IP,
     {"properties.$geoip_disable": True, "properties.capture_internal": True, "properties.$ip": KeyError}),
    ("a blank address counts as none", record(ip_address="  "),
     {"properties.capture_internal": True, "properties.$geoip_disable": True, "properties.$ip": KeyError,
      "properties.$geoip_country_code": "MY"}),
    ("a country name without an ISO code gets no $geoip_country_code", record(NO_IP, country="Narnia"),
     {"properties.$geoip_country_name": "Narnia", "properties.$geoip_country_code": KeyError}),
    ("Amplitude's country names are matched to ISO codes", record(NO_IP, country="South Korea"),
     {"properties.$geoip_country_code": "KR"}),
    ("a server-side event without any place gets no GeoIP names and no person update", HTTP_API,
     {"properties.capture_internal": True, "properties.$geoip_disable": True,
      "properties.$geoip_country_name": KeyError, "properties.$set": KeyError}),
    # provenance
    ("every imported event is marked as Amplitude's, with its export hour", IOS,
     {"properties.analytics_source": "amplitude", "properties.$amplitude_export_hour": "2025-07-01T17"}),
    ("events without an address are marked too", HTTP_API,
     {"properties.analytics_source": "amplitude", "properties.$amplitude_export_hour": "2025-07-01T17"}),
    # persons
    ("campaign and referrer first-touch properties go to $set_once under PostHog's names",
     record(user_properties={"initial_referrer": "https://news.example/", "initial_referring_domain": "news.example",
                             "initial_utm_campaign": "launch", "initial_utm_term": "loft", "initial_gclid": "g1",
                             "initial_fbclid": "f1", "initial_msclkid": "m1", "initial_twclid": "t1"}),
     {"properties.$set_once": {"$initial_referrer": "https://news.example/", "$initial_referring_domain": "news.example",
                               "$initial_utm_campaign": "launch", "$initial_utm_term": "loft", "$initial_gclid": "g1",
                               "$initial_fbclid": "f1", "$initial_msclkid": "m1", "$initial_twclid": "t1"},
      "properties.$set": KeyError}),
    ("other first-touch properties keep Amplitude's names in $set_once",
     record(user_properties={"initial_landing_page": "/pricing", "[Amplitude] Initial Page Domain": "a.example"}),
     {"properties.$set_once": {"initial_landing_page": "/pricing", "[Amplitude] Initial Page Domain": "a.example"}}),
    ("an EMPTY first referrer is PostHog's $direct; an EMPTY first campaign is nothing",
     record(user_properties={"initial_referrer": "EMPTY", "initial_referring_domain": "EMPTY", "initial_utm_source": "EMPTY"}),
     {"properties.$set_once": {"$initial_referrer": "$direct", "$initial_referring_domain": "$direct"}}),
    ("latest campaign user properties keep their names, which PostHog's persons use too",
     record(user_properties={"utm_source": "newsletter"}), {"properties.$set": {"utm_source": "newsletter"}}),
    # standard event properties, under PostHog's names and types
    ("a decimal browser version is a float", record(WEB, os_version="17.4"), {"properties.$browser_version": 17.4}),
    ("an integral browser version is an int", record(WEB, os_version="15.0"), {"properties.$browser_version": 15}),
    ("a browser version that is not a number stays a string", record(WEB, os_version="17.4.1"),
     {"properties.$browser_version": "17.4.1"}),
    ("viewport sizes come from Amplitude's viewport properties, as numbers",
     record(WEB, event_type="[Amplitude] Element Clicked",
            event_properties={"[Amplitude] Viewport Height": 900, "[Amplitude] Viewport Width": "1440"}),
     {"properties.$viewport_height": 900, "properties.$viewport_width": 1440}),
    ("$current_url is the page location with its query string",
     record(WEB, event_properties={**WEB["event_properties"], "[Amplitude] Page URL": "https://shop.example.com/cart",
                                   "[Amplitude] Page Location": "https://shop.example.com/cart?utm_source=ads"}),
     {"properties.$current_url": "https://shop.example.com/cart?utm_source=ads"}),
    ("a web iPad is a Tablet", record(WEB, device_type="Apple iPad"), {"properties.$device_type": "Tablet"}),
    ("a mobile iPad is a Tablet", record(device_model="iPad13,18"), {"properties.$device_type": "Tablet"}),
    ("a phone is Mobile", record(device_model="iPhone16,1"), {"properties.$device_type": "Mobile"}),
    ("a mobile OS version is $os_version", IOS, {"properties.$os_version": "18.5"}),
    # groups: one key per type on the event
    ("$groups holds the first key of each type",
     record(groups={"company": ["acme", "globex"], "team": "blue"}),
     {"properties.$groups": {"company": "acme", "team": "blue"}}),
    # sessions
    ("a session_id in seconds is read as seconds", record(session_id=IOS["session_id"] // 1000),
     {"properties.$session_id": session_uuid(IOS["session_id"] // 1000 * 1000, IOS["device_id"]),
      "properties.$amplitude_session_id": IOS["session_id"] // 1000}),
    ("a counter session_id gives no $session_id, and Amplitude's value is kept", record(session_id=42),
     {"properties.$session_id": KeyError, "properties.$amplitude_session_id": 42}),
    ("a session_id far in the future gives no $session_id", record(session_id=IOS["session_id"] + 3 * 86_400_000),
     {"properties.$session_id": KeyError}),
]


@pytest.mark.parametrize("name, rec, expected", FIDELITY, ids=[c[0] for c in FIDELITY])
def test_fidelity_mapping(name, rec, expected):
    test_mapping(name, rec, expected)


# Every name PostHog obeys, on an Amplitude event property: PostHog must not act on it, the
# value stays, and the connector's own value wins where it sets one.
STEERING = sorted(CONTROL_KEYS) + ["$group_7", "$group_12"]
OWN = {  # what the connector itself sets, on an IOS event with user properties
    "$set": {"plan": "pro"}, "$session_id": session_uuid(IOS["session_id"], IOS["device_id"]),
    "$ignore_sent_at": True, "$ip": "203.0.113.12",
}


@pytest.mark.parametrize("key", STEERING)
def test_no_amplitude_property_steers_posthog(key):
    rec = record(user_properties={"plan": "pro"}, event_properties={key: "from amplitude", "kept": 1})
    props = translate_record(rec, CTX).event["properties"]
    assert props["$amplitude_" + key] == "from amplitude"
    assert props.get(key) == OWN.get(key), "gone, or the connector's own value"
    assert props["kept"] == 1


def test_the_connectors_own_control_keys_win():
    steering = {k: "from amplitude" for k in CONTROL_KEYS}
    rec = record(NO_IP, user_properties={"plan": "pro"}, groups={"company": "acme"}, event_properties=steering)
    props = translate_record(rec, CTX).event["properties"]
    assert (props["$set"]["plan"], props["$groups"], props["$ignore_sent_at"], props["$geoip_disable"],
            props["capture_internal"]) == ("pro", {"company": "acme"}, True, True, True)
    assert props["$session_id"] == session_uuid(IOS["session_id"], IOS["device_id"])
    assert not {k for k in CONTROL_KEYS if props.get(k) == "from amplitude"}


def test_an_amplitude_field_with_a_control_name_moves_aside_too():
    rec = {**record(), "$process_person_profile": False}  # not one of Amplitude's 55 fields, today
    props = translate_record(rec, CTX).event["properties"]
    assert "$process_person_profile" not in props and props["$amplitude_$process_person_profile"] is False


RENAMED = sorted(SPECIAL_EVENTS - {"$identify", "$groupidentify"}) + [
    "$$heatmap", "$$client_ingestion_warning", "$$plugin_metrics", "$ai_generation", "$ai_span"]


@pytest.mark.parametrize("name", RENAMED)
def test_special_event_names_become_ordinary_events(name):
    rec = record(event_type=name, event_properties={"alias": "someone-else", "Plan": "pro"})
    event = translate_record(rec, CTX).event
    assert event["event"] == "$amplitude_" + name
    assert event["properties"]["$amplitude_event_type"] == name
    assert event["properties"]["Plan"] == "pro" and event["properties"]["$amplitude_alias"] == "someone-else"
    assert "alias" not in event["properties"]


@pytest.mark.parametrize("name", ["$pageview", "$screen", "$autocapture", "Purchase", "$web_vitals"])
def test_ordinary_names_are_kept(name):
    assert translate_record(record(event_type=name), CTX).event["event"] == name


# ---- groups -------------------------------------------------------------------------------
GROUPED = record(groups={"company": ["acme", "globex"], "team": "blue"},
                 group_properties={"company": {"acme": {"plan": "pro", "seats": "EMPTY"}}})


def test_every_key_of_every_group_type_gets_an_update_from_the_acting_user():
    translation = translate_record(GROUPED, CTX)
    uid, ts = IOS["user_id"], translation.event["timestamp"]
    assert translation.groups == (GroupUpdate("company", "acme", {"plan": "pro"}, ts, uid),
                                  GroupUpdate("company", "globex", None, ts, uid),
                                  GroupUpdate("team", "blue", None, ts, uid))


def test_flat_group_properties_belong_to_the_only_key_of_their_type():
    one = translate_record(record(groups={"company": "acme"}, group_properties={"company": {"plan": "pro"}}), CTX)
    assert [u.properties for u in one.groups] == [{"plan": "pro"}]
    two = translate_record(record(groups={"company": ["acme", "globex"]}, group_properties={"company": {"plan": "pro"}}), CTX)
    assert [u.properties for u in two.groups] == [None, None], "ambiguous: no key gets them"


def test_amplitude_groupidentify_rows_become_group_updates_not_events():
    rec = record(event_type="$groupidentify", groups={"company": ["acme", "globex"]},
                 group_properties={"company": {"acme": {"tier": "gold"}}})
    translation = translate_record(rec, CTX)
    assert translation.event is None
    assert [(u.group_key, u.properties, u.distinct_id) for u in translation.groups] == [
        ("acme", {"tier": "gold"}, IOS["user_id"]), ("globex", None, IOS["user_id"])]
    result = translate_block(Block(orjson.dumps(rec) + b"\n" + orjson.dumps(IOS)), CTX)
    assert result.ignored == 1 and len(result.events) == 1 and len(result.groups) == 2


def test_a_groupidentify_row_without_an_actor_uses_posthog_nodes_default_id():
    rec = record(event_type="$groupidentify", user_id=None, device_id=None, groups={"company": "acme"})
    assert [u.distinct_id for u in translate_record(rec, CTX).groups] == ["$company_acme"]


def test_a_block_keeps_the_latest_properties_and_a_sighting_never_replaces_them():
    def line(props, minute):
        return orjson.dumps(record(groups={"company": "acme"}, group_properties=props,
                                   event_time=f"2025-07-01 17:{minute}:00.000000"))
    lines = [line({}, 10), line({"company": {"acme": {"plan": "free"}}}, 11),
             line({"company": {"acme": {"plan": "pro"}}}, 12), line({}, 13)]
    (update,) = translate_block(Block(b"\n".join(lines)), CTX).groups
    assert update.properties == {"plan": "pro"} and update.timestamp.startswith("2025-07-01T17:12")


def test_group_and_merge_events_carry_the_connectors_own_properties():
    group = group_event(GroupUpdate("company", "acme", None, "2025-07-01T17:00:00Z", "user-1"), "d")
    merge = merge_event(translate_record(IOS, CTX).merge)
    for event in (group, merge):
        props = event["properties"]
        assert (props["capture_internal"], props["$geoip_disable"], props["$ignore_sent_at"],
                props["analytics_source"]) == (True, True, True, "amplitude")
        assert "$ip" not in props and "$amplitude_export_hour" not in props
    assert group["distinct_id"] == "user-1" and group["properties"]["$group_set"] == {}
    assert group["uuid"] == group_event(GroupUpdate("company", "acme", None, "2025-07-01T17:00:00Z", "user-1"), "d")["uuid"]


# ---- sessions, numbers, countries ----------------------------------------------------------
EVENT_MS = 1_751_390_303_621  # 2025-07-01T17:18:23.621Z
SESSIONS = [
    ("a start a minute before the event", EVENT_MS - 60_000, EVENT_MS - 60_000),
    ("a start two days before the event", EVENT_MS - 48 * 3_600_000, EVENT_MS - 48 * 3_600_000),
    ("a start an hour after the event (clock skew)", EVENT_MS + 3_600_000, EVENT_MS + 3_600_000),
    ("seconds near the event are read as seconds", (EVENT_MS - 60_000) // 1000, (EVENT_MS - 60_000) // 1000 * 1000),
    ("a small counter is no start", 42, None),
    ("a start three days before the event is no start", EVENT_MS - 72 * 3_600_000, None),
    ("a start two hours after the event is no start", EVENT_MS + 2 * 3_600_000, None),
    ("a far-future clock is no start", 4_102_444_800_000, None),
    ("-1 is Amplitude's no session", -1, None),
    ("zero is no session", 0, None),
    ("a string is no session", "1751390294370", None),
    ("a float is no session", 1751390294370.0, None),
]


@pytest.mark.parametrize("name, session_id, start", SESSIONS, ids=[c[0] for c in SESSIONS])
def test_session_start_rule(name, session_id, start):
    assert session_start(session_id, EVENT_MS) == start


def test_no_session_uuid_is_dated_1970():
    for session_id in (42, 1_000, IOS["session_id"] // 1000):
        sid = translate_record(record(session_id=session_id), CTX).event["properties"].get("$session_id")
        assert sid is None or uuid.UUID(sid).int >> 80 > 1_600_000_000_000


@pytest.mark.parametrize("value, number", [("122", 122), ("17.4", 17.4), ("15.0", 15), ("17.4.1", "17.4.1"),
                                           ("beta", "beta"), ("", ""), (" 12", " 12"), ("1e3", "1e3"),
                                           ("nan", "nan"), (124, 124), (None, None)])
def test_as_number_is_parse_float_for_numeric_strings_only(value, number):
    assert as_number(value) == number and type(as_number(value)) is type(number)


@pytest.mark.parametrize("name, code", [
    ("United States", "US"), ("Russia", "RU"), ("South Korea", "KR"), ("Republic of Korea", "KR"),
    ("North Korea", "KP"), ("Turkey", "TR"), ("Türkiye", "TR"), ("The Netherlands", "NL"), ("Czechia", "CZ"),
    ("Czech Republic", "CZ"), ("Vietnam", "VN"), ("Iran", "IR"), ("Ivory Coast", "CI"), ("Côte d'Ivoire", "CI"),
    ("Curacao", "CW"), ("Curaçao", "CW"), ("Kosovo", "XK"), ("St Kitts and Nevis", "KN"), ("DR Congo", "CD"),
    ("Congo Republic", "CG"), ("Hong Kong", "HK"), ("Macao", "MO"), ("Macau", "MO"), ("United Kingdom", "GB"),
    ("Bosnia and Herzegovina", "BA"), ("Trinidad & Tobago", "TT"), ("Hashemite Kingdom of Jordan", "JO"),
    ("Republic of Lithuania", "LT"), ("Réunion", "RE"), ("Åland", "AX"), ("Laos", "LA"), ("Syria", "SY"),
    ("Taiwan", "TW"), ("Palestine", "PS"), ("Brunei", "BN"), ("Micronesia", "FM"), ("Germany", "DE"),
    ("germany", "DE"), ("Malaysia", "MY"), ("Narnia", None), ("(none)", None), ("", None),
])
def test_country_names_map_to_iso_codes(name, code):
    assert country_code(name) == code


def test_a_broken_installation_fails_the_block_instead_of_rejecting_every_record(monkeypatch):
    import connector.translate as translate_module

    def missing(*args):
        raise ModuleNotFoundError("No module named 'pycountry'")

    monkeypatch.setattr(translate_module, "translate_record", missing)
    with pytest.raises(ImportError):
        translate_block(Block(orjson.dumps(IOS)), CTX)
