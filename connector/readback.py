"""Reading back what PostHog holds: a client of PostHog's query API (HogQL).

`PostHogQuery` asks `POST {api_host}/api/projects/{id}/query/` with a personal
API key (`Authorization: Bearer phx_...`, scope `query:read`):

- `project()`: the project id. POSTHOG_PROJECT_ID when set; otherwise the
  project whose `api_token` is the project API key, from `GET /api/projects/`
  (DRF LimitOffsetPagination, 100 a page, `next` followed on our own host;
  needs `project:read`). A key scoped to projects cannot list them (PostHog
  answers 403 "API keys with scoped projects are only supported on
  project-based endpoints"), so then `GET /api/projects/@current/` is tried.
- `hour_counts(hours, days)`: per (export hour, event day), how many rows
  PostHog's events table holds for imported events (`count()`, duplicates of a
  uuid included until PostHog merges them) and how many distinct uuids
  (`count(DISTINCT uuid)`). One query per call (`HOUR_COUNTS_QUERY`), split
  only when hours x days could reach `ROW_LIMIT` rows.
- `persons(distinct_ids)`: distinct_id -> PostHog person id, from
  `person_distinct_ids` (the latest, non-deleted mapping, so merges show),
  1000 ids a query (`PERSONS_QUERY`).

Every query is sent with `"refresh": "force_blocking"` (always recalculated:
an identical query may otherwise be answered from a cache up to 6 h old) and
`"modifiers": {"convertToProjectTimezone": false}`, so `timestamp` and
`toDate(timestamp)` are UTC whatever the project's timezone; wrapping the
column in `toTimeZone(timestamp, 'UTC')` would do the same but hide
`toDate(timestamp)`, the events table's sorting key, from ClickHouse's index.
Values go in as HogQL placeholders (`{name}` + `values`), never into the text.
An answer that says it came from the cache, or that it converted to a non-UTC
project timezone anyway, is refused.

What PostHog's answers mean (each attempt; `retry.retrying` repeats the
transient ones with backoff):

| answer                                         | meaning                                                  |
|------------------------------------------------|----------------------------------------------------------|
| 200 with the query API's JSON                  | the results (refused if truncated, cached or malformed)  |
| 202 `query_status.complete: false`             | computed asynchronously: polled until done, within `timeout` |
| 200 that is not JSON (a login page, a proxy)   | `ConfigError`: POSTHOG_API_HOST is not PostHog's API      |
| 3xx                                            | not followed (the key would go along): `ConfigError` naming the Location for POSTHOG_API_HOST |
| 400 (a HogQL error)                            | `OperatorActionNeeded` with PostHog's detail: the query is not understood (PostHog version?) |
| 401                                            | `AuthError`: POSTHOG_PERSONAL_API_KEY is wrong            |
| 403 missing scope                              | `AuthError`: the key needs `query:read` (or set POSTHOG_PROJECT_ID instead of `project:read`) |
| 403 / 404 for the project                      | `ConfigError`: POSTHOG_PROJECT_ID names no project this key may read |
| 404 that is not PostHog's JSON                 | `ConfigError`: POSTHOG_API_HOST serves no PostHog API     |
| 429, 5xx, timeouts, refused connections        | `QueryUnavailable`: retry (Retry-After, else the wait in PostHog's detail) |

PostHog's 429 carries its wait only in the detail text ("Expected available in
N seconds."): its exception handler (drf-exceptions-hog, wrapped by
posthog/exceptions.py) builds the response without DRF's Retry-After header.
A Retry-After set by a proxy in front wins.

Secrets never appear in messages: errors are built from names, statuses and
PostHog's detail text, with both keys scrubbed out of anything echoed.
"""

from __future__ import annotations

import json
import random
import re
import time
from dataclasses import dataclass
from datetime import date, datetime, timezone
from typing import Any, Callable, Iterator, Mapping, Sequence
from urllib.parse import parse_qs, urlencode, urljoin, urlsplit

import requests

