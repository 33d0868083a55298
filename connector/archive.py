"""Reading an export archive: a zip of gzip'd NDJSON members, streamed block by block.

`Archive.blocks(hour)` yields `Block`s of about BLOCK_BYTES of complete lines,
in natural member order (`#10` after `#9`) and file order within a member.
Members are decompressed incrementally and never written to disk, so memory
does not grow with the size of an hour. A line over MAX_LINE_BYTES is never
held: the block carries it as an `Oversized` (its first bytes and its length),
and the translation turns it into an ordinary rejection. This module is the
one place that rule is enforced.
"""

from __future__ import annotations

import os
import re
import zipfile
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Iterator, NamedTuple

from isal import isal_zlib

from .errors import ExportUnavailable

# JSON compresses about 10x; a member inflating 200x is a decompression bomb.
MAX_INFLATION = 200
MIN_INFLATION_ALLOWANCE = 64 * 1024**2
# A line longer than this is rejected unread; only its start is kept.
MAX_LINE_BYTES = 4 * 1024**2
KEPT_PREFIX_BYTES = 64 * 1024
BLOCK_BYTES = 2 * 1024**2
_READ_BYTES = 1024**2
# Decompression output per call. A line that starts and ends inside one output
# chunk is therefore never longer than MAX_LINE_BYTES; only a line continued
# from earlier output has to be measured.
_INFLATE_STEP = 4 * _READ_BYTES
assert _INFLATE_STEP <= MAX_LINE_BYTES

_MEMBER = re.compile(r"_(\d{4}-\d{2}-\d{2})_(\d{1,2})#(\d+)\.json\.gz$")


class Oversized(NamedTuple):
    """A line over MAX_LINE_BYTES: its first KEPT_PREFIX_BYTES and its length."""

    prefix: bytes
    length: int


class Block(NamedTuple):
    """Complete NDJSON lines of one hour (newline-separated, no trailing newline), and
    the oversized lines met among them."""

    lines: bytes
    oversized: tuple[Oversized, ...] = ()


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


class UnnamedMembers(ExportUnavailable):
    """A multi-hour archive whose member names do not tell their hour: fetch hour by hour."""


class Archive:
    """One downloaded export (hours `start`..`end`, inclusive) in a file. Close it to delete the file."""

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
            raise UnnamedMembers("member names do not tell their hour; fetch hour by hour", cause="bad_archive")
        return [m for m in self.members if m.hour == hour]

    def blocks(self, hour: datetime) -> Iterator[Block]:
        """`hour`'s lines as blocks of about BLOCK_BYTES, in natural member order and file order."""
        pending: list[bytes] = []
        oversized: list[Oversized] = []
        size = 0
        for member in self.members_for(hour):
            for piece in self._member_lines(member):
                if type(piece) is Oversized:
                    oversized.append(piece)
                    continue
                pending.append(piece)
                size += len(piece)
                if size >= BLOCK_BYTES:
                    yield Block(b"\n".join(pending), tuple(oversized))
                    pending, oversized, size = [], [], 0
        if pending or oversized:
            yield Block(b"\n".join(pending), tuple(oversized))

    def _member_lines(self, member: Member) -> Iterator[bytes | Oversized]:
        """Chunks of whole lines (no trailing newline) of one gzip member, and its oversized lines."""
        info = self._zip.getinfo(member.name)
        allowance = max(MIN_INFLATION_ALLOWANCE, MAX_INFLATION * max(info.compress_size, info.file_size))
        inflated = 0
        carry = b""
        skipping: Oversized | None = None
        try:
            with self._zip.open(info) as raw:
                inflater = isal_zlib.decompressobj(31)
                while True:
                    chunk = raw.read(_READ_BYTES)
                    if not chunk:
                        break
                    while chunk:
                        data = inflater.decompress(chunk, _INFLATE_STEP)
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
                        cut = data.rfind(b"\n")
                        if cut == -1:
                            # No line ends here: the current line only grows.
                            if skipping:
                                skipping = Oversized(skipping.prefix, skipping.length + len(data))
                            elif len(carry) + len(data) > MAX_LINE_BYTES:
                                skipping = Oversized((carry + data)[:KEPT_PREFIX_BYTES], len(carry) + len(data))
                                carry = b""
                            else:
                                carry += data
                            continue
                        # The first line continues what came before; every other line of
                        # `data` is shorter than _INFLATE_STEP.
                        first_end = data.find(b"\n")
                        if skipping:
                            yield Oversized(skipping.prefix, skipping.length + first_end)
                            skipping = None
                            head = data[first_end + 1 : cut]
                        elif len(carry) + first_end > MAX_LINE_BYTES:
                            yield Oversized((carry + data[:first_end])[:KEPT_PREFIX_BYTES], len(carry) + first_end)
                            head = data[first_end + 1 : cut]
                        else:
                            head = carry + data[:cut]
                        carry = data[cut + 1 :]
                        if head:
                            yield head
                if not inflater.eof:
                    raise ExportUnavailable(f"member {member.name} is truncated", cause="bad_archive")
        except (zipfile.BadZipFile, isal_zlib.error, EOFError, OSError) as exc:
            raise ExportUnavailable(f"member {member.name} is corrupt: {exc}", cause="bad_archive") from exc
        if skipping:
            yield Oversized(skipping.prefix, skipping.length + len(carry))
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
