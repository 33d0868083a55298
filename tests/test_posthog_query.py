"""The fake PostHog's query API behaves as PostHog's source says (tests/fakes/posthog_query.py).

Requests are made by hand here, so these tests pin the fake itself; the
client's own tests are in test_readback.py.
"""

from __future__ import annotations

import json
import uuid as uuidlib
from datetime import datetime, timedelta, timezone

import pytest
import requests

from connector.readback import HOUR_COUNTS_QUERY, MODIFIERS, PERSONS_QUERY
from tests.fakes.posthog_query import LOGIN_PAGE, Project, QueryApi

KEY = "phx_fake_personal_key_7d1c"
H10 = "2025-07-01T10"


def imported(hour: str, timestamp: str, uuid: str | None = None, distinct_id: str = "user-1",
             **properties) -> dict:
    props = {"analytics_source": "amplitude", "$amplitude_export_hour": hour, **properties}
    return {"event": "pageview", "distinct_id": distinct_id, "timestamp": timestamp,
            "uuid": uuid or str(uuidlib.uuid4()), "properties": {k: v for k, v in props.items() if v is not None}}


def deliver(ph, events: list[dict]) -> None:
    reply = requests.post(f"{ph.base_url}/batch/", json={"api_key": ph.api_key, "batch": events}, timeout=10)
    assert reply.status_code == 200, reply.text


def api(ph, method: str, path: str, *, key: str | None = KEY, body=None) -> requests.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return requests.request(method, ph.base_url + path, headers=headers, timeout=10,
                            data=None if body is None else json.dumps(body))


def counts_body(hours, days, until, *, modifiers=MODIFIERS, refresh="force_blocking", text=HOUR_COUNTS_QUERY,
                **extra) -> dict:
    query = {"kind": "HogQLQuery", "query": text, "values": {"days": days, "until": until, "hours": hours}}
    if modifiers is not None:
        query["modifiers"] = modifiers
    return {"query": query, **({"refresh": refresh} if refresh is not None else {}), **extra}


def count(ph, hours=(H10,), days=("2025-07-01",), until="2025-07-01 11:00:00", **kw) -> requests.Response:
    return api(ph, "POST", "/api/projects/1/query/", body=counts_body(list(hours), list(days), until, **kw))


@pytest.fixture
def qa(ph):
    ph.api = QueryApi(ph, personal_api_key=KEY, project_id=1, project_api_key=ph.api_key)
    return ph.api


# ---- projects -----------------------------------------------------------------------

def test_the_project_list_is_drf_limit_offset_paginated_with_api_tokens(ph):
    others = (Project(2, "Staging", "phc_staging"), Project(3, "Web", "phc_web", "Europe/Berlin"))
    ph.api = QueryApi(ph, personal_api_key=KEY, project_id=1, other_projects=others, page_size=2)
    first = api(ph, "GET", "/api/projects/").json()
    assert first["count"] == 3 and first["previous"] is None
    assert first["next"] == f"{ph.base_url}/api/projects/?limit=2&offset=2"
    assert [(p["id"], p["api_token"], p["timezone"]) for p in first["results"]] == [
        (1, ph.api_key, "UTC"), (2, "phc_staging", "UTC")]
    assert {"id", "uuid", "organization", "api_token", "name", "timezone"} <= set(first["results"][0])
    second = api(ph, "GET", "/api/projects/?limit=2&offset=2").json()
    assert [p["id"] for p in second["results"]] == [3] and second["next"] is None
    assert second["previous"] == f"{ph.base_url}/api/projects/?limit=2"


def test_current_project_is_the_users_last_selected_not_the_keys(ph):
    ph.api = QueryApi(ph, personal_api_key=KEY, project_id=1, other_projects=(Project(2, "Staging", "phc_s"),),
                      current_project_id=2)
    assert api(ph, "GET", "/api/projects/@current/").json()["id"] == 2
    assert api(ph, "GET", "/api/projects/1/").json()["api_token"] == ph.api_key


