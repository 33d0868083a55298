"""Plumbing shared by the fake servers: a restartable local HTTP server,
a FIFO of injected faults and a waitable request log.

Contracts:
- Servers bind 127.0.0.1 only; port 0 picks an ephemeral port, which is then
  kept so that ``stop()`` + ``start()`` serve again on the SAME address.
- ``stop()`` closes the listening socket AND every open client connection, so
  a client holding a pooled keep-alive connection sees the server gone (and a
  new connection is refused) instead of talking to a lingering handler thread.
- Handlers never sleep to synchronise: timed waits use ``FakeServer.stopping``
  (a ``threading.Event``), so stopping the server ends every stall at once.
"""

from __future__ import annotations

import email.utils
import socket
import struct
import sys
import threading
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Generic, Iterable, Mapping, TypeVar

T = TypeVar("T")

try:  # orjson (a project dependency) is ~10x faster; output is equivalent
    import orjson

    def compact_json(value: Any) -> bytes:
        """Compact JSON bytes, non-ASCII kept as UTF-8."""
        return orjson.dumps(value)
except ImportError:  # pragma: no cover
    import json

    def compact_json(value: Any) -> bytes:
        """Compact JSON bytes, non-ASCII kept as UTF-8."""
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


class Fault:
    """One injected fault: a name plus the keyword arguments it was given."""

    __slots__ = ("name", "kw")

    def __init__(self, name: str, kw: Mapping[str, Any]):
        self.name = name
        self.kw = dict(kw)

    def __repr__(self) -> str:
        return f"Fault({self.name!r}, {self.kw!r})"


class FaultQueue:
    """Thread-safe FIFO of faults; each request takes at most one."""

    def __init__(self, allowed: Mapping[str, tuple[str, ...]]):
        """``allowed``: fault name -> the keyword arguments it requires."""
        self._allowed = dict(allowed)
        self._faults: deque[Fault] = deque()
        self._lock = threading.Lock()

    def inject(self, name: str, times: int = 1, **kw: Any) -> None:
        # fail in the test that injects, not later inside a handler thread
        if name not in self._allowed:
            raise ValueError(f"unknown fault {name!r}; known: {sorted(self._allowed)}")
        missing = [k for k in self._allowed[name] if k not in kw]
        if missing:
            raise TypeError(f"fault {name!r} needs {missing}")
        if times < 1:
            raise ValueError("times must be >= 1")
        with self._lock:
            self._faults.extend(Fault(name, kw) for _ in range(times))

    def pop(self) -> Fault | None:
        with self._lock:
            return self._faults.popleft() if self._faults else None

    def pending(self) -> int:
        with self._lock:
            return len(self._faults)


class RecordLog(Generic[T]):
    """Append-only, thread-safe list with a Condition to wait on its length."""

    def __init__(self) -> None:
        self._items: list[T] = []
        self._cond = threading.Condition()

    def append(self, item: T) -> None:
        self.extend((item,))

    def extend(self, items: Iterable[T]) -> None:
        with self._cond:
            self._items.extend(items)
            self._cond.notify_all()

    def snapshot(self) -> list[T]:
        with self._cond:
            return list(self._items)

    def wait_for(self, n: int, timeout: float) -> list[T]:
        """Block until at least ``n`` items exist; return a snapshot.

        Raises TimeoutError (with what did arrive) after ``timeout`` seconds.
        """
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._items) >= n, timeout):
                raise TimeoutError(f"waited {timeout}s for {n} items, have {len(self._items)}: "
                                   f"{self._items[-5:]!r}")
            return list(self._items)

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)


class _Server(ThreadingHTTPServer):
    """ThreadingHTTPServer that remembers its open connections."""

    daemon_threads = True  # a stuck handler must never keep the test process alive
    allow_reuse_address = True  # rebind the same port right after stop()

    def __init__(self, address, handler, owner: "FakeServer"):
        self.owner = owner
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(address, handler)

    def handle_error(self, request, client_address):
        # clients hanging up (timeouts, resets) are part of the tests, not errors
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)

    def process_request(self, request, client_address):
        with self.connections_lock:
            self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self.connections_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def close_all_connections(self) -> None:
        with self.connections_lock:
            conns = list(self.connections)
            self.connections.clear()
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already gone
            conn.close()


