"""A fake PostHog capture endpoint (``POST /batch/``) and ingestion, on 127.0.0.1.

It validates and stores like PostHog (see shared/reference/FACTS.md). Each
behaviour names the PostHog source file it follows (paths in PostHog/posthog):

Capture (Rust):
- Answers as PostHog's Rust capture does (``rust/capture/src/api.rs``,
  ``CaptureResponse`` and ``impl IntoResponse for CaptureError``): success is
  200 ``application/json`` ``{"status":"Ok"}``; every error is a plain-text
  body holding the error's message (``failed to parse request: ...``,
  ``event submitted without a distinct_id``, ...), never JSON, and never
  naming the offending event's index.
- Body: JSON, gzip'd if ``Content-Encoding: gzip`` or it starts with the gzip
  magic; over ``max_body_bytes`` (20 MiB) raw or decompressed -> 413
  ``maximum event size exceeded: ...`` (``rust/capture/src/extractors.rs``).
- ``{"api_key", "batch": [...], "historical_migration"?, "sent_at"?}``. A
  missing api_key -> 401 ``event submitted without an api_key``; a wrong one ->
  401 ``API key is not valid: ...`` (real capture checks only the key's shape
  and may accept an unknown project key with 200, which ingestion then drops;
  the fake refuses it so tests can tell the two apart). Invalid JSON, an empty
  batch, or ONE invalid event (no non-empty string ``event``; missing/empty
  ``distinct_id``; a ``uuid`` that is not a UUID: ``rust/common/types/src/event.rs``,
  ``RawEvent.uuid``) -> 400 for the whole request, nothing stored.
- ``distinct_id`` is stringified (non-strings as JSON, like PostHog's
  ``Value::to_string``) and cut to 200 characters; ``$distinct_id`` and
  ``properties.distinct_id`` are accepted as fallbacks, as PostHog does.
- The envelope's ``ip`` is the request's client address (``client_ip``, or
  the TCP peer), or ``127.0.0.1`` when the event's properties hold the key
  ``capture_internal`` (``rust/capture/src/events/analytics.rs``,
  ``process_single_event``).
- Size: each event is written to Kafka as the ``CapturedEvent`` envelope
  (``rust/common/types/src/event.rs``) whose ``data`` is the event JSON
  escaped as a string, plus its key and headers; over ``max_event_bytes``
  (Kafka's ``message.max.bytes``, 1,000,000) the WHOLE request is answered 413
  ``maximum event size exceeded: Event rejected by kafka during send``, after
  the events before it in the request were already written
  (``rust/capture/src/sinks/kafka.rs``, ``send_batch``). The event lands in
  ``dropped``; the events after it are not written.

Ingestion (Node), per stored event, in this order:
- ``$ip``: a missing or falsy ``properties.$ip`` is filled with the envelope's
  ip (``nodejs/src/utils/event.ts``, ``sanitizeEvent``).
- ``$process_person_profile: false`` (a JSON boolean) turns person processing
  off for the event: no person is created or changed, ``$set``/``$set_once``/
  ``$unset`` are removed, and ``$identify``/``$create_alias``/
  ``$merge_dangerously``/``$groupidentify`` with it are dropped with the warning
  ``invalid_event_when_process_person_profile_is_false``; any other non-boolean
  value warns ``invalid_process_person_profile`` and counts as true
  (``nodejs/src/worker/ingestion/event-pipeline/runner.ts``;
  ``normalizeProcessPerson`` in ``nodejs/src/utils/event.ts``).
- GeoIP over a fixed test table of networks (``geoip``, default
  ``GEOIP_TEST_TABLE``), as the GeoIP transformation does
  (``nodejs/src/cdp/templates/_transformations/geoip/geoip.template.ts``):
  nothing when ``$geoip_disable`` is truthy or ``$ip`` is empty; ``127.0.0.1``
  is looked up as ``89.160.20.129`` (Sweden); an address not in the table
  changes nothing; otherwise every GeoIP key is first set to null in ``$set``
  (``$geoip_<key>``) and ``$set_once`` (``$initial_geoip_<key>``), then each
  found key is written to the event (``$geoip_<key>``), ``$set`` and ``$set_once``.
- Event properties lifted onto the person: for each of
  EVENT_TO_PERSON_PROPERTIES and CAMPAIGN_PROPERTIES present on the event,
  ``$set[key]`` and ``$set_once['$initial_' + key without '$']`` unless already
  there; ``$os_name`` stands in for ``$os`` (``personInitialAndUTMProperties``,
  ``nodejs/src/utils/db/utils.ts``; the lists in
  ``nodejs/src/worker/ingestion/persons/person-property-utils.ts``). Skipped
  for ``$snapshot`` and ``$performance_event`` (``normalizeEvent``).
- ``$groupidentify`` never changes person properties (``normalizeProcessPerson``).
- A tiny person model: ``$identify`` (``properties.$anon_distinct_id``) and
  ``$create_alias`` (``properties.alias``) merge the other id's person INTO
  the event's distinct_id's person; refused when the other person is already
  identified (``cannot_merge_already_identified``) or either id is one
  PostHog refuses to merge (``cannot_merge_with_illegal_distinct_id``).
  ``$merge_dangerously`` merges regardless of identification. Merged
  properties are ``{...other, ...into}``
  (``nodejs/src/worker/ingestion/persons/person-merge-service.ts``).
  Then ``$set`` (overwrites), ``$set_once`` (only absent keys) and ``$unset``
  (a list, or an object's keys) apply to the person of the distinct_id, which
  is created if needed (``person-property-service.ts``): ``person_properties()``.
- Groups exist only after a ``$groupidentify`` with both ``$group_type`` and
  ``$group_key`` (``upsertGroup``, ``nodejs/src/worker/ingestion/process-event.ts``);
  its ``$group_set`` is merged into the group's properties. ``$groups`` on an
  event creates nothing. ``groups()`` lists them.
- Stored: ``CapturedEvent.properties`` as sent, ``.ingested`` as ingestion
  holds them after the steps above, ``.ip`` the envelope's address.

Other:
- Stored timestamp: ``now + (timestamp - sent_at)`` when the payload has a
  valid ``sent_at`` and the event's ``properties.$ignore_sent_at`` is not
  truthy; the timestamp itself without ``sent_at``; ``now`` without (or with
  an unparseable) timestamp; more than 23 h after ``now`` -> ``now``.
  ``now`` is ``clock() + clock_skew``, so tests can skew the server's clock.
- ``/api/...`` requests go to ``api`` (an object with ``handle(method, path,
  headers, body) -> (status, content_type, body)``; the query API lives in
  ``posthog_query.py``), or answer 404 when it is None.

Faults injected with ``inject`` are consumed one per capture request, after
the body is read and before it is handled.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import signal
import threading
import uuid as uuidlib
import zlib
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Mapping, NamedTuple
from urllib.parse import urlsplit

from ._http import (FakeServer, FaultQueue, QuietHandler, RecordLog, compact_json,
                    interruptible_wait)

CAPTURE_PATHS = ("/batch/", "/batch")
OK_BODY = b'{"status":"Ok"}'  # CaptureResponse { status: Ok } as serde writes it
FAULTS = MappingProxyType({  # name -> required keyword arguments
    "status": ("code",), "delay": ("seconds",), "close_connection": (), "lose_after_accept": ()})
MAX_BODY_BYTES = 20 * 1024 * 1024
MAX_EVENT_BYTES = 1_000_000  # capture's kafka_producer_message_max_bytes default (librdkafka's message.max.bytes)
MAX_DISTINCT_ID_CHARS = 200
MAX_GROUP_KEY_CHARS = 400
FUTURE_CUTOFF = timedelta(hours=23)
EVENT_TOO_BIG = "maximum event size exceeded: Event rejected by kafka during send"
LOCALHOST = "127.0.0.1"
SPOOFED_LOCALHOST = "89.160.20.129"  # what geoip.template.ts looks up for 127.0.0.1

# nodejs/src/worker/ingestion/persons/person-property-utils.ts
EVENT_TO_PERSON_PROPERTIES = (
    "$app_build", "$app_name", "$app_namespace", "$app_version", "$browser", "$browser_version",
    "$device_type", "$current_url", "$pathname", "$os", "$os_name", "$os_version", "$referring_domain",
    "$referrer", "$screen_height", "$screen_width", "$viewport_height", "$viewport_width", "$raw_user_agent",
)
CAMPAIGN_PROPERTIES = (
    "utm_source", "utm_medium", "utm_campaign", "utm_content", "utm_name", "utm_term", "gclid", "gad_source",
    "gclsrc", "dclid", "gbraid", "wbraid", "fbclid", "msclkid", "twclid", "li_fat_id", "mc_cid", "igshid",
    "ttclid", "rdt_cid", "irclid", "_kx", "epik", "qclid", "sccid",
)
_LIFTED = tuple((key, "$initial_" + key.replace("$", "", 1))
                for key in EVENT_TO_PERSON_PROPERTIES + CAMPAIGN_PROPERTIES)
PERSON_ONLY_EVENTS = frozenset({"$identify", "$create_alias", "$merge_dangerously", "$groupidentify"})

# geoip.template.ts: the keys written for every lookup (null when not found)
GEOIP_KEYS = ("city_name", "city_confidence", "subdivision_2_name", "subdivision_2_code", "subdivision_1_name",
              "subdivision_1_code", "country_name", "country_code", "continent_name", "continent_code",
              "postal_code", "latitude", "longitude", "accuracy_radius", "time_zone")
# A fixed GeoIP database for tests: network -> what MaxMind would answer. The
# documentation ranges are the ones tests/fakes/records.py draws addresses
# from; 100.64.0.0/10 stands for the machine the connector runs on.
GEOIP_TEST_TABLE: Mapping[str, Mapping[str, Any]] = MappingProxyType({
    "89.160.20.128/25": {"city_name": "Linköping", "country_name": "Sweden", "country_code": "SE",
                         "continent_name": "Europe", "continent_code": "EU", "subdivision_1_name": "Östergötland County",
                         "subdivision_1_code": "E", "postal_code": "587 58", "latitude": 58.4167,
                         "longitude": 15.6167, "accuracy_radius": 76, "time_zone": "Europe/Stockholm"},
    "203.0.113.0/24": {"city_name": "Puchong Batu Dua Belas", "country_name": "Malaysia", "country_code": "MY",
                       "continent_name": "Asia", "continent_code": "AS", "subdivision_1_name": "Selangor",
                       "subdivision_1_code": "10", "latitude": 3.0, "longitude": 101.6, "accuracy_radius": 20,
                       "time_zone": "Asia/Kuala_Lumpur"},
    "198.51.100.0/24": {"city_name": "Berlin", "country_name": "Germany", "country_code": "DE",
                        "continent_name": "Europe", "continent_code": "EU", "subdivision_1_name": "Land Berlin",
                        "subdivision_1_code": "BE", "postal_code": "10115", "latitude": 52.52,
                        "longitude": 13.405, "accuracy_radius": 10, "time_zone": "Europe/Berlin"},
    "192.0.2.0/24": {"city_name": "Austin", "country_name": "United States", "country_code": "US",
                     "continent_name": "North America", "continent_code": "NA", "subdivision_1_name": "Texas",
                     "subdivision_1_code": "TX", "postal_code": "78701", "latitude": 30.27, "longitude": -97.74,
                     "accuracy_radius": 5, "time_zone": "America/Chicago"},
    "100.64.0.0/10": {"city_name": "Reykjavík", "country_name": "Iceland", "country_code": "IS",
                      "continent_name": "Europe", "continent_code": "EU", "subdivision_1_name": "Capital Region",
                      "subdivision_1_code": "1", "latitude": 64.15, "longitude": -21.94, "accuracy_radius": 50,
                      "time_zone": "Atlantic/Reykjavik"},
})

# ids PostHog ingests but refuses to merge on (plugin-server's isDistinctIdIllegal)
_BARE_CASE_INSENSITIVE = ("anonymous", "guest", "distinctid", "distinct_id", "id",
                          "not_authenticated", "email", "undefined", "true", "false")
_BARE_CASE_SENSITIVE = ("[object Object]", "NaN", "None", "none", "null", "0", "undefined")


def _quoted(ids: tuple[str, ...]) -> frozenset[str]:
    return frozenset(ids) | {f'"{i}"' for i in ids} | {f"'{i}'" for i in ids}


_ILLEGAL_CASE_INSENSITIVE = _quoted(_BARE_CASE_INSENSITIVE)
_ILLEGAL_CASE_SENSITIVE = _quoted(_BARE_CASE_SENSITIVE)


def is_illegal_merge_id(distinct_id: str) -> bool:
    """True for ids PostHog will not merge on (events with them still ingest)."""
    return (not distinct_id.strip() or distinct_id.lower() in _ILLEGAL_CASE_INSENSITIVE
            or distinct_id in _ILLEGAL_CASE_SENSITIVE)


@dataclass(frozen=True)
class CapturedEvent:
    """One stored event. ``timestamp`` is what PostHog would store."""

    event: str
    distinct_id: str
    uuid: str | None  # as sent (lower-cased); PostHog would generate one if None
    properties: Mapping[str, Any]
    timestamp: datetime
    sent_timestamp: Any  # the event's "timestamp" as sent
    sent_at: str | None  # the payload's "sent_at" as sent
    historical_migration: bool
    received_at: datetime  # the (skewed) server clock at ingestion
    raw: Mapping[str, Any]  # the event object as sent
    ip: str = ""  # the Kafka envelope's ip: the client's address, or 127.0.0.1 (capture_internal)
    ingested: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))  # as ingestion holds them
    person_processing: bool = True  # False: `$process_person_profile: false` made it personless


class CaptureRequest(NamedTuple):
    path: str
    status: int | None  # None: connection dropped without a response
    n_events: int
    historical_migration: bool | None
    content_encoding: str | None
    user_agent: str | None
    raw_size: int


class DroppedEvent(NamedTuple):
    uuid: str | None
    event: str
    distinct_id: str
    size: int


class RefusedMerge(NamedTuple):
    event: str
    distinct_id: str
    other_id: str
    reason: str


class IngestionWarning(NamedTuple):
    type: str
    detail: Mapping[str, Any]


class _BadRequest(Exception):
    """The whole request is rejected with 400 and this detail."""


class _Persons:
    """distinct_id -> person, with PostHog's merge rules and person properties. Not thread-safe."""

    def __init__(self) -> None:
        self._person_of: dict[str, int] = {}
        self._members: dict[int, set[str]] = {}
        self._identified: dict[int, bool] = {}
        self._properties: dict[int, dict[str, Any]] = {}
        self._next = 1

    def _new(self, ids: set[str], identified: bool) -> int:
        pid, self._next = self._next, self._next + 1
        self._members[pid] = set(ids)
        self._identified[pid] = identified
        self._properties[pid] = {}
        for i in ids:
            self._person_of[i] = pid
        return pid

    def properties_of(self, distinct_id: str) -> dict[str, Any] | None:
        pid = self._person_of.get(distinct_id)
        return None if pid is None else dict(self._properties[pid])

    def update(self, distinct_id: str, to_set: Any, to_set_once: Any, to_unset: Any) -> None:
        """Apply an event's $set, $set_once and $unset to the person of ``distinct_id``
        (created if needed), as person-property-service.ts does."""
        self.ensure(distinct_id)
        props = self._properties[self._person_of[distinct_id]]
        if isinstance(to_set_once, dict):
            for key, value in to_set_once.items():
                props.setdefault(key, value)
        if isinstance(to_set, dict):
            props.update(to_set)
        if to_unset:
            for key in to_unset if isinstance(to_unset, list) else (to_unset if isinstance(to_unset, dict) else ()):
                props.pop(key, None)

    def ensure(self, distinct_id: str) -> None:
        if distinct_id not in self._person_of:
            self._new({distinct_id}, identified=False)

    def person_of(self, distinct_id: str) -> int | None:
        return self._person_of.get(distinct_id)

    def is_identified(self, distinct_id: str) -> bool:
        pid = self._person_of.get(distinct_id)
        return pid is not None and self._identified[pid]

    def merge(self, other_id: str, into_id: str, force: bool = False) -> str | None:
        """Merge ``other_id``'s person into ``into_id``'s; a refusal reason or None."""
        if other_id == into_id:
            return None
        if is_illegal_merge_id(into_id) or is_illegal_merge_id(other_id):
            return "cannot_merge_with_illegal_distinct_id"
        other, into = self._person_of.get(other_id), self._person_of.get(into_id)
        if other is None and into is None:
            self._new({other_id, into_id}, identified=True)
        elif into is None:
            self._attach(into_id, other)  # type: ignore[arg-type]
        elif other is None:
            self._attach(other_id, into)
        elif other != into:
            if self._identified[other] and not force:
                return "cannot_merge_already_identified"
            for i in self._members.pop(other):
                self._person_of[i] = into
                self._members[into].add(i)
            del self._identified[other]
            self._identified[into] = True
            # person-merge-service.ts: { ...otherPerson.properties, ...mergeInto.properties }
            self._properties[into] = {**self._properties.pop(other), **self._properties[into]}
        return None

    def _attach(self, distinct_id: str, pid: int) -> None:
        self._person_of[distinct_id] = pid
        self._members[pid].add(distinct_id)
        self._identified[pid] = True


