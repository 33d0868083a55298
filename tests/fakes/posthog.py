"""A fake PostHog capture endpoint (``POST /batch/``) on 127.0.0.1.

It validates and stores like PostHog (see shared/reference/FACTS.md):
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
  ``distinct_id``; a ``uuid`` that is not a UUID) -> 400 for the whole
  request, nothing stored. Otherwise 200 ``{"status":"Ok"}``.
- ``distinct_id`` is stringified (non-strings as JSON, like PostHog's
  ``Value::to_string``) and cut to 200 characters; ``$distinct_id`` and
  ``properties.distinct_id`` are accepted as fallbacks, as PostHog does.
- Stored timestamp: ``now + (timestamp - sent_at)`` when the payload has a
  valid ``sent_at`` and the event's ``properties.$ignore_sent_at`` is not
  truthy; the timestamp itself without ``sent_at``; ``now`` without (or with
  an unparseable) timestamp; more than 23 h after ``now`` -> ``now``.
  ``now`` is ``clock() + clock_skew``, so tests can skew the server's clock.
- Events over ``max_event_bytes`` (1 MiB, compact JSON) are accepted but
  dropped, as ingestion drops them: they land in ``dropped``.
- ``/api/...`` requests go to ``api`` (an object with ``handle(method, path,
  headers, body) -> (status, content_type, body)``; the query API lives in
  ``posthog_query.py``), or answer 404 when it is None.
- A tiny person model: ``$identify`` (``properties.$anon_distinct_id``) and
  ``$create_alias`` (``properties.alias``) merge the other id's person INTO
  the event's distinct_id's person; refused when the other person is already
  identified (``cannot_merge_already_identified``) or either id is one
  PostHog refuses to merge (``cannot_merge_with_illegal_distinct_id``).
  ``$merge_dangerously`` merges regardless of identification.

Faults injected with ``inject`` are consumed one per capture request, after
the body is read and before it is handled.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading
import uuid as uuidlib
import zlib
from dataclasses import dataclass
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
    "status": ("code",), "delay": ("seconds",), "close_connection": ()})
MAX_BODY_BYTES = 20 * 1024 * 1024
MAX_EVENT_BYTES = 1024 * 1024
MAX_DISTINCT_ID_CHARS = 200
FUTURE_CUTOFF = timedelta(hours=23)

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
    """distinct_id -> person, with PostHog's merge rules. Not thread-safe."""

    def __init__(self) -> None:
        self._person_of: dict[str, int] = {}
        self._members: dict[int, set[str]] = {}
        self._identified: dict[int, bool] = {}
        self._next = 1

    def _new(self, ids: set[str], identified: bool) -> int:
        pid, self._next = self._next, self._next + 1
        self._members[pid] = set(ids)
        self._identified[pid] = identified
        for i in ids:
            self._person_of[i] = pid
        return pid

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
    """Fake capture endpoint. ``with FakePostHog(api_key) as ph: ph.base_url``.

    ``stop()``/``start()`` restart it on the same port (connection refused in
    between). ``on_request`` is called (from the handler thread) with each
    ``CaptureRequest``.
    """

    def __init__(self, api_key: str = "phc_test_key", *, clock_skew: timedelta = timedelta(0),
                 clock: Callable[[], datetime] | None = None,
                 max_body_bytes: int = MAX_BODY_BYTES, max_event_bytes: int = MAX_EVENT_BYTES,
                 on_request: Callable[[CaptureRequest], None] | None = None, port: int = 0):
        super().__init__(port)
        self.api_key = api_key
        # Stands in for any validation rule of PostHog's that the connector does not
        # know: a batch holding one of these uuids is refused whole with 400.
        self.refuse_uuids: set[str] = set()
        self.clock_skew = clock_skew
        self._clock = clock or (lambda: datetime.now(timezone.utc))
        self.max_body_bytes, self.max_event_bytes = max_body_bytes, max_event_bytes
        self.on_request = on_request
        self.api: Any = None  # the /api/ handler (posthog_query.QueryApi), if any
        self._faults = FaultQueue(FAULTS)
        self._lock = threading.Lock()  # one request's events are ingested as a unit
        self._persons = _Persons()
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

    def inject(self, fault: str, times: int = 1, **kw: Any) -> None:
        """Queue ``fault`` for the next ``times`` capture requests (FIFO).

        status(code, body=b"", headers={}) | delay(seconds) (then handled
        normally, so a client that timed out may still have been accepted) |
        close_connection (no response at all)
        """
        self._faults.inject(fault, times, **kw)

    # ---- ingestion -----------------------------------------------------------
    def _ingest(self, payload: Any) -> tuple[int, bytes, int, bool | None]:
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
        sent_at = payload.get("sent_at")
        with self._lock:
            now = self.now()
            stored = []
            for raw, distinct_id, event_uuid in checked:
                size = len(compact_json(raw))
                if size > self.max_event_bytes:
                    self._dropped.append(DroppedEvent(event_uuid, raw["event"], distinct_id, size))
                    continue
                stored.append(self._process(raw, distinct_id, event_uuid, sent_at, hm, now))
            self._events.extend(stored)
        return 200, OK_BODY, len(batch), hm

    def _process(self, raw: dict, distinct_id: str, event_uuid: str | None, sent_at: Any,
                 hm: bool, now: datetime) -> CapturedEvent:
        props = raw.get("properties") or {}
        ts, warnings = stored_timestamp(raw.get("timestamp"), sent_at, props, now)
        for w in warnings:
            self._warnings.append(IngestionWarning(w, {"uuid": event_uuid, "event": raw["event"]}))
        other_key = {"$identify": "$anon_distinct_id", "$create_alias": "alias",
                     "$merge_dangerously": "alias"}.get(raw["event"])
        other = props.get(other_key) if other_key else None
        if other is not None:
            other = other if isinstance(other, str) else json.dumps(other)
            reason = self._persons.merge(other, distinct_id,
                                         force=raw["event"] == "$merge_dangerously")
            if reason:
                self._refused.append(RefusedMerge(raw["event"], distinct_id, other, reason))
        self._persons.ensure(distinct_id)
        return CapturedEvent(
            event=raw["event"], distinct_id=distinct_id, uuid=event_uuid,
            properties=MappingProxyType(props), timestamp=ts,
            sent_timestamp=raw.get("timestamp"),
            sent_at=sent_at if isinstance(sent_at, str) else None,
            historical_migration=hm, received_at=now, raw=MappingProxyType(raw))


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
        status, reply, n, hm = self._handle(body, encoding)
        self._log(path, status, n, hm, encoding, raw_size)
        self.send_bytes(status, reply, "application/json" if status == 200 else "text/plain; charset=utf-8")
        self.wfile.flush()

    def _handle(self, body: bytes | None, encoding: str | None) -> tuple[int, bytes, int, bool | None]:
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
        return ph._ingest(payload)

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
