"""connector/readback.py against the fake PostHog's query API, on real sockets."""

from __future__ import annotations

import itertools
import socket
import uuid as uuidlib
from datetime import date, datetime, timedelta, timezone

import pytest
import requests

from connector import readback
from connector.config import Secret
from connector.errors import AuthError, ConfigError, OperatorActionNeeded, RetryLater
from connector.errors import QueryUnavailable
from connector.hours import export_hour_tag
from connector.readback import HOUR_COUNTS_QUERY, PERSONS_QUERY, ROW_LIMIT, Counts, PostHogQuery
from connector.retry import Backoff
from tests.fakes._http import FakeServer, QuietHandler, RecordLog
from tests.fakes.posthog_query import Project, QueryApi

KEY = "phx_personal_0b7f4e9a2c"
H10 = datetime(2025, 7, 1, 10, tzinfo=timezone.utc)
H11 = H10 + timedelta(hours=1)
JUL1, JUN15 = date(2025, 7, 1), date(2025, 6, 15)


def imported(hour: datetime, timestamp: str, uuid: str | None = None, distinct_id: str = "user-1",
             **properties) -> dict:
    props = {"analytics_source": "amplitude", "$amplitude_export_hour": export_hour_tag(hour), **properties}
    return {"event": "pageview", "distinct_id": distinct_id, "timestamp": timestamp,
            "uuid": uuid or str(uuidlib.uuid4()), "properties": {k: v for k, v in props.items() if v is not None}}


def deliver(ph, events: list[dict]) -> None:
    reply = requests.post(f"{ph.base_url}/batch/", json={"api_key": ph.api_key, "batch": events}, timeout=10)
    assert reply.status_code == 200, reply.text


class Sleeps:
    """A `sleep` that records each wait and moves a fake monotonic clock on by it."""

    def __init__(self) -> None:
        self.waits: list[float] = []
        self.now = 1000.0

    def __call__(self, seconds: float) -> bool:
        self.waits.append(seconds)
        self.now += seconds
        return False

    def clock(self) -> float:
        return self.now


def client(ph, *, key: str = KEY, project_id: int | None = 1, host: str | None = None, sleeps: Sleeps | None = None,
           attempts: int = 4, timeout: float = 10.0) -> PostHogQuery:
    sleeps = sleeps or Sleeps()
    return PostHogQuery(
        requests.Session(), host or ph.base_url, Secret(key), project_api_key=Secret(ph.api_key),
        project_id=project_id, sleep=sleeps, backoff=Backoff(base=0.01, cap=0.01, attempts=attempts),
        timeout=timeout, clock=sleeps.clock,
    )


def install(ph, **options) -> QueryApi:
    ph.api = QueryApi(ph, **{"personal_api_key": KEY, "project_id": 1, **options})
    return ph.api


@pytest.fixture
def qa(ph):
    return install(ph)


class Scripted(FakeServer):
    """Stands in for something in front of PostHog (a proxy): every request gets one fixed answer."""

    def __init__(self, status: int, body: bytes = b"", headers: dict | None = None,
                 content_type: str = "application/json"):
        super().__init__()
        self.answer = (status, body, content_type, headers or {})
        self.seen: RecordLog[tuple[str, str, str | None]] = RecordLog()


class _ScriptedHandler(QuietHandler):
    def _answer(self) -> None:
        self.read_body(1 << 20)
        self.owner.seen.append((self.command, self.path, self.headers.get("Authorization")))
        status, body, content_type, headers = self.owner.answer
        self.send_bytes(status, body, content_type, headers)

    do_GET = do_POST = _answer


Scripted.handler_class = _ScriptedHandler


# ---- counts -------------------------------------------------------------------------