def parse_timestamp(value: Any) -> datetime | None:
    """ISO 8601 (``Z`` or offset; naive means UTC) -> aware UTC, else None."""
    if not isinstance(value, str) or not value:
        return None
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.astimezone(timezone.utc)


def stored_timestamp(timestamp: Any, sent_at: Any, properties: Mapping[str, Any],
                     now: datetime) -> tuple[datetime, list[str]]:
    """PostHog's timestamp rule (plugin-server parseEventTimestamp).

    Returns the timestamp to store and the ingestion warnings raised.
    """
    warnings = []
    sent = None
    if sent_at and not properties.get("$ignore_sent_at"):
        sent = parse_timestamp(sent_at)
        if sent is None:
            warnings.append("ignored_invalid_sent_at")
    ts = now
    if timestamp:
        parsed = parse_timestamp(timestamp)
        if parsed is None:
            warnings.append("ignored_invalid_timestamp")
        elif sent is not None:
            ts = now + (parsed - sent)  # clock-skew correction
        else:
            ts = parsed
    if ts - now > FUTURE_CUTOFF:
        warnings.append("event_timestamp_in_future")
        ts = now
    return ts, warnings


def _distinct_id(event: Mapping[str, Any]) -> str | None:
    value = event.get("distinct_id", event.get("$distinct_id"))
    if value is None:
        props = event.get("properties")
        value = props.get("distinct_id") if isinstance(props, dict) else None
    if value is None:
        return None
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    return text[:MAX_DISTINCT_ID_CHARS] or None


