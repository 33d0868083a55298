"""Translation of Amplitude export records into PostHog events. Pure: no I/O, no clock.

`translate_record` maps one parsed record; `translate_block` maps a block of raw
NDJSON lines and serializes the events, which is what the worker processes run.
`merge_event` and `group_event` build the connector's own events (person
merges, group updates). Every event built here carries COMMON_PROPERTIES.
Everything a translation needs from outside (the export hour, ignored event
types) arrives in a `TranslateContext`.

Contract of an outgoing event: `event` and `distinct_id` are non-empty strings,
`uuid` is Amplitude's uuid (or one derived deterministically from the record),
`timestamp` is the record's instant as ISO 8601 UTC, and `properties` hold the
event properties, Amplitude's other non-null fields, PostHog's standard
properties and `$ignore_sent_at: true`, so PostHog stores that exact instant
whatever the clocks of this machine and PostHog say.
"""

from __future__ import annotations

import functools
import hashlib
import re
import uuid as uuidlib
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import NamedTuple

import orjson

from .archive import MAX_LINE_BYTES, Block
from .errors import RecordRejected

# PostHog discards events larger than about 1 MB; keep a margin for the envelope.
MAX_EVENT_BYTES = 1_000_000
# Property trees deeper than this are refused: PostHog's capture parses with
# serde_json, whose recursion limit (128) would fail the whole batch; real SDKs
# never nest anywhere near this deep. (The record itself is 2 levels above its
# properties' values, hence the margin.)
MAX_DEPTH = 64
# distinct_ids longer than this are truncated by PostHog, which could fuse people.
MAX_ID_LENGTH = 200
LIB = "amplitude-posthog-connector"
# On every event: PostHog stores the event's own timestamp whatever the clocks
# say, and does not resolve this machine's address into a location.
COMMON_PROPERTIES = {"$geoip_disable": True, "$ignore_sent_at": True}

NAMESPACE = uuidlib.UUID("6f1d7c63-4a5c-4bb1-8f2c-3b6d3f0a9e21")

# FACTS.md: ids PostHog refuses in merges. Events with them would pile every
# anonymous visitor into one person, so they are not usable as distinct ids.
_PLACEHOLDERS_ANY_CASE = frozenset(
    {"anonymous", "guest", "distinctid", "distinct_id", "id", "not_authenticated", "email", "undefined", "true", "false"}
)
_PLACEHOLDERS_EXACT = frozenset({"[object Object]", "NaN", "None", "none", "null", "0", "undefined"})

_TIMESTAMP = re.compile(r"(\d{4}-\d{2}-\d{2})[ T](\d{2}:\d{2}:\d{2})(\.\d{1,6})?(?:Z|\+00:00)?")
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")

# Fields consumed by the mapping itself rather than copied as plain properties.
_CONSUMED = frozenset({"event_type", "event_properties", "user_properties", "group_properties", "groups"})

_EVENT_NAMES = {
    "[Amplitude] Page Viewed": "$pageview",
    "[Amplitude] Element Clicked": "$autocapture",
    "[Amplitude] Element Changed": "$autocapture",
}
_AUTOCAPTURE_TYPES = {"[Amplitude] Element Clicked": "click", "[Amplitude] Element Changed": "change"}
_PAGE_PROPERTIES = (
    ("[Amplitude] Page URL", "$current_url"),
    ("[Amplitude] Page Domain", "$host"),
    ("[Amplitude] Page Path", "$pathname"),
    ("referrer", "$referrer"),
    ("referring_domain", "$referring_domain"),
    ("[Amplitude] Element Text", "$el_text"),
)
_FIRST_TOUCH = ("initial_", "[Amplitude] Initial")
_MOBILE_OS = {"ios": "iOS", "ipados": "iPadOS", "android": "Android", "tvos": "tvOS", "watchos": "watchOS"}
_WEB_LIBRARIES = ("amplitude-js", "@amplitude/analytics-browser", "amplitude-ts", "@amplitude/marketing-analytics-browser")
_RECORD_FIELDS = (
    ("ip_address", "$ip"),
    ("city", "$geoip_city_name"),
    ("country", "$geoip_country_name"),
    ("region", "$geoip_subdivision_1_name"),
    ("location_lat", "$geoip_latitude"),
    ("location_lng", "$geoip_longitude"),
    ("version_name", "$app_version"),
    ("device_model", "$device_model"),
    ("user_id", "$amplitude_user_id"),
    ("device_id", "$amplitude_device_id"),
    ("device_id", "$device_id"),
    ("event_id", "$amplitude_event_id"),
    ("session_id", "$amplitude_session_id"),
    ("language", "$locale"),
)


