"""Configuration: `plugin.json` is the one schema, the environment holds the values.

Every setting is an entry of `plugin.json`'s `config` array, in PostHog's
plugin format (`key`, `name`, `type`, `default`, `hint`, `required`, `secret`,
`choices`), plus what PostHog's format cannot say about a value: `format`
(how to parse it) and `minimum`/`maximum`. Its value comes from the environment
variable named by the key in UPPER_SNAKE_CASE (`amplitudeApiKey` ->
`AMPLITUDE_API_KEY`); an unset or empty variable takes the entry's default.

The schema drives everything: `load_config` parses each value by its format,
wraps it in `Secret` when the entry says `secret`, and names the `Config`
field after the key (`exportDelayHours` -> `export_delay`: a duration's unit
is in its value, a `timedelta`). Every problem is collected and raised at once
in one `ConfigError`, each naming its variable.

Formats: `text` (the default), `url` (absolute http/https, no trailing slash),
`hour` (a UTC hour, see `hours.parse_hour`), `duration` with a `unit`,
`number`, `integer`, `list` (comma-separated), `store` (STATE_STORE_URL: a path,
`sqlite:///path` or `postgresql://`; its password is masked wherever it is
shown, and is one of the `secret_values`). An empty value without a default is
`None` (off) for hours and numbers.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, fields
from datetime import datetime, timedelta
from importlib import resources
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit

from .errors import ConfigError, Problem
from .hours import parse_hour
from .store_url import check_postgres, is_postgres, masked, passwords

REGION_HOSTS = {
    "US": "https://amplitude.com",
    "EU": "https://analytics.eu.amplitude.com",
}
_UNITS = {"hours": "Hours", "minutes": "Minutes", "seconds": "Seconds"}
# A rate cap that makes one request wait longer than this looks hung.
MAX_WAIT_PER_REQUEST = 600


@dataclass(frozen=True)
class Setting:
    """One entry of plugin.json's `config` array."""

    key: str
    name: str
    type: str
    default: str
    required: bool
    secret: bool
    hint: str
    choices: tuple[str, ...] = ()
    format: str = "text"
    unit: str = ""
    minimum: float | None = None
    maximum: float | None = None

    @property
    def env(self) -> str:
        return env_name(self.key)

    @property
    def field(self) -> str:
        """The `Config` attribute: snake_case of the key, without a duration's unit."""
        key = self.key
        if self.format == "duration" and key.endswith(_UNITS.get(self.unit, "\0")):
            key = key[: -len(_UNITS[self.unit])]
        return re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", key).lower()


class Secret:
    """A secret string. It shows as '***' everywhere except `.reveal()`."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __bool__(self) -> bool:
        return bool(self._value)


def env_name(key: str) -> str:
    """`amplitudeApiKey` -> `AMPLITUDE_API_KEY`."""
    return re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", key).upper()


def load_schema(text: str | None = None) -> tuple[Setting, ...]:
    """The settings declared in plugin.json (the packaged copy unless `text` is given)."""
    if text is None:
        text = resources.files("connector").joinpath("plugin.json").read_text("utf-8")
    settings = []
    for entry in json.loads(text)["config"]:
        if "key" not in entry:
            continue  # markdown-only entries document, they configure nothing
        settings.append(
            Setting(
                key=entry["key"],
                name=entry["name"],
                type=entry["type"],
                default=entry.get("default", ""),
                required=bool(entry.get("required", False)),
                secret=bool(entry.get("secret", False)),
                hint=entry.get("hint", ""),
                choices=tuple(entry.get("choices", ())),
                format=entry.get("format", "text"),
                unit=entry.get("unit", ""),
                minimum=entry.get("minimum"),
                maximum=entry.get("maximum"),
            )
        )
    return tuple(settings)


@dataclass(frozen=True)
class Config:
    """Validated settings, one field per plugin.json entry (a test keeps them in step).

    Hours are timezone-aware UTC datetimes on the hour; durations are timedeltas;
    secrets are `Secret`s.
    """

    amplitude_api_key: Secret
    amplitude_secret_key: Secret
    amplitude_region: str
    amplitude_base_url: str
    posthog_host: str
    posthog_project_api_key: Secret
    posthog_personal_api_key: Secret
    posthog_project_id: int | None
    posthog_api_host: str
    verify_grace: timedelta
    repair_attempts: int
    start_date: datetime | None
    end_date: datetime | None
    export_delay: timedelta
    poll_interval: timedelta
    events_to_ignore: frozenset[str]
    state_store_url: str = field(repr=False)  # a postgresql:// URL holds a password
    sync_name: str
    lease: timedelta
    export_timeout: timedelta
    posthog_timeout: timedelta
    max_events_per_second: float
    batch_size: int
    health_port: int | None
    health_host: str
    workers: int
    log_level: str

    @property
    def export_url(self) -> str:
        """The Export API endpoint: the base URL override, or the region's host."""
        return (self.amplitude_base_url or REGION_HOSTS[self.amplitude_region]) + "/api/2/export"

    @property
    def api_host(self) -> str:
        """Where PostHog's app and API (read-back) are served."""
        return self.posthog_api_host or self.posthog_host

    def secret_values(self) -> tuple[str, ...]:
        """The raw secret values, for scrubbing output. Never log these."""
        values = (getattr(self, f.name) for f in fields(self))
        secrets = tuple(v.reveal() for v in values if isinstance(v, Secret) and v.reveal())
        return secrets + passwords(self.state_store_url)


