"""Deadlines for whole HTTP requests.

`requests`' timeouts bound each socket read, not the request: a server that
accepts the connection and then trickles one byte every few seconds keeps a
request alive forever. Here a request made inside `with whole_request(s):` gets at
most `s` seconds in all: when they are up, a watchdog shuts down the sockets
the request uses, the blocked read returns, and the caller sees
`DeadlineExceeded`. A long download calls `extend(s)` as data arrives, so it
may take as long as it keeps making progress.

`install(session)` mounts the adapter that lets the watchdog find the
request's sockets; it is idempotent, and the HTTP clients call it on the
session they are given.
"""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager
from typing import Iterator

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

_current = threading.local()


class DeadlineExceeded(requests.Timeout):
    """The whole request took longer than its deadline."""


class Deadline:
    """The time left for one request, and the connections it uses."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self._at = time.monotonic() + seconds
        self._connections: list[HTTPConnection] = []
        self._lock = threading.Lock()
        self._done = threading.Event()
        self.expired = False

    def watch(self, connection: HTTPConnection) -> None:
        with self._lock:
            self._connections.append(connection)
            if self.expired:
                _shut(connection)

    def extend(self, seconds: float) -> None:
        """Allow at least `seconds` more from now (progress was made)."""
        with self._lock:
            self._at = max(self._at, time.monotonic() + seconds)

    def _watchdog(self) -> None:
        while True:
            with self._lock:
                left = self._at - time.monotonic()
                if left <= 0:
                    self.expired = True
                    for connection in self._connections:
                        _shut(connection)
                    return
            if self._done.wait(left):
                return

    def start(self) -> None:
        threading.Thread(target=self._watchdog, name="http-deadline", daemon=True).start()

    def finish(self) -> None:
        self._done.set()


def _shut(connection: HTTPConnection) -> None:
    sock = connection.sock
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already closed


@contextmanager
def whole_request(seconds: float) -> Iterator[Deadline]:
    """Requests made in this thread inside the block get `seconds` in all.

    Raises DeadlineExceeded (a requests.Timeout) when they ran out, whatever
    error the cut connection surfaced as.
    """
    watch = Deadline(seconds)
    previous = getattr(_current, "deadline", None)
    _current.deadline = watch
    watch.start()
    try:
        yield watch
    except (requests.RequestException, OSError) as exc:
        if watch.expired:
            raise DeadlineExceeded(f"no complete answer within {seconds:g} s") from exc
        raise
    finally:
        watch.finish()
        _current.deadline = previous


class _Watched:
    """A connection that tells the current deadline (if any) it is in use."""

    def request(self, *args, **kwargs):  # noqa: D401 - urllib3's signature
        watch = getattr(_current, "deadline", None)
        if watch is not None:
            watch.watch(self)  # type: ignore[arg-type]
        return super().request(*args, **kwargs)  # type: ignore[misc]


class _WatchedHTTPConnection(_Watched, HTTPConnection):
    pass


class _WatchedHTTPSConnection(_Watched, HTTPSConnection):
    pass


class _WatchedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _WatchedHTTPConnection


class _WatchedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


_POOLS = {"http": _WatchedHTTPPool, "https": _WatchedHTTPSPool}


class DeadlineAdapter(HTTPAdapter):
    """requests' adapter, with connections the deadline watchdog can cut."""

    def init_poolmanager(self, *args, **kwargs) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = dict(_POOLS)

    def proxy_manager_for(self, proxy, **proxy_kwargs):
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        manager.pool_classes_by_scheme = dict(_POOLS)
        return manager


def install(session: requests.Session) -> requests.Session:
    """Mount the deadline adapter on `session` (once) and return it."""
    if not isinstance(session.get_adapter("http://x"), DeadlineAdapter):
        session.mount("http://", DeadlineAdapter())
        session.mount("https://", DeadlineAdapter())
    return session
