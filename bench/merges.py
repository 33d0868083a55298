"""Merge history at scale: look up and record N distinct device/user pairs.

``python -m bench.merges [--pairs 1000000] [--block 1000] [--store sqlite|postgres] [--pg-url URL]``
drives the real store the way the sync loop does: per block of pairs, one
lookup of the block's devices, then one transaction recording the new pairs;
then it looks every pair up again (the steady state of a long sync). Prints
the time per pair and in total, and the size of the merge history.

``--store postgres`` measures the PostgreSQL store and, in the same run and on
the same pairs, the SQLite store, so the two figures are comparable. Without
``--pg-url`` it starts a throwaway PostgreSQL server (tests/pgserver.py: fsync
and synchronous_commit on, over TCP on 127.0.0.1) with PostgreSQL's stock
``shared_buffers`` of 128 MB, not the test suite's 16 MB.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable, Iterator

from connector.store import StateStore, open_store

HOUR = datetime(2024, 3, 1, tzinfo=timezone.utc)


@dataclass(frozen=True)
class Result:
    store: str
    pairs: int
    block: int
    record_s: float  # look up + record, every pair new
    lookup_s: float  # the lookups within record_s
    relookup_s: float  # look every pair up again, all known
    size_bytes: int


def measure(name: str, store: StateStore, size: Callable[[], int], pairs: list[tuple[str, str]],
            block: int) -> Result:
    assert store.acquire().held
    started = time.perf_counter()
    lookups = 0.0
    with store.hour(HOUR) as txn:
        for i in range(0, len(pairs), block):
            chunk = pairs[i : i + block]
            t = time.perf_counter()
            known = txn.linked_users(d for d, _ in chunk)
            lookups += time.perf_counter() - t
            txn.record_merges([p for p in chunk if p[0] not in known])
        recorded = time.perf_counter() - started
        t = time.perf_counter()
        for i in range(0, len(pairs), block):
            found = txn.linked_users(d for d, _ in pairs[i : i + block])
            assert len(found) == len(pairs[i : i + block])
        relookup = time.perf_counter() - t
    return Result(name, len(pairs), block, recorded, lookups, relookup, size())


@contextmanager
def sqlite_store(workdir: str) -> Iterator[tuple[StateStore, Callable[[], int]]]:
    path = os.path.join(workdir, "state.sqlite")
    store = open_store(path, sync="bench")
    try:
        yield store, lambda: sum(os.path.getsize(path + suffix) for suffix in ("", "-wal") if os.path.exists(path + suffix))
    finally:
        store.close()


@contextmanager
def postgres_store(url: str | None) -> Iterator[tuple[StateStore, Callable[[], int]]]:
    import psycopg

    with _postgres(url) as database:
        store = open_store(database, sync="bench")

        def size() -> int:
            with psycopg.connect(database) as conn:
                return conn.execute("SELECT pg_total_relation_size('connector_merges')").fetchone()[0]

        try:
            yield store, size
        finally:
            store.close()


@contextmanager
def _postgres(url: str | None) -> Iterator[str]:
    if url:
        yield url
        return
    from .pg import PASSWORD, ROLE, bench_server

    with bench_server() as server:
        server.create_database("bench", owner=ROLE)
        yield server.url("bench", ROLE, PASSWORD)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=1_000_000)
    parser.add_argument("--block", type=int, default=1000)
    parser.add_argument("--store", choices=("sqlite", "postgres"), default="sqlite",
                        help="postgres: PostgreSQL, then SQLite on the same pairs for comparison")
    parser.add_argument("--pg-url", help="an existing, empty PostgreSQL database (default: start a throwaway server)")
    args = parser.parse_args()
    pairs = [(str(uuid.UUID(int=i * 7919 + 1)), str(uuid.UUID(int=i * 104729 + 3))) for i in range(args.pairs)]
    results = []
    if args.store == "postgres":
        with postgres_store(args.pg_url) as (store, size):
            results.append(measure("postgres", store, size, pairs, args.block))
    with tempfile.TemporaryDirectory() as tmp, sqlite_store(tmp) as (store, size):
        results.append(measure("sqlite", store, size, pairs, args.block))
    print(f"pairs: {args.pairs:,} in blocks of {args.block}")
    for r in results:
        print(f"{r.store}: look up + record: {r.record_s:.1f} s ({r.record_s / r.pairs * 1e6:.1f} µs/pair; "
              f"lookups {r.lookup_s:.1f} s); look up again, all known: {r.relookup_s:.1f} s "
              f"({r.relookup_s / r.pairs * 1e6:.1f} µs/pair); merge history: {r.size_bytes / 1e6:.0f} MB")


if __name__ == "__main__":
    main()