REFUSALS = [
    # (name, QueryApi options, method, path, key, status, code, detail)
    ("no key", {}, "GET", "/api/projects/", None, 401, "not_authenticated",
     "Authentication credentials were not provided."),
    ("wrong key", {}, "POST", "/api/projects/1/query/", "phx_wrong", 401, "authentication_failed",
     "Personal API key found in request Authorization header is invalid."),
    ("no query:read", {"scopes": ("project:read",)}, "POST", "/api/projects/1/query/", KEY, 403,
     "permission_denied", "API key missing required scope 'query:read'"),
    ("no project:read", {"scopes": ("query:read",)}, "GET", "/api/projects/", KEY, 403,
     "permission_denied", "API key missing required scope 'project:read'"),
    ("scoped key lists projects", {"scoped_teams": (1,)}, "GET", "/api/projects/", KEY, 403, "permission_denied",
     "API keys with scoped projects are only supported on project-based endpoints."),
    ("scoped to another project", {"scoped_teams": (2,), "other_projects": (Project(2, "B", "phc_b"),)},
     "POST", "/api/projects/1/query/", KEY, 403, "permission_denied",
     "API key does not have access to the requested project: ID 1."),
    ("scoped check before scope check", {"scoped_teams": (2,), "scopes": ()}, "POST",
     "/api/projects/1/query/", KEY, 403, "permission_denied",
     "API key does not have access to the requested project: ID 1."),
    ("not a member", {"foreign_project_ids": (5,)}, "POST", "/api/projects/5/query/", KEY, 403,
     "permission_denied", "You don't have access to the project."),
    ("no such project", {}, "POST", "/api/projects/404/query/", KEY, 404, "not_found", "Project not found."),
]


