"""Translation of Amplitude export records into PostHog events. Pure: no I/O, no clock.

`translate_record` maps one parsed record; `translate_block` maps a block of raw
NDJSON lines and serializes the events, which is what the worker processes run.
`merge_event` and `group_event` build the connector's own events (person
merges, group updates). Every event built here carries COMMON_PROPERTIES, and
every event without the user's real address also carries NO_ADDRESS (see
`connector_properties`). Everything a translation needs from outside (the
export hour, ignored event types) arrives in a `TranslateContext`.

Contract of an outgoing event: `event` and `distinct_id` are non-empty strings,
`uuid` is Amplitude's uuid (or one derived deterministically from the record),
`timestamp` is the record's instant as ISO 8601 UTC, and `properties` hold the
event properties, Amplitude's other non-null fields and PostHog's standard
properties. No Amplitude property can steer PostHog: names PostHog's capture or
ingestion acts on (CONTROL_KEYS) are kept as `$amplitude_<name>`, and event
names PostHog treats specially are renamed the same way (`special_event_name`).
"""

from __future__ import annotations

import functools
import hashlib
import re
import unicodedata
import uuid as uuidlib
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from types import MappingProxyType
from typing import Mapping, NamedTuple

import orjson

from .archive import MAX_LINE_BYTES, Block
from .errors import RecordRejected
from .hours import export_hour_tag

# PostHog's capture writes each event to Kafka inside an envelope whose `data`
# field is the event JSON escaped as a string; librdkafka refuses a message
# (value + key + headers) over `message.max.bytes`, 1,000,000 by default
# (rust/capture/src/sinks/kafka.rs), and capture then fails the whole request.
MAX_EVENT_BYTES = 1_000_000
# The envelope's other fields (uuid, ip, now, token, timestamp, field names),
# its key and its Kafka headers, token and ip at their longest: about 700
# bytes, budgeted generously. The distinct_id and event name come on top.
ENVELOPE_BYTES = 1024
# Property trees deeper than this are refused: PostHog's capture parses with
# serde_json, whose recursion limit (128) would fail the whole batch; real SDKs
# never nest anywhere near this deep. (The record itself is 2 levels above its
# properties' values, hence the margin.)
MAX_DEPTH = 64
# distinct_ids longer than this are truncated by PostHog, which could fuse people.
MAX_ID_LENGTH = 200
LIB = "amplitude-posthog-connector"
PROVENANCE = "amplitude"

# On every event the connector sends: PostHog stores the event's own timestamp
# whatever the clocks say, and the event is marked as imported from Amplitude,
# as PostHog's own importer marks its events.
COMMON_PROPERTIES: Mapping[str, object] = MappingProxyType({"$ignore_sent_at": True, "analytics_source": PROVENANCE})
# On every event without the user's real address. PostHog's ingestion fills a
# missing or falsy `$ip` with the address of whoever POSTed the batch, i.e. this
# machine (nodejs/src/utils/event.ts); `capture_internal` makes capture put
# 127.0.0.1 there instead (rust/capture/src/events/analytics.rs), and
# `$geoip_disable` keeps PostHog's GeoIP from resolving that 127.0.0.1, which
# it would swap for a Swedish test address (geoip.template.ts).
NO_ADDRESS: Mapping[str, object] = MappingProxyType({"capture_internal": True, "$geoip_disable": True})


def connector_properties(*, export_hour: str | None = None, has_address: bool = False) -> dict:
    """The properties the connector itself sets on an event, set last so they win.

    COMMON_PROPERTIES; `$amplitude_export_hour` ("YYYY-MM-DDTHH") on an imported
    event; NO_ADDRESS unless the event carries the user's own `$ip` (which the
    caller sets: PostHog's GeoIP then resolves it).
    """
    own = dict(COMMON_PROPERTIES)
    if export_hour is not None:
        own["$amplitude_export_hour"] = export_hour
    if not has_address:
        own.update(NO_ADDRESS)
    return own