from .deadline import DeadlineExceeded, install, whole_request
from .config import Secret
from .errors import AuthError, ConfigError, Interrupted, OperatorActionNeeded, Problem, QueryUnavailable, RetryLater
from .redact import Redactor
from .hours import HOUR, export_hour_tag, floor_hour
from .retry import Backoff, retry_after_seconds, retrying

# Rows one query may return. PostHog caps every LIMIT at MAX_SELECT_RETURNED_ROWS
# (posthog/hogql/constants.py: 50000; 10000 in older releases), silently. At
# 10000 the cap never cuts below our LIMIT, so an answer of ROW_LIMIT rows can
# only mean "there were more": calls are split to need at most ROW_LIMIT - 1.
ROW_LIMIT = 10_000
PERSONS_PER_QUERY = 1_000
PROJECTS_PAGE = 100  # DRF's PAGE_SIZE in posthog/settings/web.py, when `next` names no limit
MAX_PROJECT_PAGES = 1_000
MAX_ANSWER_BYTES = 64 * 1024 * 1024
CONNECT_TIMEOUT = 10.0
USER_AGENT = "amplitude-posthog-connector readback"

PERSONAL_KEY_VAR = "POSTHOG_PERSONAL_API_KEY"
PROJECT_ID_VAR = "POSTHOG_PROJECT_ID"
API_HOST_VAR = "POSTHOG_API_HOST"

# The two query texts, sent verbatim. The fake PostHog matches them strictly
# (tests/fakes/posthog_query.py keeps its own copy), so any change here must be
# made there too, on purpose.
HOUR_COUNTS_QUERY = """\
SELECT
    properties.$amplitude_export_hour AS export_hour,
    toString(toDate(timestamp)) AS event_day,
    count() AS stored,
    count(DISTINCT uuid) AS distinct_uuids
FROM events
WHERE toDate(timestamp) IN {days}
    AND timestamp <= toDateTime({until}, 'UTC')
    AND properties.analytics_source = 'amplitude'
    AND properties.$amplitude_export_hour IN {hours}
GROUP BY export_hour, event_day
ORDER BY export_hour, event_day
LIMIT 10000"""
HOUR_COUNTS_COLUMNS = ["export_hour", "event_day", "stored", "distinct_uuids"]

PERSONS_QUERY = """\
SELECT distinct_id, person_id
FROM person_distinct_ids
WHERE distinct_id IN {distinct_ids}
LIMIT 10000"""
PERSONS_COLUMNS = ["distinct_id", "person_id"]

MODIFIERS = {"convertToProjectTimezone": False}

_THROTTLE_WAIT = re.compile(r"Expected available in (\d+(?:\.\d+)?) seconds?")
_MISSING_SCOPE = re.compile(r"missing required scope '([a-z_]+:[a-z]+)'")


@dataclass(frozen=True)
class Counts:
    """What PostHog holds for one (export hour, event day).

    `stored` counts rows, so two deliveries of one uuid count twice until
    PostHog merges them; `distinct` counts uuids.
    """

    stored: int
    distinct: int


@dataclass(frozen=True)
class _Answer:
    status: int
    headers: Mapping[str, str]
    content: bytes




