"""Reading an export archive: a zip of gzip'd NDJSON members, streamed block by block.

`Archive.blocks(hour)` yields `Block`s of about BLOCK_BYTES of complete lines,
in natural member order (`#10` after `#9`) and file order within a member.
Members are decompressed incrementally and never written to disk, so memory
does not grow with the size of an hour. A line over MAX_LINE_BYTES is never
held: the block carries it as an `Oversized` (its first bytes and its length),
and the translation turns it into an ordinary rejection. This module is the
one place that rule is enforced.

An archive that does not look like Amplitude's fails loudly
(`UnexpectedArchive`) instead of passing as an empty hour: a data member named
for an hour outside the requested window, two members with one name, or data
in another form (`.json`, `.jsonl.gz`, ...) with no `.json.gz` member. Other
files (a readme) are ignored, as Amplitude's documentation says.

Decompression bombs are bounded by what is really inflated per byte really
read (a zip's declared sizes are not trusted): kept lines may inflate at most
MAX_INFLATION times the compressed bytes read so far (above a floor). The
bytes of an oversized line are skipped, not kept, so they do not count; a
single line that inflates past MAX_SKIPPED_BYTES ends its member there, as one
rejected record saying so, and the hour goes on.
"""

from __future__ import annotations

import os
import re
import zipfile
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Iterator, NamedTuple

from isal import isal_zlib

from .errors import ExportUnavailable, UnexpectedArchive

# JSON compresses about 10x; a member inflating 200x is a decompression bomb.
MAX_INFLATION = 200
MIN_INFLATION_ALLOWANCE = 64 * 1024**2
# A single line is skipped through (cheaply: nothing is kept) up to this size.
MAX_SKIPPED_BYTES = 1024**3
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
# Names that hold data in a form this reader does not take: never silently skipped.
_OTHER_DATA = re.compile(r"\.(json|jsonl|ndjson)(\.gz|\.zst|\.bz2)?$|\.gz$", re.IGNORECASE)


class Oversized(NamedTuple):
    """A line over MAX_LINE_BYTES: its first KEPT_PREFIX_BYTES and its length.

    `cut_member` names the member when the line ran past MAX_SKIPPED_BYTES and
    the rest of that member was not read.
    """

    prefix: bytes
    length: int
    cut_member: str = ""


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
        try:
            members = self._check([i.filename for i in self._zip.infolist() if not i.is_dir()])
        except BaseException:
            self._zip.close()
            raise
        # Natural order: hour, then the member number (`#10` after `#9`), as Amplitude wrote them.
        self.members = sorted(members, key=lambda m: (m.hour or start, m.seq, m.name))

    def _check(self, names: list[str]) -> list[Member]:
        """The data members, or UnexpectedArchive saying what does not look like Amplitude's."""
        window = f"{self.start:%Y-%m-%dT%H}..{self.end:%Y-%m-%dT%H}"
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise UnexpectedArchive(f"the export of {window} holds two members named {duplicates[0]!r}: "
                                    "not an archive Amplitude writes; nothing of it is used")
        members = [m for m in map(member_of, names) if m]
        outside = [m.name for m in members if m.hour is not None and not self.start <= m.hour <= self.end]
        if outside:
            raise UnexpectedArchive(f"the export of {window} holds {outside[0]!r}, named for an hour outside it: "
                                    "nothing of it is used")
        other = [n for n in names if not n.endswith(".json.gz") and _OTHER_DATA.search(n)]
        if other and not members:
            raise UnexpectedArchive(f"the export of {window} holds data in a form Amplitude's exports do not use "
                                    f"({other[0]!r}) and no .json.gz member: not taken as an empty hour")
        return members

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
        read = kept = 0
        carry = b""
        skipping: Oversized | None = None
        try:
            with self._zip.open(info) as raw:
                inflater = isal_zlib.decompressobj(31)
                while True:
                    chunk = raw.read(_READ_BYTES)
                    if not chunk:
                        break
                    read += len(chunk)
                    while chunk:
                        data = inflater.decompress(chunk, _INFLATE_STEP)
                        chunk = inflater.unconsumed_tail
                        if inflater.eof and inflater.unused_data:
                            # Concatenated gzip streams are one valid gzip file.
                            chunk = inflater.unused_data
                            inflater = isal_zlib.decompressobj(31)
                        if not skipping:
                            kept += len(data)
                            if kept > max(MIN_INFLATION_ALLOWANCE, MAX_INFLATION * read):
                                raise ExportUnavailable(
                                    f"member {member.name} inflates {kept} bytes from {read}: refusing a "
                                    "decompression bomb", cause="bad_archive",
                                )
                        cut = data.rfind(b"\n")
                        if cut == -1:
                            # No line ends here: the current line only grows.
                            if skipping:
                                skipping = Oversized(skipping.prefix, skipping.length + len(data))
                                if skipping.length > MAX_SKIPPED_BYTES:
                                    # Past this, reading on costs more than the rest of the member is
                                    # worth: the line and what follows it are one rejected record.
                                    yield Oversized(skipping.prefix, skipping.length, member.name)
                                    return
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
