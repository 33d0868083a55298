"""Running the real connector against the fakes: in-process through the CLI, or as a process."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path
from random import Random

from connector import cli

from .fakes.records import make_population

ROOT = Path(__file__).resolve().parent.parent
AMP_KEY, AMP_SECRET, PH_KEY = "amp-key-5b8e1f", "amp-secret-9c2d7a", "phc_project_4e6f3b"
START = datetime(2025, 7, 1, 10, tzinfo=timezone.utc)
HOUR = timedelta(hours=1)


def connector_env(amp, ph, state_dir: Path, **overrides: str) -> dict[str, str]:
    env = {
        "AMPLITUDE_API_KEY": AMP_KEY,
        "AMPLITUDE_SECRET_KEY": AMP_SECRET,
        "AMPLITUDE_BASE_URL": amp.base_url,
        "POSTHOG_HOST": ph.base_url,
        "POSTHOG_PROJECT_API_KEY": PH_KEY,
        "START_DATE": START.strftime("%Y-%m-%dT%H"),
        "END_DATE": (START + 3 * HOUR).strftime("%Y-%m-%dT%H"),
        "STATE_STORE_URL": str(state_dir / "state.sqlite"),
        "MAX_EVENTS_PER_SECOND": "0",
        "WORKERS": "1",
        "LOG_LEVEL": "WARNING",
    }
    env.update(overrides)
    return env


def run(args: list[str], env: dict[str, str]) -> tuple[int, str]:
    """`python -m connector ARGS` in this process; returns (exit status, stdout)."""
    out = io.StringIO()
    code = cli.main(args, env=env, out=out)
    return code, out.getvalue()


def status(env: dict[str, str]) -> dict:
    code, out = run(["status"], env)
    assert code == 0, out
    return json.loads(out)


def spawn(args: list[str], env: dict[str, str], **kw) -> subprocess.Popen:
    """The connector as a real process (its own signals, its own death)."""
    full = {"PATH": os.environ.get("PATH", "/usr/bin"), "PYTHONPATH": str(ROOT), **env}
    return subprocess.Popen([sys.executable, "-m", "connector", *args], env=full, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def populate(amp, hours: int = 3, events_per_hour: int = 200, seed: int = 7, members: int = 2,
             start: datetime = START) -> list[dict]:
    """Realistic records for `hours` hours from `start`; returns them all."""
    hour_list = [start + i * HOUR for i in range(hours)]
    records = list(make_population(Random(seed), hours * events_per_hour, hour_list))
    for hour in hour_list:
        mine = [r for r in records if r["server_upload_time"].startswith(hour.strftime("%Y-%m-%d %H"))]
        amp.add_records(hour, mine, members=members)
    return records


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str) -> tuple[int, str]:
    """(status, body) of a GET; HTTP errors are answers too."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def wait_until(predicate, timeout: float, what: str):
    """Poll a condition with a deadline (for things with no event to wait on, like a port)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def check_delivery(ph, expected: set[str]) -> None:
    """Every expected uuid arrived; duplicates are identical; no merge pair was sent more than twice."""
    received = ph.events
    assert {e.uuid for e in received} == expected, "every event arrived"
    seen: dict[str, tuple] = {}
    for e in received:
        key = (e.uuid, e.event, e.distinct_id, e.timestamp)
        assert seen.setdefault(e.uuid, key) == key, "a duplicate is identical (PostHog dedups it)"
    merges = Counter((e.distinct_id, e.properties["alias"]) for e in received if e.event == "$create_alias")
    assert merges and max(merges.values()) <= 2, "no merge pair sent more than twice"