def _valid_uuid(value: Any) -> str | None:
    """The uuid lower-cased, None if absent; _BadRequest if not a UUID."""
    if value is None or value == "":
        return None
    try:
        return str(uuidlib.UUID(str(value)))
    except ValueError:
        raise _BadRequest("failed to parse request: data did not match any variant of untagged enum RawRequest") from None


class FakePostHog(FakeServer):
    """Fake capture endpoint and ingestion. ``with FakePostHog(api_key) as ph: ph.base_url``.

    ``stop()``/``start()`` restart it on the same port (connection refused in
    between). ``on_request`` is called (from the handler thread) with each
    ``CaptureRequest``. ``client_ip`` is the address capture sees every request
    come from (default: the TCP peer, 127.0.0.1 in tests, which is also the
    address ``capture_internal`` gives: set it to tell the two apart). ``geoip``
    maps networks to locations (default ``GEOIP_TEST_TABLE``).
    """

    def __init__(self, api_key: str = "phc_test_key", *, clock_skew: timedelta = timedelta(0),
                 clock: Callable[[], datetime] | None = None,
                 max_body_bytes: int = MAX_BODY_BYTES, max_event_bytes: int = MAX_EVENT_BYTES,
                 on_request: Callable[[CaptureRequest], None] | None = None, port: int = 0,
                 client_ip: str | None = None, geoip: Mapping[str, Mapping[str, Any]] = GEOIP_TEST_TABLE):
        super().__init__(port)
        self.api_key = api_key
        # Stands in for any validation rule of PostHog's that the connector does not
        # know: a batch holding one of these uuids is refused whole with 400.
        self.refuse_uuids: set[str] = set()
        self.clock_skew = clock_skew
        self._clock = clock or (lambda: datetime.now(timezone.utc))
        self.max_body_bytes, self.max_event_bytes = max_body_bytes, max_event_bytes
        self.on_request = on_request
        self.client_ip = client_ip
        self._geoip = [(ipaddress.ip_network(net), MappingProxyType(dict(loc))) for net, loc in geoip.items()]
        self.api: Any = None  # the /api/ handler (posthog_query.QueryApi), if any
        self._faults = FaultQueue(FAULTS)
        self._lock = threading.Lock()  # one request's events are ingested as a unit
        self._persons = _Persons()
        self._groups: dict[tuple[str, str], dict[str, Any]] = {}
        self._events: RecordLog[CapturedEvent] = RecordLog()
        self._requests: RecordLog[CaptureRequest] = RecordLog()
        self._dropped: RecordLog[DroppedEvent] = RecordLog()
        self._refused: RecordLog[RefusedMerge] = RecordLog()
        self._warnings: RecordLog[IngestionWarning] = RecordLog()

    def now(self) -> datetime:
        """The server's (skewed) clock."""
        return self._clock() + self.clock_skew

    # ---- observations --------------------------------------------------------
    @property
    def events(self) -> list[CapturedEvent]:
        return self._events.snapshot()

    @property
    def requests(self) -> list[CaptureRequest]:
        return self._requests.snapshot()

    @property
    def dropped(self) -> list[DroppedEvent]:
        return self._dropped.snapshot()

    @property
    def refused_merges(self) -> list[RefusedMerge]:
        return self._refused.snapshot()

    @property
    def warnings(self) -> list[IngestionWarning]:
        return self._warnings.snapshot()

    def uuids(self) -> list[str | None]:
        """The stored events' uuids, in arrival order (duplicates kept)."""
        return [e.uuid for e in self._events.snapshot()]

    def wait_for_events(self, n: int, timeout: float = 5.0) -> list[CapturedEvent]:
        return self._events.wait_for(n, timeout)

    def wait_for_requests(self, n: int, timeout: float = 5.0) -> list[CaptureRequest]:
        return self._requests.wait_for(n, timeout)

    def person_of(self, distinct_id: str) -> str | None:
        """A stable id of the person ``distinct_id`` belongs to (None: unknown)."""
        with self._lock:
            pid = self._persons.person_of(distinct_id)
        return None if pid is None else f"person-{pid}"

    def is_identified(self, distinct_id: str) -> bool:
        with self._lock:
            return self._persons.is_identified(distinct_id)

    def person_properties(self, distinct_id: str) -> dict[str, Any] | None:
        """A copy of the properties of the person ``distinct_id`` belongs to (None: no person)."""
        with self._lock:
            return self._persons.properties_of(distinct_id)

    def groups(self) -> dict[tuple[str, str], dict[str, Any]]:
        """(group type, group key) -> properties, for every group a `$groupidentify` created."""
        with self._lock:
            return {key: dict(props) for key, props in self._groups.items()}

    def geoip_lookup(self, ip: str) -> Mapping[str, Any] | None:
        """The test table's location of ``ip`` (None: not in the table, or not an address)."""
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return None
        return next((loc for net, loc in self._geoip if address in net), None)

    def inject(self, fault: str, times: int = 1, **kw: Any) -> None:
        """Queue ``fault`` for the next ``times`` capture requests (FIFO).

        status(code, body=b"", headers={}) | delay(seconds) (then handled
        normally, so a client that timed out may still have been accepted) |
        close_connection (no response at all) | lose_after_accept (validated
        and answered 200 ``{"status":"Ok"}``, but nothing is stored: hobby's
        Kafka keeps messages about an hour, and events that capture accepted
        expire unread when ingestion is down longer)
        """
        self._faults.inject(fault, times, **kw)

    # ---- capture -------------------------------------------------------------
    def _ingest(self, payload: Any, client_ip: str, store: bool = True) -> tuple[int, bytes, int, bool | None]:
        """Validate and store one decoded payload: (status, body, n_events, hm)."""
        if not isinstance(payload, dict):
            return 400, _error("failed to parse request: expected a JSON object"), 0, None
        token = payload.get("api_key") or payload.get("token")
        if not token:
            return 401, _error("event submitted without an api_key"), 0, None
        if token != self.api_key:
            return 401, _error("API key is not valid: unknown project API key"), 0, None
        batch, hm = payload.get("batch"), payload.get("historical_migration", False)
        if not isinstance(batch, list):
            return 400, _error("failed to parse request: batch must be a list"), 0, None
        if not batch:
            return 400, _error("request holds no event"), 0, None
        if not isinstance(hm, bool):
            return 400, _error("failed to parse request: historical_migration must be a boolean"), 0, None
        try:
            checked = [_check_event(e, i) for i, e in enumerate(batch)]
            for i, (_, _, event_uuid) in enumerate(checked):
                if event_uuid in self.refuse_uuids:
                    raise _BadRequest("invalid event could not be processed")
        except _BadRequest as exc:
            return 400, _error(str(exc)), len(batch), hm
        if not store:
            return 200, OK_BODY, len(batch), hm
        sent_at = payload.get("sent_at")
        with self._lock:
            now = self.now()
            stored = []
            too_big = False
            for raw, distinct_id, event_uuid in checked:
                props = raw.get("properties") or {}
                # rust/capture/src/events/analytics.rs: internally generated events
                ip = LOCALHOST if "capture_internal" in props else client_ip
                size = kafka_message_size(raw, distinct_id, event_uuid, ip, token, now, hm)
                if size > self.max_event_bytes:
                    # rust/capture/src/sinks/kafka.rs: the events before it are in
                    # Kafka already; the request fails whole.
                    self._dropped.append(DroppedEvent(event_uuid, raw["event"], distinct_id, size))
                    too_big = True
                    break
                event = self._process(raw, distinct_id, event_uuid, ip, sent_at, hm, now)
                if event is not None:
                    stored.append(event)
            self._events.extend(stored)
        if too_big:
            return 413, _error(EVENT_TOO_BIG), len(batch), hm
        return 200, OK_BODY, len(batch), hm

    # ---- ingestion -----------------------------------------------------------
    def _warn(self, kind: str, raw: dict, event_uuid: str | None) -> None:
        self._warnings.append(IngestionWarning(kind, {"uuid": event_uuid, "event": raw["event"]}))

    def _process(self, raw: dict, distinct_id: str, event_uuid: str | None, ip: str, sent_at: Any,
                 hm: bool, now: datetime) -> CapturedEvent | None:
        """Node's ingestion of one event; None when ingestion drops it."""
        sent = raw.get("properties") or {}
        props = json.loads(json.dumps(sent))  # ingestion works on its own copy
        name = raw["event"]
        ts, warnings = stored_timestamp(raw.get("timestamp"), sent_at, sent, now)
        for w in warnings:
            self._warn(w, raw, event_uuid)
        # nodejs/src/utils/event.ts, sanitizeEvent: a falsy $ip gets capture's address
        if not props.get("$ip") and ip:
            props["$ip"] = ip
        # runner.ts / normalizeProcessPerson: only a JSON false turns person processing off
        process_person = True
        if "$process_person_profile" in props:
            flag = props["$process_person_profile"]
            if flag is False:
                process_person = False
                if name in PERSON_ONLY_EVENTS:
                    self._warn("invalid_event_when_process_person_profile_is_false", raw, event_uuid)
                    return None
            elif flag is not True:
                self._warn("invalid_process_person_profile", raw, event_uuid)
        self._geoip_transformation(props)
        if name not in ("$snapshot", "$performance_event"):
            _lift_person_properties(props)
        if not process_person or name == "$groupidentify":
            for key in ("$set", "$set_once", "$unset"):
                props.pop(key, None)
        if process_person:
            props.pop("$process_person_profile", None)
            self._persons_step(name, distinct_id, props, raw, event_uuid)
            if name == "$groupidentify":
                self._upsert_group(props, raw, event_uuid)
        else:
            props["$process_person_profile"] = False
        return CapturedEvent(
            event=name, distinct_id=distinct_id, uuid=event_uuid,
            properties=MappingProxyType(sent), timestamp=ts,
            sent_timestamp=raw.get("timestamp"),
            sent_at=sent_at if isinstance(sent_at, str) else None,
            historical_migration=hm, received_at=now, raw=MappingProxyType(raw),
            ip=ip, ingested=MappingProxyType(props), person_processing=process_person)

    def _geoip_transformation(self, props: dict) -> None:
        """geoip.template.ts, over the test table."""
        if props.get("$geoip_disable") or not props.get("$ip"):
            return
        ip = props["$ip"]
        if ip == LOCALHOST:
            ip = SPOOFED_LOCALHOST  # "spoofing private ip for local development"
        location = self.geoip_lookup(str(ip))
        if not location:
            return
        to_set = props["$set"] = props.get("$set") or {}
        to_set_once = props["$set_once"] = props.get("$set_once") or {}
        for key in GEOIP_KEYS:
            to_set[f"$geoip_{key}"] = None
            to_set_once[f"$initial_geoip_{key}"] = None
        for key, value in location.items():
            props[f"$geoip_{key}"] = to_set[f"$geoip_{key}"] = to_set_once[f"$initial_geoip_{key}"] = value

    def _persons_step(self, name: str, distinct_id: str, props: dict, raw: dict, event_uuid: str | None) -> None:
        other_key = {"$identify": "$anon_distinct_id", "$create_alias": "alias",
                     "$merge_dangerously": "alias"}.get(name)
        other = props.get(other_key) if other_key else None
        if other is not None:
            other = other if isinstance(other, str) else json.dumps(other)
            reason = self._persons.merge(other, distinct_id, force=name == "$merge_dangerously")
            if reason:
                self._refused.append(RefusedMerge(name, distinct_id, other, reason))
        self._persons.update(distinct_id, props.get("$set"), props.get("$set_once"), props.get("$unset"))

    def _upsert_group(self, props: dict, raw: dict, event_uuid: str | None) -> None:
        """process-event.ts upsertGroup: needs $group_type and $group_key; merges $group_set."""
        group_type, group_key = props.get("$group_type"), props.get("$group_key")
        if not group_type or group_key is None or group_key == "":
            return
        group_key = str(group_key)
        if len(group_key) > MAX_GROUP_KEY_CHARS:
            self._warn("group_key_too_long", raw, event_uuid)
            return
        group = self._groups.setdefault((str(group_type), group_key), {})
        group_set = props.get("$group_set")
        if isinstance(group_set, dict):
            group.update(group_set)


