"""The fake PostHog's app API: project lookup and the HogQL query endpoint.

Installed on a ``FakePostHog`` (which routes every ``/api/...`` request here)::

    ph.api = QueryApi(ph, personal_api_key="phx_...", project_id=1, project_api_key=ph.api_key)

It answers from ``ph.events`` as PostHog answers from ClickHouse. Each rule
names the PostHog source it follows:

- Authentication (``posthog/auth.py`` PersonalAPIKeyAuthentication): a key in
  ``Authorization: Bearer``; none -> 401 ``not_authenticated``, a wrong one ->
  401 ``authentication_failed`` "Personal API key found in request
  Authorization header is invalid.".
- Error bodies (``exceptions_hog/handler.py`` of drf-exceptions-hog, wrapped by
  ``posthog/exceptions.py``): ``{"type", "code", "detail", "attr"}``, and no
  Retry-After header: a 429 says its wait only in the detail.
- Scopes (``posthog/permissions.py`` APIScopePermission): ``project:read`` for
  ``/api/projects/``, ``query:read`` for ``/query/`` (``posthog/api/query.py``
  puts create/retrieve among the read actions); ``:write`` implies ``:read``;
  ``*`` allows all. A key scoped to projects (``scoped_teams``) is refused the
  project list ("API keys with scoped projects are only supported on
  project-based endpoints.") and any other project ("API key does not have
  access to the requested project: ID n."); that check runs before the scope
  check, as in ``has_permission``. A project the user is not a member of ->
  403 "You don't have access to the project." (TeamMemberAccessPermission); an
  unknown one -> 404 "Project not found." (``posthog/api/routing.py``).
- Projects (``posthog/api/project.py`` ProjectViewSet): the list uses
  ProjectBackwardCompatBasicSerializer fields (``posthog/api/shared.py``: id,
  uuid, organization, api_token, name, timezone, ...) under DRF's
  LimitOffsetPagination with PAGE_SIZE 100 (``posthog/settings/web.py``):
  ``{count, next, previous, results}``, ``next`` an absolute URL built from the
  request's Host. ``@current`` is the user's current project, not the key's.
- Queries (``posthog/api/query.py`` QueryViewSet.create): only the two HogQL
  texts ``connector/readback.py`` sends are understood, matched exactly up to
  whitespace against this module's own copies; anything else is 400
  ``validation_error`` (as a HogQL error), so a drift between client and fake
  fails loudly. Placeholders come from ``values``
  (``posthog/hogql_queries/hogql_query_runner.py`` to_query); a missing or
  extra value, or one of the wrong type, is a 400 too (extra values are
  stricter than PostHog, on purpose).
- Semantics (ClickHouse, as HogQL prints it): ``count()`` counts every stored
  row, so duplicates of a uuid count until PostHog merges them (the fake never
  merges); ``count(DISTINCT uuid)`` counts uuids (an event sent without one got
  its own from PostHog); property filters compare the property as HogQL
  extracts it (strings as-is, other JSON as its text, missing -> NULL never
  matches); ``toDate(timestamp)`` is the UTC date when the query's modifiers say
  ``convertToProjectTimezone: false``, else the date in the project's timezone
  (``posthog/hogql/printer`` ``_get_timezone``); ``toDateTime(s, 'UTC')`` is UTC.
  ``person_distinct_ids`` is the person model of the fake (``ph.person_of``),
  each person shown as a UUID.
- LIMIT (``posthog/hogql/printer`` visit_select_query, ``posthog/hogql/constants.py``):
  capped at ``row_cap`` (MAX_SELECT_RETURNED_ROWS, 50000; 10000 in older
  releases) silently; with an explicit LIMIT no paginator runs, so ``hasMore``,
  ``limit`` and ``offset`` are null.
- Caching (``posthog/hogql_queries/query_runner.py`` ExecutionMode,
  HogQLQueryRunner.cache_target_age): ``refresh`` "force_blocking" (or true)
  always recalculates; absent/"blocking" answers a cached result younger than
  6 h with ``is_cached: true``. The HTTP status is 202 when
  ``query_status.complete`` is false; ``GET .../query/{id}/`` answers 202 while
  running, 200 with ``query_status.results`` when done.

Switches for tests:
- ``visibility_lag``: events stored less than this ago are not yet visible
  (ingestion lag between capture and ClickHouse).
- ``serve_cached``: answer every query from the cache (``is_cached: true``),
  as a PostHog that ignored ``refresh`` would.
- ``inject(fault, times=1, **kw)``, FIFO, one fault per API request:
  ``throttle(wait)`` -> 429 as PostHog's throttles answer; ``html`` -> a 200
  ``text/html`` login page, as an auth proxy in front answers; ``status(code,
  body=None)`` -> that status with a DRF-shaped body (or ``body``). Faults
  ``canned(results, has_more=None)`` (the next query's rows replaced) and
  ``run_async(polls)`` (the next query answered 202, done after ``polls`` status
  polls) wait for the next query request.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import uuid as uuidlib
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from types import MappingProxyType
from typing import Any, Mapping, NamedTuple
from urllib.parse import parse_qs, urlsplit
from zoneinfo import ZoneInfo

from ._http import Fault, FaultQueue, RecordLog, compact_json

ORGANIZATION_ID = "01890000-0000-0000-0000-0000000000a1"
MAX_SELECT_RETURNED_ROWS = 50_000
CACHE_TARGET_AGE = timedelta(hours=6)
PAGE_SIZE = 100
FAULTS = MappingProxyType({"throttle": ("wait",), "html": (), "status": ("code",)})
QUERY_FAULTS = MappingProxyType({"canned": ("results",), "run_async": ("polls",)})
LOGIN_PAGE = (b"<!DOCTYPE html><html><head><title>Sign in</title></head><body>"
              b"<form method=post action=/oauth2/sign_in><button>Sign in with SSO</button></form></body></html>")

# The texts connector/readback.py sends, kept here apart from the client on purpose.
HOUR_COUNTS_TEXT = """
SELECT properties.$amplitude_export_hour AS export_hour, toString(toDate(timestamp)) AS event_day,
    count() AS stored, count(DISTINCT uuid) AS distinct_uuids
