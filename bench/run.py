"""``python -m bench``: the connector against the obvious recipe and the floor.

See bench/README.md. Everything runs on 127.0.0.1: a fake Export API and a fake
PostHog sink, each in its own process, and each contender as a subprocess,
interleaved over rounds (round 1: A B C, round 2: B C A, ...).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

from . import data
from .procmon import Measured, Service, run_measured

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
AMP_KEY, AMP_SECRET, PH_KEY = "bench-amp-key", "bench-amp-secret", "phc_bench_project_key"
CONTENDERS = ("connector", "recipe", "floor")
MB = 1024 * 1024


def log(message: str) -> None:
    sys.stderr.write(f"[bench {time.strftime('%H:%M:%S')}] {message}\n")
    sys.stderr.flush()


# -- services ----------------------------------------------------------------


class Fakes:
    """The fake Export API (serving `export_dir`) and the fake PostHog sink."""

    def __init__(self, export_dir: Path, workdir: Path):
        env = _base_env()
        self.amp = Service([PY, "-m", "bench.fake_amplitude", "--dir", str(export_dir), "--key", AMP_KEY,
                            "--secret", AMP_SECRET], env=env, cwd=str(ROOT), log_path=str(workdir / "fake_amplitude.log"))
        try:
            self.sink = Service([PY, "-m", "bench.fake_posthog"], env=env, cwd=str(ROOT),
                                log_path=str(workdir / "fake_posthog.log"))
        except BaseException:
            self.amp.stop()
            raise

    def reset_sink(self) -> None:
        request = urllib.request.Request(f"{self.sink.url}/reset", data=b"", method="POST")
        with urllib.request.urlopen(request, timeout=30) as response:
            response.read()

    def sink_stats(self) -> dict:
        with urllib.request.urlopen(f"{self.sink.url}/stats", timeout=600) as response:
            return json.loads(response.read())

    def warm(self, start: str, end: str) -> None:
        """Fetch the range once, so page cache and range zips are ready before any measured run."""
        import base64

        auth = base64.b64encode(f"{AMP_KEY}:{AMP_SECRET}".encode()).decode()
        request = urllib.request.Request(f"{self.amp.url}/api/2/export?start={start}&end={end}",
                                         headers={"Authorization": f"Basic {auth}"})
        with urllib.request.urlopen(request, timeout=600) as response:
            while response.read(1 << 20):
                pass

    def stop(self) -> None:
        self.sink.stop()
        self.amp.stop()


def _base_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AMPLITUDE_", "POSTHOG_"))}
    for key in ("WORKERS", "START_DATE", "END_DATE", "STATE_STORE_URL", "EXPORT_DELAY_HOURS",
                "MAX_EVENTS_PER_SECOND", "LOG_LEVEL", "EVENTS_TO_IGNORE"):
        env.pop(key, None)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def connector_env(fakes: Fakes, meta: dict, state_path: Path) -> dict:
    env = _base_env()
    start = datetime.strptime(meta["start"], "%Y%m%dT%H")
    end = datetime.strptime(meta["end_exclusive"], "%Y%m%dT%H")
    env.update({
        "AMPLITUDE_API_KEY": AMP_KEY,
        "AMPLITUDE_SECRET_KEY": AMP_SECRET,
        "AMPLITUDE_BASE_URL": fakes.amp.url,
        "POSTHOG_HOST": fakes.sink.url,
        "POSTHOG_PROJECT_API_KEY": PH_KEY,
        "START_DATE": start.strftime("%Y-%m-%dT%H"),
        "END_DATE": end.strftime("%Y-%m-%dT%H"),
        "EXPORT_DELAY_HOURS": "0",
        "MAX_EVENTS_PER_SECOND": "0",
        "STATE_STORE_URL": str(state_path),
        "LOG_LEVEL": "WARNING",
    })
    return env


# -- contenders ----------------------------------------------------------------


def _timeout(events: int) -> float:
    return 120 + events / 250  # far above any expected run; only a safety net


def run_connector(fakes: Fakes, meta: dict, workdir: Path, tag: str, workers: int | None = None,
                  store_url: str | None = None) -> dict:
    """One `sync` over the export; `store_url` (an empty PostgreSQL database) instead of a fresh SQLite file."""
    state_dir = Path(tempfile.mkdtemp(prefix="state-", dir=workdir))
    env = connector_env(fakes, meta, state_dir / "state.sqlite")
    if store_url is not None:
        env["STATE_STORE_URL"] = store_url
    if workers is not None:
        env["WORKERS"] = str(workers)
    m = run_measured([PY, "-m", "connector", "sync"], env=env, cwd=str(ROOT),
                     stderr_path=str(workdir / f"{tag}.stderr"), timeout=_timeout(meta["events"]))
    sink = fakes.sink_stats()
    status = {}
    if store_url is not None or os.path.exists(state_dir / "state.sqlite"):
        out = subprocess.run([PY, "-m", "connector", "status"], env=env, cwd=str(ROOT), capture_output=True, timeout=60)
        try:
            status = json.loads(out.stdout)
        except ValueError:
            status = {"error": out.stderr.decode(errors="replace")[-500:]}
    shutil.rmtree(state_dir, ignore_errors=True)
    totals = status.get("totals", {})
    expected = totals.get("events_sent", 0) + totals.get("merges_sent", 0) + totals.get("groups_sent", 0)
    checks = {
        "exit_0": m.returncode == 0,
        "read_every_record": totals.get("events_read") == meta["events"],
        "ignored_are_session_markers": totals.get("ignored") == meta["session_markers"],
        "no_rejections": totals.get("rejected") == 0,
        "events_sent_as_expected": totals.get("events_sent") == meta["connector_expected_events"],
        "merges_as_expected": totals.get("merges_sent") == meta["connector_expected_merges"],
        "sink_got_everything_sent": sink["events"] == expected,
        "sink_merges_match": sink["by_event"].get("$create_alias", 0) == totals.get("merges_sent"),
        "sink_groups_match": sink["by_event"].get("$groupidentify", 0) == totals.get("groups_sent"),
        # $groupidentify uuids derive from the group's properties, so a group whose
        # properties return to an earlier state repeats a uuid: reported, not a failure.
        "no_duplicate_event_uuids": sink["duplicate_uuids"] - sink["duplicate_uuids_by_event"].get("$groupidentify", 0) == 0,
        "no_invalid_events": sink["invalid_events"] == 0,
    }
    return _result("connector", m, meta, sink, expected_at_sink=meta["connector_expected_events"]
                   + totals.get("merges_sent", 0) + totals.get("groups_sent", 0),
                   checks=checks, details={"status_totals": totals, "last_error": status.get("last_error")})


def run_recipe(fakes: Fakes, meta: dict, workdir: Path, tag: str) -> dict:
    argv = [PY, "-m", "bench.recipe", "--amplitude", fakes.amp.url, "--api-key", AMP_KEY, "--secret-key", AMP_SECRET,
            "--posthog", fakes.sink.url, "--project-key", PH_KEY, "--start", meta["start"], "--hours", str(meta["hours"])]
    m = run_measured(argv, env=_base_env(), cwd=str(ROOT), stderr_path=str(workdir / f"{tag}.stderr"),
                     timeout=_timeout(meta["events"]) * 4)
    sink = fakes.sink_stats()
    out = _last_json(m.stdout)
    expected = meta["events"] + meta["recipe_expected_aliases"]
    checks = {
        "exit_0": m.returncode == 0,
        "read_every_record": out.get("records_read") == meta["events"],
        "sink_got_everything": sink["events"] == expected,
    }
    details = {"recipe_output": out, "stderr_lines": _count_lines(workdir / f"{tag}.stderr")}
    return _result("recipe", m, meta, sink, expected_at_sink=expected, checks=checks, details=details)


def run_floor(fakes: Fakes, meta: dict, workdir: Path, tag: str) -> dict:
    argv = [PY, "-m", "bench.floor", "--amplitude", fakes.amp.url, "--api-key", AMP_KEY, "--secret-key", AMP_SECRET,
            "--start", meta["start"], "--hours", str(meta["hours"])]
    m = run_measured(argv, env=_base_env(), cwd=str(ROOT), stderr_path=str(workdir / f"{tag}.stderr"),
                     timeout=_timeout(meta["events"]))
    out = _last_json(m.stdout)
    checks = {"exit_0": m.returncode == 0, "parsed_every_record": out.get("records_parsed") == meta["events"]}
    return _result("floor", m, meta, None, expected_at_sink=0, checks=checks, details={"floor_output": out})


RUNNERS = {"connector": run_connector, "recipe": run_recipe, "floor": run_floor}


def _last_json(stdout: bytes) -> dict:
    for line in reversed(stdout.decode(errors="replace").splitlines()):
        try:
            return json.loads(line)
        except ValueError:
            continue
    return {}


def _count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for _ in f)


def _result(name: str, m: Measured, meta: dict, sink: dict | None, *, expected_at_sink: int, checks: dict,
            details: dict) -> dict:
    events = meta["events"]
    return {
        "contender": name,
        "ok": all(checks.values()),
        "checks": checks,
        "returncode": m.returncode,
        "wall_s": round(m.wall_s, 3),
        "events_per_s": round(events / m.wall_s, 1),
        "cpu_s": round(m.cpu_s, 3),
        "user_s": round(m.user_s, 3),
        "sys_s": round(m.sys_s, 3),
        "cpu_s_per_million_events": round(m.cpu_s / events * 1e6, 1),
        "peak_rss_tree_mb": round(m.peak_rss_tree_bytes / MB, 1),
        "max_rss_single_mb": round(m.max_rss_single_bytes / MB, 1),
        "ru_maxrss_mb": round(m.ru_maxrss_bytes / MB, 1),
        "max_processes": m.max_processes,
        "peak_rss_by_process_mb": [[round(b / MB, 1), cmd] for b, cmd in m.peak_by_process],
        "rss_samples": m.rss_samples,
        "delivered_at_sink": sink["events"] if sink else None,
        "expected_at_sink": expected_at_sink if sink else None,
        "sink": sink,
        "details": details,
        "stderr": m.stderr_path,
    }


# -- modes ---------------------------------------------------------------------


def throughput(args, workdir: Path) -> dict:
    export_dir, meta = data.ensure_export(args.events, args.hours, log=log)
    fakes = Fakes(export_dir, workdir)
    rounds: list[list[dict]] = []
    try:
        fakes.warm(meta["start"], (datetime.strptime(meta["end_exclusive"], "%Y%m%dT%H")
                                   - data.HOUR).strftime("%Y%m%dT%H"))
        names = list(args.contenders)
        for r in range(args.rounds):
            order = names[r % len(names):] + names[: r % len(names)]
            results = []
            for name in order:
                fakes.reset_sink()
                log(f"round {r + 1}/{args.rounds}: {name}")
                result = RUNNERS[name](fakes, meta, workdir, f"r{r + 1}-{name}")
                result["round"] = r + 1
                log(f"  {name}: {result['events_per_s']:.0f} events/s, {result['cpu_s_per_million_events']:.0f} CPU s/M, "
                    f"peak RSS {result['peak_rss_tree_mb']:.0f} MB, sink {result['delivered_at_sink']}"
                    f"{'' if result['ok'] else '  CHECKS FAILED: ' + ', '.join(k for k, v in result['checks'].items() if not v)}")
                results.append(result)
            rounds.append(results)
    finally:
        fakes.stop()
    summary = {}
    for name in args.contenders:
        runs = [res for results in rounds for res in results if res["contender"] == name]
        summary[name] = {
            "events_per_s_median": statistics.median(r["events_per_s"] for r in runs),
            "events_per_s_min": min(r["events_per_s"] for r in runs),
            "events_per_s_max": max(r["events_per_s"] for r in runs),
            "cpu_s_per_million_median": statistics.median(r["cpu_s_per_million_events"] for r in runs),
            "peak_rss_tree_mb_max": max(r["peak_rss_tree_mb"] for r in runs),
            "max_rss_single_mb_max": max(r["max_rss_single_mb"] for r in runs),
            "delivered_at_sink": [r["delivered_at_sink"] for r in runs],
            "expected_at_sink": runs[0]["expected_at_sink"],
            "all_ok": all(r["ok"] for r in runs),
            "failed_checks": sorted({k for r in runs for k, v in r["checks"].items() if not v}),
        }
    ratios = {}
    if "connector" in summary:
        for other in ("recipe", "floor"):
            if other in summary:
                ratios[f"connector/{other}_throughput"] = round(
                    summary["connector"]["events_per_s_median"] / summary[other]["events_per_s_median"], 3)
    return {"mode": "throughput", "export": meta, "summary": summary, "ratios": ratios, "rounds": rounds}


def memory(args, workdir: Path) -> dict:
    runs = {}
    for events in args.memory_sizes:
        export_dir, meta = data.ensure_export(events, 1, log=log)
        fakes = Fakes(export_dir, workdir)
        try:
            fakes.warm(meta["start"], meta["start"])
            fakes.reset_sink()
            log(f"memory: connector on one {events}-event hour")
            result = run_connector(fakes, meta, workdir, f"mem-{events}")
            log(f"  peak RSS tree {result['peak_rss_tree_mb']:.0f} MB, max single {result['max_rss_single_mb']:.0f} MB, "
                f"{result['events_per_s']:.0f} events/s, ok={result['ok']}")
        finally:
            fakes.stop()
        runs[str(events)] = {"export": {k: meta[k] for k in ("events", "members", "zip_bytes", "ndjson_bytes")},
                             **result}
    sizes = [str(e) for e in args.memory_sizes]
    ratios = {}
    if len(sizes) == 2:
        small, large = runs[sizes[0]], runs[sizes[1]]
        ratios = {
            "peak_rss_tree_large/small": round(large["peak_rss_tree_mb"] / small["peak_rss_tree_mb"], 3),
            "max_rss_single_large/small": round(large["max_rss_single_mb"] / small["max_rss_single_mb"], 3),
            "events_large/small": round(int(sizes[1]) / int(sizes[0]), 1),
        }
    return {"mode": "memory", "runs": runs, "ratios": ratios}


def profile(args, workdir: Path) -> dict:
    from . import profile as prof

    py_spy = prof.find_py_spy()
    if not py_spy:
        raise SystemExit("py-spy is needed for --profile: /work/venv/bin/pip install py-spy")
    export_dir, meta = data.ensure_export(args.events, args.hours, log=log)
    fakes = Fakes(export_dir, workdir)
    results = []
    try:
        fakes.warm(meta["start"], (datetime.strptime(meta["end_exclusive"], "%Y%m%dT%H")
                                   - data.HOUR).strftime("%Y%m%dT%H"))
        for workers in (1, None):
            fakes.reset_sink()
            log(f"profile: connector WORKERS={workers or 'default'}, unprofiled (for its CPU time)")
            plain = run_connector(fakes, meta, workdir, f"profile-plain-{workers or 'default'}", workers=workers)
            fakes.reset_sink()
            log(f"profile: connector WORKERS={workers or 'default'} under py-spy")
            env = connector_env(fakes, meta, workdir / "unused.sqlite")
            result = prof.profile_connector(py_spy=py_spy, env=env, events=meta["events"], workers=workers,
                                            rate=args.profile_rate, workdir=workdir, timeout=_timeout(meta["events"]) * 3)
            result["sink_events"] = fakes.sink_stats()["events"]
            result["unprofiled_checks_ok"] = plain["ok"]
            prof.normalize(result, cpu_s=plain["cpu_s"], wall_s=plain["wall_s"], events=meta["events"])
            results.append(result)
    finally:
        fakes.stop()
    return {"mode": "profile", "export": meta, "profiles": results, "markdown": prof.render(results)}


# -- reporting -----------------------------------------------------------------


def render_throughput(report: dict) -> str:
    meta = report["export"]
    lines = [
        f"Export: {meta['events']} events over {meta['hours']} h ({meta['avg_record_bytes']:.0f} B/record, "
        f"{meta['members']} members, {meta['zip_bytes'] / MB:.1f} MB zipped); "
        f"{len(report['rounds'])} rounds, interleaved.",
        "",
        "| contender | events/s (median) | min–max | CPU s / M events | peak RSS, tree (MB) | max RSS, one process (MB) "
        "| delivered at sink | expected at sink | checks |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, s in report["summary"].items():
        delivered = s["delivered_at_sink"]
        shown = "–" if delivered[0] is None else (str(delivered[0]) if len(set(delivered)) == 1
                                                   else f"{min(delivered)}–{max(delivered)}")
        expected = "–" if s["expected_at_sink"] is None else str(s["expected_at_sink"])
        checks = "ok" if s["all_ok"] else "FAILED: " + ", ".join(s["failed_checks"])
        lines.append(f"| {name} | {s['events_per_s_median']:,.0f} | {s['events_per_s_min']:,.0f}–{s['events_per_s_max']:,.0f} "
                     f"| {s['cpu_s_per_million_median']:,.0f} | {s['peak_rss_tree_mb_max']:,.0f} | {s['max_rss_single_mb_max']:,.0f} "
                     f"| {shown} | {expected} | {checks} |")
    if report["ratios"]:
        lines.append("")
        lines.append("Throughput ratios (median events/s): " + ", ".join(f"{k} = {v:.2f}" for k, v in report["ratios"].items()))
    conn = report["summary"].get("connector")
    if conn:
        lines.append(f"Connector expected at sink = {meta['connector_expected_events']} events "
                     f"({meta['events']} records - {meta['session_markers']} session_start/session_end, ignored by default) "
                     f"+ {meta['connector_expected_merges']} $create_alias + the $groupidentify events it reports.")
    if "recipe" in report["summary"]:
        lines.append(f"Recipe expected at sink = {meta['events']} records (markers included) + "
                     f"{meta['recipe_expected_aliases']} aliases (one per device/user pair).")
    return "\n".join(lines)


def render_memory(report: dict) -> str:
    lines = ["| one-hour export | zip (MB) | peak RSS, tree (MB) | max RSS, one process (MB) | events/s | checks |",
             "|---|---:|---:|---:|---:|---|"]
    for events, r in report["runs"].items():
        checks = "ok" if r["ok"] else "FAILED: " + ", ".join(k for k, v in r["checks"].items() if not v)
        lines.append(f"| {int(events):,} events | {r['export']['zip_bytes'] / MB:,.0f} | {r['peak_rss_tree_mb']:,.0f} "
                     f"| {r['max_rss_single_mb']:,.0f} | {r['events_per_s']:,.0f} | {checks} |")
    if report["ratios"]:
        lines.append("")
        lines.append("Ratios (large/small): " + ", ".join(f"{k} = {v}" for k, v in report["ratios"].items()))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=200_000, help="events in the export (default 200000)")
    parser.add_argument("--hours", type=int, default=4, help="hours the events spread over (default 4)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--mode", choices=("throughput", "memory"), default="throughput")
    parser.add_argument("--profile", action="store_true",
                        help="instead: profile the connector with py-spy (WORKERS=1 and default) and print µs/event per category")
    parser.add_argument("--profile-rate", type=int, default=250, help="py-spy samples per second (default 250)")
    parser.add_argument("--contenders", default=",".join(CONTENDERS),
                        help="comma-separated subset of connector,recipe,floor (default all)")
    parser.add_argument("--memory-sizes", default="100000,1000000", help="event counts of the one-hour exports for --mode memory")
    parser.add_argument("--out", type=Path, help="write the full report as JSON here")
    parser.add_argument("--keep-workdir", action="store_true", help="keep logs, stderr files and raw profiles")
    args = parser.parse_args(argv)
    args.contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    unknown = set(args.contenders) - set(CONTENDERS)
    if unknown or not args.contenders:
        parser.error(f"unknown contenders: {sorted(unknown)}")
    args.memory_sizes = [int(x) for x in args.memory_sizes.split(",") if x.strip()]
    if args.events < 1 or args.hours < 1 or args.rounds < 1:
        parser.error("--events, --hours and --rounds must be >= 1")

    workdir = Path(tempfile.mkdtemp(prefix="bench-"))
    started = time.monotonic()
    if args.profile:
        report = profile(args, workdir)
        text = report["markdown"]
    elif args.mode == "memory":
        report = memory(args, workdir)
        text = render_memory(report)
    else:
        report = throughput(args, workdir)
        text = render_throughput(report)
    report["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}
    report["started_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    report["bench_seconds"] = round(time.monotonic() - started, 1)
    ok = _all_ok(report)
    if ok and not args.keep_workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        text += f"\n\nLogs, stderr and raw profiles kept in {workdir}"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2, default=str))
        log(f"wrote {args.out}")
    return 0 if ok else 1


def _all_ok(report: dict) -> bool:
    if report["mode"] == "throughput":
        return all(s["all_ok"] for name, s in report["summary"].items() if name != "recipe")
    if report["mode"] == "memory":
        return all(r["ok"] for r in report["runs"].values())
    return all("error" not in p for p in report["profiles"])