# Property names PostHog's capture or ingestion obeys (capture.md §5, read in
# PostHog's source). An Amplitude event property or field with one of these
# names is kept as `$amplitude_<name>`; so is any `$group_<n>`, the columns
# Node fills from `$groups` (nodejs/src/worker/ingestion/groups.ts).
CONTROL_KEYS = frozenset({
    # identity and project (rust/common/types/src/event.rs: top level, then properties)
    "token", "$token", "api_key", "distinct_id", "$distinct_id",
    # capture (rust/capture/src/events/analytics.rs): address, timestamps,
    # cookieless partitioning, heatmap redirects
    "capture_internal", "$ignore_sent_at", "$cookieless_mode", "$heatmap_data", "$prev_pageview_pathname",
    # persons (nodejs/src/utils/event.ts, nodejs/src/worker/ingestion/persons/)
    "$process_person_profile", "$set", "$set_once", "$unset", "$anon_distinct_id", "alias", "$os_name",
    # groups
    "$groups", "$group_type", "$group_key", "$group_set", "$group_unset",
    "$group_0", "$group_1", "$group_2", "$group_3", "$group_4",
    # sessions and replay, geography, library
    "$session_id", "$window_id", "$snapshot_data", "$snapshot_source", "$ip", "$geoip_disable", "$lib",
    # error tracking, ingestion warnings
    "$exception_list", "$$client_ingestion_warning_message",
})
_GROUP_COLUMN = re.compile(r"\$group_\d+")
MOVED_ASIDE = "$amplitude_"

# Event names PostHog's capture or ingestion treats specially (capture.md §6):
# merges, person and group updates, replay, error tracking, heatmaps, AI, and
# internal `$$` events. Amplitude rows with them become ordinary events named
# `$amplitude_<name>`, except `$identify` (-> `$set`) and `$groupidentify`
# (-> the connector's group updates).
SPECIAL_EVENTS = frozenset({
    "$create_alias", "$merge_dangerously", "$identify", "$groupidentify", "$set", "$delete_person",
    "$snapshot", "$snapshot_items", "$performance_event", "$exception",
})
_SPECIAL_PREFIXES = ("$$", "$ai_")

NAMESPACE = uuidlib.UUID("6f1d7c63-4a5c-4bb1-8f2c-3b6d3f0a9e21")

# FACTS.md: ids PostHog refuses in merges. Events with them would pile every
# anonymous visitor into one person, so they are not usable as distinct ids.
_PLACEHOLDERS_ANY_CASE = frozenset(
    {"anonymous", "guest", "distinctid", "distinct_id", "id", "not_authenticated", "email", "undefined", "true", "false"}
)
_PLACEHOLDERS_EXACT = frozenset({"[object Object]", "NaN", "None", "none", "null", "0", "undefined"})

_TIMESTAMP = re.compile(r"(\d{4}-\d{2}-\d{2})[ T](\d{2}:\d{2}:\d{2})(\.\d{1,6})?(?:Z|\+00:00)?")
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_NUMBER = re.compile(r"\d{1,15}(?:\.\d{1,15})?")

# Fields consumed by the mapping itself rather than copied as plain properties.
_CONSUMED = frozenset({"event_type", "event_properties", "user_properties", "group_properties", "groups"})