@dataclass(frozen=True)
class TranslateContext:
    """What a translation needs to know beyond the record itself."""

    hour: datetime  # the export hour (server upload hour), UTC
    events_to_ignore: frozenset[str] = frozenset()
    # `$amplitude_export_hour` of every event: ties it to its export hour for the read-back.
    export_hour: str = field(init=False, repr=False)
    # Timestamps after the end of the export hour are impossible: Amplitude had
    # the record by then. Kept as a string comparable with Amplitude's format.
    latest_valid: str = field(init=False, repr=False)

    def __post_init__(self) -> None:
        latest = (self.hour + timedelta(hours=1)).strftime("%Y-%m-%d %H:%M:%S")
        object.__setattr__(self, "latest_valid", latest)
        object.__setattr__(self, "export_hour", self.hour.strftime("%Y-%m-%dT%H"))


# The per-event values are NamedTuples rather than frozen dataclasses: just as
# immutable, and four times cheaper to create, which counts a million times an hour.


class Merge(NamedTuple):
    """A device seen together with a user: the device's person should join the user's."""

    device_id: str
    user_id: str
    timestamp: str  # of the earliest event that showed the pair


class GroupUpdate(NamedTuple):
    """A group's properties as one event saw them."""

    group_type: str
    group_key: str
    properties: dict
    timestamp: str


class Translation(NamedTuple):
    event: dict
    merge: Merge | None = None
    groups: tuple[GroupUpdate, ...] = ()


class Rejection(NamedTuple):
    """A record that is not delivered, on purpose: why, and its raw line as read."""

    reason: str
    detail: str
    raw: bytes


@dataclass
class BlockResult:
    """Translated events of one block of lines, in input order.

    `events[i]` is the serialized event of input line `lines[i]`. `merges` has
    one entry per device/user pair, in order of first appearance, with the
    earliest timestamp of the pair; `groups` the latest update per group.
    Rejections carry their raw line.
    """

    events: list[bytes] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)
    days: dict[str, int] = field(default_factory=dict)  # events by UTC day of their timestamp, "YYYY-MM-DD"
    merges: list[Merge] = field(default_factory=list)
    groups: list[GroupUpdate] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)
    ignored: int = 0
    read: int = 0


class Ignored(Exception):
    """The record's event type is configured to be ignored. Not an error."""


