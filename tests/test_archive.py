"""Reading export archives: real zip files of gzip members, streamed."""

from __future__ import annotations

import gzip
import zipfile
from datetime import datetime, timezone

import pytest

from connector import archive as archive_module
from connector.errors import ExportUnavailable
from connector.archive import Archive, Oversized, UnnamedMembers, member_of

H9 = datetime(2025, 7, 1, 9, tzinfo=timezone.utc)
H10 = datetime(2025, 7, 1, 10, tzinfo=timezone.utc)


def write_zip(path, members: dict[str, bytes]) -> str:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return str(path)


def lines_of(archive: Archive, hour: datetime) -> list[bytes]:
    out = []
    for block in archive.blocks(hour):
        out.extend(block.oversized)
        out.extend(line for line in block.lines.split(b"\n") if line)
    return out


def test_member_names_give_hour_and_sequence():
    m = member_of("123/123_2025-07-01_9#10.json.gz")
    assert (m.hour, m.seq) == (H9, 10)
    assert member_of("123/notes.txt") is None
    assert member_of("123/odd-name.json.gz").hour is None


def test_members_are_read_in_natural_order_and_last_line_may_lack_newline(tmp_path):
    members = {
        f"1/1_2025-07-01_9#{n}.json.gz": gzip.compress(f'{{"n":{n},"a":1}}\n{{"n":{n},"a":2}}'.encode())
        for n in (10, 2, 1, 9)
    }
    members["1/readme.txt"] = b"ignored"
    with Archive(write_zip(tmp_path / "a.zip", members), 0, H9, H9) as archive:
        got = lines_of(archive, H9)
    assert [line.decode() for line in got] == [
        f'{{"n":{n},"a":{a}}}' for n in (1, 2, 9, 10) for a in (1, 2)
    ]


def test_concatenated_gzip_streams_are_one_member(tmp_path):
    data = gzip.compress(b"a\nb\n") + gzip.compress(b"c\n")
    with Archive(write_zip(tmp_path / "a.zip", {"1/1_2025-07-01_9#1.json.gz": data}), 0, H9, H9) as archive:
        assert lines_of(archive, H9) == [b"a", b"b", b"c"]


def test_multi_hour_archive_splits_members_by_hour(tmp_path):
    members = {
        "1/1_2025-07-01_9#1.json.gz": gzip.compress(b"nine"),
        "1/1_2025-07-01_10#1.json.gz": gzip.compress(b"ten"),
    }
    with Archive(write_zip(tmp_path / "a.zip", members), 0, H9, H10) as archive:
        assert lines_of(archive, H9) == [b"nine"]
        assert lines_of(archive, H10) == [b"ten"]


def test_multi_hour_archive_with_unnamed_members_asks_for_single_hours(tmp_path):
    with Archive(write_zip(tmp_path / "a.zip", {"1/x.json.gz": gzip.compress(b"x")}), 0, H9, H10) as archive:
        with pytest.raises(UnnamedMembers):
            archive.members_for(H9)


def test_corrupt_gzip_member_is_retryable(tmp_path):
    good = gzip.compress(b'{"a":1}\n' * 1000)
    bad = good[:40] + bytes(b ^ 0xFF for b in good[40:80]) + good[80:]
    with Archive(write_zip(tmp_path / "a.zip", {"1/1_2025-07-01_9#1.json.gz": bad}), 0, H9, H9) as archive:
        with pytest.raises(ExportUnavailable):
            lines_of(archive, H9)


def test_truncated_gzip_member_is_retryable(tmp_path):
    data = gzip.compress(b'{"a":1}\n' * 1000)[:-30]
    with Archive(write_zip(tmp_path / "a.zip", {"1/1_2025-07-01_9#1.json.gz": data}), 0, H9, H9) as archive:
        with pytest.raises(ExportUnavailable, match="truncated|corrupt"):
            lines_of(archive, H9)


@pytest.mark.parametrize("length, step", [(5000, 256), (1500, 800), (1001, 1000), (2000, 1000)],
                         ids=["over many steps", "ends in the step after it began",
                              "one byte over, split across steps", "ends exactly at a step"])
def test_overlong_line_is_cut_out_and_the_rest_kept(tmp_path, monkeypatch, length, step):
    monkeypatch.setattr(archive_module, "MAX_LINE_BYTES", 1000)
    monkeypatch.setattr(archive_module, "KEPT_PREFIX_BYTES", 10)
    monkeypatch.setattr(archive_module, "_READ_BYTES", 64)
    monkeypatch.setattr(archive_module, "_INFLATE_STEP", step)
    data = b"first\n" + b"x" * (length - 1) + b"y" + b"\nlast"
    with Archive(write_zip(tmp_path / "a.zip", {"1/1_2025-07-01_9#1.json.gz": gzip.compress(data)}), 0, H9, H9) as archive:
        got = lines_of(archive, H9)
    assert got == [Oversized(b"x" * 10, length), b"first", b"last"]