_EVENT_NAMES = {
    "[Amplitude] Page Viewed": "$pageview",
    "[Amplitude] Element Clicked": "$autocapture",
    "[Amplitude] Element Changed": "$autocapture",
}
_AUTOCAPTURE_TYPES = {"[Amplitude] Element Clicked": "click", "[Amplitude] Element Changed": "change"}
# Event properties copied under PostHog's names. A later entry wins: the full
# address with its query string ("Page Location", as PostHog's `$current_url`
# holds it) over the one without ("Page URL").
_PAGE_PROPERTIES = (
    ("[Amplitude] Page URL", "$current_url"),
    ("[Amplitude] Page Location", "$current_url"),
    ("[Amplitude] Page Domain", "$host"),
    ("[Amplitude] Page Path", "$pathname"),
    ("referrer", "$referrer"),
    ("referring_domain", "$referring_domain"),
    ("[Amplitude] Element Text", "$el_text"),
)
# Numbers in PostHog's web SDK (window.innerHeight/innerWidth).
_VIEWPORT = (("[Amplitude] Viewport Height", "$viewport_height"), ("[Amplitude] Viewport Width", "$viewport_width"))
_MOBILE_OS = {"ios": "iOS", "ipados": "iPadOS", "android": "Android", "tvos": "tvOS", "watchos": "watchOS"}
_WEB_LIBRARIES = ("amplitude-js", "@amplitude/analytics-browser", "amplitude-ts", "@amplitude/marketing-analytics-browser")
_RECORD_FIELDS = (
    ("version_name", "$app_version"),
    ("device_model", "$device_model"),
    ("user_id", "$amplitude_user_id"),
    ("device_id", "$amplitude_device_id"),
    ("device_id", "$device_id"),
    ("event_id", "$amplitude_event_id"),
    ("session_id", "$amplitude_session_id"),
    ("language", "$locale"),
)
# Amplitude's own location, written under PostHog's GeoIP names only when there
# is no address for PostHog's GeoIP to resolve: (field, event and person
# property, first-touch person property), spelled as geoip.template.ts does.
_PLACE_FIELDS = (
    ("city", "$geoip_city_name", "$initial_geoip_city_name"),
    ("country", "$geoip_country_name", "$initial_geoip_country_name"),
    ("region", "$geoip_subdivision_1_name", "$initial_geoip_subdivision_1_name"),
    ("location_lat", "$geoip_latitude", "$initial_geoip_latitude"),
    ("location_lng", "$geoip_longitude", "$initial_geoip_longitude"),
)

# First-touch user properties under PostHog's names: Amplitude's `initial_<x>`
# becomes `$initial_<x>` for the referrer and PostHog's campaign keys
# (CAMPAIGN_PROPERTIES, nodejs/src/worker/ingestion/persons/person-property-utils.ts).
CAMPAIGN_PROPERTIES = (
    "utm_source", "utm_medium", "utm_campaign", "utm_content", "utm_name", "utm_term", "gclid", "gad_source",
    "gclsrc", "dclid", "gbraid", "wbraid", "fbclid", "msclkid", "twclid", "li_fat_id", "mc_cid", "igshid",
    "ttclid", "rdt_cid", "irclid", "_kx", "epik", "qclid", "sccid",
)
_INITIAL_NAMES = {f"initial_{x}": f"$initial_{x}" for x in ("referrer", "referring_domain", *CAMPAIGN_PROPERTIES)}
# Amplitude writes "EMPTY" for a first visit without a referrer; PostHog's web
# SDK writes "$direct" for the same.
_DIRECT_WHEN_EMPTY = frozenset({"initial_referrer", "initial_referring_domain"})
# Other first-touch properties go to $set_once under Amplitude's names.
_FIRST_TOUCH = ("initial_", "[Amplitude] Initial")

# A session_id is the session's start in epoch milliseconds. One further than
# this from its event is not a start time (seconds, a counter, a broken clock):
# at most an hour after the event (clock skew) and two days before it.
SESSION_BEFORE_MS = 48 * 3_600_000
SESSION_AFTER_MS = 3_600_000
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


@dataclass(frozen=True)
class TranslateContext:
    """What a translation needs to know beyond the record itself."""

    hour: datetime  # the export hour (server upload hour), UTC
    events_to_ignore: frozenset[str] = frozenset()
    # Timestamps after the end of the export hour are impossible: Amplitude had
    # the record by then. Kept as a string comparable with Amplitude's format.
    latest_valid: str = field(init=False, repr=False)
    # connector_properties() of this hour's events, built once per hour: with
    # the user's address (`$ip` added per event) and without. Plain dicts, not
    # to be changed: dict.update() takes a dict several times faster than a proxy.
    with_address: dict[str, object] = field(init=False, repr=False, compare=False)
    without_address: dict[str, object] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        latest = (self.hour + timedelta(hours=1)).strftime("%Y-%m-%d %H:%M:%S")
        object.__setattr__(self, "latest_valid", latest)
        export_hour = export_hour_tag(self.hour)
        object.__setattr__(self, "with_address", connector_properties(export_hour=export_hour, has_address=True))
        object.__setattr__(self, "without_address", connector_properties(export_hour=export_hour))