def test_counts_per_hour_and_day_are_what_posthog_stored(ph, qa):
    dup = str(uuidlib.uuid4())
    deliver(ph, [
        imported(H10, "2025-07-01T10:05:00Z", dup),
        imported(H10, "2025-07-01T10:40:00Z"),
        imported(H10, "2025-06-15T08:00:00Z"),  # a late upload
        imported(H10, "2025-06-15T09:00:00Z"),
        imported(H11, "2025-07-01T12:00:00Z"),  # at the end of its hour: still its own
        imported(datetime(2025, 7, 1, 12, tzinfo=timezone.utc), "2025-07-01T12:10:00Z"),  # an hour not asked
        imported(H10, "2025-06-20T08:00:00Z"),  # a day not asked
        imported(H10, "2025-07-01T10:07:00Z", analytics_source="segment"),  # not imported by us
        imported(H10, "2025-07-01T10:08:00Z", analytics_source=None),  # no provenance marker
        {"event": "pageview", "distinct_id": "u", "timestamp": "2025-07-01T10:09:00Z"},  # no markers at all
    ])
    deliver(ph, [imported(H10, "2025-07-01T10:05:00Z", dup)])  # delivered twice: a second row of one uuid
    counts = client(ph).hour_counts([H10, H11], [JUL1, JUN15])
    assert counts == {
        (H10, JUL1): Counts(stored=3, distinct=2),
        (H10, JUN15): Counts(stored=2, distinct=2),
        (H11, JUL1): Counts(stored=1, distinct=1),
        (H11, JUN15): Counts(stored=0, distinct=0),  # asked, and PostHog holds none
    }


def test_one_call_is_one_query_with_placeholders_utc_and_no_cache(ph, qa):
    client(ph).hour_counts([H11, H10, H10], [JUL1, JUN15])
    (query,) = qa.queries
    assert query.shape == "hour_counts" and query.refresh == "force_blocking"
    assert dict(query.values) == {"days": ["2025-06-15", "2025-07-01"], "until": "2025-07-01 12:00:00",
                                  "hours": ["2025-07-01T10", "2025-07-01T11"]}
    assert dict(query.modifiers) == {"convertToProjectTimezone": False}


def test_days_after_the_last_hour_are_not_asked_and_count_zero(ph, qa):
    deliver(ph, [imported(H10, "2025-07-01T10:05:00Z")])
    counts = client(ph).hour_counts([H10], [JUL1, date(2025, 7, 5)])
    assert counts == {(H10, JUL1): Counts(1, 1), (H10, date(2025, 7, 5)): Counts(0, 0)}
    assert qa.queries[0].values["days"] == ["2025-07-01"]
    assert client(ph).hour_counts([H10], [date(2025, 7, 5)]) == {(H10, date(2025, 7, 5)): Counts(0, 0)}
    assert len(qa.queries) == 1  # nothing to ask: no second query


def test_calls_that_could_reach_the_row_limit_are_split(ph, qa):
    hours = [datetime(2025, 7, 1, tzinfo=timezone.utc) + timedelta(hours=n) for n in range(150)]
    days = [date(2025, 7, 7) - timedelta(days=n) for n in range(100)]
    deliver(ph, [imported(hours[140], "2025-04-01T00:00:00Z"), imported(hours[3], "2025-07-01T03:30:00Z")])
    counts = client(ph).hour_counts(hours, days)
    assert len(counts) == 150 * 100
    assert {k: v for k, v in counts.items() if v != Counts(0, 0)} == {
        (hours[140], date(2025, 4, 1)): Counts(1, 1), (hours[3], JUL1): Counts(1, 1)}
    asked = [(q.values["hours"], q.values["days"]) for q in qa.queries]
    assert len(asked) > 1 and all(len(h) * len(d) < ROW_LIMIT for h, d in asked)
    pairs = [(h, d) for hs, ds in asked for h, d in itertools.product(hs, ds)]
    assert len(pairs) == len(set(pairs))  # no pair asked twice
    needed = {(export_hour_tag(h), d.isoformat()) for h in hours for d in days
              if d <= (h + timedelta(hours=1)).date()}
    assert needed <= set(pairs)
    for hs, ds in asked:  # a day after a query's last hour holds none of its events: never asked
        assert max(ds) <= (datetime.strptime(max(hs), "%Y-%m-%dT%H") + timedelta(hours=1)).date().isoformat()


def test_days_are_utc_days_in_a_project_with_another_timezone(ph):
    install(ph, timezone_name="America/Los_Angeles")
    h2 = datetime(2025, 7, 1, 2, tzinfo=timezone.utc)
    deliver(ph, [imported(h2, "2025-07-01T02:30:00Z")])  # 06-30 19:30 in Los Angeles
    counts = client(ph).hour_counts([h2], [date(2025, 6, 30), JUL1])
    assert counts == {(h2, date(2025, 6, 30)): Counts(0, 0), (h2, JUL1): Counts(1, 1)}


