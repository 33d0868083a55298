"""A fake Amplitude Export API (``GET /api/2/export``) on 127.0.0.1.

Behaviour (see shared/reference/FACTS.md):
- HTTP Basic auth, API key as user, secret key as password: no credentials
  gives 401, wrong ones 403, both with body ``Invalid API Key``.
- ``start``/``end`` are ``YYYYMMDDTHH`` and both INCLUSIVE; anything else, an
  inverted range or more than 365 days is 400.
- ``max_hours_per_request``: a range of more hours is 400; ``too_large_hours``:
  a range containing one of them is 400 (both stand for the 4 GB limit).
- No data in the range: 404 ``Raw data files were not found.``
- Otherwise 200 ``application/zip``; members
  ``<project>/<project>_<YYYY-MM-DD>_<H>#<n>.json.gz`` (H not zero-padded, n
  from 1 per hour), each gzip'd newline-delimited JSON without a trailing
  newline. Members are stored in plain string order, so ``_10`` comes before
  ``_2``: a client must sort naturally itself.

Records are gzip'd into files under a temporary directory as they are added,
and each response's archive is written to a temporary file and streamed, so a
million events never sit in memory. Faults injected with ``inject`` are
consumed one per export request, before auth and validation.
"""

from __future__ import annotations

import argparse
import base64
import hmac
import io
import json
import os
import re
import shutil
import signal
import tempfile
import threading
import zipfile
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import MappingProxyType
from typing import IO, Any, Iterable, NamedTuple
from urllib.parse import parse_qs, urlsplit

try:  # isal (a project dependency) gzips ~4x faster than zlib; same format
    from isal.igzip import GzipFile
except ImportError:  # pragma: no cover
    from gzip import GzipFile

from .records import utc_hour
from ._http import (Fault, FakeServer, FaultQueue, QuietHandler, RecordLog, compact_json,
                    interruptible_wait)

EXPORT_PATH = "/api/2/export"
NOT_FOUND_BODY = b"Raw data files were not found."
INVALID_KEY_BODY = b"Invalid API Key"
TOO_LARGE_BODY = b"Export size exceeds the 4GB limit. Try a smaller time range."  # wording invented
FAULTS = MappingProxyType({  # name -> required keyword arguments
    "status": ("code",), "reset_mid_body": (), "stall": ("seconds",), "html_200": (),
    "truncated_zip": (), "corrupt_gzip_member": (), "empty_200": ()})
_HOUR_PARAM = re.compile(r"\d{8}T\d{2}")
_MAX_RANGE_HOURS = 365 * 24
_CHUNK = 256 * 1024
HTML_ERROR_PAGE = (b"<html><head><title>502 Bad Gateway</title></head><body>"
                   b"<center><h1>502 Bad Gateway</h1></center></body></html>")


class ExportRequest(NamedTuple):
    """One export request as received: raw ``start``/``end`` and our status."""

    start: str | None
    end: str | None
    status: int


class _Member(NamedTuple):
    name: str  # path inside the zip
    path: Path  # the member's bytes on disk


def parse_hour(value: str) -> datetime:
    """``YYYYMMDDTHH`` -> tz-aware UTC hour (ValueError if malformed)."""
    if not _HOUR_PARAM.fullmatch(value):
        raise ValueError(f"bad hour {value!r}")
    return datetime.strptime(value, "%Y%m%dT%H").replace(tzinfo=timezone.utc)


def format_hour(hour: datetime) -> str:
    """tz-aware hour -> ``YYYYMMDDTHH`` (the API's parameter format)."""
    return hour.astimezone(timezone.utc).strftime("%Y%m%dT%H")


def hours_between(start: datetime, end: datetime) -> list[datetime]:
    """Every hour from ``start`` to ``end``, both included."""
    n = int((end - start) / timedelta(hours=1))
    return [start + timedelta(hours=i) for i in range(n + 1)]