# The per-event values are NamedTuples rather than frozen dataclasses: just as
# immutable, and four times cheaper to create, which counts a million times an hour.


class Merge(NamedTuple):
    """A device seen together with a user: the device's person should join the user's."""

    device_id: str
    user_id: str
    timestamp: str  # of the earliest event that showed the pair


class GroupUpdate(NamedTuple):
    """A group as one event saw it.

    `properties` is None when the event showed the group without properties (a
    sighting: the group must exist, nothing more); `distinct_id` is the acting
    user's, which the `$groupidentify` carries.
    """

    group_type: str
    group_key: str
    properties: dict | None
    timestamp: str
    distinct_id: str


class Translation(NamedTuple):
    """An event (None when the record only updates groups), a merge, group updates."""

    event: dict | None
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
    earliest timestamp of the pair; `groups` one entry per group, the latest
    update with properties (a sighting only if no event had properties).
    Rejections carry their raw line. `ignored` counts the configured ignored
    event types and Amplitude `$groupidentify` rows, which reach PostHog as
    group updates rather than events.
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


@functools.lru_cache(maxsize=8192)  # an hour's events fall in a few hundred distinct minutes
def minute_ms(minute: str) -> int:
    """`2025-07-01T17:18` (the first 16 characters of a normalized timestamp) -> epoch ms."""
    return int((datetime.fromisoformat(minute).replace(tzinfo=timezone.utc) - _EPOCH).total_seconds()) * 1000


def session_start(session_id: object, event_ms: int) -> int | None:
    """The session's start in epoch ms, or None when `session_id` is not one.

    Plausible: the event happened at most SESSION_BEFORE_MS after the start and
    at most SESSION_AFTER_MS before it. A value that is plausible once read as
    seconds is taken as seconds. Anything else (a counter, a clock in 1970 or
    2090, `-1` for "no session") is no start: PostHog's session queries drop a
    session dated by it.
    """
    if type(session_id) is not int or session_id <= 0:
        return None
    if -SESSION_AFTER_MS <= event_ms - session_id <= SESSION_BEFORE_MS:
        return session_id
    seconds = session_id * 1000
    if -SESSION_AFTER_MS <= event_ms - seconds <= SESSION_BEFORE_MS:
        return seconds
    return None


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


def kafka_message_bytes(data: bytes, distinct_id: str, name: str) -> int:
    """An upper bound of the Kafka message PostHog's capture writes for one event.

    `data` is the event's JSON. Capture escapes it into the envelope's `data`
    string, which doubles every `"` and `\\` (the JSON holds no raw control
    characters, and serde_json leaves non-ASCII as it is), and repeats the
    distinct_id (envelope, key, header) and the event name (envelope, header).
    """
    escaped = len(data) + data.count(b'"') + data.count(b"\\")
    return escaped + ENVELOPE_BYTES + 4 * len(distinct_id.encode()) + 3 * len(name.encode())


# Below this many bytes of JSON no event can reach MAX_EVENT_BYTES: escaping at
# most doubles it, the name is part of it, and the distinct_id is at most 200
# characters. So nearly every event skips the exact count.
_SURELY_SMALL = (MAX_EVENT_BYTES - ENVELOPE_BYTES - 4 * 4 * MAX_ID_LENGTH) // 5


def special_event_name(name: str) -> bool:
    """True for event names PostHog's capture or ingestion treats specially."""
    return name in SPECIAL_EVENTS or name.startswith(_SPECIAL_PREFIXES)


# ---- countries ------------------------------------------------------------------------