def _lift_person_properties(props: dict) -> None:
    """personInitialAndUTMProperties (nodejs/src/utils/db/utils.ts)."""
    found = [(key, initial) for key, initial in _LIFTED if key in props]
    if not found:
        return
    to_set = props.get("$set") if isinstance(props.get("$set"), dict) else {}
    to_set_once = props.get("$set_once") if isinstance(props.get("$set_once"), dict) else {}
    for key, initial in found:
        to_set.setdefault(key, props[key])
        to_set_once.setdefault(initial, props[key])
    if "$os_name" in props:  # an alias of $os for person properties
        props.setdefault("$os", props["$os_name"])
        to_set.setdefault("$os", props["$os_name"])
        to_set_once.setdefault("$initial_os", props["$os_name"])
        to_set.pop("$os_name", None)
        to_set_once.pop("$initial_os_name", None)
    props["$set"], props["$set_once"] = to_set, to_set_once


def kafka_message_size(raw: dict, distinct_id: str, event_uuid: str | None, ip: str, token: str,
                       now: datetime, historical: bool) -> int:
    """Bytes of the Kafka message capture produces for one event: the serialized
    ``CapturedEvent`` (rust/common/types/src/event.rs), whose ``data`` is the
    event's JSON as a string, plus the key and the headers, as librdkafka counts
    them against ``message.max.bytes``."""
    data = compact_json(raw).decode()
    envelope = {"uuid": event_uuid or "00000000-0000-7000-8000-000000000000", "distinct_id": distinct_id,
                "ip": ip, "data": data, "now": now.isoformat(), "token": token, "event": raw["event"],
                "timestamp": now.isoformat()}
    if historical:
        envelope["historical_migration"] = True
    key = f"{token}:{distinct_id}"
    headers = {"token": token, "distinct_id": distinct_id, "timestamp": "1751360400000", "event": raw["event"],
               "uuid": envelope["uuid"], "now": envelope["now"], "historical_migration": "true"}
    return (len(compact_json(envelope)) + len(key.encode())
            + sum(len(k) + len(v.encode()) + 2 for k, v in headers.items()))


