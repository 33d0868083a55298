"""Where the connector's time goes per event, measured with py-spy.

``python -m bench.profile`` (same as ``python -m bench --profile``) runs the
real ``python -m connector sync`` against the fakes under
``py-spy record --format raw`` (sampling every thread of every process; idle
threads are not sampled, so a sample is CPU time), then attributes each sample
to a category by the innermost connector frame of its stack:

- decode: ``gunzip`` (the inflater call in ``archive.Archive._member_lines``),
  ``lines`` (zip reads, cutting and joining lines into blocks, ``block.split``),
  ``json`` (``orjson.loads`` in ``translate_block``)
- translate: ``translate.translate_record`` and helpers, and the rest of the
  per-line loop of ``translate_block``
- serialize: ``orjson.dumps`` of the event in ``translate_block``
- compress: ``batches`` (``encode_body``: join + gzip, ``cut``)
- send: ``sink`` (requests/urllib3/http.client below it)
- store: ``store``/``sqlite_store`` and the merge/group planning in ``identities`` that feeds it
- download: ``export`` client saving the archive (the prefetch thread)
- ipc: pickling/queues of the worker pool (only with WORKERS > 1)
- startup: imports; other: everything else (config, logging, the sync loop)

Two runs: WORKERS=1 (everything in one process, clean attribution) and the
default (one worker per core; CPU summed over all processes, also split by
process role). Needs ``pip install py-spy``.
"""

from __future__ import annotations

import inspect
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from connector import archive as archive_module
from connector import translate as translate_module

ROOT = Path(__file__).resolve().parent.parent
FINE = ("decode_gunzip", "decode_lines", "decode_json", "translate", "serialize", "compress", "send",
        "store", "merge_planning", "download", "ipc", "startup", "other")
COARSE = {
    "decode": ("decode_gunzip", "decode_lines", "decode_json"),
    "translate": ("translate",),
    "serialize": ("serialize",),
    "compress": ("compress",),
    "send": ("send",),
    "store": ("store", "merge_planning"),
    "download": ("download",),
    "ipc": ("ipc",),
    "startup": ("startup",),
    "other": ("other",),
}


def _lines_matching(func, *needles: str) -> dict[str, set[int]]:
    source, first = inspect.getsourcelines(func)
    found = {needle: set() for needle in needles}
    for offset, text in enumerate(source):
        for needle in needles:
            if needle in text:
                found[needle].add(first + offset)
    return found


class Classifier:
    def __init__(self) -> None:
        tb = _lines_matching(translate_module.translate_block, "loads(line)", "dumps(translation.event)",
                             "block.lines.split(")
        self.loads_lines = tb["loads(line)"]
        self.dumps_lines = tb["dumps(translation.event)"]
        self.split_lines = tb["block.lines.split("]
        ml = _lines_matching(archive_module.Archive._member_lines, ".decompress(")
        self.inflate_lines = ml[".decompress("]
        missing = [n for n, s in (("loads", self.loads_lines), ("dumps", self.dumps_lines),
                                  ("inflate", self.inflate_lines)) if not s]
        if missing:
            raise RuntimeError(f"profile: cannot find the {missing} lines in connector source; update bench/profile.py")

    @staticmethod
    def _frame(text: str) -> tuple[str, str, int]:
        # "func (path/file.py:123)"
        open_at = text.rfind(" (")
        func = text[:open_at]
        location = text[open_at + 2 : -1]
        path, _, line = location.rpartition(":")
        try:
            return func, path, int(line)
        except ValueError:
            return func, location, 0

    def category(self, frames: list[str]) -> str:
        for text in reversed(frames):  # innermost first
            func, path, line = self._frame(text)
            if "connector/" in path:
                name = path.rsplit("/", 1)[-1]
                if name == "translate.py":
                    if func == "translate_block":
                        if line in self.loads_lines:
                            return "decode_json"
                        if line in self.dumps_lines:
                            return "serialize"
                        if line in self.split_lines:
                            return "decode_lines"
                    return "translate"
                if name == "batches.py":
                    return "compress"
                if name == "sink.py":
                    return "send"
                if name in ("store.py", "sqlite_store.py"):
                    return "store"
                if name == "identities.py":
                    return "merge_planning"
                if name == "archive.py":
                    if func.endswith("_member_lines"):
                        return "decode_gunzip" if line in self.inflate_lines else "decode_lines"
                    return "decode_lines"
                if name == "export.py":
                    return "download"
                if name == "worker.py" and func.endswith("translate_and_encode"):
                    continue  # its callees decide; its own lines are negligible
                return "other"
            if "importlib" in path:
                return "startup"
            if any(part in path for part in ("multiprocessing/", "concurrent/futures/", "pickle", "copyreg")):
                return "ipc"
        return "other"


def parse_raw(path: Path, classifier: Classifier) -> tuple[Counter, dict[str, Counter]]:
    """Samples per category overall and per process role (main/worker/other)."""
    totals: Counter = Counter()
    by_role: dict[str, Counter] = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for raw in f:
            raw = raw.rstrip("\n")
            stack, _, count = raw.rpartition(" ")
            if not stack or not count.isdigit():
                continue
            frames = stack.split(";")
            if frames and frames[0].startswith("process "):
                frames = frames[1:]  # py-spy labels every process of the tree with the root's pid
            if any("spawn_main" in fr or "_process_worker" in fr for fr in frames):
                role = "worker"
            elif any("resource_tracker" in fr for fr in frames):
                role = "helper"
            else:
                role = "main"
            category = classifier.category(frames)
            totals[category] += int(count)
            by_role.setdefault(role, Counter())[category] += int(count)
    return totals, by_role