def usable_id(value: object) -> str | None:
    """The id as PostHog should see it, or None when it cannot identify a person."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        value = str(value)
    if not isinstance(value, str):
        return None
    core = value.strip()
    if not core or len(value) > MAX_ID_LENGTH:
        return None
    if len(core) >= 2 and core[0] == core[-1] and core[0] in "'\"":
        core = core[1:-1].strip()
        if not core:
            return None
    if core in _PLACEHOLDERS_EXACT or core.lower() in _PLACEHOLDERS_ANY_CASE:
        return None
    return value


def normalize_timestamp(value: object, latest: str) -> str | None:
    """Amplitude `2025-07-01 17:18:45.118000` -> `2025-07-01T17:18:45.118000Z`.

    None when the value is not a valid timestamp or lies after `latest`.
    """
    if not isinstance(value, str):
        return None
    if len(value) == 26 and value[10] == " " and value[19] == ".":
        # Amplitude's usual shape, "2025-07-01 17:18:45.118000": fromisoformat
        # checks every field, slicing does the rest.
        try:
            datetime.fromisoformat(value)
        except ValueError:
            return None
        if value[:19] > latest:
            return None
        return f"{value[:10]}T{value[11:]}Z"
    match = _TIMESTAMP.fullmatch(value)
    if not match:
        return None
    day, clock, fraction = match.groups()
    try:
        datetime.fromisoformat(f"{day} {clock}")
    except ValueError:
        return None
    if f"{day} {clock}" > latest:
        return None
    return f"{day}T{clock}{fraction or ''}Z"


@functools.lru_cache(maxsize=65536)  # a busy hour has tens of thousands of sessions
def session_uuid(session_id: int, owner: str) -> str:
    """A UUIDv7 whose time is the session start, unique per device (owner) and session.

    Deterministic: the same session of the same device always gets the same id.
    """
    digest = hashlib.blake2b(f"{owner}\x00{session_id}".encode(), digest_size=10).digest()
    rand = int.from_bytes(digest, "big")  # 80 bits, 74 used
    value = (session_id & 0xFFFF_FFFF_FFFF) << 80
    value |= 0x7 << 76
    value |= ((rand >> 68) & 0xFFF) << 64
    value |= 0b10 << 62
    value |= rand & 0x3FFF_FFFF_FFFF_FFFF
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def derived_uuid(record: dict) -> str:
    """A stable uuid for a record without a valid one, from the fields that identify it."""
    key = "\x1f".join(
        str(record.get(k))
        for k in ("app", "amplitude_id", "device_id", "user_id", "event_id", "session_id", "event_type",
                  "event_time", "client_event_time", "$insert_id")
    )
    return str(uuidlib.uuid5(NAMESPACE, key))


def merge_uuid(device_id: str, user_id: str) -> str:
    return str(uuidlib.uuid5(NAMESPACE, f"merge\x1f{device_id}\x1f{user_id}"))


def group_uuid(group_type: str, group_key: str, properties_digest: str, timestamp: str) -> str:
    """Deterministic for a redo; the timestamp keeps A -> B -> A changes three distinct events
    (the same uuid twice in a day would be deduplicated by PostHog)."""
    return str(uuidlib.uuid5(NAMESPACE, f"group\x1f{group_type}\x1f{group_key}\x1f{properties_digest}\x1f{timestamp}"))


def properties_digest(properties: dict) -> str:
    return hashlib.blake2b(orjson.dumps(properties, option=orjson.OPT_SORT_KEYS), digest_size=16).hexdigest()


def _too_deep(value: object, depth: int = 1) -> bool:
    if depth > MAX_DEPTH:
        return True
    if type(value) is dict:
        return any(_too_deep(v, depth + 1) for v in value.values() if type(v) in (dict, list))
    if type(value) is list:
        return any(_too_deep(v, depth + 1) for v in value if type(v) in (dict, list))
    return False


def _groups(record: dict) -> dict[str, str]:
    """Amplitude `groups` ({type: [keys]} or {type: key}) -> PostHog `$groups` {type: key}.

    PostHog holds one key per group type on an event: the first is used.
    """
    groups = record.get("groups")
    if not isinstance(groups, dict) or not groups:
        return {}
    out = {}
    for group_type, keys in groups.items():
        if isinstance(keys, list):
            keys = next((k for k in keys if k is not None and k != ""), None)
        if keys is not None and keys != "" and not isinstance(keys, (dict, list)):
            out[str(group_type)] = str(keys)
    return out


def _group_updates(record: dict, groups: dict[str, str], timestamp: str) -> tuple[GroupUpdate, ...]:
    """Group properties in either shape: {type: {key: {prop: v}}} or {type: {prop: v}}."""
    props = record.get("group_properties")
    if not isinstance(props, dict) or not props or not groups:
        return ()
    updates = []
    for group_type, group_key in groups.items():
        by_type = props.get(group_type)
        if not isinstance(by_type, dict) or not by_type:
            continue
        nested = by_type.get(group_key)
        if isinstance(nested, dict):
            values = nested
        elif all(not isinstance(v, dict) for v in by_type.values()):
            values = by_type
        else:
            continue
        values = {k: v for k, v in values.items() if v != "EMPTY"}
        if values:
            updates.append(GroupUpdate(group_type, group_key, values, timestamp))
    return tuple(updates)


def _person_properties(record: dict) -> tuple[dict, dict]:
    """($set, $set_once): user and group properties without "EMPTY"; first-touch to $set_once."""
    user = record.get("user_properties")
    to_set: dict = {}
    to_set_once: dict = {}
    if isinstance(user, dict):
        for key, value in user.items():
            if value == "EMPTY":
                continue
            if key.startswith(_FIRST_TOUCH):
                to_set_once[key] = value
            else:
                to_set[key] = value
    group_props = record.get("group_properties")
    if isinstance(group_props, dict):
        for key, value in group_props.items():
            if value != "EMPTY":
                to_set[key] = value
    return to_set, to_set_once


def _device_properties(record: dict, props: dict) -> None:
    os_name = record.get("os_name")
    os_version = record.get("os_version")
    platform = record.get("platform")
    library = record.get("library") or ""
    is_web = platform == "Web" or (isinstance(library, str) and library.startswith(_WEB_LIBRARIES))
    if is_web:
        # Web SDKs put the browser where mobile SDKs put the OS.
        if os_name is not None:
            props["$browser"] = os_name
        if os_version is not None:
            props["$browser_version"] = os_version
        family = record.get("device_family")
        if family is not None:
            props["$os"] = family
        mobile = isinstance(family, str) and family.lower() in ("ios", "android")
        props["$device_type"] = "Mobile" if mobile else "Desktop"
    else:
        if isinstance(os_name, str):
            props["$os"] = _MOBILE_OS.get(os_name.lower(), os_name)
        if os_version is not None:
            props["$os_version"] = os_version
        if platform is not None or os_name is not None:
            tablet = False
            for key in ("device_model", "device_type", "device_family"):
                value = record.get(key)
                if type(value) is str and ("ipad" in (low := value.lower()) or "tablet" in low):
                    tablet = True
                    break
            props["$device_type"] = "Tablet" if tablet else "Mobile"
    manufacturer = record.get("device_manufacturer") or record.get("device_brand")
    if manufacturer is not None:
        props["$device_manufacturer"] = manufacturer


def translate_record(record: dict, ctx: TranslateContext) -> Translation:
    """Map one Amplitude record to a PostHog event (and a merge and group updates).

    Raises Ignored for configured event types and RecordRejected for records
    PostHog cannot take; both leave the rest of the hour unaffected.
    """
    event_type = record.get("event_type")
    if not isinstance(event_type, str) or not event_type.strip():
        raise RecordRejected("missing_event_type", "the record has no event_type")
    if event_type in ctx.events_to_ignore:
        raise Ignored(event_type)

    user_id = usable_id(record.get("user_id"))
    device_id = usable_id(record.get("device_id"))
    distinct_id = user_id or device_id

    latest = ctx.latest_valid
    timestamp = (
        normalize_timestamp(record.get("event_time"), latest)
        or normalize_timestamp(record.get("client_event_time"), latest)
        or normalize_timestamp(record.get("server_received_time"), latest)
    )
    if timestamp is None:
        raise RecordRejected(
            "invalid_timestamp",
            "no valid event_time, client_event_time or server_received_time at or before the end of its export hour",
        )

    event_uuid = record.get("uuid")
    if not isinstance(event_uuid, str) or not _UUID.fullmatch(event_uuid):
        event_uuid = derived_uuid(record)
    else:
        event_uuid = event_uuid.lower()

    # Every non-null Amplitude field, then the event properties over them: they
    # are the customer's data, so on a name clash they keep the name and
    # Amplitude's field moves aside to `$amplitude_<name>`.
    props = {key: value for key, value in record.items() if value is not None}
    for key in _CONSUMED:
        props.pop(key, None)
    source_props = record.get("event_properties")
    if isinstance(source_props, dict) and source_props:
        for key in props.keys() & source_props.keys():
            props["$amplitude_" + key] = props[key]
        props.update(source_props)
        for source, target in _PAGE_PROPERTIES:
            value = source_props.get(source)
            if value is not None:
                props[target] = value
    for source, target in _RECORD_FIELDS:
        value = record.get(source)
        if value is not None:
            props[target] = value
    _device_properties(record, props)

    session_id = record.get("session_id")
    owner = device_id or user_id
    if type(session_id) is int and session_id > 0 and owner:
        props["$session_id"] = session_uuid(session_id, owner)

    groups = _groups(record)
    if groups:
        props["$groups"] = groups
    to_set, to_set_once = _person_properties(record)

    name = _EVENT_NAMES.get(event_type, event_type)
    if name != event_type:
        props["$amplitude_event_type"] = event_type
        if name == "$autocapture":
            props["$event_type"] = _AUTOCAPTURE_TYPES[event_type]
    group_updates: tuple[GroupUpdate, ...] = _group_updates(record, groups, timestamp)

    if event_type == "$identify":
        # Amplitude identify rows carry person properties; a PostHog `$identify`
        # without `$anon_distinct_id` would mean something else, so they become `$set`.
        name = "$set"
    elif event_type == "$groupidentify":
        if not group_updates and groups:
            group_type, group_key = next(iter(groups.items()))
            group_updates = (GroupUpdate(group_type, group_key, {}, timestamp),)
        if not group_updates:
            raise RecordRejected("invalid_group_identify", "a $groupidentify row without groups")
        update = group_updates[0]
        name = "$groupidentify"
        props["$group_type"] = update.group_type
        props["$group_key"] = update.group_key
        props["$group_set"] = update.properties
        distinct_id = distinct_id or f"${update.group_type}_{update.group_key}"
        group_updates = ()

    if distinct_id is None:
        raise RecordRejected(
            "no_usable_id", f"user_id {record.get('user_id')!r:.60} and device_id {record.get('device_id')!r:.60} are both unusable"
        )

    if to_set:
        props["$set"] = to_set
    if to_set_once:
        props["$set_once"] = to_set_once
    props.update(COMMON_PROPERTIES)
    # Provenance, as PostHog's own importer marks its events; the hour is what verify counts by.
    props["analytics_source"] = "amplitude"
    props["$amplitude_export_hour"] = ctx.export_hour

    event = {"event": name, "distinct_id": distinct_id, "uuid": event_uuid, "timestamp": timestamp, "properties": props}
    merge = Merge(device_id, user_id, timestamp) if user_id and device_id and user_id != device_id else None
    return Translation(event, merge, group_updates)


def merge_event(merge: Merge) -> dict:
    """`$create_alias` joining the device's person into the user's.

    The user is the event's distinct_id and the device the alias: PostHog checks
    only the merged-in side for being identified, so a user's second and third
    devices merge too. The uuid is derived from the pair, so a re-send is a duplicate.
    """
    return {
        "event": "$create_alias",
        "distinct_id": merge.user_id,
        "uuid": merge_uuid(merge.device_id, merge.user_id),
        "timestamp": merge.timestamp,
        "properties": {"alias": merge.device_id, "distinct_id": merge.user_id, "$lib": LIB, **COMMON_PROPERTIES},
    }


def group_event(update: GroupUpdate, digest: str) -> dict:
    """`$groupidentify` setting a group's properties (`digest`: of those properties)."""
    return {
        "event": "$groupidentify",
        "distinct_id": f"${update.group_type}_{update.group_key}",
        "uuid": group_uuid(update.group_type, update.group_key, digest, update.timestamp),
        "timestamp": update.timestamp,
        "properties": {
            "$group_type": update.group_type,
            "$group_key": update.group_key,
            "$group_set": update.properties,
            "$lib": LIB,
            **COMMON_PROPERTIES,
        },
    }


