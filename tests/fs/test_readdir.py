"""Directory listings of a lazily mounted layer, through a real FUSE mount.

A READDIRPLUS answer hands the kernel every entry with its attributes (the kernel then
needs no LOOKUP for it), so it must say exactly what a LOOKUP of that name says. And a
walk must cost what the protocol allows: no OPENDIR / RELEASEDIR (the kernel opens
directories itself once the first OPENDIR got ENOSYS), READDIRPLUS rather than READDIR,
no LOOKUP of a listed entry.
"""

from __future__ import annotations

import collections
import os
import struct
import time

import pytest

from stargz.fs import ops as ops_module
from stargz.fs.ops import ino_of
from stargz.fuse import DirBuffer, Opcode

ENTRY_OUT = struct.Struct("<QQQQII" + "QQQqqqIIIIIIIIII")  # fuse_entry_out (128)
DIRENT = struct.Struct("<QQII")  # fuse_dirent without its name (24)


def _records(body: bytes, plus: bool) -> list[tuple[bytes, bytes, int, int, int]]:
    """(name, entry_out bytes or b"", ino, next offset, type) of each record."""
    out, pos = [], 0
    while pos < len(body):
        entry = b""
        if plus:
            entry = body[pos : pos + ENTRY_OUT.size]
            pos += ENTRY_OUT.size
        ino, off, namelen, typ = DIRENT.unpack_from(body, pos)
        out.append((body[pos + DIRENT.size : pos + DIRENT.size + namelen], entry, ino, off, typ))
        pos += (DIRENT.size + namelen + 7) & ~7
    assert pos == len(body)
    return out


def _listing(ops, ino: int, plus: bool, size: int) -> list[tuple[bytes, bytes, int, int, int]]:
    """Every record of directory ``ino``, asked ``size`` bytes at a time as the kernel
    does (each call continues at the last record's offset)."""
    got, off = [], 0
    while True:
        out = DirBuffer(plus, size)
        ops.readdir(ino, off, out)
        recs = _records(out.body(), plus)
        if not recs:
            return got
        got += recs
        off = recs[-1][3]


def _mounted(fs, digest: str):
    return next(m for m in fs.ops.slots.values() if m.layer.digest == digest)


@pytest.mark.parametrize("tag", ["esgz", "zstdchunked"])
def test_readdirplus_says_what_lookup_says(fs_env, corners, corners_source, tag):
    fs = fs_env.start(corners_source)
    for layer in corners.layers(tag):
        mp = fs_env.mount(layer)
        m = _mounted(fs, layer.digest)

        async def collect(m=m):  # on the loop, as the session calls the handlers
            out = {}
            for node in m.tree.nodes:
                if node.type != "dir":
                    continue
                ino = ino_of(m.slot, node.id)
                plus = _listing(fs.ops, ino, True, 4096)
                small = _listing(fs.ops, ino, True, 600)
                plain = _listing(fs.ops, ino, False, 4096)
                lookups = {
                    r[0]: fs.ops.lookup(ino, r[0]).entry_out()
                    for r in plus
                    if r[0] not in (b".", b"..")
                }
                out[node.path] = (plus, small, plain, lookups)
            return out

        dirs = fs_env.run(collect())
        assert len(dirs) >= 3
        for path, (plus, small, plain, lookups) in dirs.items():
            assert small == plus
            assert [r[0] for r in plain] == [r[0] for r in plus]
            assert [r[2:] for r in plain] == [r[2:] for r in plus]
            assert [r[3] for r in plus] == list(range(1, len(plus) + 1))
            names = [r[0] for r in plus]
            assert names[:2] == [b".", b".."]
            assert sorted(os.fsdecode(n) for n in names[2:]) == sorted(os.listdir(mp / path))
            for name, entry, ino, _off, typ in plus[2:]:
                assert entry == lookups[name], (path, name)
                st = os.lstat(mp / path / os.fsdecode(name))
                assert (st.st_ino, st.st_mode >> 12) == (ino, typ), (path, name)
                assert ENTRY_OUT.unpack(entry)[6:9] == (ino, st.st_size, st.st_blocks)