# English country names Amplitude shows (MaxMind's) that ISO 3166 (pycountry)
# spells differently, and PostHog's GeoIP codes outside ISO 3166 (Kosovo).
# Keys are normalized as `_country_key` does.
_COUNTRY_ALIASES = {
    "russia": "RU", "turkey": "TR", "macau": "MO", "ivory coast": "CI", "cape verde": "CV", "swaziland": "SZ",
    "macedonia": "MK", "palestine": "PS", "kosovo": "XK", "micronesia": "FM", "federated states of micronesia": "FM",
    "brunei": "BN", "burma": "MM", "dr congo": "CD", "congo republic": "CG", "democratic republic of the congo": "CD",
    "republic of the congo": "CG", "congo kinshasa": "CD", "congo brazzaville": "CG", "vatican city": "VA",
    "vatican": "VA", "east timor": "TL", "saint vincent and grenadines": "VC", "south korea": "KR",
    "republic of korea": "KR", "north korea": "KP", "republic of lithuania": "LT",
    "hashemite kingdom of jordan": "JO", "republic of moldova": "MD", "aland": "AX", "uk": "GB",
    "great britain": "GB", "england": "GB", "scotland": "GB", "wales": "GB", "northern ireland": "GB",
    "us virgin islands": "VI", "u s virgin islands": "VI", "british virgin islands": "VG",
    "bonaire sint eustatius and saba": "BQ", "falkland islands": "FK", "heard and mcdonald islands": "HM",
    "cocos keeling islands": "CC", "us minor outlying islands": "UM", "u s minor outlying islands": "UM",
    "saint martin": "MF", "sint maarten": "SX", "laos": "LA", "syria": "SY", "iran": "IR", "vietnam": "VN",
    "tanzania": "TZ", "bolivia": "BO", "venezuela": "VE", "taiwan": "TW", "czech republic": "CZ",
}
_COUNTRY_PUNCTUATION = str.maketrans({c: " " for c in ".,'’()[]-_/"})


def _country_key(name: str) -> str:
    """Case, accents, punctuation, a leading "The" and "St" for "Saint" do not matter."""
    text = unicodedata.normalize("NFKD", name)
    text = "".join(c for c in text if not unicodedata.combining(c)).casefold()
    words = text.replace("&", " and ").translate(_COUNTRY_PUNCTUATION).split()
    if words and words[0] == "the":
        words = words[1:]
    if words and words[0] == "st":
        words[0] = "saint"
    return " ".join(words)


@functools.lru_cache(maxsize=1)
def _country_index() -> dict[str, str]:
    """Normalized name -> ISO alpha-2 code, from pycountry's ISO 3166 data and the aliases."""
    # Imported on first use: a project that collects addresses never needs it,
    # and its data costs each worker process a few MB.
    import pycountry

    index: dict[str, str] = {}
    for country in pycountry.countries:
        for attr in ("alpha_2", "alpha_3", "name", "official_name", "common_name"):
            value = getattr(country, attr, None)
            if value:
                index.setdefault(_country_key(value), country.alpha_2)
    index.update(_COUNTRY_ALIASES)
    return index


@functools.lru_cache(maxsize=1024)
def country_code(name: str) -> str | None:
    """ISO 3166-1 alpha-2 code of a country name as Amplitude writes it, or None if unknown.

    Exact lookups only (after `_country_key`): pycountry's fuzzy search guesses
    wrong for names such as "Republic of Korea" (it answers North Korea).
    """
    return _country_index().get(_country_key(name))


# ---- the mapping ----------------------------------------------------------------------


def _too_deep(value: object, depth: int = 1) -> bool:
    if depth > MAX_DEPTH:
        return True
    if type(value) is dict:
        return any(_too_deep(v, depth + 1) for v in value.values() if type(v) in (dict, list))
    if type(value) is list:
        return any(_too_deep(v, depth + 1) for v in value if type(v) in (dict, list))
    return False


@functools.lru_cache(maxsize=4096)
def _number_from(text: str) -> int | float | str:
    if not _NUMBER.fullmatch(text):
        return text
    number = float(text)
    return int(number) if number.is_integer() else number


def as_number(value: object) -> object:
    """A numeric string as PostHog's web SDK sends it (parseFloat): an int when integral,
    else a float; anything else unchanged ("17.4.1" stays a string)."""
    return _number_from(value) if type(value) is str else value


_NO_GROUPS: tuple[dict, list] = ({}, [])  # shared, never changed