class PostHogQuery:
    """Reads counts and persons back from one PostHog project. Not thread-safe.

    `sleep(seconds)` waits and returns True when the process is stopping;
    `clock()` is monotonic seconds; `timeout` bounds each request, body and
    polling included, in seconds.
    """

    def __init__(
        self,
        session: requests.Session,
        api_host: str,
        personal_api_key: Secret,
        *,
        project_api_key: Secret,
        project_id: int | None = None,
        sleep: Callable[[float], bool],
        rng: random.Random | None = None,
        backoff: Backoff = Backoff(base=1.0, cap=60.0, attempts=6),
        timeout: float = 120.0,
        clock: Callable[[], float] = time.monotonic,
        on_retry: Callable[[str], None] = lambda cause: None,
    ):
        self._session = install(session)
        self._host = api_host.rstrip("/")
        self._redact = Redactor([personal_api_key.reveal(), project_api_key.reveal()])
        self._personal_key = personal_api_key
        self._project_key = project_api_key
        self._project_id = project_id
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._backoff = backoff
        self._timeout = timeout
        self._clock = clock
        self._on_retry = on_retry

    def __repr__(self) -> str:
        return f"PostHogQuery(api_host={self._host!r}, project_id={self._project_id!r})"

    # -- the project ---------------------------------------------------------

    def project(self) -> int:
        """The project id: POSTHOG_PROJECT_ID, else found by the project API key (then kept)."""
        if self._project_id is None:
            self._project_id = self._discover()
        return self._project_id

    def _discover(self) -> int:
        token = self._project_key.reveal()
        try:
            projects = self._list_projects()
        except _ScopedKey:
            current = self._get("/api/projects/@current/", "the current project", where="current")
            if current.get("api_token") == token and _is_id(current.get("id")):
                return current["id"]
            raise ConfigError([Problem(PROJECT_ID_VAR, (
                f"the personal API key ({PERSONAL_KEY_VAR}) is scoped to projects, so PostHog does not list them, "
                f"and its current project is not the one of POSTHOG_PROJECT_API_KEY: set {PROJECT_ID_VAR} to the "
                "project's id (the number after /project/ in PostHog's URLs)"))]) from None
        for item in projects:
            if item.get("api_token") == token:
                return item["id"]
        raise ConfigError([Problem(PROJECT_ID_VAR, (
            f"none of the {len(projects)} projects the personal API key ({PERSONAL_KEY_VAR}) can read has the "
            f"project API key POSTHOG_PROJECT_API_KEY: set {PROJECT_ID_VAR} to the project's id (the number after "
            "/project/ in PostHog's URLs), or use a key of a user of that project"))])

    def _list_projects(self) -> list[dict]:
        projects: list[dict] = []
        query: dict[str, str] = {}  # the first page at PostHog's own page size
        for _ in range(MAX_PROJECT_PAGES):
            path = "/api/projects/" + (f"?{urlencode(query)}" if query else "")
            page = self._get(path, "the project list", where="list")
            results = page.get("results")
            if not isinstance(results, list) or not all(
                isinstance(p, dict) and _is_id(p.get("id")) and isinstance(p.get("api_token"), str) for p in results
            ):
                raise OperatorActionNeeded(
                    "PostHog's project list is not the expected {count, next, results: [{id, api_token, ...}]}: "
                    f"check that {API_HOST_VAR} is PostHog's app, and its version")
            projects.extend(results)
            follow = _next_page(page.get("next"), query)
            if follow is None:
                return projects
            query = follow
        raise OperatorActionNeeded(f"PostHog's project list did not end after {MAX_PROJECT_PAGES} pages")

    def _get(self, path: str, what: str, *, where: str) -> dict:
        return retrying(
            lambda: self._attempt("GET", path, None, where=where),
            backoff=self._backoff, sleep=self._sleep, rng=self._rng,
            what=f"reading {what} from PostHog", on_retry=self._on_retry,
        )

    def probe(self, hour: datetime) -> dict:
        """For `check`: find the project and run the read-back query once (for `hour`)."""
        result: dict = {"url": self._host}
        try:
            result["project_id"] = self.project()
            self.hour_counts([hour], [hour.date()])
        except (ConfigError, OperatorActionNeeded, RetryLater) as exc:
            return {**result, "ok": False, "error": str(exc)}
        return {**result, "ok": True}

    # -- counts --------------------------------------------------------------

    def hour_counts(self, hours: Sequence[datetime], days: Sequence[date]) -> dict[tuple[datetime, date], Counts]:
        """What PostHog holds of each (export hour, event day) asked: every pair is in the
        answer, with zero counts where PostHog has nothing. Hours are UTC-aware, whole hours."""
        hours_ = sorted({_whole_hour(h) for h in hours})
        days_ = sorted({_day(d) for d in days})
        counts = {(h, d): Counts(0, 0) for h in hours_ for d in days_}
        for chunk, chunk_days in _chunks(hours_, days_, ROW_LIMIT - 1):
            values = {
                "days": [d.isoformat() for d in chunk_days],
                "until": (chunk[-1] + HOUR).strftime("%Y-%m-%d %H:%M:%S"),
                "hours": [export_hour_tag(h) for h in chunk],
            }
            what = f"PostHog hour counts {export_hour_tag(chunk[0])}..{export_hour_tag(chunk[-1])}"
            rows = self._query(HOUR_COUNTS_QUERY, values, HOUR_COUNTS_COLUMNS, what)
            wanted_hours, wanted_days = set(chunk), set(chunk_days)
            seen: set[tuple[datetime, date]] = set()
            for row in rows:
                key, value = _count_row(row, what)
                if key[0] not in wanted_hours or key[1] not in wanted_days or key in seen:
                    raise OperatorActionNeeded(f"{what}: PostHog answered a row that was not asked for: {row!r:.200}")
                seen.add(key)
                counts[key] = value
        return counts

    # -- persons -------------------------------------------------------------

    def persons(self, distinct_ids: Sequence[str]) -> dict[str, str]:
        """distinct_id -> PostHog's person id, for the ids PostHog knows (absent otherwise)."""
        ids = list(dict.fromkeys(distinct_ids))
        found: dict[str, str] = {}
        for start in range(0, len(ids), PERSONS_PER_QUERY):
            chunk = ids[start:start + PERSONS_PER_QUERY]
            what = f"PostHog persons of {len(chunk)} distinct ids"
            rows = self._query(PERSONS_QUERY, {"distinct_ids": chunk}, PERSONS_COLUMNS, what)
            wanted = set(chunk)
            for row in rows:
                if not (isinstance(row, list) and len(row) == 2 and all(isinstance(v, str) for v in row)):
                    raise OperatorActionNeeded(f"{what}: PostHog answered a row that is not [distinct_id, person_id]")
                distinct_id, person_id = row
                if distinct_id not in wanted or distinct_id in found:
                    raise OperatorActionNeeded(f"{what}: PostHog answered a distinct id that was not asked for")
                found[distinct_id] = person_id
        return found

    # -- one query -----------------------------------------------------------

    def _query(self, text: str, values: dict, columns: list[str], what: str) -> list:
        project = self.project()
        body = json.dumps({
            "query": {"kind": "HogQLQuery", "query": text, "values": values, "modifiers": MODIFIERS},
            "refresh": "force_blocking",
        }).encode()
        answer = retrying(
            lambda: self._run(project, body),
            backoff=self._backoff, sleep=self._sleep, rng=self._rng, what=what, on_retry=self._on_retry,
        )
        return _results(answer, columns, what)

    def _run(self, project: int, body: bytes) -> dict:
        """POST the query; poll while PostHog computes it asynchronously (202). One attempt."""
        deadline = self._clock() + self._timeout
        path = f"/api/projects/{project}/query/"
        answer = self._attempt("POST", path, body, where="query", deadline=deadline)
        status = answer.get("query_status")
        wait = 0.5
        while isinstance(status, dict) and status.get("complete") is False:
            query_id = status.get("id")
            if not isinstance(query_id, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,100}", query_id):
                raise OperatorActionNeeded("PostHog answered 202 without a usable query_status.id")
            if self._clock() + wait >= deadline:
                raise QueryUnavailable(f"PostHog did not finish the query within {self._timeout:g} s", cause="timeout")
            if self._sleep(wait):
                raise Interrupted("stopping while PostHog computes a query")
            wait = min(wait * 2, 5.0)
            polled = self._attempt("GET", f"{path}{query_id}/", None, where="poll", deadline=deadline)
            status = polled.get("query_status")
            if isinstance(status, dict) and status.get("complete") is True:
                answer = status.get("results")
                if not isinstance(answer, dict):
                    raise OperatorActionNeeded("PostHog's finished query_status holds no results object")
                break
        return answer

    # -- one request ---------------------------------------------------------

    def _attempt(self, method: str, path: str, body: bytes | None, *, where: str,
                 deadline: float | None = None) -> dict:
        """One request: the JSON object of a 200/202, or the error its answer means."""
        answer = self._exchange(method, path, body, deadline if deadline is not None else self._clock() + self._timeout)
        if answer.status in (200, 202):
            return self._json_object(answer)
        raise self._refusal(answer, where)

    def _exchange(self, method: str, path: str, body: bytes | None, deadline: float) -> _Answer:
        remaining = deadline - self._clock()
        if remaining <= 0:
            raise QueryUnavailable(f"PostHog did not answer within {self._timeout:g} s", cause="timeout")
        headers = {
            "Authorization": f"Bearer {self._personal_key.reveal()}",
            "Accept": "application/json",
            "User-Agent": USER_AGENT,
        }
        if body is not None:
            headers["Content-Type"] = "application/json"
        try:
            # Redirects are never followed: requests would resend the key to wherever
            # the Location points. The whole exchange, body included, has one deadline.
            with whole_request(remaining):
                response = self._session.request(
                    method, self._host + path, data=body, headers=headers, allow_redirects=False, stream=True,
                    timeout=(min(CONNECT_TIMEOUT, remaining), remaining),
                )
                with response:
                    content = bytearray()
                    for piece in response.iter_content(chunk_size=1 << 16):
                        content += piece
                        if len(content) > MAX_ANSWER_BYTES:
                            raise QueryUnavailable(f"PostHog's answer is over {MAX_ANSWER_BYTES} bytes",
                                                   cause="bad_answer")
                    return _Answer(response.status_code, response.headers, bytes(content))
        except DeadlineExceeded:
            raise QueryUnavailable(f"PostHog's API at {self._host} gave no complete answer within "
                                   f"{self._timeout:g} s", cause="timeout") from None
        except requests.Timeout:
            raise QueryUnavailable(f"PostHog's API at {self._host} did not answer in time", cause="timeout") from None
        except requests.RequestException as exc:
            raise QueryUnavailable(f"cannot reach PostHog's API at {self._host} ({type(exc).__name__})",
                                   cause="connection") from None

    def _json_object(self, answer: _Answer) -> dict:
        content_type = answer.headers.get("Content-Type", "")
        parsed: Any = None
        if "json" in content_type.lower():
            try:
                parsed = json.loads(answer.content)
            except ValueError:
                parsed = None
        if not isinstance(parsed, dict):
            raise ConfigError([Problem(API_HOST_VAR, (
                f"{self._host} answered {answer.status} with {content_type or 'no content type'} "
                f"({len(answer.content)} bytes), not the JSON of PostHog's API (a login page or a proxy?): set "
                f"{API_HOST_VAR} to PostHog's own address (http://web:8000 inside a hobby deployment)"))])
        return parsed

    def _refusal(self, answer: _Answer, where: str) -> Exception:
        """The exception for a non-2xx answer (see the table in the module docstring)."""
        status = answer.status
        body = _json_or_none(answer)
        detail = self._scrub(_detail(body))
        said = f": {detail}" if detail else ""
        if 300 <= status < 400:
            return ConfigError([Problem(API_HOST_VAR, self._redirect_text(answer))])
        if status == 401:
            return AuthError([Problem(PERSONAL_KEY_VAR, (
                f"PostHog refused the personal API key (401{said}): check {PERSONAL_KEY_VAR}, a personal API key "
                "(phx_...) from PostHog's Settings > Personal API keys, not the project key"))])
        if status == 429:
            retry_after = retry_after_seconds(answer.headers.get("Retry-After"))
            match = _THROTTLE_WAIT.search(detail)
            if retry_after is None and match:
                retry_after = float(match.group(1))
            return QueryUnavailable(f"PostHog's query API is rate limited (429{said})", retry_after, cause="rate_limited")
        if status >= 500:
            return QueryUnavailable(f"PostHog's API answered {status}{said}",
                                    retry_after_seconds(answer.headers.get("Retry-After")), cause="server_error")
        if status == 403:
            return self._forbidden(detail, where)
        if status == 404:
            if body is None or "detail" not in body:
                return ConfigError([Problem(API_HOST_VAR, (
                    f"{self._host} answered 404 for PostHog's API: set {API_HOST_VAR} to PostHog's app/API address "
                    "(on hobby, http://web:8000 or the proxy; capture on :3000 serves no /api/)"))])
            return ConfigError([Problem(PROJECT_ID_VAR, (
                f"PostHog found no {self._project_text()} for this personal API key (404{said}): "
                f"set {PROJECT_ID_VAR} to the id of the project POSTHOG_PROJECT_API_KEY belongs to"))])
        if status == 400:
            return OperatorActionNeeded(
                f"PostHog did not understand the connector's query (400{said}). The connector was written for "
                "PostHog's HogQL query API of 2024 and later: check PostHog's version")
        return OperatorActionNeeded(f"PostHog's API answered {status}{said}")

    def _forbidden(self, detail: str, where: str) -> Exception:
        scope = _MISSING_SCOPE.search(detail)
        if "scoped projects are only supported on project-based endpoints" in detail and where == "list":
            return _ScopedKey()
        if scope and scope.group(1) == "project:read":
            return ConfigError([Problem(PROJECT_ID_VAR, (
                f"the personal API key ({PERSONAL_KEY_VAR}) lacks the scope project:read, so the project cannot be "
                f"found from POSTHOG_PROJECT_API_KEY: set {PROJECT_ID_VAR} to the project's id (the number after "
                "/project/ in PostHog's URLs), or give the key project:read"))])
        if scope:
            return AuthError([Problem(PERSONAL_KEY_VAR, (
                f"the personal API key ({PERSONAL_KEY_VAR}) lacks the scope {scope.group(1)} (403): create a key "
                f"with {scope.group(1)}"))])
        if any(phrase in detail for phrase in (
                "access to the requested project", "access to the project", "access to the requested organization")):
            return ConfigError([Problem(PROJECT_ID_VAR, (
                f"the personal API key may not read the {self._project_text()} (403: {detail}): check "
                f"{PROJECT_ID_VAR}, or use a key of a member of that project that is not scoped away from it"))])
        return AuthError([Problem(PERSONAL_KEY_VAR, (
            f"PostHog refused the personal API key (403{': ' + detail if detail else ''}): check "
            f"{PERSONAL_KEY_VAR} and {PROJECT_ID_VAR}"))])

    def _project_text(self) -> str:
        return f"project {self._project_id}" if self._project_id is not None else "current project of the key's user"

    def _redirect_text(self, answer: _Answer) -> str:
        location = answer.headers.get("Location", "")
        target = urlsplit(urljoin(self._host + "/", location))
        prefix = target.path.split("/api/", 1)[0] if "/api/" in target.path else ""
        suggestion = f"{target.scheme}://{target.netloc}{prefix}" if target.scheme and target.netloc else ""
        fix = f"set {API_HOST_VAR} to {suggestion}" if suggestion else f"set {API_HOST_VAR} to PostHog's API address"
        return (f"{self._host} answered {answer.status} redirecting elsewhere; the connector does not follow "
                f"redirects (the personal API key would go along): {fix}")

    def _scrub(self, text: Any) -> str:
        """PostHog's detail text, safe to show: no key, one line, at most 300 characters."""
        if not isinstance(text, str):
            return ""
        return " ".join(self._redact(text).split())[:300]


