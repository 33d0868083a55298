"""Command line: `python -m connector run|sync|status|check|rejected`.

The only place that reads the environment, configures logging, installs signal
handlers and wires the parts together. Exit status: 0 done, 1 a sync failed
(retry later or act on the message), 2 configuration error.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import random
import shutil
import signal
import sqlite3
import sys
import tempfile
import threading
from datetime import datetime, timedelta, timezone
from typing import Callable, Sequence

import requests
import schedule
from pythonjsonlogger.json import JsonFormatter

from . import allocator
from .config import Config, load_config, parse_hour
from .errors import ConfigError, ConnectorError, Interrupted, RetryLater
from .export import ExportClient, hour_param
from .health import Health, serve
from .metrics import Metrics
from .sink import PostHogSink, PrintSink, RateLimiter
from .store import SQLiteStore, open_store
from .sync import HOUR, Syncer, Translator, due_limit, floor_hour

log = logging.getLogger("connector")

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2


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


def configure_logging(level: str, secrets: Sequence[str] = ()) -> None:
    handler = logging.StreamHandler(sys.stderr)
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
    """The wired parts for one command."""

    def __init__(self, config: Config, stopper: Stopper, *, dry_run: bool = False, out=sys.stdout):
        self.config = config
        self.stopper = stopper
        self.metrics = Metrics()
        self.health = Health(utcnow, max(3 * config.poll_interval, timedelta(minutes=15)))
        self._tmpdir: str | None = None
        rng = random.Random()
        self.store = self._dry_run_store() if dry_run else open_store(config.state_path)
        export_session = requests.Session()
        self.export = ExportClient(
            export_session,
            config.export_url,
            config.amplitude_api_key,
            config.amplitude_secret_key,
            region=config.amplitude_region,
            sleep=stopper.sleep,
            rng=rng,
            timeout=(10.0, config.export_timeout),
            on_retry=lambda cause: self.metrics.retries.labels("amplitude", cause).inc(),
        )
        if dry_run:
            self.sink = PrintSink(out)
        else:
            self.sink = PostHogSink(
                requests.Session(),
                config.posthog_host,
                config.posthog_project_api_key,
                sleep=stopper.sleep,
                rng=rng,
                timeout=config.posthog_timeout,
                limiter=RateLimiter(config.max_events_per_second, sleep=stopper.sleep),
                on_retry=lambda cause: self.metrics.retries.labels("posthog", cause).inc(),
            )
        workers = 1 if dry_run else (config.workers or os.cpu_count() or 1)
        self.translator = Translator(workers, config.posthog_project_api_key.reveal(), config.batch_size)
        self.syncer = Syncer(
            config,
            self.store,
            self.export,
            self.sink,
            self.translator,
            clock=utcnow,
            stop=stopper.event,
            metrics=self.metrics,
            on_progress=self.health.beat,
        )

    def _dry_run_store(self) -> SQLiteStore:
        """A throwaway copy of the state, so a dry run sees the real cursor and
        merge history but changes nothing and takes no lock."""
        self._tmpdir = tempfile.mkdtemp(prefix="connector-dry-run-")
        copy = os.path.join(self._tmpdir, "state.sqlite")
        if os.path.exists(self.config.state_path):
            source = sqlite3.connect(f"file:{self.config.state_path}?mode=ro", uri=True)
            target = sqlite3.connect(copy)
            source.backup(target)
            source.close()
            target.close()
        return SQLiteStore(copy)

    def close(self) -> None:
        self.translator.close()
        self.store.close()
        if self._tmpdir:
            shutil.rmtree(self._tmpdir, ignore_errors=True)


# -- commands ---------------------------------------------------------------


def cmd_sync(app: App, args: argparse.Namespace) -> int:
    max_hours = args.hours if args.hours is not None else (1 if args.dry_run else None)
    try:
        reports = app.syncer.sync_due(max_hours=max_hours)
    except RetryLater as exc:
        return _failed(app, exc)
    except (ConfigError, Interrupted):
        raise
    except ConnectorError as exc:
        return _failed(app, exc)
    if not args.dry_run:
        app.store.record_error(None)
    log.info(
        "sync finished",
        extra={"hours": len(reports), "events_sent": sum(r.stats.events_sent for r in reports),
               "cursor": hour_param(app.syncer.cursor()), "dry_run": bool(args.dry_run)},
    )
    return EXIT_OK


def _failed(app: App, exc: ConnectorError) -> int:
    message = f"{type(exc).__name__}: {exc}"
    log.error("sync failed", extra={"error": message, "cursor": hour_param(app.syncer.cursor())})
    try:
        app.store.record_error(message)
    except ConnectorError:
        pass
    return EXIT_FAILED


def cmd_run(app: App, args: argparse.Namespace) -> int:
    """Sync now, then every poll interval; failures back off and the loop goes on."""
    config = app.config
    if config.health_port:
        serve(config.health_port, app.health, app.metrics)
        log.info("health endpoint listening", extra={"port": config.health_port, "paths": ["/healthz", "/metrics"]})
    failures = 0
    retry_at: datetime | None = None
    announced_end = False

    def tick() -> None:
        nonlocal failures, retry_at, announced_end
        now = utcnow()
        if retry_at and now < retry_at:
            app.health.beat(app.store.last_error())
            return
        try:
            app.syncer.sync_due()
        except (ConfigError, Interrupted):
            raise
        except Exception as exc:  # noqa: BLE001 - the loop must outlive a bug in one tick
            if not isinstance(exc, ConnectorError):
                log.exception("unexpected error in a sync tick")
            failures += 1
            delay = min(config.poll_interval * 2 ** (failures - 1), timedelta(hours=1))
            retry_at = utcnow() + delay
            message = f"{type(exc).__name__}: {exc}"
            log.error("sync failed; retrying later", extra={"error": message, "failures": failures,
                                                            "retry_at": retry_at.isoformat()})
            app.store.record_error(message)
            app.health.beat(message)
        else:
            if failures:
                app.store.record_error(None)
            failures, retry_at = 0, None
            app.health.beat(None)
            if app.syncer.finished() and not announced_end:
                announced_end = True
                log.info("endDate reached: every hour before it is delivered; idling",
                         extra={"end": hour_param(config.end_hour)})
        app.metrics.last_tick.set(utcnow().timestamp())

    scheduler = schedule.Scheduler()
    scheduler.every(config.poll_interval.total_seconds()).seconds.do(tick)
    log.info("connector started", extra={"cursor": hour_param(app.syncer.cursor()),
                                         "poll_interval_s": config.poll_interval.total_seconds()})
    tick()
    while not app.stopper.event.is_set():
        scheduler.run_pending()
        idle = scheduler.idle_seconds
        app.stopper.sleep(min(idle if idle is not None else 1.0, 5.0))
    raise Interrupted("stop requested")


def status_report(config: Config, store, now: datetime) -> dict:
    """What `status` prints: cursor, due hours, lag, totals, rejections, last error."""
    cursor = store.cursor()
    limit = due_limit(config, now)
    cursor_or_start = cursor if cursor is not None else config.start_hour
    totals = store.totals()
    backlog = max(0, int((limit - cursor_or_start) / HOUR)) if cursor_or_start else None
    finished = config.end_hour is not None and cursor_or_start is not None and cursor_or_start >= config.end_hour
    if finished:
        next_due = None
    elif cursor_or_start is not None:
        next_due = (cursor_or_start + HOUR + config.export_delay) if backlog == 0 else now
    else:
        next_due = None
    return {
        "state": config.state_path,
        "cursor": cursor.isoformat() if cursor else None,
        "next_hour": cursor_or_start.isoformat() if cursor_or_start else None,
        "next_due_at": next_due.isoformat() if next_due else None,
        "backlog_hours": backlog,
        "lag_seconds": int((now - cursor).total_seconds()) if cursor else None,
        "finished": finished,
        "totals": {k: totals.counters.get(k, 0) for k in (
            "events_read", "events_sent", "merges_sent", "groups_sent", "rejected", "ignored",
            "merge_conflicts", "hours_done", "hours_empty", "merges_recorded")},
        "rejected_by_reason": totals.rejected_by_reason,
        "last_error": store.last_error(),
    }


def cmd_status(config: Config, args: argparse.Namespace, out) -> int:
    store = open_store(config.state_path, readonly=True)
    try:
        out.write(json.dumps(status_report(config, store, utcnow()), indent=2) + "\n")
    finally:
        store.close()
    return EXIT_OK


def cmd_rejected(config: Config, args: argparse.Namespace, out) -> int:
    store = open_store(config.state_path, readonly=True)
    try:
        hour = parse_hour(args.hour) if args.hour else None
        for r in store.rejections(hour=hour, reason=args.reason, limit=args.limit):
            try:
                raw: object = r.raw.decode("utf-8")
                key = "raw"
            except UnicodeDecodeError:
                raw, key = base64.b64encode(r.raw).decode(), "raw_base64"
            out.write(json.dumps({"hour": r.hour.isoformat(), "reason": r.reason, "detail": r.detail, key: raw}) + "\n")
    finally:
        store.close()
    return EXIT_OK


def cmd_check(config: Config, args: argparse.Namespace, out) -> int:
    """Reach both APIs with the configured keys, without importing anything."""
    results = {}
    hour = floor_hour(utcnow() - config.export_delay) - HOUR
    try:
        response = requests.get(
            config.export_url,
            params={"start": hour_param(hour), "end": hour_param(hour)},
            auth=(config.amplitude_api_key.reveal(), config.amplitude_secret_key.reveal()),
            stream=True,
            timeout=(10, 60),
        )
        response.close()
        ok = response.status_code in (200, 404)
        results["amplitude"] = {"ok": ok, "status": response.status_code, "url": config.export_url}
        if response.status_code in (401, 403):
            results["amplitude"]["hint"] = "check AMPLITUDE_API_KEY, AMPLITUDE_SECRET_KEY and AMPLITUDE_REGION"
    except requests.RequestException as exc:
        results["amplitude"] = {"ok": False, "error": type(exc).__name__, "url": config.export_url}
    try:
        response = requests.post(
            config.posthog_host + "/batch/",
            json={"api_key": config.posthog_project_api_key.reveal(), "batch": []},
            timeout=30,
        )
        # An empty batch may be refused as such (400); only the key or the URL being wrong matter here.
        ok = response.status_code < 500 and response.status_code not in (401, 403, 404)
        results["posthog"] = {"ok": ok, "status": response.status_code, "url": config.posthog_host + "/batch/"}
        if response.status_code in (401, 403):
            results["posthog"]["hint"] = "check POSTHOG_PROJECT_API_KEY"
    except requests.RequestException as exc:
        results["posthog"] = {"ok": False, "error": type(exc).__name__, "url": config.posthog_host}
    try:
        store = open_store(config.state_path, readonly=os.path.exists(config.state_path))
        store.close()
        results["state"] = {"ok": True, "path": config.state_path}
    except ConnectorError as exc:
        results["state"] = {"ok": False, "path": config.state_path, "error": str(exc)}
    out.write(json.dumps(results, indent=2) + "\n")
    return EXIT_OK if all(r["ok"] for r in results.values()) else EXIT_FAILED


def read_env_file(path: str) -> dict[str, str]:
    """KEY=VALUE lines as docker's --env-file reads them: no quotes, no expansion, # comments."""
    values = {}
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            line = line.strip()
            if line and not line.startswith("#") and "=" in line:
                key, value = line.split("=", 1)
                values[key.strip()] = value
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m connector",
        description="Sync Amplitude Export API hours into PostHog. Configured by environment variables (see plugin.json).",
    )
    parser.add_argument(
        "--env-file",
        help="read variables from this KEY=VALUE file (as docker --env-file); the real environment wins",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="sync due hours now and every POLL_INTERVAL_MINUTES, until stopped")
    sync = sub.add_parser("sync", help="sync every due hour once and exit (0 when all were delivered)")
    sync.add_argument("--dry-run", action="store_true", help="print translated events as JSON lines; send and store nothing")
    sync.add_argument("--hours", type=int, default=None, help="at most this many hours (default: all; 1 with --dry-run)")
    sub.add_parser("status", help="print the cursor, backlog, lag, totals and last error as JSON")
    sub.add_parser("check", help="validate the configuration and reach Amplitude, PostHog and the state file")
    rejected = sub.add_parser("rejected", help="list rejected records as JSON lines")
    rejected.add_argument("--hour", help="only this hour (YYYY-MM-DDTHH)")
    rejected.add_argument("--reason", help="only this reason, e.g. no_usable_id")
    rejected.add_argument("--limit", type=int, default=100)
    return parser