def test_a_line_of_exactly_the_limit_is_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(archive_module, "MAX_LINE_BYTES", 1000)
    monkeypatch.setattr(archive_module, "_INFLATE_STEP", 300)
    data = b"a\n" + b"z" * 1000 + b"\nb"
    with Archive(write_zip(tmp_path / "a.zip", {"1/1_2025-07-01_9#1.json.gz": gzip.compress(data)}), 0, H9, H9) as archive:
        assert lines_of(archive, H9) == [b"a", b"z" * 1000, b"b"]


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(archive_module, "MIN_INFLATION_ALLOWANCE", 1000)
    bomb = gzip.compress(b"\n" * 10_000_000)  # ~10 KB inflating 1000x
    with Archive(write_zip(tmp_path / "a.zip", {"1/1_2025-07-01_9#1.json.gz": bomb}), 0, H9, H9) as archive:
        with pytest.raises(ExportUnavailable, match="bomb"):
            lines_of(archive, H9)


def test_member_names_are_never_used_as_paths(tmp_path):
    evil = {"../../evil_2025-07-01_9#1.json.gz": gzip.compress(b"x"), "/etc/passwd_2025-07-01_9#2.json.gz": gzip.compress(b"y")}
    with Archive(write_zip(tmp_path / "a.zip", evil), 0, H9, H9) as archive:
        assert lines_of(archive, H9) == [b"x", b"y"]
    assert list(tmp_path.iterdir()) == []  # the archive itself was deleted on close; nothing was extracted
    assert not (tmp_path.parent.parent / "evil_2025-07-01_9#1.json.gz").exists()


def test_close_deletes_the_temporary_file(tmp_path):
    path = write_zip(tmp_path / "a.zip", {"1/1_2025-07-01_9#1.json.gz": gzip.compress(b"x")})
    Archive(path, 0, H9, H9).close()
    assert not (tmp_path / "a.zip").exists()


def _falsify_declared_sizes(path, size: int) -> None:
    """Rewrite every size the zip declares (local and central headers) to `size`."""
    import struct

    data = bytearray(open(path, "rb").read())
    for magic, offsets in ((b"PK\x03\x04", (18, 22)), (b"PK\x01\x02", (20, 24))):
        at = data.find(magic)
        while at != -1:
            for offset in offsets[1:]:  # uncompressed size; the compressed size must stay true to be readable
                struct.pack_into("<I", data, at + offset, size)
            at = data.find(magic, at + 4)
    open(path, "wb").write(bytes(data))


def test_a_bomb_with_a_falsified_declared_size_is_bounded_by_bytes_actually_inflated(tmp_path, monkeypatch):
    monkeypatch.setattr(archive_module, "MIN_INFLATION_ALLOWANCE", 1000)
    bomb = gzip.compress(b"\n" * 10_000_000)  # ~10 KB inflating 1000x
    path = write_zip(tmp_path / "a.zip", {"1/1_2025-07-01_9#1.json.gz": bomb})
    _falsify_declared_sizes(path, 0xFFFFFFF0)  # "4 GB": the old guard allowed 200x that
    with Archive(path, 0, H9, H9) as archive:
        with pytest.raises(ExportUnavailable, match="bomb"):
            lines_of(archive, H9)


def test_a_single_line_bomb_is_one_rejected_record_and_the_hour_goes_on(tmp_path, monkeypatch):
    monkeypatch.setattr(archive_module, "MAX_LINE_BYTES", 1000)
    monkeypatch.setattr(archive_module, "_INFLATE_STEP", 1000)
    monkeypatch.setattr(archive_module, "MIN_INFLATION_ALLOWANCE", 10_000)
    monkeypatch.setattr(archive_module, "MAX_SKIPPED_BYTES", 2_000_000)
    line_bomb = gzip.compress(b"kept-1\n" + b"a" * 50_000_000 + b"\nafter")  # one line inflating ~1000x
    members = {"1/1_2025-07-01_9#1.json.gz": line_bomb, "1/1_2025-07-01_9#2.json.gz": gzip.compress(b"kept-2")}
    with Archive(write_zip(tmp_path / "a.zip", members), 0, H9, H9) as archive:
        got = lines_of(archive, H9)
    [oversized] = [g for g in got if isinstance(g, Oversized)]
    assert oversized.cut_member == "1/1_2025-07-01_9#1.json.gz" and oversized.length > 2_000_000
    assert [g for g in got if not isinstance(g, Oversized)] == [b"kept-1", b"kept-2"], "the next member is read"


def test_a_cut_member_becomes_a_rejection_saying_so():
    from connector.archive import Block
    from connector.translate import TranslateContext, translate_block

    result = translate_block(Block(b"", (Oversized(b"aaaa", 3_000_000_000, "1/x#1.json.gz"),)), TranslateContext(H9))
    [rejection] = result.rejections
    assert rejection.reason == "too_large" and "rest of member 1/x#1.json.gz was not read" in rejection.detail
    assert result.read == 1