def test_events_posthog_has_not_ingested_yet_are_not_counted(ph, qa):
    deliver(ph, [imported(H10, "2025-07-01T10:05:00Z")])
    qa.visibility_lag = timedelta(minutes=30)
    assert client(ph).hour_counts([H10], [JUL1]) == {(H10, JUL1): Counts(0, 0)}
    qa.visibility_lag = timedelta(0)
    assert client(ph).hour_counts([H10], [JUL1]) == {(H10, JUL1): Counts(1, 1)}


@pytest.mark.parametrize("hours,days", [
    ([datetime(2025, 7, 1, 10)], [JUL1]),  # naive
    ([H10 + timedelta(minutes=5)], [JUL1]),  # not a whole hour
    ([H10], [H10]),  # a datetime is not a day
], ids=["naive hour", "part of an hour", "datetime as a day"])
def test_hours_and_days_must_be_what_they_say(ph, qa, hours, days):
    with pytest.raises(ValueError):
        client(ph).hour_counts(hours, days)
    assert qa.requests == []


# ---- the project --------------------------------------------------------------------

def test_the_project_is_found_by_its_api_token_across_pages_and_kept(ph):
    others = (Project(2, "A", "phc_a"), Project(3, "B", "phc_b"))
    qa = install(ph, project_id=7, other_projects=others, page_size=1)
    reader = client(ph, project_id=None)
    assert reader.project() == 7 and reader.project() == 7
    assert [(r.method, r.path) for r in qa.requests] == [
        ("GET", "/api/projects/"), ("GET", "/api/projects/?limit=1&offset=1"),
        ("GET", "/api/projects/?limit=1&offset=2")]
    deliver(ph, [imported(H10, "2025-07-01T10:05:00Z")])
    assert reader.hour_counts([H10], [JUL1]) == {(H10, JUL1): Counts(1, 1)}
    assert qa.requests[-1].path == "/api/projects/7/query/"


def test_a_given_project_id_needs_no_lookup(ph, qa):
    client(ph, project_id=1).hour_counts([H10], [JUL1])
    assert [r.path for r in qa.requests] == ["/api/projects/1/query/"]


def test_a_key_scoped_to_projects_finds_its_current_project(ph):
    qa = install(ph, scoped_teams=(1,))
    assert client(ph, project_id=None).project() == 1
    assert [r.status for r in qa.requests] == [403, 200]


DISCOVERY_FAILURES = [
    ("no project has the key", {"project_api_key": "phc_someone_else"}, "none of the 1 projects"),
    ("the key lacks project:read", {"scopes": ("query:read",)}, "project:read"),
    ("a scoped key whose current project is another", {
        "scoped_teams": (1,), "current_project_id": 2, "other_projects": (Project(2, "B", "phc_b"),)},
     "may not read the current project of the key's user"),
]


@pytest.mark.parametrize("name,options,says", DISCOVERY_FAILURES, ids=[d[0] for d in DISCOVERY_FAILURES])
def test_when_the_project_cannot_be_found_the_error_says_to_set_its_id(ph, name, options, says):
    install(ph, **options)
    with pytest.raises(ConfigError) as caught:
        client(ph, project_id=None).project()
    assert not isinstance(caught.value, AuthError) and caught.value.problems[0].variable == "POSTHOG_PROJECT_ID"
    assert "POSTHOG_PROJECT_ID" in str(caught.value) and says in str(caught.value)


# ---- refusals -----------------------------------------------------------------------

def test_a_wrong_personal_key_is_an_auth_error_naming_the_variable_not_the_key(ph, qa):
    wrong = "phx_wrong_4f0a9d7e11"
    with pytest.raises(AuthError) as caught:
        client(ph, key=wrong).hour_counts([H10], [JUL1])
    error = caught.value
    assert error.problems[0].variable == "POSTHOG_PERSONAL_API_KEY" and "401" in str(error)
    for text in (str(error), repr(error), repr(error.args), repr(error.problems), repr(client(ph, key=wrong))):
        assert wrong not in text and KEY not in text and ph.api_key not in text


def test_a_key_without_query_read_says_which_scope_is_missing(ph):
    install(ph, scopes=("project:read",))
    with pytest.raises(AuthError) as caught:
        client(ph).hour_counts([H10], [JUL1])
    assert caught.value.problems[0].variable == "POSTHOG_PERSONAL_API_KEY" and "query:read" in str(caught.value)


