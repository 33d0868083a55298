"""Wiring: the parts of one command built from a `Config`, plus logging and signals.

Only the entry point (`cli.main`) calls `configure_logging` and installs the
`Stopper`; everything else receives its clock, sessions, store and stop event.
"""

from __future__ import annotations

import logging
import random
import signal
import sys
import threading
from datetime import datetime, timedelta, timezone
from typing import Callable, Sequence, TextIO

import requests
from pythonjsonlogger.json import JsonFormatter

from .config import Config
from .errors import Interrupted
from .export import ExportClient
from .health import Health
from .metrics import Metrics
from .sink import PostHogSink, PrintSink, RateLimiter
from .store import DryRunStore, StateStore, open_configured_store
from .sync import Syncer
from .worker import Translator, default_workers


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class ScrubbingJsonFormatter(JsonFormatter):
    """JSON lines; any configured secret that slipped into a message is masked."""

    def __init__(self, secrets: Sequence[str], *args, **kwargs):
        super().__init__(*args, **kwargs)
        # A one- or two-letter test secret would mask every such letter in the log.
        self._secrets = [s for s in secrets if len(s) >= 4]

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text


def configure_logging(level: str, secrets: Sequence[str] = (), stream: TextIO | None = None) -> None:
    """JSON lines on standard error (or `stream`), secrets masked."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(
        ScrubbingJsonFormatter(
            secrets,
            "{asctime}{levelname}{name}{message}",
            style="{",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            datefmt="%Y-%m-%dT%H:%M:%S%z",
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # urllib3 logs full URLs at DEBUG; the posthog package logs request bodies.
    for noisy in ("urllib3", "posthog"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


class Stopper:
    """SIGTERM/SIGINT: set `event` (wakes every wait) and interrupt the main thread,
    which may be blocked in a network read, so the process stops within seconds."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def install(self) -> Callable[[], None]:
        """Install the handlers; the returned function puts the previous ones back."""
        previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}
        return lambda: [signal.signal(sig, handler) for sig, handler in previous.items()]

    def _handle(self, signum: int, frame) -> None:
        first = not self.event.is_set()
        self.event.set()
        if first:
            raise Interrupted(f"received {signal.Signals(signum).name}")

    def sleep(self, seconds: float) -> bool:
        """Wait; True when stopping."""
        return self.event.wait(max(0.0, seconds))


class App:
    """The wired parts for `run` and `sync` (a dry run reads the store and prints)."""

    def __init__(self, config: Config, stopper: Stopper, *, dry_run: bool = False, out: TextIO = sys.stdout,
                 clock: Callable[[], datetime] = utcnow):
        self.config = config
        self.stopper = stopper
        self.clock = clock
        self.metrics = Metrics()
        self.health = Health(clock, max(3 * config.poll_interval, timedelta(minutes=15)))
        self.store: StateStore = (
            DryRunStore(open_configured_store(config, readonly=True)) if dry_run else open_configured_store(config)
        )
        self.metrics.watch_lease(self.store.lease_state)
        rng = random.Random()
        self.export = export_client(config, stopper.sleep, rng,
                                    on_retry=lambda cause: self.metrics.retries.labels("amplitude", cause).inc(),
                                    on_bytes=self.metrics.export_bytes.inc)
        if dry_run:
            self.sink: PostHogSink | PrintSink = PrintSink(out)
        else:
            self.sink = posthog_sink(config, stopper.sleep, rng,
                                     on_retry=lambda cause: self.metrics.retries.labels("posthog", cause).inc(),
                                     on_accepted=self.health.beat)
        workers = 1 if dry_run else (config.workers or default_workers())
        self.translator = Translator(workers, config.posthog_project_api_key.reveal(), config.batch_size)
        self.syncer = Syncer(config, self.store, self.export, self.sink, self.translator, clock=clock,
                             stop=stopper.event, metrics=self.metrics, on_progress=self.health.beat)

    def close(self) -> None:
        self.translator.close()
        self.store.close()


def export_client(config: Config, sleep: Callable[[float], bool], rng: random.Random | None = None,
                  **callbacks) -> ExportClient:
    return ExportClient(
        requests.Session(), config.export_url, config.amplitude_api_key, config.amplitude_secret_key,
        region=config.amplitude_region, sleep=sleep, rng=rng,
        timeout=(10.0, config.export_timeout.total_seconds()), **callbacks,
    )


def posthog_sink(config: Config, sleep: Callable[[float], bool], rng: random.Random | None = None,
                 **callbacks) -> PostHogSink:
    return PostHogSink(
        requests.Session(), config.posthog_host, config.posthog_project_api_key, sleep=sleep, rng=rng,
        timeout=config.posthog_timeout.total_seconds(),
        limiter=RateLimiter(config.max_events_per_second, sleep=sleep), **callbacks,
    )
