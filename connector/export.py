"""Amplitude Export API client: whole hours in, a streamed archive out.

`ExportClient.download(start, end)` asks for the hours `start`..`end`, both
INCLUSIVE as the API defines them, and returns an `Archive` kept in a temporary
file (or None when Amplitude has no data for the range). Transient faults are
retried here with exponential backoff and full jitter; what is left raises from
the errors tree: `AuthError` (fix keys or region), `RangeTooLarge` (the caller
splits the range), `ExportUnavailable` (retry later).

`Archive.blocks(hour)` streams one hour's records as blocks of complete lines:
members are read one by one, decompressed incrementally and never written to
disk, so memory does not grow with the size of an hour.
"""

from __future__ import annotations

import os
import random
import re
import tempfile
import zipfile
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Callable, Iterator

import requests
from isal import isal_zlib

from .config import Secret
from .errors import AuthError, ConnectorError, ExportUnavailable, Interrupted

# Amplitude refuses exports over 4 GB; anything much larger is not Amplitude.
MAX_ARCHIVE_BYTES = 8 * 1024**3
# JSON compresses about 10x; a member inflating 200x is a decompression bomb.
MAX_INFLATION = 200
MIN_INFLATION_ALLOWANCE = 64 * 1024**2
# A line longer than this is rejected unread; only its start is kept.
MAX_LINE_BYTES = 4 * 1024**2
KEPT_PREFIX_BYTES = 64 * 1024
BLOCK_BYTES = 2 * 1024**2
_READ_BYTES = 1024**2
# A server asking for more than this is not waited for in one go: the attempt
# after it will ask again.
MAX_RETRY_AFTER = 900.0

_MEMBER = re.compile(r"_(\d{4}-\d{2}-\d{2})_(\d{1,2})#(\d+)\.json\.gz$")
_ZIP_MAGIC = b"PK\x03\x04"


class RangeTooLarge(ConnectorError):
    """Amplitude answered 400 for this range (over 4 GB, or malformed)."""


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with full jitter; a server's Retry-After is a floor."""

    base: float = 1.0
    cap: float = 120.0
    attempts: int = 7

    def delay(self, attempt: int, rng: random.Random, retry_after: float | None = None) -> float:
        delay = rng.uniform(0, min(self.cap, self.base * 2**attempt))
        if retry_after is not None:
            delay = max(delay, min(retry_after, MAX_RETRY_AFTER))
        return delay


@dataclass(frozen=True)
class OversizedLine:
    """A line over MAX_LINE_BYTES: its first bytes and its length."""

    prefix: bytes
    length: int


def hour_param(hour: datetime) -> str:
    return hour.astimezone(timezone.utc).strftime("%Y%m%dT%H")


@dataclass(frozen=True)
class Member:
    name: str
    hour: datetime | None
    seq: int


def member_of(name: str) -> Member | None:
    """`<project>/<project>_2025-07-01_9#2.json.gz` -> its hour and sequence; None if not data."""
    if not name.endswith(".json.gz"):
        return None
    match = _MEMBER.search(name)
    if not match:
        return Member(name, None, 0)
    day, hour, seq = match.groups()
    when = datetime.strptime(day, "%Y-%m-%d").replace(tzinfo=timezone.utc) + timedelta(hours=int(hour))
    return Member(name, when, int(seq))