class _ScopedKey(Exception):
    """The key is scoped to projects and may not list them."""


def _detail(body: dict | None) -> Any:
    """PostHog's error text: DRF's `detail`, or a failed async query's `error_message`."""
    if not isinstance(body, dict):
        return None
    status = body.get("query_status")
    if "detail" not in body and isinstance(status, dict):
        return status.get("error_message")
    return body.get("detail")


def _json_or_none(answer: _Answer) -> dict | None:
    try:
        parsed = json.loads(answer.content)
    except ValueError:
        return None
    return parsed if isinstance(parsed, dict) else None


def _results(answer: dict, columns: list[str], what: str) -> list:
    """The rows of a query answer, or the reason they cannot be trusted."""
    results = answer.get("results")
    if not isinstance(results, list):
        raise OperatorActionNeeded(f"{what}: PostHog's answer has no results list")
    if answer.get("hasMore") or len(results) >= ROW_LIMIT:
        raise OperatorActionNeeded(
            f"{what}: PostHog's answer was cut at {len(results)} rows (hasMore={answer.get('hasMore')!r}); "
            "the counts would be short")
    if answer.get("columns") is not None and answer.get("columns") != columns:
        raise OperatorActionNeeded(f"{what}: PostHog answered columns {answer.get('columns')!r:.200}, not {columns}")
    if answer.get("is_cached"):
        raise OperatorActionNeeded(
            f"{what}: PostHog answered from its cache although the connector asked for a fresh count "
            "(refresh=force_blocking); this PostHog ignores `refresh`: check its version")
    modifiers = answer.get("modifiers")
    project_zone = answer.get("timezone")
    if (isinstance(modifiers, dict) and modifiers.get("convertToProjectTimezone") is not False
            and project_zone not in (None, "UTC")):
        raise OperatorActionNeeded(
            f"{what}: PostHog ignored convertToProjectTimezone=false and counted days in {project_zone!r:.40}; "
            "check PostHog's version")
    return results


