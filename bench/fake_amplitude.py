"""Fake Amplitude Export API, run in its own process.

``python -m bench.fake_amplitude --dir EXPORT_DIR [--port 0]`` prints
``PORT <n>`` on stdout once listening on 127.0.0.1, then serves:

- ``GET /api/2/export?start=YYYYMMDDTHH&end=YYYYMMDDTHH`` (both inclusive),
  HTTP Basic auth (``--key``/``--secret``): 200 ``application/zip`` with every
  member of those hours; 404 ``Raw data files were not found.`` when none of
  them has data; 400 for a malformed or reversed range; 401 for wrong keys.
- ``GET /health``: 200.

Serving costs little CPU: one hour is its cached zip file; a multi-hour range
is built once (members copied, not recompressed) into ``EXPORT_DIR/ranges/``
and reused; bodies go out with ``sendfile``.
"""

from __future__ import annotations

import argparse
import base64
import os
import re
import sys
import threading
import zipfile
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

_PARAM = re.compile(r"^\d{8}T\d{2}$")
HOUR = timedelta(hours=1)
NOT_FOUND = b"Raw data files were not found."


def _parse(value: str) -> datetime | None:
    if not _PARAM.match(value):
        return None
    try:
        return datetime.strptime(value, "%Y%m%dT%H").replace(tzinfo=timezone.utc)
    except ValueError:
        return None


class Exports:
    """Maps an hour range to a zip file on disk, building multi-hour zips once."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.hours = {p.stem: p for p in directory.glob("*.zip")}
        self.ranges = directory / "ranges"
        self._lock = threading.Lock()

    def path_for(self, start: datetime, end: datetime) -> Path | None:
        present = []
        hour = start
        while hour <= end:  # bounded: the caller limits the range to 365 days
            key = hour.strftime("%Y%m%dT%H")
            if key in self.hours:
                present.append(key)
            hour += HOUR
        if not present:
            return None
        if len(present) == 1:
            return self.hours[present[0]]
        target = self.ranges / f"{present[0]}_{present[-1]}_{len(present)}.zip"
        with self._lock:
            if not target.exists():
                self.ranges.mkdir(exist_ok=True)
                partial = target.with_suffix(".partial")
                with zipfile.ZipFile(partial, "w", zipfile.ZIP_STORED) as out:
                    for key in present:
                        with zipfile.ZipFile(self.hours[key]) as source:
                            for info in source.infolist():
                                out.writestr(info.filename, source.read(info))
                os.replace(partial, target)
        return target


def make_handler(exports: Exports, key: str, secret: str):
    expected = "Basic " + base64.b64encode(f"{key}:{secret}".encode()).decode()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format, *args):  # quiet
            pass

        def _plain(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            url = urlsplit(self.path)
            if url.path == "/health":
                return self._plain(200, b"ok")
            if url.path != "/api/2/export":
                return self._plain(404, b"not found")
            if self.headers.get("Authorization") != expected:
                return self._plain(401, b"Invalid API Key")
            query = parse_qs(url.query)
            start = _parse((query.get("start") or [""])[0])
            end = _parse((query.get("end") or [""])[0])
            if start is None or end is None or end < start or end - start > timedelta(days=365):
                return self._plain(400, b"Invalid request")
            path = exports.path_for(start, end)
            if path is None:
                return self._plain(404, NOT_FOUND)
            with open(path, "rb") as body:
                size = os.fstat(body.fileno()).st_size
                self.send_response(200)
                self.send_header("Content-Type", "application/zip")
                self.send_header("Content-Length", str(size))
                self.end_headers()
                self.wfile.flush()
                self.connection.sendfile(body)

    return Handler


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", required=True, type=Path)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--key", default="bench-amp-key")
    parser.add_argument("--secret", default="bench-amp-secret")
    args = parser.parse_args(argv)
    exports = Exports(args.dir)
    if not exports.hours:
        sys.stderr.write(f"no hour zips in {args.dir}\n")
        return 2
    # Build the full-range zip up front, so no measured run pays for it.
    keys = sorted(exports.hours)
    exports.path_for(_parse(keys[0]), _parse(keys[-1]))
    server = Server(("127.0.0.1", args.port), make_handler(exports, args.key, args.secret))
    sys.stdout.write(f"PORT {server.server_address[1]}\n")
    sys.stdout.flush()
    try:
        server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
