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
    MAX_DEPTH,
    Ignored,
    TranslateContext,
    derived_uuid,
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
     {"properties.$browser": "Chrome", "properties.$browser_version": "122", "properties.$os": "Mac OS X",
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
     {"properties.$ip": "203.0.113.12", "properties.$geoip_city_name": "Puchong Batu Dua Belas",
      "properties.$geoip_country_name": "Malaysia", "properties.$geoip_subdivision_1_name": "Selangor",
      "properties.$app_version": "1.0.81", "properties.$amplitude_user_id": IOS["user_id"],
      "properties.$amplitude_device_id": IOS["device_id"], "properties.$device_id": IOS["device_id"],
      "properties.$amplitude_event_id": 238, "properties.$amplitude_session_id": IOS["session_id"]}),
    ("GeoIP is disabled and sent_at ignored", IOS, {"properties.$geoip_disable": True, "properties.$ignore_sent_at": True}),
    ("session_id becomes a UUIDv7 $session_id", IOS,
     {"properties.$session_id": session_uuid(IOS["session_id"], IOS["device_id"])}),
    ("session_id -1 means no session", HTTP_API, {"properties.$session_id": KeyError}),
    ("user properties go to $set without EMPTY", record(user_properties={"plan": "pro", "age": "EMPTY"}),
     {"properties.$set": {"plan": "pro"}}),
    ("first-touch properties go to $set_once",
     record(user_properties={"plan": "pro", "initial_utm_source": "ads", "initial_referrer": "EMPTY"}),
     {"properties.$set": {"plan": "pro"}, "properties.$set_once": {"initial_utm_source": "ads"}}),
    ("group properties join $set as the guide says",
     record(groups={"company": ["acme"]}, group_properties={"company": {"acme": {"tier": "gold"}}}),
     {"properties.$set": {"company": {"acme": {"tier": "gold"}}}, "properties.$groups": {"company": "acme"}}),
    ("scalar groups shape gives $groups", record(groups={"company": "acme"}), {"properties.$groups": {"company": "acme"}}),
    ("no user properties means no $set", IOS, {"properties.$set": KeyError}),
    ("Amplitude $identify becomes a $set event, never a bare $identify",
     record(event_type="$identify", user_properties={"plan": "pro"}),
     {"event": "$set", "properties.$set": {"plan": "pro"}}),
    ("Amplitude $groupidentify updates the group",
     record(event_type="$groupidentify", groups={"company": "acme"}, group_properties={"company": {"acme": {"tier": "gold"}}}),
     {"event": "$groupidentify", "properties.$group_type": "company", "properties.$group_key": "acme",
      "properties.$group_set": {"tier": "gold"}}),
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