def _us_per_event(counter: Counter, rate: int, events: int) -> dict[str, float]:
    return {k: round(counter.get(k, 0) / rate / events * 1e6, 2) for k in FINE}


def _coarse(fine: dict[str, float]) -> dict[str, float]:
    return {k: round(sum(fine[f] for f in parts), 2) for k, parts in COARSE.items()}


def find_py_spy() -> str | None:
    candidate = Path(sys.executable).parent / "py-spy"
    return str(candidate) if candidate.exists() else shutil.which("py-spy")


def profile_connector(*, py_spy: str, env: dict, events: int, workers: int | None, rate: int,
                      workdir: Path, timeout: float) -> dict:
    env = dict(env)
    if workers is None:
        env.pop("WORKERS", None)
    else:
        env["WORKERS"] = str(workers)
    state = Path(tempfile.mkdtemp(prefix="bench-profile-state-", dir=workdir))
    env["STATE_STORE_URL"] = str(state / "state.sqlite")
    out = workdir / f"pyspy-workers{workers or 'default'}.txt"
    argv = [py_spy, "record", "--rate", str(rate), "--format", "raw", "--output", str(out)]
    if workers != 1:
        argv.append("--subprocesses")
    argv += ["--", sys.executable, "-m", "connector", "sync"]
    started = time.perf_counter()
    with open(workdir / f"pyspy-workers{workers or 'default'}.log", "wb") as log:
        proc = subprocess.run(argv, env=env, cwd=str(ROOT), stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
    wall = time.perf_counter() - started
    shutil.rmtree(state, ignore_errors=True)
    if proc.returncode != 0 or not out.exists():
        return {"workers": workers or "default", "error": f"py-spy/connector exited {proc.returncode}; see {out}.log"}
    totals, by_role = parse_raw(out, Classifier())
    fine = _us_per_event(totals, rate, events)
    sampled = sum(totals.values())
    return {
        "workers": workers or f"default ({os.cpu_count()})",
        "wall_s_under_profiler": round(wall, 2),
        "sampled_cpu_s": round(sampled / rate, 2),
        "rate_hz": rate,
        "samples": sampled,
        "us_per_event": _coarse(fine),
        "us_per_event_fine": fine,
        "us_per_event_total": round(sum(fine.values()), 2),
        "us_per_event_by_process_role": {role: _coarse(_us_per_event(c, rate, events)) for role, c in by_role.items()},
        "raw_profile": str(out),
    }


def normalize(result: dict, *, cpu_s: float, wall_s: float, events: int) -> None:
    """Add the shares of the samples scaled to the CPU an unprofiled run really used.

    py-spy counts a thread as busy while it is runnable, including while it
    waits for a core (3+ busy processes on 2 cores), so its seconds overstate
    CPU; the shares are what it measures well.
    """
    if "error" in result:
        return
    sampled = sum(result["us_per_event_fine"].values()) or 1.0
    scale = (cpu_s / events * 1e6) / sampled
    result["unprofiled"] = {"cpu_s": round(cpu_s, 2), "wall_s": round(wall_s, 2),
                            "cpu_us_per_event": round(cpu_s / events * 1e6, 2),
                            "events_per_s": round(events / wall_s, 1)}
    result["cpu_us_per_event_fine"] = {k: round(v * scale, 2) for k, v in result["us_per_event_fine"].items()}
    result["cpu_us_per_event"] = _coarse(result["cpu_us_per_event_fine"])
    result["cpu_us_per_event_by_process_role"] = {
        role: {k: round(v * scale, 2) for k, v in cats.items()}
        for role, cats in result["us_per_event_by_process_role"].items()
    }


def render(results: list[dict]) -> str:
    lines = []
    for r in results:
        if "error" in r:
            lines.append(f"WORKERS={r['workers']}: {r['error']}")
            continue
        u = r.get("unprofiled", {})
        lines.append(f"\nConnector, WORKERS={r['workers']}: unprofiled run {u.get('events_per_s', 0):,.0f} events/s, "
                     f"{u.get('cpu_us_per_event', 0):.1f} CPU µs/event; py-spy {r['rate_hz']} Hz, {r['samples']} samples "
                     f"({r['sampled_cpu_s']} s busy, wall {r['wall_s_under_profiler']} s under the profiler)\n")
        lines.append("| category | CPU µs/event (py-spy share × measured CPU) | share | py-spy busy µs/event |")
        lines.append("|---|---:|---:|---:|")
        total = r["us_per_event_total"] or 1
        for k, v in r["us_per_event"].items():
            lines.append(f"| {k} | {r.get('cpu_us_per_event', {}).get(k, float('nan')):.1f} | {100 * v / total:.0f}% | {v:.1f} |")
        lines.append(f"| **total** | **{u.get('cpu_us_per_event', float('nan')):.1f}** | | {total:.1f} |")
        fine = r.get("cpu_us_per_event_fine", r["us_per_event_fine"])
        lines.append("\nfine (CPU µs/event): " + ", ".join(f"{k} {v:.1f}" for k, v in fine.items() if v))
        roles = r.get("cpu_us_per_event_by_process_role", r["us_per_event_by_process_role"])
        if len(roles) > 1:
            for role, cats in sorted(roles.items()):
                nonzero = ", ".join(f"{k} {v:.1f}" for k, v in cats.items() if v)
                lines.append(f"\n{role} process(es): {sum(cats.values()):.1f} CPU µs/event ({nonzero})")
    return "\n".join(lines)


def main(argv=None) -> int:
    from .run import main as run_main

    return run_main(["--profile", *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    sys.exit(main())