def _groups(record: dict) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """Amplitude `groups` ({type: [keys]} or {type: key}) -> ($groups, every (type, key)).

    PostHog holds one key per group type on an event (`$groups`, the first);
    every key of every type is returned too, so each gets its group.
    """
    groups = record.get("groups")
    if not groups or not isinstance(groups, dict):
        return _NO_GROUPS
    first: dict[str, str] = {}
    every: list[tuple[str, str]] = []
    for group_type, keys in groups.items():
        group_type = str(group_type)
        for key in keys if isinstance(keys, list) else (keys,):
            if key is None or key == "" or isinstance(key, (dict, list)):
                continue
            key = str(key)
            if (group_type, key) in every:
                continue
            first.setdefault(group_type, key)
            every.append((group_type, key))
    return first, every


def _group_updates(record: dict, every: list[tuple[str, str]], distinct_id: str, timestamp: str
                   ) -> tuple[GroupUpdate, ...]:
    """One update per (type, key): its properties from `group_properties`
    ({type: {key: {prop: v}}}, or {type: {prop: v}} when the type has one key),
    without "EMPTY"; None (a sighting) when Amplitude has none for it."""
    props = record.get("group_properties")
    by_type = props if isinstance(props, dict) else {}
    keys_per_type: dict[str, int] = {}
    for group_type, _ in every:
        keys_per_type[group_type] = keys_per_type.get(group_type, 0) + 1
    updates = []
    for group_type, group_key in every:
        values = None
        of_type = by_type.get(group_type)
        if isinstance(of_type, dict) and of_type:
            nested = of_type.get(group_key)
            if isinstance(nested, dict):
                values = nested
            elif keys_per_type[group_type] == 1 and all(not isinstance(v, dict) for v in of_type.values()):
                values = of_type
        if values is not None:
            values = {k: v for k, v in values.items() if v != "EMPTY"} or None
        updates.append(GroupUpdate(group_type, group_key, values, timestamp, distinct_id))
    return tuple(updates)


def _person_properties(record: dict) -> tuple[dict, dict]:
    """($set, $set_once) from user properties, without Amplitude's "EMPTY" placeholders.

    First-touch properties go to $set_once: `initial_<x>` as PostHog's
    `$initial_<x>` for the referrer and campaign keys (an "EMPTY" first
    referrer as PostHog's "$direct"), the others under Amplitude's names.
    Group properties never go to the person: Amplitude's setGroup writes the
    user property `type: key` (`company: "acme"`), which must survive.
    """
    user = record.get("user_properties")
    to_set: dict = {}
    to_set_once: dict = {}
    if isinstance(user, dict) and user:
        for key, value in user.items():
            if value == "EMPTY":
                if key in _DIRECT_WHEN_EMPTY:
                    to_set_once[_INITIAL_NAMES[key]] = "$direct"
                continue
            if key.startswith(_FIRST_TOUCH):
                to_set_once[_INITIAL_NAMES.get(key, key)] = value
            else:
                to_set[key] = value
    return to_set, to_set_once


def _is_tablet(record: dict) -> bool:
    for key in ("device_model", "device_type", "device_family"):
        value = record.get(key)
        if type(value) is str and ("ipad" in (low := value.lower()) or "tablet" in low):
            return True
    return False


def _device_properties(record: dict, props: dict) -> None:
    """$os, $os_version, $browser, $browser_version, $device_type (Mobile/Tablet/Desktop), $device_manufacturer."""
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
            props["$browser_version"] = as_number(os_version)
        family = record.get("device_family")
        if family is not None:
            props["$os"] = family
        if _is_tablet(record):
            props["$device_type"] = "Tablet"
        elif isinstance(family, str) and family.lower() in ("ios", "android"):
            props["$device_type"] = "Mobile"
        else:
            props["$device_type"] = "Desktop"
    else:
        if isinstance(os_name, str):
            props["$os"] = _MOBILE_OS.get(os_name.lower(), os_name)
        if os_version is not None:
            props["$os_version"] = os_version
        if platform is not None or os_name is not None:
            props["$device_type"] = "Tablet" if _is_tablet(record) else "Mobile"
    manufacturer = record.get("device_manufacturer") or record.get("device_brand")
    if manufacturer is not None:
        props["$device_manufacturer"] = manufacturer


def _steering(names) -> set[str]:
    """The names among `names` (a dict's string keys) that PostHog would obey."""
    found = names & CONTROL_KEYS
    found.update(k for k in names if k.startswith("$group_") and _GROUP_COLUMN.fullmatch(k))
    return found


