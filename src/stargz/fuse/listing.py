"""A directory listing packed once, as the kernel wants it in READDIRPLUS answers.

A walk of a tree (``find``, ``du``, a container's first ``ls -R``) is mostly READDIRPLUS:
one answer carries each entry's name, type and inode *and* its full attributes, so the
kernel needs no LOOKUP per entry. Packing those records one by one costs more than the
rest of the request; a filesystem whose directories never change packs each directory
once (`pack_listing`) and answers every READDIRPLUS (or READDIR) of it with a slice of the
same bytes (`DirListing.fill`).

Record ``i`` of a listing is the entry with offset id ``first_id + i``; its ``off`` field
(where the next call continues) is ``first_id + i + 1``, as `DirBuffer.add` would write it.
"""

from __future__ import annotations

from array import array
from bisect import bisect_right
from collections.abc import Iterable

from stargz.fuse.protocol import DIRENT, DIRENTPLUS, ENTRY_WITH_ATTR, DirBuffer

_HEAD = ENTRY_WITH_ATTR.size
_PADS = [b"\0" * n for n in range(8)]


class DirListing:
    """Entries ``first_id``, ``first_id + 1``, ... of a directory as READDIRPLUS records
    (``fuse_direntplus``: entry_out + attr + dirent + name, 8-byte aligned), back to back
    in ``body``; ``ends[i]`` is where record ``i`` ends."""

    __slots__ = ("body", "ends", "first_id")

    def __init__(self, body: bytes, ends: array, first_id: int) -> None:
        self.body = body
        self.ends = ends
        self.first_id = first_id

    def __len__(self) -> int:
        return len(self.ends)

    def fill(self, out: DirBuffer, start_id: int) -> bool:
        """Add the entries from ``start_id`` on to ``out`` while they fit: records as they
        are for READDIRPLUS, without their entry_out for READDIR. True when the last
        entry went in (or none was left), False when ``out`` is full."""
        ends = self.ends
        i = start_id - self.first_id
        n = len(ends)
        if i < 0:
            raise ValueError(f"entry id {start_id} is before this listing's first")
        if i >= n:
            return True
        begin = ends[i - 1] if i else 0
        room = out.limit - out.used
        if out.plus:
            k = bisect_right(ends, begin + room, i)  # records i .. k-1 fit
            if k > i:
                out.parts.append(self.body[begin : ends[k - 1]])
                out.used += ends[k - 1] - begin
            return k == n
        body = self.body
        for j in range(i, n):
            rec = body[begin + _HEAD : ends[j]]
            begin = ends[j]
            if out.used + len(rec) > out.limit:
                return False
            out.parts.append(rec)
            out.used += len(rec)
        return True


def pack_listing(
    entries: Iterable[tuple[bytes, int, tuple[int, int, int, int, int, int], int]],
    first_id: int,
    entry_timeout: float,
    attr_timeout: float,
    blksize: int = 4096,
) -> DirListing:
    """``entries``: ``(name, ino, (mode, nlink, uid, gid, rdev, size), mtime_ns)`` in
    listing order; atime and ctime are the mtime, st_blocks counts 512-byte units of the
    size (as `stargz.fuse.pack_entry` answers a LOOKUP of the same inode)."""
    es = int(entry_timeout)
    ens = int((entry_timeout - es) * 1e9)
    as_ = int(attr_timeout)
    ans = int((attr_timeout - as_) * 1e9)
    pack = DIRENTPLUS.pack
    pads = _PADS
    dirent = DIRENT.size
    parts: list[bytes] = []
    ends = array("Q")
    end = 0
    next_id = first_id
    for name, ino, (mode, nlink, uid, gid, rdev, size), mtime_ns in entries:
        next_id += 1
        sec, nsec = divmod(mtime_ns, 1_000_000_000)
        n = len(name)
        pad = pads[-(dirent + n) & 7]
        parts.append(
            pack(
                ino,
                0,
                es,
                as_,
                ens,
                ans,
                ino,
                size,
                (size + 511) // 512,
                sec,
                sec,
                sec,
                nsec,
                nsec,
                nsec,
                mode,
                nlink,
                uid,
                gid,
                rdev & 0xFFFFFFFF,
                blksize,
                0,
                ino,
                next_id,
                n,
                (mode >> 12) & 0xF,
            )  # fmt: skip
        )
        parts.append(name)
        parts.append(pad)
        end += _HEAD + dirent + n + len(pad)
        ends.append(end)
    return DirListing(b"".join(parts), ends, first_id)
