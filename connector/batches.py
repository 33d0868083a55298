"""The /batch/ wire format: events cut into batches within PostHog's limits.

Pure functions, shared by the worker processes (which build request bodies in
parallel) and the sink (which rebuilds bodies when it splits a batch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import orjson
from isal import igzip

# PostHog's capture takes bodies up to 20 MB; stay far below so a batch never
# comes near it, and so a 400 costs little to bisect.
MAX_BATCH_BYTES = 5 * 1024**2
MAX_BATCH_EVENTS = 2000


@dataclass(frozen=True)
class Batch:
    """`count` serialized events: the events themselves, their gzip request body, or both.

    A worker process ships only the body (the events would triple what crosses
    the process boundary); the sender asks for the events again only in the rare
    case that PostHog refuses the batch and it has to be split.
    """

    events: tuple[bytes, ...]
    historical: bool
    body: bytes | None = None
    count: int = -1

    def __post_init__(self) -> None:
        if self.count < 0:
            object.__setattr__(self, "count", len(self.events))

    def without_events(self) -> "Batch":
        return Batch((), self.historical, self.body, self.count)


def encode_batch(api_key: str, events: Sequence[bytes], historical: bool) -> bytes:
    """The gzip body of one /batch/ request.

    No `sent_at`: PostHog would shift every timestamp by this machine's clock
    error. (`$ignore_sent_at` in each event says the same, for any proxy that adds one.)
    """
    flag = b',"historical_migration":true' if historical else b""
    payload = b'{"api_key":' + orjson.dumps(api_key) + flag + b',"batch":[' + b",".join(events) + b"]}"
    return igzip.compress(payload, compresslevel=1)


def make_batches(
    api_key: str, events: Sequence[bytes], historical: bool, *, encode: bool = True, max_events: int = MAX_BATCH_EVENTS
) -> list[Batch]:
    """Cut `events` into batches of at most `max_events` within PostHog's limits, keeping their order."""
    batches: list[Batch] = []
    start, size = 0, 0
    for i, event in enumerate(events):
        if i > start and (size + len(event) > MAX_BATCH_BYTES or i - start >= max_events):
            batches.append(_batch(api_key, events[start:i], historical, encode))
            start, size = i, 0
        size += len(event) + 1
    if start < len(events):
        batches.append(_batch(api_key, events[start:], historical, encode))
    return batches


def _batch(api_key: str, events: Sequence[bytes], historical: bool, encode: bool) -> Batch:
    events = tuple(events)
    return Batch(events, historical, encode_batch(api_key, events, historical) if encode else None)