def main(argv: Sequence[str] | None = None, env: dict | None = None, out=None) -> int:
    args = build_parser().parse_args(argv)
    out = out or sys.stdout
    env = dict(os.environ if env is None else env)
    if args.env_file:
        try:
            env = {**read_env_file(args.env_file), **env}
        except OSError as exc:
            sys.stderr.write(f"configuration error:\n  - cannot read --env-file {args.env_file}: {exc.strerror}\n")
            return EXIT_CONFIG
    try:
        config = load_config(env)
    except ConfigError as exc:
        sys.stderr.write("configuration error:\n" + "".join(f"  - {p}\n" for p in exc.problems))
        return EXIT_CONFIG
    configure_logging(config.log_level, config.secret_values())
    allocator.tune(allocator.MAIN_MMAP_THRESHOLD)
    os.umask(0o077)  # state, temp exports: owner-only
    try:
        if args.command == "status":
            return cmd_status(config, args, out)
        if args.command == "rejected":
            return cmd_rejected(config, args, out)
        if args.command == "check":
            return cmd_check(config, args, out)
        stopper = Stopper()
        restore = stopper.install()
        try:
            app = App(config, stopper, dry_run=args.command == "sync" and args.dry_run, out=out)
            try:
                return cmd_run(app, args) if args.command == "run" else cmd_sync(app, args)
            finally:
                app.close()
        finally:
            restore()
    except Interrupted as exc:
        log.info("stopped; an unfinished hour is redone from its start on the next run", extra={"reason": str(exc)})
        return EXIT_OK if args.command == "run" else EXIT_FAILED
    except ConfigError as exc:
        log.error("configuration error", extra={"error": str(exc)})
        sys.stderr.write("configuration error:\n" + "".join(f"  - {p}\n" for p in exc.problems))
        return EXIT_CONFIG
    except ConnectorError as exc:
        log.error("cannot continue", extra={"error": f"{type(exc).__name__}: {exc}"})
        return EXIT_FAILED
