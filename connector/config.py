"""Configuration: `plugin.json` is the one schema, the environment holds the values.

Every setting the connector reads is an entry of `plugin.json`'s `config` array.
Its value comes from the environment variable named by the key in
UPPER_SNAKE_CASE (`amplitudeApiKey` -> `AMPLITUDE_API_KEY`); an unset or empty
variable takes the entry's default. `load_config` validates everything and
raises one `ConfigError` listing every problem, each naming its variable.
Secret values are wrapped in `Secret`, whose repr and str never show them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from importlib import resources
from typing import Any, Mapping
from urllib.parse import urlsplit

from .errors import ConfigError

REGION_HOSTS = {
    "US": "https://amplitude.com",
    "EU": "https://analytics.eu.amplitude.com",
}


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

    @property
    def env(self) -> str:
        return env_name(self.key)


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


def env_name(key: str) -> str:
    """`amplitudeApiKey` -> `AMPLITUDE_API_KEY`."""
    return re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", key).upper()


def load_schema(text: str | None = None) -> tuple[Setting, ...]:
    """The settings declared in plugin.json (the packaged copy unless `text` is given)."""
    if text is None:
        text = resources.files("connector").joinpath("plugin.json").read_text("utf-8")
    doc = json.loads(text)
    settings = []
    for entry in doc["config"]:
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
            )
        )
    return tuple(settings)


@dataclass(frozen=True)
class Config:
    """Validated settings. Hours are timezone-aware UTC datetimes on the hour."""

    amplitude_api_key: Secret
    amplitude_secret_key: Secret
    amplitude_region: str
    export_url: str
    posthog_host: str
    posthog_project_api_key: Secret
    start_hour: datetime | None
    end_hour: datetime | None
    export_delay: timedelta
    poll_interval: timedelta
    events_to_ignore: frozenset[str]
    state_path: str
    max_events_per_second: float
    export_timeout: float
    batch_size: int
    posthog_timeout: float
    health_port: int | None
    workers: int
    log_level: str

    def secret_values(self) -> tuple[str, ...]:
        """The raw secret values, for scrubbing output. Never log these."""
        return tuple(
            s.reveal()
            for s in (self.amplitude_api_key, self.amplitude_secret_key, self.posthog_project_api_key)
            if s.reveal()
        )


def truncate_to_hour(moment: datetime) -> datetime:
    return moment.astimezone(timezone.utc).replace(minute=0, second=0, microsecond=0)


def parse_hour(text: str) -> datetime:
    """`YYYY-MM-DD`, `YYYY-MM-DDTHH` or an ISO timestamp -> the UTC hour containing it.

    A timestamp without an offset is UTC. Raises ValueError on anything else.
    """
    text = text.strip()
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
        return datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=timezone.utc)
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}[T ]\d{2}", text):
        return datetime.strptime(text[:10] + "T" + text[11:], "%Y-%m-%dT%H").replace(tzinfo=timezone.utc)
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}.*", text):
        raise ValueError(text)
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return truncate_to_hour(moment)


def _check_url(value: str) -> str | None:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return "must be an absolute http:// or https:// URL"
    return None


def _number(value: str, *, minimum: float, integer: bool) -> float | int:
    number = int(value) if integer else float(value)
    if number != number or number < minimum:  # NaN fails the first test
        raise ValueError(value)
    return number


def load_config(env: Mapping[str, str], schema: tuple[Setting, ...] | None = None) -> Config:
    """Read and validate every setting from `env`; raise ConfigError listing all problems."""
    schema = schema or load_schema()
    raw: dict[str, str] = {}
    problems: list[str] = []
    for setting in schema:
        value = env.get(setting.env, "").strip()
        raw[setting.key] = value or setting.default
        if setting.required and not raw[setting.key]:
            problems.append(f"{setting.env} is required ({setting.name}) but is not set")
        elif setting.choices and raw[setting.key] and raw[setting.key] not in setting.choices:
            # Secrets have no choices, so echoing the value here is safe.
            problems.append(
                f"{setting.env} must be one of {', '.join(setting.choices)}, got {raw[setting.key]!r}"
            )

    def get(key: str) -> str:
        return raw.get(key, "")

    def number(key: str, *, minimum: float = 0, integer: bool = False, default: Any = 0) -> Any:
        try:
            return _number(get(key), minimum=minimum, integer=integer)
        except ValueError:
            kind = "a whole number" if integer else "a number"
            problems.append(f"{env_name(key)} must be {kind} >= {minimum:g}, got {get(key)!r}")
            return default

    def hour(key: str) -> datetime | None:
        if not get(key):
            return None
        try:
            return parse_hour(get(key))
        except ValueError:
            problems.append(
                f"{env_name(key)} must be YYYY-MM-DD, YYYY-MM-DDTHH or an ISO timestamp, got {get(key)!r}"
            )
            return None

    base = get("amplitudeBaseUrl")
    if base:
        error = _check_url(base)
        if error:
            problems.append(f"AMPLITUDE_BASE_URL {error}, got {base!r}")
    else:
        base = REGION_HOSTS.get(get("amplitudeRegion") or "US", REGION_HOSTS["US"])
    host = get("posthogHost")
    if host:
        error = _check_url(host)
        if error:
            problems.append(f"POSTHOG_HOST {error}, got {host!r}")

    start, end = hour("startDate"), hour("endDate")
    if start and end and end <= start:
        problems.append(
            f"END_DATE ({end:%Y-%m-%dT%H}) must be after START_DATE ({start:%Y-%m-%dT%H}): it is the first hour not imported"
        )
    delay = number("exportDelayHours", minimum=0)
    poll = number("pollIntervalMinutes", minimum=0.05)
    rate = number("maxEventsPerSecond", minimum=0)
    export_timeout = number("exportTimeoutSeconds", minimum=0.1)
    posthog_timeout = number("posthogTimeoutSeconds", minimum=0.1)
    workers = number("workers", minimum=0, integer=True)
    batch_size = number("batchSize", minimum=1, integer=True, default=1)
    port = None
    if get("healthPort"):
        port = number("healthPort", minimum=1, integer=True, default=None)
        if port is not None and port > 65535:
            problems.append(f"HEALTH_PORT must be a port number from 1 to 65535, got {get('healthPort')!r}")
    state = get("stateStoreUrl")
    if state.startswith("sqlite:///"):
        state = state[len("sqlite:///") :]  # sqlite:///rel.db is relative, sqlite:////abs.db absolute
    elif "://" in state:
        problems.append(f"STATE_STORE_URL must be a file path or sqlite:///path, got {state!r}")

    if problems:
        raise ConfigError(problems)
    return Config(
        amplitude_api_key=Secret(get("amplitudeApiKey")),
        amplitude_secret_key=Secret(get("amplitudeSecretKey")),
        amplitude_region=get("amplitudeRegion") or "US",
        export_url=base.rstrip("/") + "/api/2/export",
        posthog_host=host.rstrip("/"),
        posthog_project_api_key=Secret(get("posthogProjectApiKey")),
        start_hour=start,
        end_hour=end,
        export_delay=timedelta(hours=delay),
        poll_interval=timedelta(minutes=poll),
        events_to_ignore=frozenset(e.strip() for e in get("eventsToIgnore").split(",") if e.strip()),
        state_path=state,
        max_events_per_second=float(rate),
        export_timeout=float(export_timeout),
        batch_size=int(batch_size),
        posthog_timeout=float(posthog_timeout),
        health_port=port,
        workers=int(workers),
        log_level=get("logLevel") or "INFO",
    )
