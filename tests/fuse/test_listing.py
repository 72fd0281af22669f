"""`stargz.fuse.listing`: a directory packed once answers READDIRPLUS and READDIR with
exactly the records `DirBuffer.add` would write entry by entry (parsed here with the
layouts of ``include/uapi/linux/fuse.h`` written out again), for every buffer size and
every offset a kernel may continue from."""

from __future__ import annotations

import stat
import struct

import pytest

from stargz.fuse import DirBuffer, pack_entry
from stargz.fuse.listing import pack_listing

ATTR = struct.Struct("<QQQqqqIIIIIIIIII")  # fuse_attr (88)
ENTRY_OUT = struct.Struct("<QQQQII" + ATTR.format[1:])  # fuse_entry_out (128)
DIRENT = struct.Struct("<QQII")  # fuse_dirent without its name (24)

MTIME_NS = 1_700_000_000_123_456_789
ENTRIES = [
    (b"a", 0x100000004, (stat.S_IFDIR | 0o755, 2, 0, 0, 0, 0), MTIME_NS),
    (b"bin-file", 0x100000005, (stat.S_IFREG | 0o755, 1, 1000, 1001, 0, 12345), MTIME_NS + 1),
    (b"c" * 255, 0x100000006, (stat.S_IFLNK | 0o777, 1, 0, 0, 0, 7), 0),
    (b"dev", 0x100000007, (stat.S_IFCHR | 0o600, 1, 0, 0, (1 << 8) | 3, 0), MTIME_NS),
    (b"hard", 0x100000005, (stat.S_IFREG | 0o755, 3, 1000, 1001, 0, 1 << 40), MTIME_NS),
    (b"\xff\xfe-not-utf8", 0x100000008, (stat.S_IFIFO | 0o644, 1, 5, 6, 0, 0), MTIME_NS),
    (b"wh", 0x100000009, (stat.S_IFCHR, 1, 0, 0, 0, 0), MTIME_NS),
]


def parse(body: bytes, plus: bool) -> list[tuple]:
    """(entry_out fields or None, ino, next offset, namelen, type, name) per record."""
    out, pos = [], 0
    while pos < len(body):
        entry = None
        if plus:
            entry = ENTRY_OUT.unpack_from(body, pos)
            pos += ENTRY_OUT.size
        ino, off, namelen, typ = DIRENT.unpack_from(body, pos)
        name = body[pos + DIRENT.size : pos + DIRENT.size + namelen]
        rec = DIRENT.size + namelen
        assert body[pos + rec : pos + ((rec + 7) & ~7)] == b"\0" * (-rec & 7)
        pos += (rec + 7) & ~7
        out.append((entry, ino, off, namelen, typ, name))
    assert pos == len(body)
    return out


def one_by_one(plus: bool, limit: int, start_id: int, timeouts=(1.0, 1.0)) -> bytes:
    """What `DirBuffer.add` answers for the same entries (ids from 2, as the fs numbers)."""
    out = DirBuffer(plus, limit)
    for i in range(start_id - 2, len(ENTRIES)):
        name, ino, st, mtime = ENTRIES[i]
        if not out.add(name, pack_entry(ino, *timeouts, st, mtime), i + 3):
            break
    return out.body()


@pytest.mark.parametrize("plus", [True, False])
def test_same_bytes_as_entry_by_entry(plus):
    listing = pack_listing(ENTRIES, 2, 1.0, 1.0)
    assert len(listing) == len(ENTRIES)
    for start_id in range(2, len(ENTRIES) + 3):
        for limit in (0, 100, 152, 160, 300, 440, 1000, 4096):
            out = DirBuffer(plus, limit)
            done = listing.fill(out, start_id)
            want = one_by_one(plus, limit, start_id)
            assert out.body() == want, (start_id, limit)
            assert out.used == len(want) <= limit
            got = parse(want, plus)
            assert done == (start_id - 2 + len(got) >= len(ENTRIES))


def test_records_carry_the_entry_and_its_attributes():
    listing = pack_listing(ENTRIES, 2, 7.0, 2.5, blksize=4096)
    out = DirBuffer(True, 1 << 16)
    assert listing.fill(out, 2)
    recs = parse(out.body(), True)
    assert [r[5] for r in recs] == [e[0] for e in ENTRIES]
    for (entry, ino, _off, namelen, typ, name), (n, want_ino, st, mtime) in zip(
        recs, ENTRIES, strict=True
    ):
        mode, nlink, uid, gid, rdev, size = st
        sec, nsec = divmod(mtime, 1_000_000_000)
        # nodeid, generation, entry_valid 7.0 s, attr_valid 2.5 s, then the attr
        assert entry == (
            want_ino, 0, 7, 2, 0, 500_000_000,
            want_ino, size, (size + 511) // 512, sec, sec, sec, nsec, nsec, nsec,
            mode, nlink, uid, gid, rdev, 4096, 0,
        )  # fmt: skip
        assert (ino, namelen, typ, name) == (want_ino, len(n), mode >> 12, n)
    assert [r[2] for r in recs] == list(range(3, 3 + len(ENTRIES)))


@pytest.mark.parametrize("plus", [True, False])
def test_continuing_from_each_answers_offset_lists_everything_once(plus):
    listing = pack_listing(ENTRIES, 2, 1.0, 1.0)
    for limit in (440, 600, 1000):  # (each holds the largest record, 408 bytes)
        names, start = [], 2
        for _ in range(len(ENTRIES) + 1):
            out = DirBuffer(plus, limit)
            done = listing.fill(out, start)
            recs = parse(out.body(), plus)
            if not recs:
                assert done
                break
            names += [r[5] for r in recs]
            start = recs[-1][2]
        assert names == [e[0] for e in ENTRIES]


def test_after_the_end_and_before_the_start():
    listing = pack_listing(ENTRIES, 2, 1.0, 1.0)
    out = DirBuffer(True, 4096)
    assert listing.fill(out, 2 + len(ENTRIES)) and listing.fill(out, 99)
    assert out.body() == b"" and out.used == 0
    with pytest.raises(ValueError):
        listing.fill(out, 1)
    empty = pack_listing([], 2, 1.0, 1.0)
    assert len(empty) == 0 and empty.fill(out, 2) and out.body() == b""


def test_appends_after_what_the_buffer_holds():
    # "." and ".." go in one by one first; the listing fills the rest of the room
    listing = pack_listing(ENTRIES, 2, 1.0, 1.0)
    out = DirBuffer(True, 700)
    dot = pack_entry(1, 1.0, 1.0, (stat.S_IFDIR | 0o755, 2, 0, 0, 0, 0), 0)
    assert out.add(b".", dot, 1) and out.add(b"..", dot, 2)
    assert not listing.fill(out, 2)
    recs = parse(out.body(), True)
    assert [r[5] for r in recs][:3] == [b".", b"..", b"a"]
    assert out.used == len(out.body()) <= 700
    ref = DirBuffer(True, 700)
    ref.add(b".", dot, 1)
    ref.add(b"..", dot, 2)
    for i, (name, ino, st, mtime) in enumerate(ENTRIES):
        if not ref.add(name, pack_entry(ino, 1.0, 1.0, st, mtime), i + 3):
            break
    assert out.body() == ref.body()
