"""pytest fixtures around tests/pgserver.py: one real PostgreSQL server per test session.

- `pg_server` (session): a started `PgServer`. If it cannot start, every test using
  it fails (at setup, reported by pytest as an error) with the reason; it never skips.
- `pg_url` (function): the URL of a fresh database with a random name, owned by a
  fresh non-superuser role with its own password; both are dropped after the test.
  If a previous test left the server stopped or killed, it is started again first.
- `pg_database` (function): a factory making more databases like `pg_url`'s (each
  call one more), for a test that needs several.

Registering them: either import the ones used (and `pg_server`, which they need)
into the test module or a conftest,

    from .pg_fixtures import pg_server, pg_url  # noqa: F401

or, in the rootdir conftest.py only (pytest refuses `pytest_plugins` elsewhere),

    pytest_plugins = ["tests.pg_fixtures"]
"""

from __future__ import annotations

import secrets
from contextlib import contextmanager

import pytest

from .pgserver import PgServer, PgUnavailable


@pytest.fixture(scope="session")
def pg_server():
    server, reason = None, None
    try:
        server = PgServer()  # raises already if there is no PostgreSQL installed
        server.start()
    except PgUnavailable as e:
        reason = str(e)
        if server is not None:
            server.cleanup()
    if reason is not None:  # failed outside the except block, so no chained traceback
        pytest.fail(f"the test PostgreSQL server could not start: {reason}", pytrace=False)
    yield server
    server.cleanup()


@contextmanager
def _databases(server: PgServer):
    """Yield a function creating fresh databases on `server`; drop them all on exit."""
    names = []

    def new_database() -> str:
        if not server.is_running():
            server.start()
        name = "t_" + secrets.token_hex(6)
        password = secrets.token_urlsafe(18)
        server.create_role(name, password)
        names.append(name)
        server.create_database(name, owner=name)
        return server.url(dbname=name, user=name, password=password)

    try:
        yield new_database
    finally:
        if names and not server.is_running():
            server.start()
        for name in names:
            server.drop_database(name)
            server.drop_role(name)


@pytest.fixture
def pg_url(pg_server: PgServer):
    """The URL of a fresh database of its own, as its non-superuser owner."""
    with _databases(pg_server) as new_database:
        yield new_database()


@pytest.fixture
def pg_database(pg_server: PgServer):
    """A factory: each call creates another database like pg_url's and returns its URL."""
    with _databases(pg_server) as new_database:
        yield new_database
