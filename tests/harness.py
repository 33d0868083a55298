"""Running the real connector against the fakes: in-process through the CLI, or as a process."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
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
