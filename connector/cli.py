"""Command line: `python -m connector run|sync|status|check|rejected`.

argv -> a command -> an exit status: 0 done, 1 a sync or check failed (the
message says what to do), 2 the configuration (or an argument) is wrong. The
only place that reads the environment and standard streams, configures
logging and installs signal handlers.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import sys
from datetime import datetime, timezone
from typing import Sequence, TextIO

from . import allocator
from .app import App, Stopper, configure_logging, export_client, posthog_sink, utcnow
from .config import Config, load_config
from .errors import ConfigError, ConnectorError, Interrupted, Problem
from .hours import HOUR, iso_hour, parse_hour, plan
from .lease import require_lease
from .service import Service
from .sqlite_store import sqlite_path
from .store import StateStore, SyncInfo, open_configured_store, sync_name
from .store_url import is_postgres, masked

log = logging.getLogger("connector")

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2


# -- commands ---------------------------------------------------------------


def cmd_run(config: Config, args: argparse.Namespace, out: TextIO) -> int:
    app = App(config, args.stopper, out=out)
    try:
        Service(app).run()
    finally:
        app.close()
    return EXIT_OK  # pragma: no cover - run only ends by raising


def cmd_sync(config: Config, args: argparse.Namespace, out: TextIO) -> int:
    app = App(config, args.stopper, dry_run=args.dry_run, out=out)
    try:
        try:
            require_lease(app.store)  # LeaseHeld (exit 1) while another connector works this sync
            reports = app.syncer.sync_due(max_hours=args.hours)
        except (ConfigError, Interrupted):
            raise
        except ConnectorError as exc:
            message = f"{type(exc).__name__}: {exc}"
            log.error("sync failed", extra={"error": message, "cursor": iso_hour(app.syncer.plan().cursor)})
            try:
                app.store.record_error(message)
            except ConnectorError:
                pass
            return EXIT_FAILED
        if reports and not args.dry_run:
            app.store.record_error(None)
        log.info("sync finished", extra={
            "hours": len(reports), "events_sent": sum(r.counts.events_sent for r in reports),
            "cursor": iso_hour(app.syncer.plan().cursor), "dry_run": bool(args.dry_run)})
        return EXIT_OK
    finally:
        app.close()


def status_report(config: Config, store: StateStore, now: datetime) -> dict:
    """What `status` prints: the plan, totals, rejections by reason and the last error."""
    stored = store.cursor()
    current = plan(config, stored, now)
    totals = store.totals()
    return {
        "state": _shown_store(config),
        "cursor_stored": stored is not None,
        **current.as_dict(),
        "totals": totals.counters,
        "rejected_by_reason": totals.rejected_by_reason,
        "last_error": store.last_error(),
        **_sync_fields(config, store),
    }


def _sync_fields(config: Config, store: StateStore) -> dict:
    """This sync's name and who holds its lease (PostgreSQL; SQLite's flock cannot be seen by a reader)."""
    name = sync_name(config)
    info = next((s for s in store.syncs() if s.name == name), None)
    known = info is not None and info.lease_active is not None  # a reader cannot see SQLite's flock
    lease = {"holder": info.holder, "expires_at": _iso(info.lease_expires_at), "active": info.lease_active} if known else None
    return {"sync": name, "lease": lease}


def all_syncs_report(config: Config, store: StateStore, now: datetime) -> dict:
    """What `status --all` prints: every sync in the store with its cursor, lag and lease."""
    return {"state": _shown_store(config), "syncs": [_sync_line(info, now) for info in store.syncs()]}


def _sync_line(info: SyncInfo, now: datetime) -> dict:
    lag = int((now - info.cursor).total_seconds()) if info.cursor else None
    return {"sync": info.name, "cursor": _iso(info.cursor), "lag_seconds": lag, "hours_done": info.hours_done,
            "lease": {"holder": info.holder, "expires_at": _iso(info.lease_expires_at), "active": info.lease_active},
            "last_error": info.last_error}


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment else None


def cmd_status(config: Config, args: argparse.Namespace, out: TextIO) -> int:
    store = open_configured_store(config, readonly=True)
    try:
        report = all_syncs_report if args.all else status_report
        out.write(json.dumps(report(config, store, utcnow()), indent=2) + "\n")
    finally:
        store.close()
    return EXIT_OK


def cmd_rejected(config: Config, args: argparse.Namespace, out: TextIO) -> int:
    try:
        hour = parse_hour(args.hour) if args.hour else None
    except ValueError:
        raise ConfigError([Problem("--hour", f"--hour must be an hour such as 2025-07-01T10, got {args.hour!r}")]) from None
    store = open_configured_store(config, readonly=True)
    try:
        for at, r in store.rejections(hour=hour, reason=args.reason, limit=args.limit):
            try:
                raw: object = r.raw.decode("utf-8")
                key = "raw"
            except UnicodeDecodeError:
                raw, key = base64.b64encode(r.raw).decode(), "raw_base64"
            out.write(json.dumps({"hour": at.isoformat(), "reason": r.reason, "detail": r.detail, key: raw}) + "\n")
    finally:
        store.close()
    return EXIT_OK


def cmd_check(config: Config, args: argparse.Namespace, out: TextIO) -> int:
    """Reach both APIs with the configured keys, and the state store, without changing anything."""
    never = lambda seconds: True  # noqa: E731 - a probe never retries
    hour = plan(config, None, utcnow()).limit - HOUR  # the newest due hour
    results = {
        "amplitude": export_client(config, never).probe(hour),
        "posthog": posthog_sink(config, never).probe(),
        "state": _check_store(config),
    }
    out.write(json.dumps(results, indent=2) + "\n")
    return EXIT_OK if all(r["ok"] for r in results.values()) else EXIT_FAILED


def _check_store(config: Config) -> dict:
    """The store can be read, and written where the connector will write; nothing is created."""
    if is_postgres(config.state_store_url):
        from .postgres_store import check_store

        return check_store(config.state_store_url)
    path = sqlite_path(config.state_store_url)
    shown = _shown_store(config)
    if os.path.exists(path):
        try:
            open_configured_store(config, readonly=True).close()
        except ConnectorError as exc:
            return {"ok": False, "store": shown, "error": str(exc)}
        writable = os.access(path, os.W_OK)
    else:
        directory = os.path.dirname(os.path.abspath(path))
        writable = os.path.isdir(directory) and os.access(directory, os.W_OK)
    result: dict = {"ok": writable, "store": shown, "exists": os.path.exists(path)}
    if not writable:
        result["error"] = f"{path} (or its directory) is not writable by this user"
    return result


def _shown_store(config: Config) -> str:
    return masked(config.state_store_url)


# -- the parser -------------------------------------------------------------

COMMANDS = {
    "run": (cmd_run, "sync due hours now and every POLL_INTERVAL_MINUTES, until stopped", """\