class QuietHandler(BaseHTTPRequestHandler):
    """HTTP/1.1 keep-alive handler with helpers; logs nothing to stderr.

    The `Date` header follows the owner's clock when it has one (`owner.now()`),
    so a test can skew a server's clock as a misconfigured host would be.
    """

    protocol_version = "HTTP/1.1"  # keep-alive: every response sets Content-Length
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass  # tests read the fakes' own logs, not stderr noise

    def date_time_string(self, timestamp: float | None = None) -> str:
        now = getattr(self.owner, "now", None)
        if timestamp is None and callable(now):
            return email.utils.format_datetime(now(), usegmt=True)
        return super().date_time_string(timestamp)

    @property
    def owner(self) -> Any:
        return self.server.owner

    def send_bytes(self, status: int, body: bytes = b"", content_type: str = "text/plain",
                   headers: Mapping[str, str] | None = None) -> None:
        """A complete response with an exact Content-Length."""
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, str(v))
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)

    def read_body(self, limit: int) -> bytes | None:
        """Read the Content-Length body; None (body drained) if over ``limit``.

        Draining rather than hanging up lets the client read our 413.
        """
        length = int(self.headers.get("Content-Length") or 0)
        if length <= limit:
            return self.rfile.read(length)
        remaining = length
        while remaining > 0:
            chunk = self.rfile.read(min(remaining, 1 << 20))
            if not chunk:
                break
            remaining -= len(chunk)
        return None

    def abort_connection(self) -> None:
        """Reset the TCP connection (RST, not FIN) and stop handling it."""
        self.close_connection = True
        try:
            self.wfile.flush()
        except OSError:
            pass
        # SO_LINGER with timeout 0 makes close() send RST: the client sees a
        # reset, as when a proxy or load balancer kills a transfer.
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()

    def write_quietly(self, data: bytes) -> bool:
        """Write; return False if the client has gone (it may have timed out)."""
        try:
            self.wfile.write(data)
            return True
        except (BrokenPipeError, ConnectionResetError, OSError):
            self.close_connection = True
            return False


class FakeServer:
    """Base of the fakes: lifecycle, base_url, context manager.

    Subclasses set ``handler_class``. ``start()`` may be called again after
    ``stop()``; it binds the same port.
    """

    handler_class: type[QuietHandler]

    def __init__(self, port: int = 0):
        self._port = port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._lifecycle = threading.Lock()
        self.stopping = threading.Event()

    @property
    def port(self) -> int:
        return self._port

    @property
    def base_url(self) -> str:
        if not self._port:
            raise RuntimeError("server not started yet")
        return f"http://127.0.0.1:{self._port}"

    def start(self) -> "FakeServer":
        with self._lifecycle:
            if self._server is not None:
                return self
            self.stopping.clear()
            server = _Server(("127.0.0.1", self._port), self.handler_class, self)
            self._port = server.server_address[1]
            thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                      name=f"{type(self).__name__}:{self._port}", daemon=True)
            thread.start()
            self._server, self._thread = server, thread
        return self

    def stop(self) -> None:
        """Stop serving: refuse new connections, cut the open ones."""
        with self._lifecycle:
            server, thread = self._server, self._thread
            self._server = self._thread = None
            if server is None:
                return
            self.stopping.set()  # wakes stalled / delayed handlers
            server.shutdown()
            server.server_close()
            server.close_all_connections()
            assert thread is not None
            thread.join(timeout=5)

    @property
    def running(self) -> bool:
        return self._server is not None

    def close(self) -> None:
        self.stop()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def interruptible_wait(server: FakeServer, seconds: float, cap: float = 300.0) -> bool:
    """Wait up to ``seconds`` (capped); return False if the server is stopping."""
    return not server.stopping.wait(min(max(seconds, 0.0), cap))