def _count_row(row: Any, what: str) -> tuple[tuple[datetime, date], Counts]:
    if not (isinstance(row, list) and len(row) == 4 and all(isinstance(v, str) for v in row[:2])
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in row[2:])
            and row[3] <= row[2]):
        raise OperatorActionNeeded(f"{what}: PostHog answered a row that is not [hour, day, count, distinct]: {row!r:.200}")
    try:
        hour = datetime.strptime(row[0], "%Y-%m-%dT%H").replace(tzinfo=timezone.utc)
        day = date.fromisoformat(row[1])
    except ValueError:
        raise OperatorActionNeeded(f"{what}: PostHog answered an unreadable hour or day: {row!r:.200}") from None
    return (hour, day), Counts(stored=row[2], distinct=row[3])


def _chunks(hours: list[datetime], days: list[date], capacity: int) -> Iterator[tuple[list[datetime], list[date]]]:
    """Consecutive runs of hours, each with the days it can have events on, at most
    `capacity` (hour, day) pairs a run. A day after an hour's end holds none of its
    events (their timestamps are never later), so such days are left out."""
    def days_of(run: list[datetime]) -> list[date]:
        end = (run[-1] + HOUR).date()
        return [d for d in days if d <= end]

    run: list[datetime] = []
    for hour in hours:
        if run and (len(run) + 1) * len(days_of(run + [hour])) > capacity:
            yield from _split_days(run, days_of(run), capacity)
            run = []
        run.append(hour)
    if run:
        yield from _split_days(run, days_of(run), capacity)