class FakeAmplitude(FakeServer):
    """Fake Export API. ``with FakeAmplitude(key, secret) as amp: amp.base_url``.

    Thread-safe: records may be added while the server runs.
    """

    def __init__(self, api_key: str = "amp-api-key", secret_key: str = "amp-secret-key", *,
                 project_id: int = 636686, max_hours_per_request: int | None = None,
                 too_large_hours: Iterable[datetime] = (), compresslevel: int = 1,
                 clock_skew: timedelta = timedelta(0), port: int = 0):
        super().__init__(port)
        self.clock_skew = clock_skew  # how far this server's clock (its Date header) is off
        self.api_key, self.secret_key, self.project_id = api_key, secret_key, project_id
        self.max_hours_per_request = max_hours_per_request
        self.too_large_hours = {utc_hour(h) for h in too_large_hours}
        self.compresslevel = compresslevel  # 1: fast; the level does not change validity
        self._tmp = tempfile.TemporaryDirectory(prefix="fake-amplitude-")
        self._members: dict[datetime, list[_Member]] = {}
        self._json_members: dict[datetime, int] = {}  # hour -> members named #n so far
        self._lock = threading.Lock()
        self._faults = FaultQueue(FAULTS)
        self._requests: RecordLog[ExportRequest] = RecordLog()

    # ---- data ----------------------------------------------------------------
    def add_records(self, hour: datetime, records: Iterable[dict | bytes | str],
                    members: int = 1) -> int:
        """Store records uploaded in ``hour``; return how many were added.

        Items may be dicts (serialized compactly) or raw lines (bytes/str,
        written as-is: use them to inject malformed JSON or invalid UTF-8).
        The records are split into ``members`` consecutive chunks (fewer if
        there are fewer records); each becomes one ``#n`` member, numbering
        on after any earlier call for the same hour. An iterator is streamed
        when ``members == 1`` and materialised otherwise.
        """
        hour = utc_hour(hour)
        if members < 1:
            raise ValueError("members must be >= 1")
        if members > 1:
            records = list(records)
            size, extra = divmod(len(records), members)
            bounds, at = [], 0
            for i in range(members):
                n = size + (1 if i < extra else 0)
                if n:
                    bounds.append((at, at + n))
                at += n
            chunks: list[Iterable[Any]] = [records[a:b] for a, b in bounds]
        else:
            chunks = [records]
        total = 0
        for chunk in chunks:
            fd, tmp_name = tempfile.mkstemp(dir=self._tmp.name, suffix=".json.gz")
            os.close(fd)
            count = self._write_member(Path(tmp_name), chunk)
            if not count:
                continue
            total += count
            with self._lock:  # numbering and registering together: no gaps, no clashes
                seq = self._json_members.get(hour, 0) + 1
                self._json_members[hour] = seq
                name = f"{self.project_id}/{self.project_id}_{hour:%Y-%m-%d}_{hour.hour}#{seq}.json.gz"
                self._members.setdefault(hour, []).append(_Member(name, Path(tmp_name)))
        return total

    def add_file(self, hour: datetime, name: str, data: bytes) -> None:
        """Add an arbitrary member ``<project>/<name>`` to ``hour``'s data
        (e.g. a non-``.json.gz`` file a client must ignore)."""
        hour = utc_hour(hour)
        path = Path(tempfile.mkstemp(dir=self._tmp.name, suffix=".extra")[1])
        path.write_bytes(data)
        self._register(hour, _Member(f"{self.project_id}/{name}", path))

    def _register(self, hour: datetime, member: _Member) -> None:
        with self._lock:
            self._members.setdefault(hour, []).append(member)

    def _write_member(self, path: Path, records: Iterable[dict | bytes | str]) -> int:
        count = 0
        with open(path, "wb") as raw, GzipFile(fileobj=raw, mode="wb", mtime=0,
                                               compresslevel=self.compresslevel) as gz:
            buf: list[bytes] = []
            for record in records:
                line = record if isinstance(record, bytes) else (
                    record.encode() if isinstance(record, str) else compact_json(record))
                if count:
                    buf.append(b"\n")  # separators only: the last line has no newline
                buf.append(line)
                count += 1
                if len(buf) >= 2048:
                    gz.write(b"".join(buf))
                    buf.clear()
            gz.write(b"".join(buf))
        if not count:
            path.unlink()
        return count

    def now(self) -> datetime:
        """The server's (skewed) clock, as its answers' Date header shows it."""
        return datetime.now(timezone.utc) + self.clock_skew

    def hours(self) -> list[datetime]:
        """Hours that have data, sorted."""
        with self._lock:
            return sorted(self._members)

    def members_for(self, hours: Iterable[datetime]) -> list[str]:
        """Member names an archive of ``hours`` holds, in archive order."""
        return [m.name for m in self._members_for(hours)]

    def _members_for(self, hours: Iterable[datetime]) -> list[_Member]:
        with self._lock:
            found = [m for h in {utc_hour(h) for h in hours} for m in self._members.get(h, ())]
        # plain string order, as a directory listing would give: _10 before _2
        return sorted(found, key=lambda m: m.name)

    # ---- archives ------------------------------------------------------------
    def write_archive(self, hours: Iterable[datetime], out: IO[bytes],
                      corrupt_member: int | None = None) -> None:
        """Write the zip of ``hours``' members to ``out`` (empty zip if none).

        ``corrupt_member`` indexes (archive order) a member whose gzip bytes
        are damaged while the zip itself stays valid.
        """
        members = self._members_for(hours)
        if corrupt_member is not None and members:
            corrupt_member %= len(members)
        with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zf:
            for i, member in enumerate(members):
                info = zipfile.ZipInfo(member.name, date_time=(2025, 1, 1, 0, 0, 0))
                info.file_size = member.path.stat().st_size  # lets zipfile pick zip64
                with open(member.path, "rb") as src, zf.open(info, "w") as dst:
                    if i == corrupt_member:
                        dst.write(_corrupt_gzip(src.read()))
                    else:
                        shutil.copyfileobj(src, dst, _CHUNK)

    def build_archive(self, hours: Iterable[datetime], corrupt_member: int | None = None) -> bytes:
        """The archive of ``hours`` as bytes (for tests that skip HTTP)."""
        buf = io.BytesIO()
        self.write_archive(hours, buf, corrupt_member)
        return buf.getvalue()

    def _archive_file(self, hours: list[datetime], corrupt_member: int | None = None) -> IO[bytes]:
        """The archive in an unnamed temp file, positioned at 0."""
        f = tempfile.TemporaryFile(dir=self._tmp.name)
        if self._members_for(hours):
            self.write_archive(hours, f, corrupt_member)
        else:
            # faults that need a body still get a zip-looking one
            with zipfile.ZipFile(f, "w") as zf:
                zf.writestr(f"{self.project_id}/placeholder.txt", os.urandom(32 * 1024))
        f.seek(0)
        return f

    # ---- faults and observations ---------------------------------------------
    def inject(self, fault: str, times: int = 1, **kw: Any) -> None:
        """Queue ``fault`` for the next ``times`` export requests (FIFO).

        status(code, body=b"", headers={}) | reset_mid_body(fraction=0.5) |
        stall(seconds) | html_200 | truncated_zip | corrupt_gzip_member(member=-1) |
        empty_200
        """
        self._faults.inject(fault, times, **kw)

    @property
    def requests(self) -> list[ExportRequest]:
        """Export requests so far, recorded when their status line is sent."""
        return self._requests.snapshot()

    def wait_for_requests(self, n: int, timeout: float = 5.0) -> list[ExportRequest]:
        return self._requests.wait_for(n, timeout)

    def close(self) -> None:
        super().close()
        self._tmp.cleanup()


