"""`stargz.fuse.protocol`: every opcode named, and the structs the size fuse.h gives."""

from __future__ import annotations

import struct

from stargz.fuse import protocol as p
from stargz.fuse.protocol import Opcode


def test_opcodes_are_fuse_h_7_40():
    # 1..52 as of 7.39/7.40, with 7 and 19 never used
    assert sorted(Opcode) == [o for o in range(1, 53) if o not in (7, 19)]
    assert Opcode.INTERRUPT == 36 and Opcode.READDIRPLUS == 44 and Opcode.TMPFILE == 51
    assert {o.value for o in p.WRITE_OPCODES} == {
        4, 6, 8, 9, 10, 11, 12, 13, 16, 21, 24, 35, 43, 45, 47, 51
    }  # fmt: skip
    assert not p.WRITE_OPCODES & p.NO_REPLY


def test_struct_sizes_match_fuse_h():
    sizes = {
        "IN_HEADER": 40,
        "OUT_HEADER": 16,
        "INIT_IN_COMPAT": 16,
        "INIT_OUT": 64,
        "ATTR": 88,
        "ENTRY_OUT": 40,  # fuse_entry_out (128) without its fuse_attr
        "ENTRY_WITH_ATTR": 128,
        "ATTR_OUT": 16,  # fuse_attr_out (104) without its fuse_attr
        "OPEN_IN": 8,
        "OPEN_OUT": 16,
        "READ_IN": 40,
        "RELEASE_IN": 24,
        "GETXATTR_IN": 8,
        "GETXATTR_OUT": 8,
        "INTERRUPT_IN": 8,
        "STATFS_OUT": 80,
        "DIRENT": 24,
        "NOTIFY_STORE_OUT": 24,
        "NOTIFY_INVAL_ENTRY_OUT": 16,
        "BACKING_MAP": 16,
    }
    assert {k: getattr(p, k).size for k in sizes} == sizes
    # the offsets PackedEntry copies from fuse_entry_out
    assert (p.ENTRY_OUT_ATTR_VALID, p.ENTRY_OUT_ATTR_VALID_NSEC) == (24, 36)


def test_packed_entry_attr_out_is_fuse_attr_out():
    e = p.pack_entry(9, 3.25, 1.5, (0o100644, 1, 5, 6, 0, 1000), 2_000_000_001, 4096)
    out = e.attr_out()
    assert len(out) == 104
    attr_valid, attr_valid_nsec, dummy = struct.unpack_from("<QII", out)
    assert (attr_valid, attr_valid_nsec, dummy) == (1, 500_000_000, 0)
    assert out[16:] == e.entry_out()[40:]
    assert struct.unpack_from("<QQ", out, 16) == (9, 1000)


def test_packed_entry_answers_like_entry_attributes():
    """The walk's fast path (`pack_entry`) packs exactly what EntryAttributes packs."""
    import stat as st

    from stargz.fuse.protocol import EntryAttributes, pack_entry

    for fields, mtime in (
        ((st.S_IFREG | 0o644, 1, 1000, 1000, 0, 12345), 1_600_000_000_123_456_789),
        ((st.S_IFCHR, 1, 0, 0, 0, 0), 0),
        ((st.S_IFBLK | 0o600, 1, 0, 6, (8 << 8) | 1, 0), -1_500_000_000),
        ((st.S_IFDIR | 0o755, 7, 0, 0, 0, 0), 1),
    ):
        a = EntryAttributes()
        a.st_ino = (3 << 32) | 77
        a.st_mode, a.st_nlink, a.st_uid, a.st_gid, a.st_rdev, a.st_size = fields
        a.st_blocks = (a.st_size + 511) // 512
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = mtime
        a.entry_timeout, a.attr_timeout = 1.5, 0.25
        p = pack_entry(a.st_ino, 1.5, 0.25, fields, mtime, 4096)
        assert p.entry_out() == a.entry_out()
        assert p.attr_out() == a.attr_out()
        assert (p.st_ino, p.st_mode) == (a.st_ino, a.st_mode)
