"""Liveness and metrics over HTTP: `/healthz` and Prometheus `/metrics`."""

from __future__ import annotations

import json
import threading
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from .metrics import Metrics


class Health:
    """The sync loop beats on progress; silence longer than `max_silence` is unhealthy."""

    def __init__(self, clock: Callable[[], datetime], max_silence: timedelta):
        self._clock = clock
        self._max_silence = max_silence
        self._last_beat = clock()
        self._last_error: str | None = None
        self._lock = threading.Lock()

    def beat(self, error: str | None = None) -> None:
        with self._lock:
            self._last_beat = self._clock()
            self._last_error = error

    def check(self) -> tuple[bool, dict]:
        with self._lock:
            silence = self._clock() - self._last_beat
            body = {
                "last_progress": self._last_beat.isoformat(),
                "seconds_since_progress": round(silence.total_seconds(), 1),
                "last_error": self._last_error,
            }
        if silence > self._max_silence:
            body["status"] = "unhealthy"
            body["reason"] = f"no progress for {int(silence.total_seconds())}s (limit {int(self._max_silence.total_seconds())}s)"
            return False, body
        body["status"] = "ok"
        return True, body


def serve(port: int, health: Health, metrics: Metrics, host: str = "127.0.0.1") -> ThreadingHTTPServer:
    """Start the HTTP endpoint in a daemon thread; `shutdown()` the returned server to stop it.

    Raises OSError when the address cannot be bound (in use, not this machine's).
    """

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            if self.path.split("?")[0] == "/healthz":
                ok, body = health.check()
                self._reply(200 if ok else 503, "application/json", json.dumps(body).encode())
            elif self.path.split("?")[0] == "/metrics":
                self._reply(200, "text/plain; version=0.0.4; charset=utf-8", metrics.render())
            else:
                self._reply(404, "text/plain", b"not found: try /healthz or /metrics\n")

        def _reply(self, status: int, content_type: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args) -> None:  # probes every few seconds would flood the log
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="health-http", daemon=True).start()
    return server
