"""Merge history at scale: look up and record N distinct device/user pairs.

``python -m bench.merges [--pairs 1000000] [--block 1000]`` drives the real
SQLite store the way the sync loop does: per block of pairs, one lookup of the
block's devices, then one transaction recording the new pairs. Prints the time
per pair and in total, and the state file's size.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import uuid
from datetime import datetime, timezone

from connector.sqlite_store import SQLiteStore

HOUR = datetime(2024, 3, 1, tzinfo=timezone.utc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=1_000_000)
    parser.add_argument("--block", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = SQLiteStore(os.path.join(tmp, "state.sqlite"))
        pairs = [(str(uuid.UUID(int=i * 7919 + 1)), str(uuid.UUID(int=i * 104729 + 3))) for i in range(args.pairs)]
        started = time.perf_counter()
        lookups = 0.0
        with store.hour(HOUR) as txn:
            for i in range(0, len(pairs), args.block):
                chunk = pairs[i : i + args.block]
                t = time.perf_counter()
                known = txn.linked_users(d for d, _ in chunk)
                lookups += time.perf_counter() - t
                txn.record_merges([p for p in chunk if p[0] not in known])
            # Looking them all up again once they exist: the steady state of a long sync.
            t = time.perf_counter()
            for i in range(0, len(pairs), args.block):
                found = txn.linked_users(d for d, _ in pairs[i : i + args.block])
                assert len(found) == len(pairs[i : i + args.block])
            relookup = time.perf_counter() - t
        total = time.perf_counter() - started - relookup
        size = os.path.getsize(os.path.join(tmp, "state.sqlite")) + os.path.getsize(os.path.join(tmp, "state.sqlite-wal"))
        store.close()
    print(f"pairs: {args.pairs:,} in blocks of {args.block}")
    print(f"look up + record: {total:.1f} s ({total / args.pairs * 1e6:.1f} µs/pair; lookups {lookups:.1f} s)")
    print(f"look up again, all known: {relookup:.1f} s ({relookup / args.pairs * 1e6:.1f} µs/pair)")
    print(f"state file: {size / 1e6:.0f} MB")


if __name__ == "__main__":
    main()