def _number(text: str, setting: Setting, integer: bool) -> float | int:
    value: float | int = int(text) if integer else float(text)
    if not math.isfinite(value):
        raise ValueError(text)
    if setting.minimum is not None and value < setting.minimum:
        raise ValueError(text)
    if setting.maximum is not None and value > setting.maximum:
        raise ValueError(text)
    return value


def _range(setting: Setting) -> str:
    low, high = setting.minimum, setting.maximum
    if low is not None and high is not None:
        return f" from {low:g} to {high:g}"
    return f" >= {low:g}" if low is not None else ""


def _url(text: str, setting: Setting) -> str:
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(text)
    return text.rstrip("/")


def _store(text: str, setting: Setting) -> str:
    if is_postgres(text):
        check_postgres(text)
        return text
    if text.startswith("sqlite:///") or "://" not in text:
        return text
    raise ValueError(text)


def _duration(text: str, setting: Setting) -> timedelta:
    return timedelta(**{setting.unit: _number(text, setting, integer=False)})


# format -> (parse(text, setting) -> value or ValueError, what a valid value looks like)
_PARSERS: dict[str, tuple[Callable[[str, Setting], Any], Callable[[Setting], str]]] = {
    "text": (lambda text, s: text, lambda s: "text"),
    "url": (_url, lambda s: "an absolute http:// or https:// URL"),
    "hour": (lambda text, s: parse_hour(text), lambda s: "YYYY-MM-DD, YYYY-MM-DDTHH or an ISO timestamp"),
    "duration": (_duration, lambda s: f"a number of {s.unit}{_range(s)}"),
    "number": (lambda text, s: float(_number(text, s, integer=False)), lambda s: f"a number{_range(s)}"),
    "integer": (lambda text, s: _number(text, s, integer=True), lambda s: f"a whole number{_range(s)}"),
    "list": (lambda text, s: frozenset(part.strip() for part in text.split(",") if part.strip()), lambda s: "a list"),
    "store": (_store, lambda s: "a file path, sqlite:///path or postgresql://user:password@host:5432/database"),
}
# An empty value without a default: "" for text-like formats, None (off, unset) for the others.
_EMPTY = {"text": "", "url": "", "store": "", "list": frozenset()}


