"""One full `sync` of the benchmark export with each state store: SQLite against PostgreSQL.

``python -m bench.stores [--events 200000] [--hours 4] [--rounds 2] [--pg-url URL]``
runs the connector (`python -m connector sync`, as `python -m bench` does: fake
Export API and fake PostHog in their own processes, WORKERS one per core, no
rate cap) with a fresh SQLite file and with a fresh PostgreSQL database,
interleaved over rounds, and prints events/s and CPU per store. Every run is
checked against the sink and `status` as in `python -m bench`. Without
``--pg-url`` (a server where this role may create databases) it starts a
throwaway PostgreSQL server as `python -m bench.merges` does.
"""

from __future__ import annotations

import argparse
import secrets
import shutil
import statistics
import sys
import tempfile
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterator

from . import data
from .run import Fakes, log, run_connector

STORES = ("sqlite", "postgres")


@contextmanager
def postgres_databases(url: str | None) -> Iterator[Callable[[], str]]:
    """A factory of fresh, empty databases (one per run, so every run starts from nothing)."""
    if url:
        import psycopg

        def fresh() -> str:
            name = "bench_" + secrets.token_hex(4)
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute(f'CREATE DATABASE "{name}"')
            return psycopg.conninfo.make_conninfo(url, dbname=name)

        yield fresh
        return
    from .pg import PASSWORD, ROLE, bench_server

    with bench_server() as server:
        def fresh() -> str:
            name = "bench_" + secrets.token_hex(4)
            server.create_database(name, owner=ROLE)
            return server.url(name, ROLE, PASSWORD)

        yield fresh


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--hours", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--pg-url", help="a PostgreSQL server to create the run databases on (default: start one)")
    args = parser.parse_args()
    export_dir, meta = data.ensure_export(args.events, args.hours, log=log)
    workdir = Path(tempfile.mkdtemp(prefix="bench-stores-"))
    runs: dict[str, list[dict]] = {name: [] for name in STORES}
    fakes = Fakes(export_dir, workdir)
    try:
        last = (datetime.strptime(meta["end_exclusive"], "%Y%m%dT%H") - data.HOUR).strftime("%Y%m%dT%H")
        fakes.warm(meta["start"], last)
        with postgres_databases(args.pg_url) as fresh_database:
            for r in range(args.rounds):
                for name in STORES if r % 2 == 0 else tuple(reversed(STORES)):
                    fakes.reset_sink()
                    log(f"round {r + 1}/{args.rounds}: connector with {name}")
                    url = fresh_database() if name == "postgres" else None
                    result = run_connector(fakes, meta, workdir, f"r{r + 1}-{name}", store_url=url)
                    log(f"  {name}: {result['events_per_s']:.0f} events/s, {result['cpu_s_per_million_events']:.0f} "
                        f"CPU s/M, checks {'ok' if result['ok'] else 'FAILED: ' + str(result['checks'])}")
                    runs[name].append(result)
    finally:
        fakes.stop()
    ok = all(r["ok"] for results in runs.values() for r in results)
    if ok:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"Export: {meta['events']:,} events over {meta['hours']} h; {args.rounds} rounds, interleaved.")
    print("| state store | events/s (median) | min–max | CPU s / M events (median) | checks |")
    print("|---|---:|---:|---:|---|")
    for name, results in runs.items():
        rates = [r["events_per_s"] for r in results]
        cpu = statistics.median(r["cpu_s_per_million_events"] for r in results)
        checks = "ok" if all(r["ok"] for r in results) else "FAILED"
        print(f"| {name} | {statistics.median(rates):,.0f} | {min(rates):,.0f}–{max(rates):,.0f} | {cpu:,.0f} | {checks} |")
    if not ok:
        print(f"logs kept in {workdir}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