def _corrupt_gzip(data: bytes) -> bytes:
    """Flip the deflate payload, keeping the 10-byte header and 8-byte trailer."""
    body = bytes(b ^ 0x5A for b in data[10:-8])
    return data[:10] + body + data[-8:]


class _ExportHandler(QuietHandler):
    owner: FakeAmplitude

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        if url.path.rstrip("/") != EXPORT_PATH:
            self.send_bytes(404, b"Not Found")
            return
        query = parse_qs(url.query)
        start_s = (query.get("start") or [None])[0]
        end_s = (query.get("end") or [None])[0]
        fault = self.owner._faults.pop()
        if fault is not None:
            self._fault(fault, start_s, end_s)
            return
        status, body = self._check(start_s, end_s)
        if status != 200:
            headers = {"WWW-Authenticate": 'Basic realm="Amplitude"'} if status == 401 else None
            self._respond(start_s, end_s, status, body, headers=headers)
            return
        hours = hours_between(parse_hour(start_s), parse_hour(end_s))  # type: ignore[arg-type]
        with self.owner._archive_file(hours) as f:
            size = os.fstat(f.fileno()).st_size
            self._record(start_s, end_s, 200)
            self._headers(200, "application/zip", size)
            while chunk := f.read(_CHUNK):
                if not self.write_quietly(chunk):
                    break

    def _check(self, start_s: str | None, end_s: str | None) -> tuple[int, bytes]:
        """Status and body for a normal request (200: serve the archive)."""
        amp = self.owner
        auth = self.headers.get("Authorization", "")
        if not auth.startswith("Basic "):
            return 401, INVALID_KEY_BODY
        try:
            user, _, password = base64.b64decode(auth[6:], validate=True).decode().partition(":")
        except ValueError:
            return 401, INVALID_KEY_BODY
        if not (hmac.compare_digest(user.encode(), amp.api_key.encode())
                and hmac.compare_digest(password.encode(), amp.secret_key.encode())):
            return 403, INVALID_KEY_BODY
        try:
            start, end = parse_hour(start_s or ""), parse_hour(end_s or "")
        except ValueError:
            return 400, b"Bad request: start and end must be YYYYMMDDTHH"
        if not start <= end <= start + timedelta(hours=_MAX_RANGE_HOURS - 1):
            return 400, b"Bad request: invalid time range"
        hours = hours_between(start, end)
        if amp.max_hours_per_request is not None and len(hours) > amp.max_hours_per_request:
            return 400, TOO_LARGE_BODY
        if amp.too_large_hours.intersection(hours):
            return 400, TOO_LARGE_BODY
        if not amp._members_for(hours):
            return 404, NOT_FOUND_BODY
        return 200, b""

    # ---- response helpers ------------------------------------------------------
    def _record(self, start_s: str | None, end_s: str | None, status: int) -> None:
        self.owner._requests.append(ExportRequest(start_s, end_s, status))

    def _headers(self, status: int, content_type: str, length: int) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        self.wfile.flush()

    def _respond(self, start_s, end_s, status: int, body: bytes,
                 content_type: str = "text/plain", headers: dict | None = None) -> None:
        self._record(start_s, end_s, status)
        self.send_bytes(status, body, content_type, headers)

    def _fault_hours(self, start_s: str | None, end_s: str | None) -> list[datetime]:
        try:
            start, end = parse_hour(start_s or ""), parse_hour(end_s or "")
        except ValueError:
            return []
        return hours_between(start, end) if start <= end else []

    def _fault(self, fault: Fault, start_s: str | None, end_s: str | None) -> None:
        kw, amp = fault.kw, self.owner
        hours = self._fault_hours(start_s, end_s)
        if fault.name == "status":
            body = kw.get("body", b"")
            body = body.encode() if isinstance(body, str) else body
            self._respond(start_s, end_s, kw["code"], body, headers=kw.get("headers"))
        elif fault.name == "html_200":
            self._respond(start_s, end_s, 200, HTML_ERROR_PAGE, "text/html")
        elif fault.name == "empty_200":
            self._respond(start_s, end_s, 200, b"", "application/zip")
        elif fault.name == "truncated_zip":
            with amp._archive_file(hours) as f:
                data = f.read()
            self._respond(start_s, end_s, 200, data[: len(data) // 2], "application/zip")
        elif fault.name == "corrupt_gzip_member":
            with amp._archive_file(hours, corrupt_member=kw.get("member", -1)) as f:
                data = f.read()
            self._respond(start_s, end_s, 200, data, "application/zip")
        elif fault.name == "reset_mid_body":
            with amp._archive_file(hours) as f:
                data = f.read()
            cut = min(max(1, int(len(data) * kw.get("fraction", 0.5))), len(data) - 1)
            self._record(start_s, end_s, 200)
            self._headers(200, "application/zip", len(data))  # promises the whole archive
            self.write_quietly(data[:cut])
            self.abort_connection()
        elif fault.name == "stall":
            with amp._archive_file(hours) as f:
                size = os.fstat(f.fileno()).st_size
            self._record(start_s, end_s, 200)
            self._headers(200, "application/zip", size)
            interruptible_wait(amp, kw["seconds"])
            self.abort_connection()  # the body never comes
        else:  # pragma: no cover - FaultQueue validates names
            raise AssertionError(fault)


FakeAmplitude.handler_class = _ExportHandler


# ---- command line --------------------------------------------------------------
def _parse_hours_arg(value: str) -> list[datetime]:
    """``2025-07-01T00:2025-07-01T03`` -> the hours, both ends included."""
    start_s, sep, end_s = value.partition(":")
    if not sep:
        end_s = start_s

    def parse(s: str) -> datetime:
        return datetime.strptime(s, "%Y-%m-%dT%H").replace(tzinfo=timezone.utc)

    return hours_between(parse(start_s), parse(end_s))


def main(argv: list[str] | None = None) -> None:
    """Serve generated data until SIGINT/SIGTERM (for manual demos)."""
    from itertools import groupby
    from random import Random

    from .records import make_population

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--port-file", help="write {base_url, api_key, secret_key} JSON here")
    ap.add_argument("--hours", required=True, help="START:END, e.g. 2025-07-01T00:2025-07-01T03")
    ap.add_argument("--events-per-hour", type=int, default=1000)
    ap.add_argument("--members-per-hour", type=int, default=1)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--api-key", default="amp-api-key")
    ap.add_argument("--secret-key", default="amp-secret-key")
    args = ap.parse_args(argv)

    hours = _parse_hours_arg(args.hours)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    with FakeAmplitude(args.api_key, args.secret_key, port=args.port) as amp:
        records = make_population(Random(args.seed), args.events_per_hour * len(hours), hours)
        for _, group in groupby(records, key=lambda r: r["server_upload_time"][:13]):
            batch = list(group)
            hour = datetime.strptime(batch[0]["server_upload_time"][:13], "%Y-%m-%d %H")
            amp.add_records(hour.replace(tzinfo=timezone.utc), batch, members=args.members_per_hour)
        info = {"base_url": amp.base_url, "api_key": args.api_key, "secret_key": args.secret_key}
        if args.port_file:
            tmp = f"{args.port_file}.tmp"
            Path(tmp).write_text(json.dumps(info))
            os.replace(tmp, args.port_file)  # readers never see a half-written file
        print(json.dumps(info), flush=True)
        try:
            done.wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