FROM events
WHERE toDate(timestamp) IN {days} AND timestamp <= toDateTime({until}, 'UTC')
    AND properties.analytics_source = 'amplitude' AND properties.$amplitude_export_hour IN {hours}
GROUP BY export_hour, event_day ORDER BY export_hour, event_day LIMIT 10000
"""
PERSONS_TEXT = """
SELECT distinct_id, person_id FROM person_distinct_ids WHERE distinct_id IN {distinct_ids} LIMIT 10000
"""
_HOUR = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}")
_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")
_UNTIL = re.compile(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}")
# Modifier names PostHog's HogQLQueryModifiers accepts (a subset); others are refused
# as its pydantic model (extra="forbid") refuses them.
KNOWN_MODIFIERS = frozenset({"convertToProjectTimezone", "personsOnEventsMode", "materializationMode",
                             "personsArgMaxVersion", "inCohortVia", "debug", "timings"})
DEFAULT_MODIFIERS = MappingProxyType({"convertToProjectTimezone": True,
                                      "personsOnEventsMode": "person_id_override_properties_joined",
                                      "materializationMode": "legacy_null_as_null"})
REQUEST_FIELDS = frozenset({"query", "refresh", "client_query_id", "name", "async", "filters_override",
                            "variables_override", "limit_context"})
HOGQL_FIELDS = frozenset({"kind", "query", "values", "modifiers", "filters", "variables", "name", "explain"})
REFRESH_VALUES = (True, False, None, "blocking", "force_blocking", "async", "force_async", "lazy_async",
                  "force_cache", "async_except_on_cache_miss")


def _normal(text: str) -> str:
    return " ".join(text.split())


@dataclass(frozen=True)
class _Shape:
    name: str
    text: str
    placeholders: tuple[str, ...]
    columns: tuple[str, ...]
    types: tuple[str, ...]
    limit: int


SHAPES = {_normal(s.text): s for s in (
    _Shape("hour_counts", HOUR_COUNTS_TEXT, ("days", "until", "hours"),
           ("export_hour", "event_day", "stored", "distinct_uuids"),
           ("Nullable(String)", "String", "UInt64", "UInt64"), 10_000),
    _Shape("persons", PERSONS_TEXT, ("distinct_ids",), ("distinct_id", "person_id"), ("String", "UUID"), 10_000),
)}


@dataclass(frozen=True)
class Project:
    """One project as PostHog's project serializers show it."""

    id: int
    name: str
    api_token: str
    timezone: str = "UTC"

    def as_json(self) -> dict:
        return {"id": self.id, "uuid": str(uuidlib.uuid5(uuidlib.NAMESPACE_URL, f"project/{self.id}")),
                "organization": ORGANIZATION_ID, "api_token": self.api_token, "name": self.name,
                "completed_snippet_onboarding": True, "has_completed_onboarding_for": None,
                "ingested_event": True, "is_demo": False, "timezone": self.timezone, "access_control": False}


