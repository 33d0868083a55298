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
from datetime import datetime, timedelta, timezone
from typing import Sequence, TextIO

from . import allocator
from .app import App, Stopper, configure_logging, export_client, posthog_sink, redactor, utcnow
from .config import Config, load_config
from .errors import ConfigError, ConnectorError, Interrupted, Problem
from .hours import HOUR, hour_range, iso_hour, parse_hour, plan
from .lease import require_lease
from .redact import mask_url
from .service import Service
from .sqlite_store import sqlite_path
from .store import EmptyStore, StateStore, SyncInfo, open_configured_store, sync_name
from .store_url import is_postgres, masked

log = logging.getLogger("connector")

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2


# -- commands ---------------------------------------------------------------


def cmd_run(config: Config, args: argparse.Namespace, out: TextIO) -> int:
    app = App(config, args.stopper, out=out, tmp_dir=args.tmp_dir)
    _warn(app)
    try:
        Service(app).run()
    finally:
        app.close()
    return EXIT_OK  # pragma: no cover - run only ends by raising


def cmd_sync(config: Config, args: argparse.Namespace, out: TextIO) -> int:
    app = App(config, args.stopper, dry_run=args.dry_run, out=out, tmp_dir=args.tmp_dir)
    _warn(app)
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


def _warn(app: App) -> None:
    for warning in warnings(app.config, app.store.cursor(), app.local_clock()):
        log.warning(warning)


def status_report(config: Config, store: StateStore, now: datetime) -> dict:
    """What `status` prints: the plan, totals, rejections by reason, the last error and warnings."""
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
        "verification": verification_summary(store) if config.posthog_personal_api_key else None,
        "warnings": warnings(config, stored, now),
        **_sync_fields(config, store),
    }


def verification_summary(store: StateStore) -> dict:
    """The read-back so far: hours by their last verdict, events missing, the last whole hour."""
    verdicts = list(store.verdicts().values())
    whole = [v.hour for v in verdicts if v.state == "whole"]
    delivered = len(store.deliveries())
    return {
        "hours_verified": len(whole),
        "hours_short": sum(v.state == "short" for v in verdicts),
        "hours_pending": delivered - len(whole) - sum(v.state == "short" for v in verdicts),
        "events_missing": sum(v.missing for v in verdicts if v.state == "short"),
        "last_verified_hour": max(whole).isoformat() if whole else None,
    }


def warnings(config: Config, stored: datetime | None, now: datetime) -> list[str]:
    """Settings that are valid but probably not what the user meant."""
    found = []
    cursor = stored or config.start_date
    if cursor is not None and cursor > now:
        what = "the stored cursor (from START_DATE)" if stored else "START_DATE"
        found.append(f"{what} ({cursor:%Y-%m-%dT%H}) is in the future: nothing is due before "
                     f"{cursor + HOUR + config.export_delay:%Y-%m-%d %H:%M} UTC")
    return found


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
    if config.posthog_personal_api_key:
        from .app import verifier

        found = verifier(config, EmptyStore(), utcnow, never)  # type: ignore[arg-type]
        assert found is not None
        results["posthog_api"] = found.query.probe(hour)
    for result in results.values():
        if "url" in result:
            result["url"] = mask_url(result["url"])
    out.write(redactor(config)(json.dumps(results, indent=2)) + "\n")
    return EXIT_OK if all(r["ok"] for r in results.values()) else EXIT_FAILED


NO_READ_BACK = Problem("POSTHOG_PERSONAL_API_KEY", (
    "verify reads back from PostHog's query API: set POSTHOG_PERSONAL_API_KEY to a personal API key with the "
    "query:read scope (and project:read, or set POSTHOG_PROJECT_ID), and POSTHOG_API_HOST when PostHog's API is "
    "not at POSTHOG_HOST (on a self-hosted PostHog: http://web:8000 or the proxy)"))


def _hour_arg(text: str | None, flag: str) -> datetime | None:
    if not text:
        return None
    try:
        return parse_hour(text)
    except ValueError:
        raise ConfigError([Problem(flag, f"{flag} must be an hour such as 2025-07-01T10, got {text!r}")]) from None


def cmd_verify(config: Config, args: argparse.Namespace, out: TextIO) -> int:
    """Compare every delivered hour in the range with what PostHog holds; optionally repair."""
    if not config.posthog_personal_api_key:
        raise ConfigError([NO_READ_BACK])
    start, stop = _hour_arg(args.start, "--from"), _hour_arg(args.stop, "--to")
    if args.repair:
        return _verify_then_repair(config, args, out, start, stop)
    store = _writer_or_reader(config)
    try:
        verifier = verifier_for(config, store, args)
        verdicts = verifier.verify(store.deliveries(start, stop))
        _record(store, verdicts)
        persons = verifier.check_persons(args.persons) if args.persons else None
    finally:
        store.close()
    _print_verdicts(verdicts, persons, out, args.json)
    return EXIT_FAILED if any(v.state == "short" for v in verdicts) or (persons and persons.not_merged) else EXIT_OK