def load_config(env: Mapping[str, str], schema: tuple[Setting, ...] | None = None) -> Config:
    """Read and validate every setting from `env`; raise ConfigError listing all problems."""
    schema = schema or load_schema()
    values: dict[str, Any] = {}
    problems: list[Problem] = []
    for setting in schema:
        text = env.get(setting.env, "").strip() or setting.default
        shown = "the value given" if setting.secret else repr(masked(text) if setting.format == "store" else text)
        if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
            # docker --env-file keeps quotes as part of the value, and so does --env-file here.
            problems.append(Problem(setting.env, f"{setting.env} is wrapped in quotes ({shown}): an env file keeps "
                                                 "quotes as part of the value; remove them"))
            continue
        if setting.secret and not (text.isascii() and text.isprintable() and " " not in text):
            problems.append(Problem(setting.env, f"{setting.env} holds a space or a character that is not printable "
                                                 "ASCII: keys never do; check it was copied whole"))
            continue
        if not text:
            if setting.required:
                problems.append(Problem(setting.env, f"{setting.env} is required ({setting.name}) but is not set"))
            values[setting.field] = Secret("") if setting.secret else _EMPTY.get(setting.format)
            continue
        if setting.choices and text not in setting.choices:
            # Secrets have no choices, so echoing the value here is safe.
            problems.append(Problem(setting.env, f"{setting.env} must be one of {', '.join(setting.choices)}, got {text!r}"))
            continue
        parse, expected = _PARSERS[setting.format]
        try:
            value = parse(text, setting)
        except ValueError:
            problems.append(Problem(setting.env, f"{setting.env} must be {expected(setting)}, got {shown}"))
            continue
        values[setting.field] = Secret(value) if setting.secret else value

    problems += _cross_checks(values)
    if problems:
        raise ConfigError(problems)
    return Config(**values)


def _cross_checks(values: dict[str, Any]) -> list[Problem]:
    """Rules that involve more than one value, or a value's meaning beyond its format."""
    problems = []
    start, end = values.get("start_date"), values.get("end_date")
    if start and end and end <= start:
        problems.append(Problem(
            "END_DATE",
            f"END_DATE ({end:%Y-%m-%dT%H}) must be after START_DATE ({start:%Y-%m-%dT%H}): it is the first hour not imported",
        ))
    base = values.get("amplitude_base_url")
    if isinstance(base, str) and urlsplit(base).path.rstrip("/").endswith("/api/2/export"):
        problems.append(Problem("AMPLITUDE_BASE_URL", f"AMPLITUDE_BASE_URL must be the host only: the connector adds "
                                                      f"/api/2/export itself, got {base!r}"))
    rate, batch = values.get("max_events_per_second"), values.get("batch_size")
    if rate is not None and 0 < rate < 1:
        problems.append(Problem("MAX_EVENTS_PER_SECOND",
                                f"MAX_EVENTS_PER_SECOND must be 0 (unlimited) or at least 1, got {rate:g}"))
    elif rate and batch and batch / rate > MAX_WAIT_PER_REQUEST:
        problems.append(Problem("MAX_EVENTS_PER_SECOND", (
            f"MAX_EVENTS_PER_SECOND={rate:g} with BATCH_SIZE={batch} makes every request wait {batch / rate:.0f} s "
            f"(more than {MAX_WAIT_PER_REQUEST} s): raise the rate or lower BATCH_SIZE")))
    return problems


def readme_rows(schema: tuple[Setting, ...] | None = None) -> list[str]:
    """The README's configuration table rows, generated from the schema."""
    rows = []
    for s in schema or load_schema():
        flags = ", ".join(f for f, on in (("required", s.required), ("secret", s.secret)) if on)
        default = f"`{s.default}`" if s.default else ""
        hint = s.hint + (f" Choices: {', '.join(s.choices)}." if s.choices else "")
        rows.append(f"| `{s.env}` | `{s.key}` | {default} | {flags} | {hint} |")
    return rows


def env_example(schema: tuple[Setting, ...] | None = None) -> str:
    """`.env.example`, generated from the schema: every variable, secrets blank."""
    lines = ["# Every variable the connector reads, from plugin.json. Copy to .env and fill in.",
             "# Secrets are blank on purpose; empty values take the defaults shown."]
    for s in schema or load_schema():
        flags = "".join(f" ({f})" for f, on in (("required", s.required), ("secret", s.secret)) if on)
        lines.append(f"# {s.name}{flags}: {s.hint}")
        lines.append(f"{s.env}={'' if s.secret else s.default}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # python -m connector.config: print what the README and .env.example hold
    print("\n".join(readme_rows()))
    print()
    print(env_example(), end="")