def _error(message: str) -> bytes:
    """A capture error body: the error's message as plain text (rust/capture/src/api.rs)."""
    return message.encode()


def _check_event(raw: Any, index: int) -> tuple[dict, str, str | None]:
    if not isinstance(raw, dict):
        raise _BadRequest("failed to parse request: data did not match any variant of untagged enum RawRequest")
    if not isinstance(raw.get("event"), str) or not raw["event"]:
        raise _BadRequest("event submitted with an empty event name")
    if raw.get("properties") is not None and not isinstance(raw["properties"], dict):
        raise _BadRequest("failed to parse request: invalid type: properties must be a map")
    distinct_id = _distinct_id(raw)
    if distinct_id is None:
        raise _BadRequest("event submitted without a distinct_id")
    return raw, distinct_id, _valid_uuid(raw.get("uuid"))


class _CaptureHandler(QuietHandler):
    owner: FakePostHog

    def do_GET(self) -> None:
        self._api("GET", b"")

    def _api(self, method: str, body: bytes) -> None:
        """Everything under /api/ is the app's API (web:8000 on a hobby deployment)."""
        api = self.owner.api
        if api is None or not urlsplit(self.path).path.startswith("/api/"):
            self.send_bytes(404, b"Not Found")
            return
        status, content_type, reply = api.handle(method, self.path, self.headers, body)
        self.send_bytes(status, reply, content_type)

    def do_POST(self) -> None:
        ph = self.owner
        path = urlsplit(self.path).path
        if path.startswith("/api/"):
            self._api("POST", self.read_body(ph.max_body_bytes) or b"")
            return
        if path not in CAPTURE_PATHS:
            self.read_body(ph.max_body_bytes)
            self.send_bytes(404, b"Not Found")
            return
        body = self.read_body(ph.max_body_bytes)
        encoding = self.headers.get("Content-Encoding")
        raw_size = int(self.headers.get("Content-Length") or 0)
        fault = ph._faults.pop()
        if fault is not None:
            if fault.name == "close_connection":
                self._log(path, None, 0, None, encoding, raw_size)
                self.abort_connection()
                return
            if fault.name == "status":
                content = fault.kw.get("body", b"")
                content = content.encode() if isinstance(content, str) else content
                self._log(path, fault.kw["code"], 0, None, encoding, raw_size)
                self.send_bytes(fault.kw["code"], content, "application/json", fault.kw.get("headers"))
                return
            if fault.name == "delay" and not interruptible_wait(ph, fault.kw["seconds"]):
                self.abort_connection()  # stopping: do not ingest after stop()
                return
        lose = fault is not None and fault.name == "lose_after_accept"
        status, reply, n, hm = self._handle(body, encoding, store=not lose)
        self._log(path, status, n, hm, encoding, raw_size)
        self.send_bytes(status, reply, "application/json" if status == 200 else "text/plain; charset=utf-8")
        self.wfile.flush()

    def _handle(self, body: bytes | None, encoding: str | None, store: bool = True
                ) -> tuple[int, bytes, int, bool | None]:
        ph = self.owner
        too_big = f"maximum event size exceeded: Request body exceeds limit of {ph.max_body_bytes} bytes"
        if body is None:
            return 413, _error(too_big), 0, None
        if (encoding or "").lower() == "gzip" or body[:2] == b"\x1f\x8b":
            inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
            try:
                body = inflater.decompress(body, ph.max_body_bytes + 1)
            except zlib.error:
                return 400, _error("failed to decode request: invalid gzip data"), 0, None
            if len(body) > ph.max_body_bytes:
                return 413, _error(too_big), 0, None
        try:
            payload = json.loads(body)
        except ValueError as exc:  # includes invalid UTF-8
            return 400, _error(f"failed to parse request: {exc}"), 0, None
        return ph._ingest(payload, ph.client_ip or self.client_address[0], store)

    def _log(self, path: str, status: int | None, n: int, hm: bool | None,
             encoding: str | None, raw_size: int) -> None:
        record = CaptureRequest(path, status, n, hm, encoding, self.headers.get("User-Agent"),
                                raw_size)
        self.owner._requests.append(record)
        if self.owner.on_request is not None:
            self.owner.on_request(record)


FakePostHog.handler_class = _CaptureHandler


def main(argv: list[str] | None = None) -> None:
    """Serve until SIGINT/SIGTERM, logging one line per request (for demos)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--port-file", help="write {base_url, api_key} JSON here")
    ap.add_argument("--api-key", default="phc_test_key")
    args = ap.parse_args(argv)

    def log(r: CaptureRequest) -> None:
        print(f"{datetime.now(timezone.utc):%H:%M:%S} POST {r.path} -> {r.status} "
              f"events={r.n_events} historical={r.historical_migration} "
              f"encoding={r.content_encoding} bytes={r.raw_size} ua={r.user_agent}", flush=True)

    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    with FakePostHog(args.api_key, on_request=log, port=args.port) as ph:
        info = {"base_url": ph.base_url, "api_key": args.api_key}
        if args.port_file:
            tmp = f"{args.port_file}.tmp"
            Path(tmp).write_text(json.dumps(info))
            os.replace(tmp, args.port_file)  # readers never see a half-written file
        print(json.dumps(info), flush=True)
        try:
            done.wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