PROJECT_REFUSALS = [
    ("scoped to other projects", {"scoped_teams": (2,)}, 1),
    ("a project of an organization the user is not in", {"foreign_project_ids": (5,)}, 5),
    ("no such project", {}, 404),
]


@pytest.mark.parametrize("name,options,project_id", PROJECT_REFUSALS, ids=[p[0] for p in PROJECT_REFUSALS])
def test_a_project_the_key_may_not_read_is_a_config_error_naming_the_project_id(ph, name, options, project_id):
    install(ph, **options)
    with pytest.raises(ConfigError) as caught:
        client(ph, project_id=project_id).hour_counts([H10], [JUL1])
    assert not isinstance(caught.value, AuthError)
    assert caught.value.problems[0].variable == "POSTHOG_PROJECT_ID" and f"project {project_id} " in str(caught.value)


def test_throttling_waits_as_long_as_posthogs_detail_says(ph, qa):
    deliver(ph, [imported(H10, "2025-07-01T10:05:00Z")])
    qa.inject("throttle", times=2, wait=7)
    sleeps = Sleeps()
    assert client(ph, sleeps=sleeps).hour_counts([H10], [JUL1]) == {(H10, JUL1): Counts(1, 1)}
    assert sleeps.waits == [7.0, 7.0]


def test_a_proxys_retry_after_header_is_honoured_then_unavailable(ph):
    with Scripted(429, b'{"detail": "slow down"}', {"Retry-After": "3"}) as proxy:
        sleeps = Sleeps()
        with pytest.raises(QueryUnavailable) as caught:
            client(ph, host=proxy.base_url, sleeps=sleeps, attempts=3).hour_counts([H10], [JUL1])
    assert sleeps.waits == [3.0, 3.0] and caught.value.cause == "rate_limited"
    assert isinstance(caught.value, RetryLater) and len(proxy.seen) == 3


def test_a_server_error_is_retried(ph, qa):
    qa.inject("status", code=503)
    sleeps = Sleeps()
    assert client(ph, sleeps=sleeps).hour_counts([H10], [JUL1]) == {(H10, JUL1): Counts(0, 0)}
    assert len(sleeps.waits) == 1 and [r.status for r in qa.requests] == [503, 200]


def test_a_server_that_never_answers_times_out_as_unavailable(ph):
    with socket.socket() as silent:  # listens, so the connection is made, but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        host = f"http://127.0.0.1:{silent.getsockname()[1]}"
        with pytest.raises(QueryUnavailable) as caught:
            client(ph, host=host, attempts=1, timeout=0.3).hour_counts([H10], [JUL1])
    assert caught.value.cause == "timeout"


def test_a_refused_connection_is_unavailable_not_a_config_error(ph):
    with Scripted(200) as gone:
        host = gone.base_url
    with pytest.raises(QueryUnavailable) as caught:
        client(ph, host=host, attempts=2).hour_counts([H10], [JUL1])
    assert caught.value.cause == "connection"


def test_the_queries_limit_is_the_one_the_truncation_check_counts_against():
    assert HOUR_COUNTS_QUERY.endswith(f"LIMIT {ROW_LIMIT}") and PERSONS_QUERY.endswith(f"LIMIT {ROW_LIMIT}")


TRUNCATED = [
    ("as many rows as the LIMIT", {"results": [["2025-07-01T10", "2025-07-01", 1, 1]] * ROW_LIMIT}),
    ("hasMore", {"results": [], "has_more": True}),
]


@pytest.mark.parametrize("name,canned", TRUNCATED, ids=[t[0] for t in TRUNCATED])
def test_a_truncated_answer_is_refused(ph, qa, name, canned):
    qa.inject("canned", **canned)
    with pytest.raises(OperatorActionNeeded, match="cut at"):
        client(ph).hour_counts([H10], [JUL1])


@pytest.mark.parametrize("row", [
    ["2025-07-01T12", "2025-07-01", 1, 1],  # an hour not asked
    ["2025-07-01T10", "2025-07-01", 1, 2],  # more uuids than rows
    ["2025-07-01T10", "2025-07-01", "1", 1],  # a count as text
], ids=["hour not asked", "distinct over stored", "count as text"])
def test_a_row_that_cannot_be_right_is_refused(ph, qa, row):
    qa.inject("canned", results=[row])
    with pytest.raises(OperatorActionNeeded):
        client(ph).hour_counts([H10], [JUL1])


