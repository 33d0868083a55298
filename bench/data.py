"""A realistic Amplitude export, generated once and cached on disk.

Layout of one export directory (``bench/.cache/<name>/``), exactly what the
Export API serves for each hour:

- ``<YYYYMMDDTHH>.zip``: members ``<project>/<project>_<YYYY-MM-DD>_<H>#<n>.json.gz``
  (H not zero padded, several members per hour, gzip NDJSON, members STORED in
  the zip since they are already compressed; the last member of each hour has
  no trailing newline, as Amplitude's sometimes lack one).
- ``meta.json``: what was generated, with the counts the checks need.

Records come from ``tests/fakes/records.py`` (``make_population``): 55 keys,
about 2 KB each. Generation is deterministic for a given seed.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import shutil
import subprocess
import sys
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path
from random import Random

import orjson

from tests.fakes.records import PROJECT_ID, SESSION_MARKERS, make_population

CACHE = Path(__file__).resolve().parent / ".cache"
START = datetime(2024, 3, 1, 0, tzinfo=timezone.utc)  # far in the past: due and historical
HOUR = timedelta(hours=1)
SEED = 20240301
# Bump when the layout or the generator's use changes, so stale caches are not reused.
LAYOUT_VERSION = 1
RECORDS_PER_MEMBER = 20_000
MIN_MEMBERS_PER_HOUR = 3
GZIP_LEVEL = 6  # gzip's default, as Amplitude's (Java) writer uses


def hour_param(hour: datetime) -> str:
    return hour.strftime("%Y%m%dT%H")


def member_name(hour: datetime, n: int) -> str:
    return f"{PROJECT_ID}/{PROJECT_ID}_{hour:%Y-%m-%d}_{hour.hour}#{n}.json.gz"


def export_dir(events: int, hours: int, seed: int = SEED) -> Path:
    return CACHE / f"export-{events}x{hours}h-seed{seed}-v{LAYOUT_VERSION}"


def ensure_export(events: int, hours: int, seed: int = SEED, log=print, *, in_process: bool = False) -> tuple[Path, dict]:
    """The cached export directory and its meta, generating it when missing.

    Generation runs in a child process unless `in_process`: the bench process
    stays small, and the processes it starts later do not inherit its memory.
    """
    directory = export_dir(events, hours, seed)
    meta_path = directory / "meta.json"
    if meta_path.exists():
        return directory, json.loads(meta_path.read_text())
    if not in_process:
        subprocess.run([sys.executable, "-m", "bench.data", "--events", str(events), "--hours", str(hours),
                        "--seed", str(seed)], cwd=str(Path(__file__).resolve().parent.parent), check=True,
                       stdout=subprocess.DEVNULL)
        return directory, json.loads(meta_path.read_text())
    tmp = directory.with_name(directory.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    log(f"generating {events} events over {hours} hour(s) into {directory} (once; cached)")
    started = time.monotonic()
    meta = _generate(tmp, events, hours, seed)
    meta["generation_seconds"] = round(time.monotonic() - started, 1)
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)
    log(f"generated in {meta['generation_seconds']} s")
    return directory, meta


def _compress(lines: list[bytes], trailing_newline: bool) -> bytes:
    data = b"\n".join(lines) + (b"\n" if trailing_newline else b"")
    return gzip.compress(data, compresslevel=GZIP_LEVEL, mtime=0)


def _generate(directory: Path, events: int, hours: int, seed: int) -> dict:
    hour_list = [START + i * HOUR for i in range(hours)]
    per_hour = [events // hours + (1 if i < events % hours else 0) for i in range(hours)]
    records = make_population(Random(seed), events, hour_list)
    dumps = orjson.dumps

    markers = 0
    with_user = 0
    merge_devices: set[str] = set()  # devices the connector merges (non-marker events with a user)
    alias_pairs: set[tuple[str, str]] = set()  # (device, user) pairs the recipe aliases (all events)
    raw_bytes = 0
    members_total = 0
    hour_meta = []
    # zlib releases the GIL: compress a member in a thread while generating the next.
    with ThreadPoolExecutor(1) as pool:
        for hour, count in zip(hour_list, per_hour):
            n_members = max(MIN_MEMBERS_PER_HOUR, math.ceil(count / RECORDS_PER_MEMBER))
            sizes = [count // n_members + (1 if i < count % n_members else 0) for i in range(n_members)]
            futures = []
            for m, size in enumerate(sizes):
                lines = []
                for _ in range(size):
                    record = next(records)
                    event_type = record["event_type"]
                    user, device = record["user_id"], record["device_id"]
                    if event_type in SESSION_MARKERS:
                        markers += 1
                    elif user and device and user != device:
                        merge_devices.add(device)
                    if user:
                        with_user += 1
                        if device and user != device:
                            alias_pairs.add((device, user))
                    line = dumps(record)
                    raw_bytes += len(line) + 1
                    lines.append(line)
                futures.append(pool.submit(_compress, lines, m < n_members - 1))
            path = directory / f"{hour_param(hour)}.zip"
            with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
                for m, future in enumerate(futures):
                    archive.writestr(member_name(hour, m), future.result())
            members_total += n_members
            hour_meta.append({"hour": hour_param(hour), "events": count, "members": n_members,
                              "zip_bytes": path.stat().st_size})
    try:
        next(records)
        raise AssertionError("make_population yielded more records than asked")
    except StopIteration:
        pass
    return {
        "layout_version": LAYOUT_VERSION,
        "seed": seed,
        "events": events,
        "hours": hours,
        "start": hour_param(hour_list[0]),
        "end_exclusive": hour_param(hour_list[-1] + HOUR),
        "session_markers": markers,
        "events_with_user_id": with_user,
        "connector_expected_events": events - markers,
        "connector_expected_merges": len(merge_devices),
        "recipe_expected_aliases": len(alias_pairs),
        "ndjson_bytes": raw_bytes,
        "avg_record_bytes": round(raw_bytes / max(1, events), 1),
        "members": members_total,
        "zip_bytes": sum(h["zip_bytes"] for h in hour_meta),
        "per_hour": hour_meta,
    }


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="generate (or show) a cached export")
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--hours", type=int, default=4)
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args()
    log = lambda message: print(f"[bench.data] {message}", file=sys.stderr, flush=True)  # noqa: E731
    print(json.dumps(ensure_export(args.events, args.hours, args.seed, log, in_process=True)[1], indent=2))