def cmd_repair(config: Config, args: argparse.Namespace, out: TextIO) -> int:
    """Re-import exactly these delivered hours (same uuids), then verify them again."""
    first, _, last = args.hours.partition("..")
    start, end = _hour_arg(first, "--hours"), _hour_arg(last or first, "--hours")
    assert start is not None and end is not None
    if end < start:
        raise ConfigError([Problem("--hours", f"--hours {args.hours}: the second hour is before the first")])
    return _repair(config, args, out, list(hour_range(start, end + HOUR)))


def _verify_then_repair(config: Config, args: argparse.Namespace, out: TextIO, start, stop) -> int:
    store = open_configured_store(config, readonly=True)
    try:
        verifier = verifier_for(config, store, args)
        short = [v.hour for v in verifier.verify(store.deliveries(start, stop)) if v.state == "short"]
    finally:
        store.close()
    if not short:
        log.info("verify --repair: no hour is short")
    return _repair(config, args, out, short)


def _repair(config: Config, args: argparse.Namespace, out: TextIO, hours: list[datetime]) -> int:
    app = App(config, args.stopper, out=out, tmp_dir=args.tmp_dir)  # the writer: refuses while `run` holds the state
    try:
        if app.verifier is None:
            raise ConfigError([NO_READ_BACK])
        if getattr(args, "grace_minutes", None) is not None:
            app.verifier.grace = timedelta(minutes=args.grace_minutes)
        require_lease(app.store)  # LeaseHeld (exit 1) while another connector works this sync
        if hours:
            reports = app.syncer.redeliver(hours)
            log.info("repaired", extra={"hours": len(reports), "events_sent": sum(r.counts.events_sent for r in reports)})
            app.verifier.mark_repaired([r.hour for r in reports])
        delivered = [d for d in app.store.deliveries() if d.hour in set(hours)]
        verdicts = app.verifier.verify(delivered)
        _record(app.store, verdicts)
    finally:
        app.close()
    _print_verdicts(verdicts, None, out, args.json)
    return EXIT_FAILED if any(v.state == "short" for v in verdicts) else EXIT_OK


def _writer_or_reader(config: Config) -> StateStore:
    """The store as its writer when free (verdicts are then recorded), else read-only next to `run`."""
    try:
        store = open_configured_store(config)
    except ConnectorError:
        return open_configured_store(config, readonly=True)
    try:
        if store.acquire().held:  # SQLite: the lock taken at open; PostgreSQL: the sync's lease, if free
            return store
    except ConnectorError:
        pass
    store.close()
    return open_configured_store(config, readonly=True)


def _record(store: StateStore, verdicts) -> None:
    try:
        store.record_verdicts(verdicts)
    except ConnectorError:
        pass  # read-only next to a running connector, which records its own


def verifier_for(config: Config, store: StateStore, args: argparse.Namespace):
    from .app import verifier

    found = verifier(config, store, utcnow, args.stopper.sleep)
    assert found is not None
    if args.grace_minutes is not None:
        found.grace = timedelta(minutes=args.grace_minutes)
    return found