class Archive:
    """One downloaded export in a temporary file. Close it to delete the file."""

    def __init__(self, path: str, size: int, start: datetime, end: datetime):
        self.path = path
        self.size = size
        self.start = start
        self.end = end
        self._zip = zipfile.ZipFile(path)
        members = [m for m in (member_of(i.filename) for i in self._zip.infolist() if not i.is_dir()) if m]
        # Natural order: hour, then the member number (`#10` after `#9`), as Amplitude wrote them.
        self.members = sorted(members, key=lambda m: (m.hour or start, m.seq, m.name))

    def members_for(self, hour: datetime) -> list[Member]:
        """The members holding `hour`. A member whose name does not tell its hour
        belongs to the only hour of a one-hour archive; in a wider one it is an error."""
        if self.start == self.end:
            return list(self.members)
        if any(m.hour is None for m in self.members):
            raise RangeTooLarge("member names do not tell their hour; fetch hour by hour")
        return [m for m in self.members if m.hour == hour]

    def blocks(self, hour: datetime) -> Iterator[bytes | OversizedLine]:
        """Blocks of complete NDJSON lines of `hour`, in file order, about BLOCK_BYTES each."""
        pending: list[bytes] = []
        pending_size = 0
        for member in self.members_for(hour):
            for piece in self._member_lines(member):
                if isinstance(piece, OversizedLine):
                    if pending:  # keep file order
                        yield b"\n".join(pending)
                        pending, pending_size = [], 0
                    yield piece
                    continue
                pending.append(piece)
                pending_size += len(piece)
                if pending_size >= BLOCK_BYTES:
                    yield b"\n".join(pending)
                    pending, pending_size = [], 0
        if pending:
            yield b"\n".join(pending)

    def _member_lines(self, member: Member) -> Iterator[bytes | OversizedLine]:
        """Chunks of whole lines (no trailing newline) of one gzip member, streamed."""
        info = self._zip.getinfo(member.name)
        allowance = max(MIN_INFLATION_ALLOWANCE, MAX_INFLATION * max(info.compress_size, info.file_size))
        inflated = 0
        carry = b""
        skipping: OversizedLine | None = None
        try:
            with self._zip.open(info) as raw:
                inflater = isal_zlib.decompressobj(31)
                while True:
                    chunk = raw.read(_READ_BYTES)
                    if not chunk:
                        break
                    while chunk:
                        # Bounded output per call: a dense member cannot balloon memory.
                        data = inflater.decompress(chunk, 4 * _READ_BYTES)
                        chunk = inflater.unconsumed_tail
                        if inflater.eof and inflater.unused_data:
                            # Concatenated gzip streams are one valid gzip file.
                            chunk = inflater.unused_data
                            inflater = isal_zlib.decompressobj(31)
                        inflated += len(data)
                        if inflated > allowance:
                            raise ExportUnavailable(
                                f"member {member.name} inflates over {allowance} bytes: refusing a decompression bomb",
                                cause="bad_archive",
                            )
                        carry += data
                        cut = carry.rfind(b"\n")
                        if cut == -1:
                            if skipping:
                                skipping = OversizedLine(skipping.prefix, skipping.length + len(carry))
                                carry = b""
                            elif len(carry) > MAX_LINE_BYTES:
                                skipping = OversizedLine(carry[:KEPT_PREFIX_BYTES], len(carry))
                                carry = b""
                            continue
                        head, carry = carry[:cut], carry[cut + 1 :]
                        if skipping:
                            first, _, head = head.partition(b"\n")
                            yield OversizedLine(skipping.prefix, skipping.length + len(first))
                            skipping = None
                        if head:
                            yield head
                if not inflater.eof:
                    raise ExportUnavailable(f"member {member.name} is truncated", cause="bad_archive")
        except (zipfile.BadZipFile, isal_zlib.error, EOFError, OSError) as exc:
            raise ExportUnavailable(f"member {member.name} is corrupt: {exc}", cause="bad_archive") from exc
        if skipping:
            yield OversizedLine(skipping.prefix, skipping.length + len(carry))
        elif carry:
            yield carry  # the last line may lack its newline

    def close(self) -> None:
        self._zip.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def __enter__(self) -> "Archive":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ExportClient:
    """Downloads hour ranges from `url` (`{base}/api/2/export`) with retries.

    `sleep(seconds)` waits and returns True when the process is stopping, which
    ends the retries with `Interrupted`. `on_retry(cause)` is told each retry.
    """

    def __init__(
        self,
        session: requests.Session,
        url: str,
        api_key: Secret,
        secret_key: Secret,
        *,
        region: str,
        sleep: Callable[[float], bool],
        rng: random.Random | None = None,
        backoff: Backoff = Backoff(),
        timeout: tuple[float, float] = (10.0, 600.0),
        tmp_dir: str | None = None,
        on_retry: Callable[[str], None] = lambda cause: None,
    ):
        self._session = session
        self._url = url
        self._auth = (api_key, secret_key)
        self._region = region
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._backoff = backoff
        self._timeout = timeout
        self._tmp_dir = tmp_dir
        self._on_retry = on_retry

    def download(self, start: datetime, end: datetime) -> Archive | None:
        """The archive of hours start..end inclusive, or None when there is no data."""
        last: ExportUnavailable | None = None
        for attempt in range(self._backoff.attempts):
            if attempt:
                assert last is not None
                self._on_retry(last.cause)
                if self._sleep(self._backoff.delay(attempt - 1, self._rng, last.retry_after)):
                    raise Interrupted("stopping during an export retry")
            try:
                return self._attempt(start, end)
            except ExportUnavailable as exc:
                last = exc
        assert last is not None
        raise ExportUnavailable(
            f"Amplitude export {hour_param(start)}..{hour_param(end)} failed {self._backoff.attempts} times; last: {last}",
            cause=last.cause,
        )

    def _attempt(self, start: datetime, end: datetime) -> Archive | None:
        span = f"{hour_param(start)}..{hour_param(end)}"
        api_key, secret_key = self._auth
        try:
            response = self._session.get(
                self._url,
                params={"start": hour_param(start), "end": hour_param(end)},
                auth=(api_key.reveal(), secret_key.reveal()),
                stream=True,
                timeout=self._timeout,
            )
        except requests.Timeout as exc:
            raise ExportUnavailable(f"export {span} timed out: {type(exc).__name__}", cause="timeout") from None
        except requests.RequestException as exc:
            raise ExportUnavailable(f"export {span}: connection failed ({type(exc).__name__})", cause="connection") from None
        with response:
            status = response.status_code
            if status == 404:
                return None
            if status == 400:
                raise RangeTooLarge(f"Amplitude answered 400 for {span}: {response.text[:200]}")
            if status in (401, 403):
                raise AuthError(
                    f"Amplitude refused the export ({status} {response.text[:80].strip()}): check AMPLITUDE_API_KEY "
                    f"and AMPLITUDE_SECRET_KEY, and AMPLITUDE_REGION (now {self._region}; EU-resident projects need EU)"
                )
            if status != 200:
                retry_after = retry_after_seconds(response.headers.get("Retry-After"))
                cause = "rate_limited" if status == 429 else "timeout" if status == 504 else "server_error"
                raise ExportUnavailable(f"Amplitude answered {status} for {span}", retry_after, cause=cause)
            return self._save(response, start, end, span)

    def _save(self, response: requests.Response, start: datetime, end: datetime, span: str) -> Archive:
        fd, path = tempfile.mkstemp(prefix="amplitude-export-", suffix=".zip", dir=self._tmp_dir)
        size = 0
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in response.iter_content(chunk_size=_READ_BYTES):
                    size += len(chunk)
                    if size > MAX_ARCHIVE_BYTES:
                        raise ExportUnavailable(f"export {span} is over {MAX_ARCHIVE_BYTES} bytes", cause="bad_archive")
                    out.write(chunk)
            with open(path, "rb") as check:
                magic = check.read(4)
            if magic != _ZIP_MAGIC:
                raise ExportUnavailable(
                    f"export {span}: a 200 whose body is not a zip ({size} bytes, starts {magic!r})", cause="bad_archive"
                )
            try:
                return Archive(path, size, start, end)
            except zipfile.BadZipFile as exc:
                raise ExportUnavailable(f"export {span}: incomplete zip ({size} bytes: {exc})", cause="bad_archive") from None
        except requests.RequestException as exc:
            os.unlink(path)
            raise ExportUnavailable(f"export {span}: download broke off ({type(exc).__name__})", cause="connection") from None
        except BaseException:
            os.unlink(path)
            raise


def retry_after_seconds(value: str | None) -> float | None:
    """A Retry-After header (seconds or an HTTP date) as seconds from now; None if absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        from email.utils import parsedate_to_datetime

        try:
            return max(0.0, (parsedate_to_datetime(value) - datetime.now(timezone.utc)).total_seconds())
        except (TypeError, ValueError):
            return None
