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
from typing import Callable, TextIO

import requests
from pythonjsonlogger.json import JsonFormatter

from .clock import ServerClock
from .config import Config
from .errors import Interrupted
from .export import ExportClient, export_dir, remove_leftovers
from .health import Health
from .metrics import Metrics
from .readback import PostHogQuery
from .redact import Redactor
from .verify import Verifier
from .sink import PostHogSink, PrintSink, RateLimiter
from .store import DryRunStore, StateStore, open_configured_store
from .sync import Syncer
from .worker import Translator, default_workers


log = logging.getLogger("connector")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class ScrubbingJsonFormatter(JsonFormatter):
    """JSON lines; any configured secret that slipped into a message is masked, in any encoding."""

    def __init__(self, redact: Redactor, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._redact = redact

    def format(self, record: logging.LogRecord) -> str:
        return self._redact(super().format(record))


def redactor(config: Config) -> Redactor:
    """Masks every secret of `config`, and the Amplitude keys as the HTTP Basic pair they travel as."""
    pair = (config.amplitude_api_key.reveal(), config.amplitude_secret_key.reveal())
    return Redactor(config.secret_values(), [pair])


def configure_logging(level: str, redact: Redactor = Redactor(), stream: TextIO | None = None) -> None:
    """JSON lines on standard error (or `stream`), secrets masked."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(
        ScrubbingJsonFormatter(
            redact,
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
    """The wired parts for `run` and `sync` (a dry run reads the store and prints).

    The hour plan runs on `ServerClock`, fed by the `Date` of every answer from
    Amplitude and PostHog; health is judged by this machine's own clock.
    """

    def __init__(self, config: Config, stopper: Stopper, *, dry_run: bool = False, out: TextIO = sys.stdout,
                 clock: Callable[[], datetime] = utcnow, tmp_dir: str | None = None):
        self.config = config
        self.stopper = stopper
        self.local_clock = clock
        self.clock = ServerClock(clock)
        self.metrics = Metrics()
        self.health = Health(clock, max(3 * config.poll_interval, timedelta(minutes=15)))
        self.store: StateStore = (
            DryRunStore(open_configured_store(config, readonly=True)) if dry_run else open_configured_store(config)
        )
        self.tmp_dir = export_dir(tmp_dir)
        left = remove_leftovers(self.tmp_dir)
        if left:
            log.info("removed downloads left by an earlier run", extra={"files": len(left), "dir": self.tmp_dir})
        self.metrics.watch_lease(self.store.lease_state)
        rng = random.Random()
        self.export = export_client(config, stopper.sleep, rng, tmp_dir=self.tmp_dir,
                                    on_retry=lambda cause: self.metrics.retries.labels("amplitude", cause).inc(),
                                    on_bytes=self.metrics.export_bytes.inc,
                                    on_date=lambda served_at: self._observe("amplitude", served_at))
        if dry_run:
            self.sink: PostHogSink | PrintSink = PrintSink(out)
        else:
            self.sink = posthog_sink(config, stopper.sleep, rng,
                                     on_retry=lambda cause: self.metrics.retries.labels("posthog", cause).inc(),
                                     on_accepted=self.health.beat,
                                     on_date=lambda served_at: self._observe("posthog", served_at))
        workers = 1 if dry_run else (config.workers or default_workers())
        self.translator = Translator(workers, config.posthog_project_api_key.reveal(), config.batch_size)
        self.syncer = Syncer(config, self.store, self.export, self.sink, self.translator, clock=self.clock,
                             stop=stopper.event, metrics=self.metrics, on_progress=self.health.beat)
        self.verifier = verifier(config, self.store, self.clock, stopper.sleep) if not dry_run else None

    def _observe(self, server: str, served_at: datetime) -> None:
        self.clock.observe(server, served_at)
        self.metrics.clock_skew.labels(server).set(self.clock.skews()[server])

    def close(self) -> None:
        self.translator.close()
        self.store.close()


def export_client(config: Config, sleep: Callable[[float], bool], rng: random.Random | None = None,
                  tmp_dir: str | None = None, **callbacks) -> ExportClient:
    return ExportClient(
        requests.Session(), config.export_url, config.amplitude_api_key, config.amplitude_secret_key,
        region=config.amplitude_region, sleep=sleep, rng=rng, tmp_dir=tmp_dir,
        timeout=(10.0, config.export_timeout.total_seconds()), **callbacks,
    )


def posthog_sink(config: Config, sleep: Callable[[float], bool], rng: random.Random | None = None,
                 **callbacks) -> PostHogSink:
    return PostHogSink(
        requests.Session(), config.posthog_host, config.posthog_project_api_key, sleep=sleep, rng=rng,
        timeout=config.posthog_timeout.total_seconds(),
        limiter=RateLimiter(config.max_events_per_second, sleep=sleep), **callbacks,
    )


def verifier(config: Config, store: StateStore, clock: Callable[[], datetime],
             sleep: Callable[[float], bool]) -> Verifier | None:
    """The read-back of delivered hours, when a personal API key is configured."""
    if not config.posthog_personal_api_key:
        return None
    query = PostHogQuery(
        requests.Session(), config.api_host, config.posthog_personal_api_key,
        project_api_key=config.posthog_project_api_key, project_id=config.posthog_project_id,
        sleep=sleep, timeout=max(120.0, config.posthog_timeout.total_seconds()),
    )
    return Verifier(store, query, clock, config.verify_grace)
