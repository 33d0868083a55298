"""Translation workers: blocks in, translated blocks with ready request bodies out.

`Translator.map(blocks, ctx, historical)` translates blocks in order, in this
process (`workers <= 1`) or on a pool of worker processes that keeps every
worker busy while the main process sends. What a worker runs,
`translate_and_encode`, imports only the translation and the wire format
(about 17 MB), not HTTP clients, the store or metrics.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import math
import os
import signal
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from datetime import date
from multiprocessing import get_context
from typing import Iterable, Iterator, NamedTuple

import orjson

from . import allocator
from .archive import Block
from .batches import MAX_BATCH_EVENTS, Batch, cut, encode_body
from .translate import BlockResult, TranslateContext, translate_block


class Encoded(NamedTuple):
    """A worker's output for one block: the result and its request bodies with their
    event counts. Across a process boundary the result comes without its events."""

    result: BlockResult
    bodies: list[tuple[bytes, int]]


def translate_and_encode(
    block: Block, ctx: TranslateContext, api_key: str, historical: bool, batch_size: int = MAX_BATCH_EVENTS,
    keep_events: bool = True,
) -> Encoded:
    """Worker entry point: translate a block and build its compressed request bodies.

    Without `keep_events` only the bodies are returned: what crosses the process
    boundary shrinks about five-fold, and a refused batch's events are rebuilt
    from the block (the translation is pure, so they come out identical).
    """
    result = translate_block(block, ctx)
    bodies = [
        (encode_body(api_key, result.events[start:stop], historical), stop - start)
        for start, stop in cut(result.events, batch_size)
    ]
    if not keep_events:
        result.events, result.lines = [], []
    return Encoded(result, bodies)


class TranslatedBlock:
    """A translated block: its result, its batches, and the raw record behind each event.

    The events and their source lines are rebuilt from the block only when
    asked for (a refused batch), and then once.
    """

    def __init__(self, block: Block, ctx: TranslateContext, encoded: Encoded, historical: bool):
        self.block = block
        self.result = encoded.result
        self._ctx = ctx
        self._bodies = encoded.bodies
        self._historical = historical
        self._kept = bool(encoded.result.events) or not encoded.bodies

    def batches(self) -> Iterator[Batch]:
        """The block's requests, in order. (Made on demand: a batch refers to this
        block for its events, and a block holding its batches would be a reference
        cycle keeping megabytes alive until the cyclic collector runs.)"""
        first = 0
        for body, count in self._bodies:
            yield Batch(body, count, self._historical, functools.partial(self._events, first, first + count))
            first += count

    @functools.cached_property
    def _full(self) -> BlockResult:
        return self.result if self._kept else translate_block(self.block, self._ctx)

    @functools.cached_property
    def _lines(self) -> list[bytes]:
        return self.block.lines.split(b"\n")

    def _events(self, start: int, stop: int) -> list[bytes]:
        return self._full.events[start:stop]

    def day_of(self, event_index: int) -> date:
        """The UTC day of the block's `event_index`-th event's timestamp."""
        return date.fromisoformat(orjson.loads(self._full.events[event_index])["timestamp"][:10])

    def line_of(self, event_index: int) -> bytes:
        """The raw Amplitude line behind the block's `event_index`-th event."""
        return self._lines[self._full.lines[event_index]]


class Translator:
    """Maps blocks to `TranslatedBlock`s, in order, inline or on a pool of processes."""

    def __init__(self, workers: int, api_key: str, batch_size: int = MAX_BATCH_EVENTS):
        self._api_key = api_key
        self._batch_size = batch_size
        self._workers = workers
        self._pool = (
            ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=init_worker,
                                initargs=(os.getpid(),))
            if workers > 1
            else None
        )

    def map(self, blocks: Iterable[Block], ctx: TranslateContext, historical: bool) -> Iterator[TranslatedBlock]:
        if self._pool is None:
            for block in blocks:
                encoded = translate_and_encode(block, ctx, self._api_key, historical, self._batch_size)
                yield TranslatedBlock(block, ctx, encoded, historical)
            return
        # Keep every worker busy while the main thread sends, but hold only a
        # bounded number of blocks in memory.
        inflight: deque[tuple[Block, Future]] = deque()
        try:
            for block in blocks:
                inflight.append((block, self._pool.submit(
                    translate_and_encode, block, ctx, self._api_key, historical, self._batch_size, False
                )))
                while len(inflight) > 2 * self._workers:
                    done, future = inflight.popleft()
                    yield TranslatedBlock(done, ctx, future.result(), historical)
            while inflight:
                done, future = inflight.popleft()
                yield TranslatedBlock(done, ctx, future.result(), historical)
        finally:
            for _, future in inflight:
                future.cancel()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


# More workers than this only add memory: the main process, which sends, is the
# bottleneck beyond it (README, Performance).
MAX_DEFAULT_WORKERS = 8


def default_workers(cgroup_root: str = "/sys/fs/cgroup") -> int:
    """WORKERS=0: the CPUs this process may really use, bounded.

    A container's CPU limit is a cgroup quota, not fewer visible cores, so it
    is read from `cpu.max` (cgroup v2) or `cpu.cfs_quota_us`/`cpu.cfs_period_us`
    (v1); the CPU affinity mask bounds it too.
    """
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = _cgroup_cpus(cgroup_root)
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return max(1, min(cpus, MAX_DEFAULT_WORKERS))


def _cgroup_cpus(root: str) -> float | None:
    """The cgroup CPU quota in CPUs, or None when there is none (or it cannot be read)."""
    try:
        with open(os.path.join(root, "cpu.max")) as f:
            quota, period = f.read().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        with open(os.path.join(root, "cpu", "cpu.cfs_quota_us")) as f:
            quota_us = int(f.read())
        with open(os.path.join(root, "cpu", "cpu.cfs_period_us")) as f:
            period_us = int(f.read())
        return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None


PR_SET_PDEATHSIG = 1


def die_with_parent() -> bool:
    """Ask Linux to SIGKILL this process when its parent dies (a SIGKILLed main process
    would otherwise leave its workers, and the resource tracker they keep alive, running).
    False where the C library has no prctl."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def init_worker(parent: int | None = None) -> None:
    if die_with_parent() and parent is not None and os.getppid() != parent:
        os._exit(0)  # the parent died before the request to follow it took effect
    # The parent decides when to stop; workers must not die mid-block on Ctrl-C.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # Translation creates no reference cycles; the collector would only cost time.
    gc.disable()
    allocator.tune()
