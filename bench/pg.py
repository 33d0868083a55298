"""A throwaway PostgreSQL server for the benchmarks, configured as a stock install would be."""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    from tests.pgserver import PgServer

ROLE, PASSWORD = "bench", "bench-password"


@contextmanager
def bench_server() -> Iterator["PgServer"]:
    """A started server (shared_buffers at PostgreSQL's default) with the role ROLE."""
    from tests.pgserver import PgServer

    with PgServer() as server:
        with server.connect() as conn:
            conn.execute("ALTER SYSTEM SET shared_buffers = '128MB'")  # PostgreSQL's own default
        server.restart()
        server.create_role(ROLE, PASSWORD)
        yield server