@dataclass(frozen=True)
class QueryRecord:
    """One query request the fake understood."""

    shape: str  # "hour_counts" | "persons"
    values: Mapping[str, Any]
    modifiers: Mapping[str, Any]
    refresh: Any
    status: int


class ApiRequest(NamedTuple):
    method: str
    path: str
    status: int


class _Refused(Exception):
    def __init__(self, status: int, type_: str, code: str, detail: str, attr: str | None = None):
        self.status, self.body = status, {"type": type_, "code": code, "detail": detail, "attr": attr}
        super().__init__(detail)


def _hogql_error(detail: str) -> _Refused:
    # posthog/api/query.py: ExposedHogQLError -> ValidationError(str(e), code_name)
    return _Refused(400, "validation_error", "hogql_query_error", detail)


@dataclass
class _Async:
    polls_left: int
    answer: dict
    team_id: int
    started: str


class QueryApi:
    """PostHog's app API for one user's personal API key (see the module docstring)."""

    def __init__(self, ph, *, personal_api_key: str = "phx_fake_personal_key", project_id: int = 1,
                 project_api_key: str | None = None, project_name: str = "Default project",
                 timezone_name: str = "UTC", scopes: tuple[str, ...] = ("query:read", "project:read"),
                 scoped_teams: tuple[int, ...] | None = None, other_projects: tuple[Project, ...] = (),
                 foreign_project_ids: tuple[int, ...] = (), current_project_id: int | None = None,
                 page_size: int = PAGE_SIZE, row_cap: int = MAX_SELECT_RETURNED_ROWS):
        self.ph = ph
        self.personal_api_key = personal_api_key
        self.project = Project(project_id, project_name, project_api_key or ph.api_key, timezone_name)
        self.projects = {p.id: p for p in (self.project, *other_projects)}  # the user's projects
        self.foreign_project_ids = frozenset(foreign_project_ids)  # exist, but the user is no member
        self.current_project_id = current_project_id or project_id
        self.scopes = frozenset(scopes)
        self.scoped_teams = None if scoped_teams is None else frozenset(scoped_teams)
        self.page_size = page_size
        self.row_cap = row_cap
        self.visibility_lag = timedelta(0)
        self.serve_cached = False
        self._faults = FaultQueue(FAULTS)
        self._query_faults: deque[Fault] = deque()
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[datetime, dict]] = {}
        self._async: dict[str, _Async] = {}
        self._queries: RecordLog[QueryRecord] = RecordLog()
        self._requests: RecordLog[ApiRequest] = RecordLog()

    # ---- observations and switches ---------------------------------------------
    @property
    def queries(self) -> list[QueryRecord]:
        return self._queries.snapshot()

    @property
    def requests(self) -> list[ApiRequest]:
        return self._requests.snapshot()

    def inject(self, fault: str, times: int = 1, **kw: Any) -> None:
        """Queue ``fault`` (see the module docstring) for the next ``times`` requests."""
        if fault not in QUERY_FAULTS:
            self._faults.inject(fault, times, **kw)
            return
        missing = [k for k in QUERY_FAULTS[fault] if k not in kw]
        if missing:
            raise TypeError(f"fault {fault!r} needs {missing}")
        with self._lock:
            self._query_faults.extend(Fault(fault, kw) for _ in range(times))

    # ---- the FakePostHog.api contract --------------------------------------------
    def handle(self, method: str, path: str, headers, body: bytes) -> tuple[int, str, bytes]:
        try:
            status, content_type, reply = self._route(method, path, headers, body)
        except _Refused as refused:
            status, content_type, reply = refused.status, "application/json", compact_json(refused.body)
        self._requests.append(ApiRequest(method, path, status))
        return status, content_type, reply

    def _route(self, method: str, raw_path: str, headers, body: bytes) -> tuple[int, str, bytes]:
        fault = self._faults.pop()
        if fault is not None:
            if fault.name == "html":
                return 200, "text/html; charset=utf-8", LOGIN_PAGE
            if fault.name == "status":
                code = fault.kw["code"]
                given = fault.kw.get("body")
                if given is not None:
                    return code, "application/json", given if isinstance(given, bytes) else compact_json(given)
                raise _Refused(code, "server_error", "error", "A server error occurred.")
        self._authenticate(headers)
        if fault is not None and fault.name == "throttle":
            # DRF checks throttles after authentication (APIView.initial); PostHog's handler
            # drops DRF's Retry-After header, so the wait is only in the detail.
            wait = fault.kw["wait"]
            raise _Refused(429, "throttled_error", "throttled",
                           f"Request was throttled. Expected available in {wait} second{'s' if wait != 1 else ''}.")
        split = urlsplit(raw_path)
        path = split.path if split.path.endswith("/") else split.path + "/"  # routes take an optional slash
        if path == "/api/projects/":
            self._method(method, "GET")
            return self._ok(self._list(parse_qs(split.query), headers))
        if m := re.fullmatch(r"/api/projects/(@current|\d+)/", path):
            self._method(method, "GET")
            return self._ok(self._retrieve(m.group(1)))
        if m := re.fullmatch(r"/api/projects/(@current|\d+)/query/", path):
            self._method(method, "POST")
            return self._query(self._project_for_query(m.group(1)), body)
        if m := re.fullmatch(r"/api/projects/(@current|\d+)/query/([^/]+)/", path):
            self._method(method, "GET")
            return self._status(self._project_for_query(m.group(1)), m.group(2))
        return 404, "text/html", b"<h1>Not Found</h1>"  # Django's resolver, not DRF

    @staticmethod
    def _ok(value: dict, status: int = 200) -> tuple[int, str, bytes]:
        return status, "application/json", compact_json(value)

    @staticmethod
    def _method(method: str, allowed: str) -> None:
        if method != allowed:
            raise _Refused(405, "invalid_request", "method_not_allowed", f'Method "{method}" not allowed.')

    def _authenticate(self, headers) -> None:
        auth = headers.get("Authorization") or ""
        scheme, _, key = auth.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise _Refused(401, "authentication_error", "not_authenticated",
                           "Authentication credentials were not provided.")
        if key.strip() != self.personal_api_key:
            raise _Refused(401, "authentication_error", "authentication_failed",
                           "Personal API key found in request Authorization header is invalid.")

    def _require_scope(self, scope: str) -> None:
        write = scope.replace(":read", ":write")
        if not ({"*", scope, write} & self.scopes):
            raise _Refused(403, "authentication_error", "permission_denied",
                           f"API key missing required scope '{scope}'")

    def _check_scoped_team(self, project_id: int) -> None:
        if self.scoped_teams is not None and project_id not in self.scoped_teams:
            raise _Refused(403, "authentication_error", "permission_denied",
                           f"API key does not have access to the requested project: ID {project_id}.")

    # ---- /api/projects/ ------------------------------------------------------------
    def _list(self, query: dict, headers) -> dict:
        if self.scoped_teams is not None:
            raise _Refused(403, "authentication_error", "permission_denied",
                           "API keys with scoped projects are only supported on project-based endpoints.")
        self._require_scope("project:read")
        try:
            limit = int(query.get("limit", [self.page_size])[0])
            offset = int(query.get("offset", [0])[0])
        except ValueError:
            limit, offset = self.page_size, 0  # DRF ignores an unreadable limit/offset
        limit, offset = max(1, limit), max(0, offset)
        projects = sorted(self.projects.values(), key=lambda p: p.id)
        base = f"http://{headers.get('Host', 'testserver')}/api/projects/"
        return {
            "count": len(projects),
            "next": f"{base}?limit={limit}&offset={offset + limit}" if offset + limit < len(projects) else None,
            "previous": (None if offset == 0 else
                         f"{base}?limit={limit}" + (f"&offset={offset - limit}" if offset - limit > 0 else "")),
            "results": [p.as_json() for p in projects[offset:offset + limit]],
        }

    def _retrieve(self, lookup: str) -> dict:
        project_id = self.current_project_id if lookup == "@current" else int(lookup)
        if project_id not in self.projects:
            raise _Refused(404, "invalid_request", "not_found", "Not found.")
        self._check_scoped_team(project_id)
        self._require_scope("project:read")
        return self.projects[project_id].as_json()

    # ---- /api/projects/{id}/query/ ---------------------------------------------------
    def _project_for_query(self, lookup: str) -> Project:
        project_id = self.current_project_id if lookup == "@current" else int(lookup)
        if project_id not in self.projects and project_id not in self.foreign_project_ids:
            raise _Refused(404, "invalid_request", "not_found", "Project not found.")
        self._check_scoped_team(project_id)
        self._require_scope("query:read")
        if project_id not in self.projects:
            raise _Refused(403, "authentication_error", "permission_denied", "You don't have access to the project.")
        return self.projects[project_id]

    def _query(self, project: Project, body: bytes) -> tuple[int, str, bytes]:
        try:
            request = json.loads(body)
        except ValueError as exc:
            raise _Refused(400, "invalid_request", "parse_error", f"JSON parse error - {exc}") from None
        shape, values, modifiers, refresh = self._parse(request)
        with self._lock:
            fault = self._query_faults.popleft() if self._query_faults else None
        answer = self._answer(project, shape, values, modifiers, refresh)
        if fault is not None and fault.name == "canned":
            answer = {**answer, "results": fault.kw["results"], "hasMore": fault.kw.get("has_more")}
        status = 200
        if fault is not None and fault.name == "run_async":
            query_id = uuidlib.uuid4().hex
            started = _iso(self.ph.now())
            with self._lock:
                self._async[query_id] = _Async(fault.kw["polls"], answer, project.id, started)
            answer, status = {"query_status": self._status_json(query_id, project.id, started, False)}, 202
        self._queries.append(QueryRecord(shape.name, MappingProxyType(values), MappingProxyType(modifiers),
                                         refresh, status))
        return self._ok(answer, status)

    def _status(self, project: Project, query_id: str) -> tuple[int, str, bytes]:
        with self._lock:
            running = self._async.get(query_id)
            if running is None or running.team_id != project.id:
                raise _Refused(404, "invalid_request", "not_found", "Query not found.")
            if running.polls_left > 0:
                running.polls_left -= 1
                done = False
            else:
                done = True
        status = self._status_json(query_id, project.id, running.started, done)
        if done:
            status["results"] = running.answer
            status["end_time"] = _iso(self.ph.now())
        return self._ok({"query_status": status}, 200 if done else 202)

    @staticmethod
    def _status_json(query_id: str, team_id: int, started: str, complete: bool) -> dict:
        # posthog/schema.py QueryStatus
        return {"id": query_id, "team_id": team_id, "complete": complete, "error": False, "error_message": None,
                "query_async": True, "results": None, "start_time": started, "end_time": None,
                "expiration_time": None, "task_id": None, "pickup_time": None, "query_progress": None,
                "dashboard_id": None, "insight_id": None, "labels": None}

    def _parse(self, request: Any) -> tuple[_Shape, dict, dict, Any]:
        if not isinstance(request, dict) or not isinstance(request.get("query"), dict):
            raise _Refused(400, "validation_error", "required", "This field is required.", "query")
        unknown = set(request) - REQUEST_FIELDS
        if unknown:
            raise _Refused(400, "validation_error", "extra_forbidden", "Extra inputs are not permitted",
                           sorted(unknown)[0])
        query = request["query"]
        if query.get("kind") != "HogQLQuery":
            raise _hogql_error(f"The fake PostHog implements only HogQLQuery, not {query.get('kind')!r}")
        unknown = set(query) - HOGQL_FIELDS
        if unknown:
            raise _Refused(400, "validation_error", "extra_forbidden", "Extra inputs are not permitted",
                           f"query__{sorted(unknown)[0]}")
        text = query.get("query")
        shape = SHAPES.get(_normal(text)) if isinstance(text, str) else None
        if shape is None:
            raise _hogql_error(f"The fake PostHog does not implement this query: {str(text)[:200]}")
        values = query.get("values") or {}
        if not isinstance(values, dict):
            raise _hogql_error("values must be an object")
        for name in shape.placeholders:
            if name not in values:
                raise _hogql_error(f"Placeholder {{{name}}} is not in the query's values")
        extra = set(values) - set(shape.placeholders)
        if extra:
            raise _hogql_error(f"The fake PostHog refuses unused values: {sorted(extra)}")
        self._check_values(shape, values)
        modifiers = query.get("modifiers") or {}
        if not isinstance(modifiers, dict) or set(modifiers) - KNOWN_MODIFIERS:
            raise _Refused(400, "validation_error", "extra_forbidden", "Extra inputs are not permitted",
                           "query__modifiers")
        refresh = request.get("refresh")
        if refresh not in REFRESH_VALUES:
            raise _Refused(400, "validation_error", "invalid_input", f"Invalid refresh value {refresh!r}", "refresh")
        if refresh not in (True, False, None, "blocking", "force_blocking"):
            raise _hogql_error(f"The fake PostHog does not implement refresh={refresh!r}")
        return shape, values, modifiers, refresh

    @staticmethod
    def _check_values(shape: _Shape, values: dict) -> None:
        def strings(name: str, pattern: re.Pattern | None) -> None:
            value = values[name]
            if not (isinstance(value, list) and value and all(isinstance(v, str) for v in value)
                    and (pattern is None or all(pattern.fullmatch(v) for v in value))):
                raise _hogql_error(f"{{{name}}} must be a non-empty list of strings"
                                   + (f" like {pattern.pattern}" if pattern else ""))
        if shape.name == "hour_counts":
            strings("days", _DAY)
            strings("hours", _HOUR)
            if not (isinstance(values["until"], str) and _UNTIL.fullmatch(values["until"])):
                raise _hogql_error("{until} must be 'YYYY-MM-DD HH:MM:SS'")
        else:
            strings("distinct_ids", None)

    # ---- answering ---------------------------------------------------------------
    def _answer(self, project: Project, shape: _Shape, values: dict, modifiers: dict, refresh: Any) -> dict:
        key = hashlib.sha256(compact_json([project.id, shape.name, values, modifiers])).hexdigest()[:24]
        now = self.ph.now()
        with self._lock:
            cached = self._cache.get(key)
        fresh_enough = cached is not None and now - cached[0] < CACHE_TARGET_AGE
        if cached is not None and (self.serve_cached or (refresh in (None, False, "blocking") and fresh_enough)):
            return {**cached[1], "is_cached": True}
        rows = self._rows(project, shape, values, modifiers)[:min(shape.limit, self.row_cap)]
        answer = {
            "cache_key": f"cache_{key}", "cache_target_age": _iso(now + CACHE_TARGET_AGE),
            "calculation_trigger": None, "clickhouse": None, "columns": list(shape.columns), "error": None,
            "explain": None, "hasMore": None, "hogql": _normal(shape.text), "is_cached": False,
            "last_refresh": _iso(now), "limit": None, "metadata": None,
            "modifiers": {**DEFAULT_MODIFIERS, **modifiers}, "next_allowed_client_refresh": _iso(now + timedelta(minutes=1)),
            "offset": None, "query": None, "query_status": None, "resolved_date_range": None, "results": rows,
            "timezone": project.timezone, "timings": None,
            "types": [[c, t] for c, t in zip(shape.columns, shape.types)],
        }
        with self._lock:
            self._cache[key] = (now, answer)
        return answer

    def _rows(self, project: Project, shape: _Shape, values: dict, modifiers: dict) -> list[list]:
        if project.id != self.project.id:
            return []  # the other projects hold no events
        if shape.name == "persons":
            rows = []
            for distinct_id in dict.fromkeys(values["distinct_ids"]):
                person = self.ph.person_of(distinct_id)
                if person is not None:
                    rows.append([distinct_id, str(uuidlib.uuid5(uuidlib.NAMESPACE_URL, f"{project.id}/{person}"))])
            return rows
        zone = timezone.utc if modifiers.get("convertToProjectTimezone") is False else ZoneInfo(project.timezone)
        days, hours = set(values["days"]), set(values["hours"])
        until = datetime.strptime(values["until"], "%Y-%m-%d %H:%M:%S").replace(tzinfo=timezone.utc)
        visible_before = self.ph.now() - self.visibility_lag
        groups: dict[tuple[str, str], list] = {}
        for n, event in enumerate(self.ph.events):
            if self.visibility_lag and event.received_at > visible_before:
                continue
            day = event.timestamp.astimezone(zone).date().isoformat()
            hour = _extracted(event.properties, "$amplitude_export_hour")
            if (day not in days or event.timestamp > until or hour not in hours
                    or _extracted(event.properties, "analytics_source") != "amplitude"):
                continue
            rows = groups.setdefault((hour, day), [0, set()])
            rows[0] += 1
            rows[1].add(event.uuid or f"generated-{n}")  # PostHog gives an event without uuid its own
        return [[h, d, count, len(uuids)] for (h, d), (count, uuids) in sorted(groups.items())]


def _extracted(properties: Mapping[str, Any], name: str) -> str | None:
    """A property as HogQL reads it (legacy_null_as_null): strings as they are, other JSON as its text."""
    value = properties.get(name)
    if value is None:
        return None
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def _iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")