def test_an_html_200_is_refused_as_not_posthogs_api(ph, qa):
    qa.inject("html")
    with pytest.raises(ConfigError) as caught:
        client(ph).hour_counts([H10], [JUL1])
    assert caught.value.problems[0].variable == "POSTHOG_API_HOST" and "text/html" in str(caught.value)


def test_a_redirect_is_not_followed_and_names_where_to_point(ph, qa):
    location = f"{ph.base_url}/api/projects/1/query/"
    with Scripted(301, headers={"Location": location}) as proxy:
        with pytest.raises(ConfigError) as caught:
            client(ph, host=proxy.base_url).hour_counts([H10], [JUL1])
    assert caught.value.problems[0].variable == "POSTHOG_API_HOST"
    assert f"set POSTHOG_API_HOST to {ph.base_url}" in str(caught.value)
    assert len(proxy.seen) == 1 and qa.requests == []  # the key never went to the Location


def test_a_query_posthog_does_not_understand_is_for_an_operator(ph, qa, monkeypatch):
    monkeypatch.setattr(readback, "HOUR_COUNTS_QUERY", HOUR_COUNTS_QUERY.replace("count()", "count(*)"))
    with pytest.raises(OperatorActionNeeded) as caught:
        client(ph).hour_counts([H10], [JUL1])
    assert "400" in str(caught.value) and "does not implement this query" in str(caught.value)


def test_a_cached_answer_never_passes_for_a_fresh_count(ph, qa):
    reader = client(ph)
    reader.hour_counts([H10], [JUL1])
    qa.serve_cached = True
    with pytest.raises(OperatorActionNeeded, match="cache"):
        reader.hour_counts([H10], [JUL1])


def test_echoed_keys_are_scrubbed_from_posthogs_detail(ph):
    echo = f'{{"detail": "bad request from Bearer {KEY} for {ph.api_key}"}}'.encode()
    with Scripted(400, echo) as proxy:
        with pytest.raises(OperatorActionNeeded) as caught:
            client(ph, host=proxy.base_url).hour_counts([H10], [JUL1])
    assert KEY not in str(caught.value) and ph.api_key not in str(caught.value) and "***" in str(caught.value)
    assert proxy.seen.snapshot()[0][2] == f"Bearer {KEY}"  # it was sent, as a header only


# ---- asynchronous answers ---------------------------------------------------------------

def test_an_async_answer_is_polled_until_done(ph, qa):
    deliver(ph, [imported(H10, "2025-07-01T10:05:00Z")])
    qa.inject("run_async", polls=2)
    sleeps = Sleeps()
    assert client(ph, sleeps=sleeps).hour_counts([H10], [JUL1]) == {(H10, JUL1): Counts(1, 1)}
    assert sleeps.waits == [0.5, 1.0, 2.0]
    assert [r.status for r in qa.requests] == [202, 202, 202, 200]


def test_an_async_answer_that_never_finishes_gives_up_at_the_deadline(ph, qa):
    qa.inject("run_async", polls=10_000)
    sleeps = Sleeps()
    with pytest.raises(QueryUnavailable) as caught:
        client(ph, sleeps=sleeps, attempts=1, timeout=20).hour_counts([H10], [JUL1])
    assert caught.value.cause == "timeout" and sum(sleeps.waits) <= 20


# ---- persons ------------------------------------------------------------------------

def test_merged_ids_resolve_to_one_person_and_unknown_ids_to_none(ph, qa):
    deliver(ph, [
        {"event": "$identify", "distinct_id": "user-1", "properties": {"$anon_distinct_id": "device-1"}},
        {"event": "pageview", "distinct_id": "device-2"},
    ])
    people = client(ph).persons(["user-1", "device-1", "device-2", "never-seen", "user-1"])
    assert set(people) == {"user-1", "device-1", "device-2"}
    assert people["user-1"] == people["device-1"] != people["device-2"]


def test_many_ids_are_asked_in_chunks(ph, qa):
    deliver(ph, [{"event": "pageview", "distinct_id": f"d-{n}"} for n in range(0, 2500, 500)])
    people = client(ph).persons([f"d-{n}" for n in range(2500)])
    assert set(people) == {f"d-{n}" for n in range(0, 2500, 500)}
    assert [len(q.values["distinct_ids"]) for q in qa.queries] == [1000, 1000, 500]