def _split_days(run: list[datetime], days: list[date], capacity: int) -> Iterator[tuple[list[datetime], list[date]]]:
    per = max(1, capacity // len(run))  # a lone hour with over `capacity` days gets its days in parts
    for start in range(0, len(days), per):
        yield run, days[start:start + per]


def _next_page(link: Any, current: dict[str, str]) -> dict[str, str] | None:
    """The `limit`/`offset` of DRF's `next` link, to ask on our own host (the link's host is
    whatever PostHog thinks it is called, and the key must not go anywhere else)."""
    if not isinstance(link, str) or not link:
        return None
    query = parse_qs(urlsplit(link).query)
    try:
        offset = int(query["offset"][0])
        limit = int(query.get("limit", [str(PROJECTS_PAGE)])[0])
    except (KeyError, ValueError):
        raise OperatorActionNeeded("PostHog's project list has a `next` link without an offset") from None
    if offset <= int(current.get("offset", "0")):
        raise OperatorActionNeeded("PostHog's project list `next` link does not move forward")
    return {"limit": str(limit), "offset": str(offset)}


def _whole_hour(hour: datetime) -> datetime:
    if not isinstance(hour, datetime) or hour.tzinfo is None or floor_hour(hour) != hour:
        raise ValueError(f"not a timezone-aware whole hour: {hour!r}")
    return hour.astimezone(timezone.utc)


def _day(day: date) -> date:
    if isinstance(day, datetime) or not isinstance(day, date):
        raise ValueError(f"not a date: {day!r}")
    return day


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0
