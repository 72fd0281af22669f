"""The POSIX view of one layer, as overlayfs wants to see a lower directory.

What the tar/TOC says and what the mount shows differ in a few places (Go
``fs/layer/node.go``):

- ``.wh.<name>`` (a tar whiteout) shows as a character device 0/0 named ``<name>``, the
  overlayfs whiteout; a real ``<name>`` in the same directory wins.
- ``.wh..wh..opq`` is hidden and marks its directory opaque: the directory answers the
  xattr ``trusted.overlay.opaque`` (``user.overlay.opaque`` in userxattr mode) with ``y``.
- No other ``.wh.*`` name can be looked up or listed; the prefetch landmarks are hidden at
  the layer root.
- Xattrs of the overlayfs namespaces (``trusted.overlay.*``, ``user.overlay.*``) that the TOC
  carries are dropped: overlayfs would obey them (redirect, metacopy, origin, opaque...), and a
  layer must never steer it. The opaque xattr above is the tree's own, not the TOC's.
- Attributes: mtime from the TOC ``modtime`` (atime and ctime the same), st_blocks in 512-byte
  units of the size, st_blksize 4096, symlink size = length of the target, nlink from the
  TOC (hardlinks share one node, so one inode).
"""

from __future__ import annotations

import os
import stat
from typing import Any

from stargz.estargz.node import S_IFMT_BY_TYPE
from stargz.estargz.toc import NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
BLOCK_SIZE = 4096
_HIDDEN_AT_ROOT = {PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK}


#: Xattr name prefixes overlayfs acts on (``trusted.`` by default, ``user.`` in userxattr
#: mode); never served from a TOC.
OVERLAY_XATTR_PREFIXES = ("trusted.overlay.", "user.overlay.")


def _enc(name: str) -> bytes:
    """A TOC string as the bytes FUSE answers with. A lone surrogate that stands for no
    byte (``"\\ud800"`` in the TOC JSON: the builders refuse it in names, but a symlink
    target or an xattr name may hold one) becomes U+FFFD, as Go's JSON decoder reads it,
    instead of failing every READLINK / LISTXATTR of the node."""
    try:
        return name.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        fixed = "".join("\ufffd" if _lone_surrogate(c) else c for c in name)
        return fixed.encode("utf-8", "surrogateescape")


def _lone_surrogate(c: str) -> bool:
    o = ord(c)
    # U+DC80..U+DCFF are surrogateescape's stand-ins for undecodable bytes: kept
    return 0xD800 <= o <= 0xDFFF and not 0xDC80 <= o <= 0xDCFF


class Tree:
    """Directory listings, lookups and attributes of one `stargz.estargz.Reader`'s nodes."""

    def __init__(self, reader: Any, opaque_xattr: str = "trusted") -> None:
        self.reader = reader
        self.nodes = reader.nodes
        self.opaque_name = _enc(f"{opaque_xattr}.overlay.opaque")
        self.parent: dict[int, int] = {0: 0}
        self.whiteouts: set[int] = set()
        self.opaque: set[int] = set()
        nodes = self.nodes
        for node in nodes:
            if node.type != "dir":
                continue
            parent = node.id
            for name, child in node.children.items():
                if nodes[child].type == "dir":
                    self.parent[child] = parent
                if name.startswith(WHITEOUT_PREFIX):
                    if name == OPAQUE_MARKER:
                        self.opaque.add(parent)
                    else:
                        self.whiteouts.add(child)

    def listing(self, dir_id: int) -> list[tuple[bytes, int]]:
        """Visible ``(name, node id)`` entries of a directory, sorted by name (made on each
        call: `stargz.fs.ops` keeps the packed form)."""
        children = self.nodes[dir_id].children
        out: dict[str, int] = {}
        for name, child in children.items():
            if name.startswith(WHITEOUT_PREFIX):
                if name == OPAQUE_MARKER:
                    continue
                target = name[len(WHITEOUT_PREFIX) :]
                if target and target not in children:
                    out[target] = child
                continue
            if dir_id == 0 and name in _HIDDEN_AT_ROOT:
                continue
            out[name] = child
        return sorted((_enc(n), c) for n, c in out.items())

    def lookup(self, dir_id: int, name: bytes) -> int:
        """Node id of ``name`` in ``dir_id`` as the mount shows it, or -1."""
        text = name.decode("utf-8", "surrogateescape")
        if text.startswith(WHITEOUT_PREFIX) or (dir_id == 0 and text in _HIDDEN_AT_ROOT):
            return -1
        child = self.reader.child(dir_id, text)
        if child >= 0:
            return child
        return self.reader.child(dir_id, WHITEOUT_PREFIX + text)

    def is_dir(self, node_id: int) -> bool:
        return self.nodes[node_id].type == "dir"

    def is_reg(self, node_id: int) -> bool:
        return node_id not in self.whiteouts and self.nodes[node_id].type == "reg"

    def stat_of(self, node_id: int) -> tuple[int, int, int, int, int, int]:
        """``(mode, nlink, uid, gid, rdev, size)`` of a node as the mount shows it."""
        if node_id in self.whiteouts:
            return stat.S_IFCHR, 1, 0, 0, 0, 0
        # from the node's fields and attrs tuple, not its properties (a walk stats every
        # node): no TOCEntry is made (and kept) per stat'ed node
        node = self.nodes[node_id]
        t = node.type
        a = node.attrs
        mode = S_IFMT_BY_TYPE[t] | (node.mode & 0o7777)
        uid, gid = ((a[2] or 0), (a[3] or 0)) if a is not None else (0, 0)
        if t == "reg":
            return mode, node.nlink or 1, uid, gid, 0, node.size
        if t == "dir":
            return mode, node.nlink or 1, uid, gid, 0, 0
        if t == "symlink":
            return mode, node.nlink or 1, uid, gid, 0, len(_enc(node.link_name))
        rdev = os.makedev(*node.dev) if t == "char" or t == "block" else 0
        return mode, node.nlink or 1, uid, gid, rdev, 0

    def fill_attr(self, attr: Any, node_id: int, mtime_ns: int) -> None:
        """Set the stat fields of a `stargz.fuse.EntryAttributes` (not st_ino/timeouts)."""
        mode, nlink, uid, gid, rdev, size = self.stat_of(node_id)
        attr.st_mode, attr.st_nlink, attr.st_uid, attr.st_gid = mode, nlink, uid, gid
        attr.st_rdev, attr.st_size = rdev, size
        attr.st_blksize = BLOCK_SIZE
        attr.st_blocks = (size + 511) // 512
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = mtime_ns

    def xattrs(self, node_id: int) -> dict[bytes, bytes]:
        if node_id in self.whiteouts:
            return {}
        out = {
            _enc(k): v
            for k, v in self.nodes[node_id].xattrs.items()
            if not k.startswith(OVERLAY_XATTR_PREFIXES)
        }
        if node_id in self.opaque:
            out[self.opaque_name] = b"y"
        return out

    def is_opaque(self, node_id: int, name: bytes) -> bool:
        """Whether ``name`` (an overlayfs-namespace xattr) is this tree's opaque marker on
        ``node_id``: the only such xattr `xattrs` ever answers."""
        return name == self.opaque_name and node_id in self.opaque

    def readlink(self, node_id: int) -> bytes | None:
        node = self.nodes[node_id]
        return _enc(node.link_name) if node.type == "symlink" else None
