"""Fake PostHog capture sink, run in its own process.

``python -m bench.fake_posthog [--port 0]`` prints ``PORT <n>`` on stdout once
listening on 127.0.0.1, then serves (HTTP/1.1 keep-alive, Content-Length):

- ``POST /batch/`` (gzip or plain JSON): 200 ``{"status":1}``.
- any other ``POST``: 200 ``{}``, counted under ``other_paths``.
- ``GET /stats``: JSON counts of what arrived since the last reset.
- ``POST /reset``: zero everything.
- ``GET /health``: 200.

Cheap while a contender runs: a request only reads its body and keeps it in
memory (one append). Bodies are decompressed (zlib) and parsed (orjson) only
when ``/stats`` is asked, after the contender finished, so the counts are
exact (events, event names, duplicate uuids, events PostHog would refuse)
while the measured run pays almost nothing for them. Measured on this machine
class: inflate + full parse cost ~25 us/event, inflate + substring count
~7 us/event; deferring both costs ~0 during the run.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import zlib
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import orjson

_SPECIAL = ("$create_alias", "$groupidentify", "$identify", "$set")


class Tally:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self._pending: list[tuple[bool, bytes]] = []
            self._uuids: set[str] = set()
            self.counts = Counter()
            self.by_event = Counter()
            self.other_paths = Counter()
            self.duplicates_by_event = Counter()
            self.first_at: float | None = None
            self.last_at: float | None = None

    def add(self, gzipped: bool, body: bytes) -> None:
        now = time.time()
        with self._lock:
            self._pending.append((gzipped, body))
            self.counts["requests"] += 1
            self.counts["bytes"] += len(body)
            if gzipped:
                self.counts["gzip_requests"] += 1
            if self.first_at is None:
                self.first_at = now
            self.last_at = now

    def other(self, path: str) -> None:
        with self._lock:
            self.other_paths[path] += 1

    def _drain(self) -> None:
        """Count what arrived (called under the lock, outside measured runs)."""
        pending, self._pending = self._pending, []
        counts, by_event, uuids = self.counts, self.by_event, self._uuids
        for gzipped, body in pending:
            try:
                data = zlib.decompress(body, 47) if gzipped else body  # 47: gzip or zlib header
                payload = orjson.loads(data)
                batch = payload["batch"]
            except Exception:
                counts["parse_errors"] += 1
                continue
            counts["bytes_json"] += len(data)
            counts["events"] += len(batch)
            if payload.get("historical_migration") is True:
                counts["historical_requests"] += 1
            if "sent_at" in payload:
                counts["sent_at_requests"] += 1
            for event in batch:
                name = event.get("event") if isinstance(event, dict) else None
                distinct_id = event.get("distinct_id") if isinstance(event, dict) else None
                if not name or distinct_id in (None, ""):
                    counts["invalid_events"] += 1
                by_event[name if name in _SPECIAL else "other"] += 1
                uuid = event.get("uuid") if isinstance(event, dict) else None
                if uuid is None:
                    counts["events_without_uuid"] += 1
                elif uuid in uuids:
                    counts["duplicate_uuids"] += 1
                    self.duplicates_by_event[name if name in _SPECIAL else "other"] += 1
                else:
                    uuids.add(uuid)

    def snapshot(self) -> dict:
        with self._lock:
            self._drain()
            out = {k: self.counts.get(k, 0) for k in (
                "events", "requests", "bytes", "bytes_json", "gzip_requests", "historical_requests",
                "sent_at_requests", "duplicate_uuids", "events_without_uuid", "invalid_events", "parse_errors")}
            out["by_event"] = dict(self.by_event)
            out["other_paths"] = dict(self.other_paths)
            out["duplicate_uuids_by_event"] = dict(self.duplicates_by_event)
            out["unique_uuids"] = len(self._uuids)
            out["first_request_at"] = self.first_at
            out["last_request_at"] = self.last_at
            return out


def make_handler(tally: Tally):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format, *args):  # quiet
            pass

        def _reply(self, status: int, body: bytes, content_type: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                parts = []
                for _ in range(1_000_000):  # bounded
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        break
                    parts.append(self.rfile.read(size))
                    self.rfile.readline()
                return b"".join(parts)
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def do_POST(self):
            path = urlsplit(self.path).path
            body = self._body()
            if path == "/reset":
                tally.reset()
                return self._reply(200, b'{"reset":true}')
            if path.rstrip("/") == "/batch":
                gzipped = self.headers.get("Content-Encoding", "").lower() == "gzip" or body[:2] == b"\x1f\x8b"
                tally.add(gzipped, body)
                return self._reply(200, b'{"status":1}')
            tally.other(path)
            return self._reply(200, b"{}")

        def do_GET(self):
            path = urlsplit(self.path).path
            if path == "/health":
                return self._reply(200, b"ok", "text/plain")
            if path == "/stats":
                return self._reply(200, json.dumps(tally.snapshot()).encode())
            return self._reply(404, b'{"error":"not found"}')

    return Handler


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    server = Server(("127.0.0.1", args.port), make_handler(Tally()))
    sys.stdout.write(f"PORT {server.server_address[1]}\n")
    sys.stdout.flush()
    try:
        server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