Imports every due hour, then looks for new ones every POLL_INTERVAL_MINUTES.
A failing hour is retried on later ticks with backoff; the process keeps
running. SIGTERM or Ctrl-C stops it within seconds; an unfinished hour is
redone from its start next time. Serves /healthz and /metrics on HEALTH_PORT.

With a PostgreSQL store, a second connector on the same sync waits as a
standby and takes over when the working one's lease runs out.

exit status: 0 after a stop, 1 when it cannot continue (e.g. the SQLite state
is locked by another connector), 2 configuration or key errors (an unreachable
PostgreSQL store at start included).

example: python -m connector --env-file .env run"""),
    "sync": (cmd_sync, "sync every due hour once and exit", """\
Imports every due hour (at most --hours N) and exits. With --dry-run it prints
the events it would send, as JSON lines, over the same hours, and changes
nothing: no request to PostHog, no write to the state store.

exit status: 0 every hour delivered, 1 an hour failed (see `status`:
last_error) or another connector works this sync, 2 configuration or key errors.

examples: python -m connector --env-file .env sync --hours 2
          python -m connector --env-file .env sync --dry-run --hours 1 | head"""),
    "status": (cmd_status, "print the plan, totals and last error as JSON", """\
Prints the cursor (the first hour not yet delivered), backlog, next due time,
lag, totals, rejections by reason, the last error, and the sync's name and
lease. Reads the state without locking, so it works next to a running
connector; before the first sync it prints the plan the first sync would
follow. With --all: every sync in the store (PostgreSQL holds many), each
with its cursor, lag, hours done, lease holder and last error.

exit status: 0, or 2 for configuration errors (an unreachable store included).

examples: docker exec connector python -m connector status
          python -m connector --env-file .env status --all"""),
    "check": (cmd_check, "reach Amplitude, PostHog and the state store; change nothing", """\
