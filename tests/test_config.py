"""Configuration: plugin.json is the one schema; every problem is reported at once."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from connector.config import REGION_HOSTS, env_name, load_config, load_schema
from connector.hours import parse_hour
from connector.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
SECRETS = {"AMPLITUDE_API_KEY": "amp-key-7f3a9", "AMPLITUDE_SECRET_KEY": "amp-secret-b21c4", "POSTHOG_PROJECT_API_KEY": "phc_secret_98d1"}
VALID = {**SECRETS, "POSTHOG_HOST": "https://posthog.example.com"}


def test_packaged_schema_is_the_top_level_plugin_json():
    top = json.loads((ROOT / "plugin.json").read_text())
    keys = [e["key"] for e in top["config"] if "key" in e]
    assert [s.key for s in load_schema()] == keys
    for field in ("name", "description", "url", "posthogVersion", "config"):
        assert field in top


def test_plugin_json_entries_use_posthogs_plugin_format():
    for entry in json.loads((ROOT / "plugin.json").read_text())["config"]:
        if "key" not in entry:
            assert "markdown" in entry
            continue
        assert entry["type"] in ("string", "choice", "json")
        assert isinstance(entry["default"], str)
        assert {"name", "hint", "required", "secret"} <= entry.keys()
        if entry["type"] == "choice":
            assert entry["default"] in entry["choices"]


def test_required_names_from_the_issue_exist():
    keys = {s.key: s for s in load_schema()}
    for key in ("amplitudeApiKey", "amplitudeSecretKey", "posthogProjectApiKey"):
        assert keys[key].secret and keys[key].required
    for key in ("amplitudeRegion", "amplitudeBaseUrl", "posthogHost", "startDate", "endDate", "exportDelayHours",
                "pollIntervalMinutes", "eventsToIgnore", "stateStoreUrl", "maxEventsPerSecond", "healthPort"):
        assert key in keys
    assert keys["eventsToIgnore"].default == "session_start,session_end"


def test_env_names_are_upper_snake_case_of_keys():
    assert env_name("amplitudeApiKey") == "AMPLITUDE_API_KEY"
    assert env_name("posthogHost") == "POSTHOG_HOST"
    assert env_name("exportDelayHours") == "EXPORT_DELAY_HOURS"


def test_defaults_apply_and_region_picks_the_host():
    config = load_config(VALID)
    assert config.export_url == "https://amplitude.com/api/2/export"
    assert config.export_delay == timedelta(hours=3)
    assert config.events_to_ignore == {"session_start", "session_end"}
    assert config.start_date is None and config.end_date is None
    assert load_config({**VALID, "AMPLITUDE_REGION": "EU"}).export_url == REGION_HOSTS["EU"] + "/api/2/export"
    assert load_config({**VALID, "AMPLITUDE_BASE_URL": "http://127.0.0.1:9/"}).export_url == "http://127.0.0.1:9/api/2/export"


@pytest.mark.parametrize(
    "text, hour",
    [("2025-07-01", datetime(2025, 7, 1, tzinfo=timezone.utc)),
     ("2025-07-01T05", datetime(2025, 7, 1, 5, tzinfo=timezone.utc)),
     ("2025-07-01T05:59:59", datetime(2025, 7, 1, 5, tzinfo=timezone.utc)),
     ("2025-07-01T05:30:00+02:00", datetime(2025, 7, 1, 3, tzinfo=timezone.utc)),
     ("2025-07-01T05:30:00Z", datetime(2025, 7, 1, 5, tzinfo=timezone.utc))],
)
def test_dates_are_utc_hours(text, hour):
    assert parse_hour(text) == hour


# Each: (variable, bad value) -> the message names the variable.
BAD = [
    ("AMPLITUDE_API_KEY", ""),
    ("AMPLITUDE_SECRET_KEY", ""),
    ("POSTHOG_PROJECT_API_KEY", ""),
    ("POSTHOG_HOST", ""),
    ("POSTHOG_HOST", "posthog.example.com"),
    ("AMPLITUDE_BASE_URL", "127.0.0.1:8080"),
    ("AMPLITUDE_REGION", "APAC"),
    ("START_DATE", "2025-13-01"),
    ("START_DATE", "yesterday"),
    ("END_DATE", "2025/07/01"),
    ("EXPORT_DELAY_HOURS", "two"),
    ("EXPORT_DELAY_HOURS", "-1"),
    ("POLL_INTERVAL_MINUTES", "often"),
    ("MAX_EVENTS_PER_SECOND", "fast"),
    ("HEALTH_PORT", "99999"),
    ("HEALTH_PORT", "http"),
    ("WORKERS", "1.5"),
    ("LOG_LEVEL", "LOUD"),
    ("STATE_STORE_URL", "redis://localhost"),
]


@pytest.mark.parametrize("variable, value", BAD, ids=[f"{v}={x!r}" for v, x in BAD])
def test_each_bad_variable_is_named_and_exits_2(variable, value):
    env = {**VALID, variable: value}
    with pytest.raises(ConfigError) as info:
        load_config(env)
    assert any(problem.variable == variable and variable in problem.text for problem in info.value.problems)
    result = subprocess.run([sys.executable, "-m", "connector", "sync"], env={**env, "PATH": "/usr/bin"},
                            capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 2
    assert variable in result.stderr
    for secret in SECRETS.values():
        assert secret not in result.stderr + result.stdout


def test_end_before_start_is_refused():
    with pytest.raises(ConfigError) as info:
        load_config({**VALID, "START_DATE": "2025-07-02", "END_DATE": "2025-07-01"})
    assert "END_DATE" in str(info.value) and "START_DATE" in str(info.value)


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as info:
        load_config({"AMPLITUDE_REGION": "XX", "EXPORT_DELAY_HOURS": "x", "START_DATE": "nope"})
    text = "\n".join(p.text for p in info.value.problems)
    for variable in ("AMPLITUDE_API_KEY", "AMPLITUDE_SECRET_KEY", "POSTHOG_HOST", "POSTHOG_PROJECT_API_KEY",
                     "AMPLITUDE_REGION", "EXPORT_DELAY_HOURS", "START_DATE"):
        assert variable in text
    assert len(info.value.problems) == 7


def test_secrets_never_show_in_reprs():
    config = load_config(VALID)
    text = repr(config) + str(config)
    for secret in SECRETS.values():
        assert secret not in text
    assert config.amplitude_api_key.reveal() == SECRETS["AMPLITUDE_API_KEY"]


def test_readme_configuration_table_matches_plugin_json():
    readme = (ROOT / "README.md").read_text()
    rows = {}
    for line in readme.splitlines():
        match = re.match(r"\|\s*`([A-Z_]+)`\s*\|\s*`(\w+)`\s*\|([^|]*)\|([^|]*)\|", line)
        if match:
            rows[match.group(2)] = (match.group(1), match.group(3).strip(), match.group(4).strip())
    schema = load_schema()
    assert set(rows) == {s.key for s in schema}, "README table and plugin.json list different settings"
    for s in schema:
        env, default, flags = rows[s.key]
        assert env == s.env
        assert default == (f"`{s.default}`" if s.default else "")
        assert ("secret" in flags) == s.secret and ("required" in flags) == s.required


def test_env_example_lists_every_variable_with_secrets_blank():
    lines = dict(
        line.split("=", 1) for line in (ROOT / ".env.example").read_text().splitlines()
        if line and not line.startswith("#")
    )
    schema = load_schema()
    assert set(lines) == {s.env for s in schema}
    for s in schema:
        if s.secret:
            assert lines[s.env] == ""


def test_config_has_one_field_per_plugin_json_entry():
    from dataclasses import fields

    from connector.config import Config

    assert [f.name for f in fields(Config)] == [s.field for s in load_schema()]


def test_the_schema_decides_secrecy_and_types():
    from connector.config import Secret

    config = load_config({**VALID, "EXPORT_DELAY_HOURS": "2.5", "HEALTH_PORT": "8123", "EVENTS_TO_IGNORE": "a, b,,"})
    for s in load_schema():
        value = getattr(config, s.field)
        assert isinstance(value, Secret) == s.secret, s.key
    assert set(config.secret_values()) == set(SECRETS.values())
    assert config.export_delay == timedelta(hours=2.5)
    assert config.health_port == 8123 and config.events_to_ignore == {"a", "b"}
    assert load_config(VALID).health_port is None


def test_a_setting_marked_secret_in_the_schema_is_masked_without_code_changes():
    from connector.config import Secret

    schema = json.loads((ROOT / "plugin.json").read_text())
    for entry in schema["config"]:
        if entry.get("key") == "amplitudeBaseUrl":
            entry["secret"] = True
    config = load_config({**VALID, "AMPLITUDE_BASE_URL": "https://user:pw-123@proxy.example.com"},
                         load_schema(json.dumps(schema)))
    assert isinstance(config.amplitude_base_url, Secret)
    assert "pw-123" not in repr(config)
    assert "https://user:pw-123@proxy.example.com" in config.secret_values()


def test_readme_table_and_env_example_are_exactly_what_the_schema_generates():
    from connector.config import env_example, readme_rows

    readme = (ROOT / "README.md").read_text().splitlines()
    assert [line for line in readme if re.match(r"\| `[A-Z_]+` \| `\w+` \|", line)] == readme_rows(), (
        "regenerate with: python -m connector.config")
    assert (ROOT / ".env.example").read_text() == env_example()


# Values users get wrong in an env file: each named, exit 2, never a traceback.
CARELESS = [
    ("double quotes kept by the env file", "POSTHOG_HOST", '"https://posthog.example.com"', "quotes"),
    ("single quotes kept by the env file", "START_DATE", "'2025-07-01'", "quotes"),
    ("quotes around a secret, not echoed", "AMPLITUDE_SECRET_KEY", '"s3cret-value"', "quotes"),
    ("infinite number", "EXPORT_DELAY_HOURS", "inf", "EXPORT_DELAY_HOURS"),
    ("not a number", "POLL_INTERVAL_MINUTES", "nan", "POLL_INTERVAL_MINUTES"),
    ("a rate cap below one event a second", "MAX_EVENTS_PER_SECOND", "0.001", "at least 1"),
    ("a rate cap that makes each request wait", "MAX_EVENTS_PER_SECOND", "2", "wait"),
    ("a non-ASCII character in a key", "POSTHOG_PROJECT_API_KEY", "phc_kéy", "ASCII"),
    ("a space inside a key", "AMPLITUDE_API_KEY", "amp key", "ASCII"),
    ("the export path in the base URL", "AMPLITUDE_BASE_URL", "https://amplitude.com/api/2/export", "host only"),
    ("a port out of range", "HEALTH_PORT", "70000", "HEALTH_PORT"),
]


@pytest.mark.parametrize("name, variable, value, words", CARELESS, ids=[c[0] for c in CARELESS])
def test_values_users_get_wrong_are_named_clearly(name, variable, value, words):
    with pytest.raises(ConfigError) as info:
        load_config({**VALID, variable: value})
    [problem] = [p for p in info.value.problems if p.variable == variable]
    assert words in problem.text
    if variable in SECRETS or "KEY" in variable:
        assert value.strip('"') not in problem.text
