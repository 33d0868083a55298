"""What runs in a worker process: translate a block and build its request bodies.

Kept apart from the sync loop so a worker imports only the translation and the
wire format (about 17 MB), not HTTP clients, the store or metrics.
"""

from __future__ import annotations

import gc
import signal
from dataclasses import dataclass, field

from . import allocator
from .batches import MAX_BATCH_EVENTS, Batch, make_batches
from .translate import BlockResult, TranslateContext, translate_block


@dataclass
class Translated:
    """A worker's output for one block: the result and its ready-to-send batches."""

    result: BlockResult
    batches: list[Batch] = field(default_factory=list)


def translate_and_encode(
    block: bytes, ctx: TranslateContext, api_key: str, historical: bool, batch_size: int = MAX_BATCH_EVENTS,
    keep_events: bool = True,
) -> Translated:
    """Worker entry point: translate a block and build its compressed request bodies.

    Without `keep_events` only the bodies are returned: what crosses the process
    boundary shrinks about five-fold, and a refused batch's events are rebuilt
    from the block (the translation is pure, so they come out identical).
    """
    result = translate_block(block, ctx)
    batches = make_batches(api_key, result.events, historical, max_events=batch_size)
    if not keep_events:
        batches = [batch.without_events() for batch in batches]
        result.events, result.lines = [], []
    return Translated(result, batches)


def init_worker() -> None:
    # The parent decides when to stop; workers must not die mid-block on Ctrl-C.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # Translation creates no reference cycles; the collector would only cost time.
    gc.disable()
    allocator.tune()