Validates the configuration, asks Amplitude for one hour (headers only),
sends PostHog an empty batch, and checks the state store can be read and
written. Creates nothing.

exit status: 0 all reachable, 1 otherwise (each part says why), 2 configuration.

example: python -m connector --env-file .env check"""),
    "rejected": (cmd_rejected, "list rejected records as JSON lines", """\
Lists records that were not imported on purpose: hour, reason, detail and the
raw Amplitude line (raw_base64 when it is not UTF-8).

exit status: 0, or 2 for configuration or argument errors.

example: python -m connector rejected --reason no_usable_id --limit 10"""),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m connector",
        description="Sync Amplitude Export API hours into PostHog. Configured by environment variables "
                    "declared in plugin.json (see the README's Configuration table).",
        epilog="exit status: 0 done, 1 failed (the message says why), 2 configuration error. "
               "Run `python -m connector COMMAND --help` for each command.",
    )
    parser.add_argument("--env-file", help="read variables from this KEY=VALUE file (as docker --env-file); "
                                           "variables already in the environment win")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parsers = {}
    for name, (_, summary, description) in COMMANDS.items():
        parsers[name] = sub.add_parser(name, help=summary, description=description,
                                       formatter_class=argparse.RawDescriptionHelpFormatter)
    parsers["sync"].add_argument("--dry-run", action="store_true",
                                 help="print the events as JSON lines; send nothing, store nothing")
    parsers["sync"].add_argument("--hours", type=int, default=None, help="at most this many hours (default: all due)")
    parsers["status"].add_argument("--all", action="store_true",
                                   help="list every sync in the store with its cursor, lag and lease")
    parsers["rejected"].add_argument("--hour", help="only this hour (YYYY-MM-DDTHH)")
    parsers["rejected"].add_argument("--reason", help="only this reason, e.g. no_usable_id")
    parsers["rejected"].add_argument("--limit", type=int, default=100, help="at most this many (default 100)")
    return parser


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


def report_config_error(exc: ConfigError, err: TextIO) -> None:
    """Readable lines at a terminal; one JSON line otherwise (each problem naming its variable)."""
    if err.isatty():
        err.write("configuration error:\n" + "".join(f"  - {p.text}\n" for p in exc.problems))
        return
    line = {
        "time": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S%z"),
        "level": "ERROR",
        "logger": "connector",
        "message": "configuration error",
        "problems": [{"variable": p.variable, "problem": p.text} for p in exc.problems],
    }
    err.write(json.dumps(line) + "\n")


def main(argv: Sequence[str] | None = None, env: dict | None = None, out: TextIO | None = None,
         err: TextIO | None = None) -> int:
    args = build_parser().parse_args(argv)
    out, err = out or sys.stdout, err or sys.stderr
    env = dict(os.environ if env is None else env)
    try:
        if args.env_file:
            try:
                env = {**read_env_file(args.env_file), **env}
            except OSError as exc:
                raise ConfigError([Problem("--env-file", f"cannot read --env-file {args.env_file}: {exc.strerror}")]) from None
        config = load_config(env)
    except ConfigError as exc:
        report_config_error(exc, err)
        return EXIT_CONFIG
    configure_logging(config.log_level, config.secret_values(), err)
    allocator.tune(allocator.MAIN_MMAP_THRESHOLD)
    os.umask(0o077)  # state, temp exports: owner-only
    command = COMMANDS[args.command][0]
    args.stopper = Stopper()
    restore = args.stopper.install() if args.command in ("run", "sync") else (lambda: None)
    try:
        return command(config, args, out)
    except Interrupted as exc:
        log.info("stopped; an unfinished hour is redone from its start on the next run", extra={"reason": str(exc)})
        return EXIT_OK if args.command == "run" else EXIT_FAILED
    except ConfigError as exc:
        report_config_error(exc, err)
        return EXIT_CONFIG
    except BrokenPipeError:
        # `sync --dry-run | head`: the reader has all it wanted.
        _silence_stdout(out)
        return EXIT_OK
    except ConnectorError as exc:
        log.error("cannot continue", extra={"error": f"{type(exc).__name__}: {exc}"})
        return EXIT_FAILED
    finally:
        restore()


def _silence_stdout(out: TextIO) -> None:
    """After a broken pipe, Python's final flush of stdout would print a traceback."""
    if out is sys.stdout:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