def translate_block(block: Block, ctx: TranslateContext) -> BlockResult:
    """Translate a block of newline-separated records and serialize each event.

    The block's oversized lines become `too_large` rejections. Pure and
    picklable in and out, so it can run in a worker process.
    """
    result = BlockResult()
    for oversized in block.oversized:
        result.read += 1
        detail = f"the line is {oversized.length} bytes, over {MAX_LINE_BYTES}"
        if oversized.cut_member:
            detail = (f"a line inflates past {oversized.length} bytes (a decompression bomb?); the rest of member "
                      f"{oversized.cut_member} was not read")
        result.rejections.append(Rejection("too_large", detail, oversized.prefix))
    merges: dict[tuple[str, str], Merge] = {}
    groups: dict[tuple[str, str], GroupUpdate] = {}
    days = result.days
    loads, dumps = orjson.loads, orjson.dumps
    for index, line in enumerate(block.lines.split(b"\n")):
        if not line or line.isspace():
            continue
        result.read += 1
        try:
            if b"\\" in line and b"\\u0000" in line:  # one memchr first: most lines have no escapes
                raise RecordRejected("nul_character", "PostHog cannot store the NUL character (\\u0000)")
            try:
                record = loads(line)
            except orjson.JSONDecodeError as exc:
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError:
                    raise RecordRejected("invalid_utf8", str(exc)) from None
                raise RecordRejected("invalid_json", str(exc)) from None
            if not isinstance(record, dict):
                raise RecordRejected("invalid_json", "the line is JSON but not an object")
            # Counting brackets is cheap and bounds the depth, so the walk runs only
            # for the rare line that could be too deep.
            if line.count(b"{") + line.count(b"[") > MAX_DEPTH and _too_deep(record, 0):
                raise RecordRejected("too_deep", f"the record is nested deeper than {MAX_DEPTH} levels")
            translation = translate_record(record, ctx)
            data = dumps(translation.event)
            if len(data) > MAX_EVENT_BYTES:
                raise RecordRejected("too_large", f"the event is {len(data)} bytes, over PostHog's {MAX_EVENT_BYTES}")
        except Ignored:
            result.ignored += 1
            continue
        except RecordRejected as rejected:
            result.rejections.append(Rejection(rejected.reason, rejected.detail, line))
            continue
        except (TypeError, ValueError, RecursionError) as exc:
            # orjson refuses what it cannot represent (lone surrogates, >64-bit ints...).
            result.rejections.append(Rejection("unserializable", str(exc)[:200], line))
            continue
        except Exception as exc:  # a record shape nobody foresaw must not stop the hour
            result.rejections.append(Rejection("translation_error", f"{type(exc).__name__}: {exc}"[:300], line))
            continue
        result.events.append(data)
        result.lines.append(index)
        day = translation.event["timestamp"][:10]
        days[day] = days.get(day, 0) + 1
        merge = translation.merge
        if merge:
            pair = (merge.device_id, merge.user_id)
            seen = merges.get(pair)
            # ISO strings compare as instants once the "Z" is off ("...:05" < "...:05.1").
            if seen is None or merge.timestamp[:-1] < seen.timestamp[:-1]:
                merges[pair] = merge
        for update in translation.groups:
            groups[(update.group_type, update.group_key)] = update
    result.merges = list(merges.values())
    result.groups = list(groups.values())
    return result