@pytest.mark.parametrize("name,options,method,path,key,status,code,detail", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_refusals_are_drf_bodies_as_posthog_sends_them(ph, name, options, method, path, key, status, code, detail):
    ph.api = QueryApi(ph, personal_api_key=KEY, project_id=1, **options)
    reply = api(ph, method, path, key=key, body=counts_body([H10], ["2025-07-01"], "2025-07-01 11:00:00"))
    assert (reply.status_code, reply.headers["Content-Type"]) == (status, "application/json")
    assert reply.json() == {"type": "authentication_error" if status in (401, 403) else "invalid_request",
                            "code": code, "detail": detail, "attr": None}


@pytest.mark.parametrize("scopes", [("query:write",), ("*",)], ids=["write implies read", "star"])
def test_broader_scopes_satisfy_query_read(ph, scopes):
    ph.api = QueryApi(ph, personal_api_key=KEY, project_id=1, scopes=scopes)
    assert count(ph).status_code == 200


# ---- counts -------------------------------------------------------------------------

def test_counts_follow_clickhouse_semantics_on_the_stored_rows(ph, qa):
    dup = str(uuidlib.uuid4())
    deliver(ph, [
        imported(H10, "2025-07-01T10:05:00Z", dup),
        imported(H10, "2025-07-01T10:06:00Z"),
        imported(H10, "2025-06-15T08:00:00Z"),  # a late upload: another event day
        imported(H10, "2025-07-01T11:00:00Z"),  # exactly at the hour's end: still in
        imported("2025-07-01T11", "2025-07-01T10:59:00Z"),  # another export hour
        imported(H10, "2025-06-20T08:00:00Z"),  # a day not asked
        imported(H10, "2025-07-01T10:07:00Z", analytics_source="segment"),
        imported(H10, "2025-07-01T10:08:00Z", analytics_source=None),
        imported(H10, "2025-07-01T11:00:01Z"),  # after {until}
        {"event": "pageview", "distinct_id": "u", "timestamp": "2025-07-01T10:09:00Z"},  # no markers
    ])
    deliver(ph, [imported(H10, "2025-07-01T10:05:00Z", dup)])  # the same uuid again: a second row
    reply = count(ph, days=("2025-07-01", "2025-06-15"))
    assert reply.status_code == 200
    assert reply.json()["results"] == [[H10, "2025-06-15", 1, 1], [H10, "2025-07-01", 4, 3]]


def test_an_answer_carries_posthogs_response_fields(ph, qa):
    deliver(ph, [imported(H10, "2025-07-01T10:05:00Z")])
    body = count(ph).json()
    assert body["columns"] == ["export_hour", "event_day", "stored", "distinct_uuids"]
    assert body["types"] == [["export_hour", "Nullable(String)"], ["event_day", "String"],
                             ["stored", "UInt64"], ["distinct_uuids", "UInt64"]]
    # an explicit LIMIT runs no paginator: hasMore, limit and offset are null
    assert (body["hasMore"], body["limit"], body["offset"], body["is_cached"]) == (None, None, None, False)
    assert body["modifiers"]["convertToProjectTimezone"] is False and body["timezone"] == "UTC"
    assert body["cache_key"].startswith("cache_") and body["query_status"] is None


def test_days_are_utc_only_when_the_query_turns_off_project_timezone_conversion(ph):
    ph.api = QueryApi(ph, personal_api_key=KEY, project_id=1, timezone_name="America/Los_Angeles")
    deliver(ph, [imported("2025-07-01T02", "2025-07-01T02:30:00Z")])
    days = ("2025-06-30", "2025-07-01")
    utc = count(ph, hours=("2025-07-01T02",), days=days, until="2025-07-01 03:00:00").json()
    local = count(ph, hours=("2025-07-01T02",), days=days, until="2025-07-01 03:00:00", modifiers=None).json()
    assert utc["results"] == [["2025-07-01T02", "2025-07-01", 1, 1]]
    assert local["results"] == [["2025-07-01T02", "2025-06-30", 1, 1]]
    assert local["modifiers"]["convertToProjectTimezone"] is True and local["timezone"] == "America/Los_Angeles"


def test_limit_is_capped_at_the_deployments_max_rows_silently(ph):
    ph.api = QueryApi(ph, personal_api_key=KEY, project_id=1, row_cap=2)
    deliver(ph, [imported(f"2025-07-01T{h:02}", f"2025-07-01T{h:02}:10:00Z") for h in (10, 11, 12)])
    body = count(ph, hours=("2025-07-01T10", "2025-07-01T11", "2025-07-01T12"), until="2025-07-01 13:00:00").json()
    assert [r[0] for r in body["results"]] == ["2025-07-01T10", "2025-07-01T11"] and body["hasMore"] is None


DRIFTS = [
    ("a changed text", {"text": HOUR_COUNTS_QUERY.replace("count()", "count(*)")}, "does not implement this query"),
    ("a value missing", {"values": {"days": ["2025-07-01"], "hours": [H10]}}, "Placeholder {until}"),
    ("an unused value", {"values": {"days": ["2025-07-01"], "hours": [H10], "until": "2025-07-01 11:00:00",
                                    "limit": 5}}, "unused values"),
    ("an hour in another format", {"values": {"days": ["2025-07-01"], "hours": ["2025-07-01 10"],
                                              "until": "2025-07-01 11:00:00"}}, "{hours} must be"),
    ("an empty list", {"values": {"days": [], "hours": [H10], "until": "2025-07-01 11:00:00"}}, "{days} must be"),
    ("another kind", {"kind": "EventsQuery"}, "only HogQLQuery"),
]


@pytest.mark.parametrize("name,change,detail", DRIFTS, ids=[d[0] for d in DRIFTS])
def test_a_query_the_fake_does_not_know_is_a_400_hogql_error(ph, qa, name, change, detail):
    body = counts_body([H10], ["2025-07-01"], "2025-07-01 11:00:00")
    if "text" in change:
        body["query"]["query"] = change["text"]
    else:
        body["query"].update(change)
    reply = api(ph, "POST", "/api/projects/1/query/", body=body)
    assert reply.status_code == 400
    assert reply.json()["type"] == "validation_error" and detail in reply.json()["detail"]
    assert qa.queries == []


@pytest.mark.parametrize("field,where", [({"tags": {}}, "tags"), ({"modifiers": {"bogus": 1}}, "query__modifiers")],
                         ids=["unknown request field", "unknown modifier"])
def test_unknown_fields_are_refused_as_pydantic_refuses_them(ph, qa, field, where):
    body = counts_body([H10], ["2025-07-01"], "2025-07-01 11:00:00")
    if "modifiers" in field:
        body["query"].update(field)
    else:
        body.update(field)
    reply = api(ph, "POST", "/api/projects/1/query/", body=body)
    assert reply.status_code == 400 and reply.json()["attr"] == where


# ---- caching, lag and faults -----------------------------------------------------------

def test_a_repeated_query_is_answered_from_the_cache_unless_forced(ph, qa):
    deliver(ph, [imported(H10, "2025-07-01T10:05:00Z")])
    assert count(ph, refresh=None).json()["results"][0][2] == 1
    deliver(ph, [imported(H10, "2025-07-01T10:06:00Z")])
    cached = count(ph, refresh=None).json()
    assert (cached["is_cached"], cached["results"][0][2]) == (True, 1)
    forced = count(ph).json()
    assert (forced["is_cached"], forced["results"][0][2]) == (False, 2)
    qa.serve_cached = True
    assert count(ph).json()["is_cached"] is True


def test_events_inside_the_visibility_lag_are_not_counted_yet(ph, qa):
    deliver(ph, [imported(H10, "2025-07-01T10:05:00Z")])
    qa.visibility_lag = timedelta(hours=1)
    assert count(ph).json()["results"] == []
    qa.visibility_lag = timedelta(0)
    assert count(ph).json()["results"] == [[H10, "2025-07-01", 1, 1]]


def test_throttling_says_its_wait_only_in_the_detail_then_serves(ph, qa):
    qa.inject("throttle", times=2, wait=7)
    replies = [count(ph) for _ in range(3)]
    assert [r.status_code for r in replies] == [429, 429, 200]
    assert replies[0].json() == {"type": "throttled_error", "code": "throttled", "attr": None,
                                 "detail": "Request was throttled. Expected available in 7 seconds."}
    assert "Retry-After" not in replies[0].headers


def test_a_throttled_request_is_still_authenticated_first(ph, qa):
    qa.inject("throttle", wait=7)
    assert api(ph, "POST", "/api/projects/1/query/", key="phx_wrong", body={}).status_code == 401


def test_html_and_status_faults(ph, qa):
    qa.inject("html")
    qa.inject("status", code=503)
    page = count(ph)
    assert (page.status_code, page.headers["Content-Type"], page.content) == (200, "text/html; charset=utf-8",
                                                                              LOGIN_PAGE)
    assert count(ph).status_code == 503
    assert count(ph).status_code == 200


def test_an_async_query_is_202_then_polled_to_its_results(ph, qa):
    deliver(ph, [imported(H10, "2025-07-01T10:05:00Z")])
    qa.inject("run_async", polls=1)
    started = count(ph)
    assert started.status_code == 202
    status = started.json()["query_status"]
    assert status["complete"] is False and status["team_id"] == 1
    path = f"/api/projects/1/query/{status['id']}/"
    running = api(ph, "GET", path)
    assert (running.status_code, running.json()["query_status"]["complete"]) == (202, False)
    done = api(ph, "GET", path)
    assert done.status_code == 200 and done.json()["query_status"]["complete"] is True
    assert done.json()["query_status"]["results"]["results"] == [[H10, "2025-07-01", 1, 1]]
    assert api(ph, "GET", "/api/projects/1/query/nope/").status_code == 404


def test_a_canned_answer_replaces_the_rows_of_the_next_query_only(ph, qa):
    qa.inject("canned", results=[["x"]], has_more=True)
    assert api(ph, "GET", "/api/projects/1/").status_code == 200  # not a query: the fault waits
    canned = count(ph).json()
    assert (canned["results"], canned["hasMore"]) == ([["x"]], True)
    assert count(ph).json()["results"] == []


# ---- persons ------------------------------------------------------------------------

def test_person_distinct_ids_follow_the_fakes_merges(ph, qa):
    deliver(ph, [
        {"event": "$identify", "distinct_id": "user-1", "properties": {"$anon_distinct_id": "device-1"}},
        {"event": "pageview", "distinct_id": "device-2"},
    ])
    body = {"query": {"kind": "HogQLQuery", "query": PERSONS_QUERY,
                      "values": {"distinct_ids": ["user-1", "device-1", "device-2", "never-seen"]}},
            "refresh": "force_blocking"}
    reply = api(ph, "POST", "/api/projects/1/query/", body=body).json()
    people = dict(reply["results"])
    assert set(people) == {"user-1", "device-1", "device-2"}
    assert people["user-1"] == people["device-1"] != people["device-2"]
    assert all(uuidlib.UUID(p) for p in people.values())
    assert reply["columns"] == ["distinct_id", "person_id"]


def test_other_routes_and_methods(ph, qa):
    assert api(ph, "GET", "/api/projects/1/query/").status_code == 405
    assert api(ph, "GET", "/api/unknown/").headers["Content-Type"] == "text/html"
    assert api(ph, "GET", "/api/unknown/").status_code == 404
    assert [r.status for r in qa.requests] == [405, 404, 404]


def test_a_query_of_another_visible_project_counts_no_events(ph):
    ph.api = QueryApi(ph, personal_api_key=KEY, project_id=1, other_projects=(Project(2, "B", "phc_b"),))
    deliver(ph, [imported(H10, "2025-07-01T10:05:00Z")])
    body = counts_body([H10], ["2025-07-01"], "2025-07-01 11:00:00")
    assert api(ph, "POST", "/api/projects/2/query/", body=body).json()["results"] == []
    assert api(ph, "POST", "/api/projects/1/query/", body=body).json()["results"] == [[H10, "2025-07-01", 1, 1]]


def test_stored_timestamps_decide_the_day_not_the_sent_text(ph, qa):
    # an offset timestamp is stored as its UTC instant: 2025-07-01T01:30+02:00 is 06-30 23:30 UTC
    deliver(ph, [imported("2025-06-30T23", "2025-07-01T01:30:00+02:00")])
    reply = count(ph, hours=("2025-06-30T23",), days=("2025-06-30", "2025-07-01"), until="2025-07-01 00:00:00")
    assert reply.json()["results"] == [["2025-06-30T23", "2025-06-30", 1, 1]]
    assert ph.events[0].timestamp == datetime(2025, 6, 30, 23, 30, tzinfo=timezone.utc)