def translate_record(record: dict, ctx: TranslateContext) -> Translation:
    """Map one Amplitude record to a PostHog event (and a merge and group updates).

    Raises Ignored for configured event types and RecordRejected for records
    PostHog cannot take; both leave the rest of the hour unaffected. An
    Amplitude `$groupidentify` row gives no event, only group updates.
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

    groups, every_group = _groups(record)
    if event_type == "$groupidentify":
        # Not an event: what it carries reaches each group as the connector's
        # own `$groupidentify`, sent when the group's properties change.
        if not every_group:
            raise RecordRejected("invalid_group_identify", "a $groupidentify row without groups")
        # Without an acting user, posthog-node's default id (a person nobody is).
        actor = distinct_id or f"${every_group[0][0]}_{every_group[0][1]}"
        updates = _group_updates(record, every_group, actor, timestamp)
        merge = Merge(device_id, user_id, timestamp) if user_id and device_id and user_id != device_id else None
        return Translation(None, merge, updates)

    if distinct_id is None:
        raise RecordRejected(
            "no_usable_id", f"user_id {record.get('user_id')!r:.60} and device_id {record.get('device_id')!r:.60} are both unusable"
        )

    event_uuid = record.get("uuid")
    if not isinstance(event_uuid, str) or not _UUID.fullmatch(event_uuid):
        event_uuid = derived_uuid(record)
    else:
        event_uuid = event_uuid.lower()

    # Every non-null Amplitude field, then the event properties over them: they
    # are the customer's data, so on a name clash they keep the name and
    # Amplitude's field moves aside to `$amplitude_<name>`. A name PostHog
    # would obey moves aside on either side, whatever else happens.
    props = {key: value for key, value in record.items() if value is not None}
    for key in _CONSUMED:
        props.pop(key, None)
    if not CONTROL_KEYS.isdisjoint(props):  # Amplitude's own field names never steer; a future one might
        for key in props.keys() & CONTROL_KEYS:
            props[MOVED_ASIDE + key] = props.pop(key)
    source_props = record.get("event_properties")
    if isinstance(source_props, dict) and source_props:
        for key in props.keys() & source_props.keys():
            props[MOVED_ASIDE + key] = props[key]
        # Two C-level scans first: nearly no record has a name PostHog would obey.
        if not CONTROL_KEYS.isdisjoint(source_props) or "$group_" in "".join(source_props):
            source_props = dict(source_props)
            for key in _steering(source_props.keys()):
                source_props[MOVED_ASIDE + key] = source_props.pop(key)
        props.update(source_props)
        for source, target in _PAGE_PROPERTIES:
            value = source_props.get(source)
            if value is not None:
                props[target] = value
        for source, target in _VIEWPORT:
            value = source_props.get(source)
            if value is not None:
                props[target] = as_number(value)
    for source, target in _RECORD_FIELDS:
        value = record.get(source)
        if value is not None:
            props[target] = value
    _device_properties(record, props)

    session_id = record.get("session_id")
    if type(session_id) is int and session_id > 0:
        # To the minute is precise enough for bounds counted in hours.
        event_ms = minute_ms(timestamp[:16])
        if -SESSION_AFTER_MS <= event_ms - session_id <= SESSION_BEFORE_MS:  # the usual case, inline
            start: int | None = session_id
        else:
            start = session_start(session_id, event_ms)
        if start is not None:
            props["$session_id"] = session_uuid(start, device_id or user_id)  # sessions belong to a device

    if groups:
        props["$groups"] = groups
    to_set, to_set_once = _person_properties(record)

    ip = record.get("ip_address")
    if type(ip) is str and ip.strip():
        # PostHog's GeoIP resolves it into event and person `$geoip_*`, as for
        # its native events; Amplitude's city/country/region stay as fields.
        own = ctx.with_address
    else:
        ip = None
        own = ctx.without_address
        for source, name, initial in _PLACE_FIELDS:
            value = record.get(source)
            if value is not None and value != "":
                props[name] = to_set[name] = to_set_once[initial] = value
        country = record.get("country")
        if type(country) is str and country:
            code = country_code(country)
            if code is not None:
                props["$geoip_country_code"] = to_set["$geoip_country_code"] = code
                to_set_once["$initial_geoip_country_code"] = code

    name = _EVENT_NAMES.get(event_type, event_type)
    if event_type == "$identify":
        # Amplitude identify rows carry person properties; a PostHog `$identify`
        # without `$anon_distinct_id` would mean something else, so they become `$set`.
        name = "$set"
    elif name[0] == "$" and special_event_name(name):
        name = MOVED_ASIDE + name
    if name != event_type:
        props["$amplitude_event_type"] = event_type
        if name == "$autocapture":
            props["$event_type"] = _AUTOCAPTURE_TYPES[event_type]

    if to_set:
        props["$set"] = to_set
    if to_set_once:
        props["$set_once"] = to_set_once
    props.update(own)
    if ip is not None:
        props["$ip"] = ip

    event = {"event": name, "distinct_id": distinct_id, "uuid": event_uuid, "timestamp": timestamp, "properties": props}
    merge = Merge(device_id, user_id, timestamp) if user_id and device_id and user_id != device_id else None
    updates = _group_updates(record, every_group, distinct_id, timestamp) if every_group else ()
    return Translation(event, merge, updates)


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
        "properties": {"alias": merge.device_id, "distinct_id": merge.user_id, "$lib": LIB, **connector_properties()},
    }


def group_event(update: GroupUpdate, digest: str) -> dict:
    """`$groupidentify` creating the group or setting its properties (`digest`: of those properties).

    Its distinct_id is the acting user's, as PostHog's browser SDK and its own
    Amplitude importer send it: ingestion runs person processing for that id,
    so posthog-node's default `$<type>_<key>` would create a person nobody is.
    (A sighting's update has no properties: `$group_set: {}`.)
    """
    return {
        "event": "$groupidentify",
        "distinct_id": update.distinct_id,
        "uuid": group_uuid(update.group_type, update.group_key, digest, update.timestamp),
        "timestamp": update.timestamp,
        "properties": {
            "$group_type": update.group_type,
            "$group_key": update.group_key,
            "$group_set": update.properties or {},
            "$lib": LIB,
            **connector_properties(),
        },
    }


def translate_block(block: Block, ctx: TranslateContext) -> BlockResult:
    """Translate a block of newline-separated records and serialize each event.

    The block's oversized lines become `too_large` rejections, and so does an
    event whose Kafka message would exceed PostHog's limit
    (`kafka_message_bytes`). Pure and picklable in and out, so it can run in a
    worker process.
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
            event = translation.event
            if event is not None:
                data = dumps(event)
                if len(data) > _SURELY_SMALL:
                    size = kafka_message_bytes(data, event["distinct_id"], event["event"])
                    if size > MAX_EVENT_BYTES:
                        raise RecordRejected(
                            "too_large", f"the event's Kafka message in PostHog's capture would be about {size} "
                                         f"bytes, over its limit of {MAX_EVENT_BYTES}")
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
        except (ImportError, MemoryError):
            raise  # the installation or the machine is at fault, not the record: never reject for it
        except Exception as exc:  # a record shape nobody foresaw must not stop the hour
            result.rejections.append(Rejection("translation_error", f"{type(exc).__name__}: {exc}"[:300], line))
            continue
        if event is None:
            result.ignored += 1  # a $groupidentify row: its updates follow
        else:
            result.events.append(data)
            result.lines.append(index)
            day = event["timestamp"][:10]
            days[day] = days.get(day, 0) + 1
        merge = translation.merge
        if merge:
            pair = (merge.device_id, merge.user_id)
            seen = merges.get(pair)
            # ISO strings compare as instants once the "Z" is off ("...:05" < "...:05.1").
            if seen is None or merge.timestamp[:-1] < seen.timestamp[:-1]:
                merges[pair] = merge
        for update in translation.groups:
            key = (update.group_type, update.group_key)
            # A sighting never replaces properties an earlier event had.
            if update.properties is not None or key not in groups:
                groups[key] = update
    result.merges = list(merges.values())
    result.groups = list(groups.values())
    return result