def _print_verdicts(verdicts, persons, out: TextIO, as_json: bool) -> None:
    from .verify import summarize

    by_day: dict = {}
    for v in verdicts:
        by_day.setdefault(v.hour.date(), []).append(v)
    if as_json:
        for v in verdicts:
            out.write(json.dumps({"hour": v.hour.isoformat(), "state": v.state, "delivered": v.delivered,
                                  "found": v.found, "missing": v.missing, "extra": v.extra,
                                  "duplicates": v.duplicates, "repairs": v.repairs}) + "\n")
        for day, group in by_day.items():
            out.write(json.dumps({"day": day.isoformat(), **summarize(group)}) + "\n")
        out.write(json.dumps({"total": summarize(verdicts),
                              **({"persons": {"checked": persons.checked,
                                              "not_merged": [{"device_id": d, "user_id": u}
                                                             for d, u in persons.not_merged]}} if persons else {})})
                  + "\n")
        return
    header = f"{'hour':<20} {'delivered':>9} {'found':>9} {'missing':>8} {'extra':>6} {'dupes':>6}  state"
    out.write(header + "\n")
    for day, group in by_day.items():
        for v in group:
            repairs = f" (repaired {v.repairs}x)" if v.repairs else ""
            out.write(f"{v.hour:%Y-%m-%dT%H:00Z}    {v.delivered:>9} {v.found:>9} {v.missing:>8} {v.extra:>6} "
                      f"{v.duplicates:>6}  {v.state}{repairs}\n")
        s = summarize(group)
        out.write(f"{day.isoformat() + ' (day)':<20} {s['delivered']:>9} {s['found']:>9} {s['missing']:>8} "
                  f"{s['extra']:>6} {s['duplicates']:>6}  {s['whole']} whole, {s['short']} short, "
                  f"{s['pending']} pending\n")
    s = summarize(verdicts)
    out.write(f"{'total':<20} {s['delivered']:>9} {s['found']:>9} {s['missing']:>8} {s['extra']:>6} "
              f"{s['duplicates']:>6}  {s['whole']} whole, {s['short']} short, {s['pending']} pending\n")
    if persons:
        out.write(f"persons: {persons.checked} merged pairs checked, {len(persons.not_merged)} not merged\n")
        for device, user in persons.not_merged[:20]:
            out.write(f"  not merged: device {device} / user {user}\n")


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
    "verify": (cmd_verify, "read every delivered hour back from PostHog: is everything there?", """\
For every delivered hour in the range (default: all): the events delivered,
the distinct uuids PostHog holds for them, missing, extra, and duplicates
(re-sent events PostHog has not merged yet: neither missing nor extra), with a
summary per day and a total; then whether sampled merged device/user pairs
resolve to one person. An hour is judged only VERIFY_GRACE_MINUTES after its
delivery (PostHog's ingestion lags); until then it is pending. Needs
POSTHOG_PERSONAL_API_KEY. Works next to a running connector (then it only
prints; `run` records its own verdicts). --repair re-imports the short hours.

exit status: 0 every judged hour is whole, 1 an hour is short or a pair did
not merge, 2 configuration (e.g. no personal API key).

examples: python -m connector --env-file .env verify --from 2025-07-01 --to 2025-07-02
          python -m connector --env-file .env verify --json | jq 'select(.state == "short")'"""),
    "repair": (cmd_repair, "re-import delivered hours (same uuids), then verify them", """\
Re-imports exactly these hours (H1..H2, both included) with the same uuids,
so PostHog keeps one copy, without moving the cursor; then verifies them. It
is the state's writer for as long as it runs: stop `run` first, or let `run`
repair short hours on its own (REPAIR_ATTEMPTS).

exit status: 0 repaired (and whole or pending), 1 still short or a failure,
2 configuration.

example: python -m connector --env-file .env repair --hours 2025-07-01T10..2025-07-01T12"""),
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
    parsers["verify"].add_argument("--from", dest="start", help="first hour (YYYY-MM-DD or YYYY-MM-DDTHH; default: the first delivered)")
    parsers["verify"].add_argument("--to", dest="stop", help="first hour not verified (default: the cursor)")
    parsers["verify"].add_argument("--json", action="store_true", help="JSON lines: one per hour, per day, then the total")
    parsers["verify"].add_argument("--repair", action="store_true", help="then re-import the hours found short")
    parsers["verify"].add_argument("--persons", type=int, default=200, help="merged pairs to check (default 200; 0: none)")
    parsers["verify"].add_argument("--grace-minutes", type=float, default=None, help="override VERIFY_GRACE_MINUTES")
    parsers["repair"].add_argument("--hours", required=True, help="H1..H2, e.g. 2025-07-01T10..2025-07-01T12")
    parsers["repair"].add_argument("--json", action="store_true", help="print the verdicts as JSON lines")
    parsers["repair"].add_argument("--grace-minutes", type=float, default=None, help="override VERIFY_GRACE_MINUTES")
    parsers["status"].add_argument("--all", action="store_true",
                                   help="list every sync in the store with its cursor, lag and lease")
    parsers["rejected"].add_argument("--hour", help="only this hour (YYYY-MM-DDTHH)")
    parsers["rejected"].add_argument("--reason", help="only this reason, e.g. no_usable_id")
    parsers["rejected"].add_argument("--limit", type=int, default=100, help="at most this many (default 100)")
    return parser


def read_env_file(path: str) -> dict[str, str]:
    """KEY=VALUE lines as docker's --env-file reads them: quotes kept, no expansion, # comments.

    Raises ConfigError naming --env-file when the file cannot be read or is not UTF-8.
    """
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        raise ConfigError([Problem("--env-file", f"cannot read --env-file {path}: {exc.strerror}")]) from None
    values = {}
    for number, raw in enumerate(data.splitlines(), 1):
        try:
            line = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise ConfigError([Problem("--env-file", f"--env-file {path} is not UTF-8 text (line {number}): "
                                                     "save it as UTF-8")]) from None
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
            env = {**read_env_file(args.env_file), **env}
        config = load_config(env)
    except ConfigError as exc:
        report_config_error(exc, err)
        return EXIT_CONFIG
    configure_logging(config.log_level, redactor(config), err)
    allocator.tune(allocator.MAIN_MMAP_THRESHOLD)
    os.umask(0o077)  # state, temp exports: owner-only
    command = COMMANDS[args.command][0]
    args.stopper = Stopper()
    args.tmp_dir = env.get("TMPDIR") or None  # downloads go there, as for any program
    restore = args.stopper.install() if args.command in ("run", "sync", "repair", "verify") else (lambda: None)
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
