"""The /batch/ wire format: events cut into requests within PostHog's limits.

A `Batch` is one request: its gzip'd body, how many events it holds, and a
way to get those events back when PostHog refuses the request and the sink
must split it. Worker processes build bodies only (shipping the events too
would triple what crosses the process boundary); the events are rebuilt from
the block in the rare case they are needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import orjson
from isal import igzip

# PostHog's capture takes bodies up to 20 MB; stay far below so a batch never
# comes near it, and so a 400 costs little to bisect.
MAX_BATCH_BYTES = 5 * 1024**2
MAX_BATCH_EVENTS = 2000


@dataclass(frozen=True)
class Batch:
    """One /batch/ request: `count` serialized events as a gzip `body`."""

    body: bytes
    count: int
    historical: bool
    events: Callable[[], Sequence[bytes]]  # the `count` events, in order


def encode_body(api_key: str, events: Sequence[bytes], historical: bool) -> bytes:
    """The gzip body of one /batch/ request.

    No `sent_at`: PostHog would shift every timestamp by this machine's clock
    error. (`$ignore_sent_at` in each event says the same, for any proxy that adds one.)
    """
    flag = b',"historical_migration":true' if historical else b""
    payload = b'{"api_key":' + orjson.dumps(api_key) + flag + b',"batch":[' + b",".join(events) + b"]}"
    return igzip.compress(payload, compresslevel=1)


def make_batch(api_key: str, events: Sequence[bytes], historical: bool) -> Batch:
    """A batch of events already in hand."""
    events = tuple(events)
    return Batch(encode_body(api_key, events, historical), len(events), historical, lambda: events)


def cut(events: Sequence[bytes], max_events: int = MAX_BATCH_EVENTS, max_bytes: int = MAX_BATCH_BYTES) -> list[tuple[int, int]]:
    """(start, stop) bounds cutting `events` into runs of at most `max_events` and about
    `max_bytes`, in order. An event alone over `max_bytes` still gets a run of its own."""
    bounds: list[tuple[int, int]] = []
    start, size = 0, 0
    for i, event in enumerate(events):
        if i > start and (size + len(event) > max_bytes or i - start >= max_events):
            bounds.append((start, i))
            start, size = i, 0
        size += len(event) + 1
    if start < len(events):
        bounds.append((start, len(events)))
    return bounds