def test_a_walk_asks_only_for_listings(fs_env, corners, corners_source):
    fs = fs_env.start(corners_source)
    layer = corners.layers("esgz")[0]
    mp = fs_env.mount(layer)
    seen: collections.Counter[int] = collections.Counter()
    handlers = fs._session._handlers

    def counting(opcode, handler):
        def h(nodeid, n):
            seen[opcode] += 1
            return handler(nodeid, n)

        return h

    async def wrap():  # on the loop: the session reads the table there
        for opcode, (handler, least) in list(handlers.items()):
            handlers[opcode] = (counting(opcode, handler), least)

    fs_env.run(wrap())
    n = 0
    for dp, dns, fns in os.walk(mp):
        for name in dns + fns:
            os.lstat(os.path.join(dp, name))
            n += 1
    dirs = sum(1 for node in fs.layer(layer.digest).reader.nodes if node.type == "dir")
    assert n > 20
    assert seen[Opcode.OPENDIR] <= 1  # the first one, answered ENOSYS
    assert seen[Opcode.RELEASEDIR] == 0 and seen[Opcode.READDIR] == 0
    assert seen[Opcode.READDIRPLUS] >= dirs
    assert seen[Opcode.LOOKUP] == 0, seen
    # a second listing of a directory is answered by the kernel's cache of it
    before = seen[Opcode.READDIRPLUS]
    for dp, _dns, _fns in os.walk(mp):
        os.listdir(dp)
    assert seen[Opcode.READDIRPLUS] == before


def test_the_fuse_root_lists_layers_as_they_come_and_go(fs_env, corners, corners_source):
    # every directory's listing is cached by the kernel, the FUSE root's too: adding or
    # removing a layer must drop that cache
    fs = fs_env.start(corners_source)
    l1, l2 = corners.layers("esgz")
    m1 = fs_env.mount(l1)
    assert os.listdir(fs.fuse_dir) == [os.path.basename(fs.subtree(l1.digest))]
    fs_env.mount(l2)
    want = {os.path.basename(fs.subtree(x.digest)) for x in (l1, l2)}
    assert set(os.listdir(fs.fuse_dir)) == want
    gone = os.path.basename(fs.subtree(l1.digest))
    fs_env.run(fs.unmount(str(m1)))
    # (the removal's invalidation runs in a worker thread)
    for _ in range(100):
        if gone not in os.listdir(fs.fuse_dir):
            break
        time.sleep(0.02)
    assert set(os.listdir(fs.fuse_dir)) == want - {gone}


def test_packed_listings_stay_within_their_bound(fs_env, corners, corners_source, monkeypatch):
    fs = fs_env.start(corners_source)
    layer = corners.layers("esgz")[0]
    ops = fs.ops

    def list_all(mp):
        m = _mounted(fs, layer.digest)
        dirs = [ino_of(m.slot, n.id) for n in m.tree.nodes if n.type == "dir"]

        async def run():
            got = [_listing(ops, ino, True, 4096) for ino in dirs]
            # names, offsets and types (inode numbers change with the mount's slot)
            return m, [[(r[0], r[3], r[4]) for r in recs] for recs in got]

        return fs_env.run(run())

    mp = fs_env.mount(layer)
    m, first = list_all(mp)
    sizes = [ops_module._listing_size(v) for k, v in ops._listings.items() if k[0] is m]
    assert len(sizes) == len(first) > 3
    fs_env.run(fs.unmount(str(mp)))
    assert not any(k[0] is m for k in ops._listings) and ops._listing_bytes == 0

    bound = max(sizes) + 1
    monkeypatch.setattr(ops_module, "LISTING_CACHE_BYTES", bound)
    mp = fs_env.mount(layer)
    _, again = list_all(mp)
    _, third = list_all(mp)  # packed again where dropped: the same answers
    assert again == third == first
    assert 0 < len(ops._listings) < len(first) and ops._listing_bytes <= bound
