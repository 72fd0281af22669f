"""FUSE request handlers: one FUSE mount whose root holds one directory per layer.

Inode numbers are computed, never allocated: ``(slot << 32) | local`` where ``slot`` is
the mounted layer's number (never reused while the FUSE connection lives, so a stale
kernel inode can't reach another layer; `stargz.fs.slots` keeps it across a daemon
restart that takes the connection over) and ``local`` is 1 for the hidden state directory,
2 for its JSON file, and ``node id + 3`` for the layer's TOC nodes (the layer root is
node 0). The FUSE root is inode 1 (slot 0). So every handler finds its layer with one
dict lookup and its node by arithmetic, and ``forget`` has nothing to do.

Handlers are plain functions called by `stargz.fuse.Session` as each request
arrives; only ``read`` may return an awaitable (a chunk that must be fetched first).
``FUSEError`` answers with an errno; other exceptions are logged, counted in
``FsMetrics.handler_errors`` (the filesystem wires the session's ``on_handler_error``)
and answered with EIO.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import stat
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from stargz.errors import StargzError, VerificationError
from stargz.fs.layer import Layer, LayerClosed
from stargz.fs.metrics import FsMetrics
from stargz.fs.options import FsOptions
from stargz.fs.passthrough import Passthrough
from stargz.fs.tree import BLOCK_SIZE, OVERLAY_XATTR_PREFIXES, Tree
from stargz.fuse.listing import DirListing, pack_listing
from stargz.fuse.protocol import (
    ROOT_INODE,
    DirBuffer,
    EntryAttributes,
    FileInfo,
    FileRanges,
    FUSEError,
    PackedEntry,
    StatvfsData,
    pack_entry,
)
from stargz.fuse.session import SPLICE_MIN

log = logging.getLogger("stargz.fs")

SLOT_SHIFT = 32
LOCAL_MASK = (1 << SLOT_SHIFT) - 1
STATE_DIR = 1
STATE_FILE = 2
NODE_BASE = 3
STATE_DIR_NAME = b".stargz-snapshotter"
#: An answer to LOOKUP/GETATTR (a layer's node: packed at once; others: field by field).
Attr = EntryAttributes | PackedEntry
#: Attribute answers kept per layer (each ~0.5 KiB; the kernel caches them itself for
#: attr_timeout, this only saves rebuilding hot ones).
ATTR_CACHE_MAX = 4096
#: Bytes of packed directory listings kept, all layers together (least recently listed
#: dropped first). Packing costs ~2 us an entry, a packed entry ~165 bytes: an image of
#: 50k entries is listed from memory, a larger tree is packed again on its next walk.
LISTING_CACHE_BYTES = 8 << 20
#: The overlayfs xattr namespaces, as the names GETXATTR carries.
OVERLAY_XATTR_NAMESPACES = tuple(p.encode() for p in OVERLAY_XATTR_PREFIXES)
#: File handle bit of a passthrough open (its RELEASE must not count as a cached close).
PASSTHROUGH_FH = 1 << 62
#: Bytes of in-memory chunks pushed into the page cache when a file is first opened.
NOTIFY_STORE_LIMIT = 8 << 20


def _listing_size(listing: DirListing) -> int:
    return len(listing.body) + listing.ends.itemsize * len(listing.ends) + 200


def ino_of(slot: int, node_id: int) -> int:
    return (slot << SLOT_SHIFT) | (node_id + NODE_BASE)


@dataclass(eq=False)
class Mounted:
    """One layer subtree of the FUSE root."""

    slot: int
    name: bytes
    layer: Layer
    tree: Tree
    attrs: dict[int, Attr] = field(default_factory=dict)
    pushed: set[int] = field(default_factory=set)
    accessed: set[int] = field(default_factory=set)
    #: Passthrough backing ids by node, and how many opens of a node are NOT passthrough,
    #: and how many are (the kernel refuses to mix the two modes on one inode while both
    #: are open; see `stargz.fs.passthrough`).
    backing: dict[int, int] = field(default_factory=dict)
    cached_opens: dict[int, int] = field(default_factory=dict)
    pt_opens: dict[int, int] = field(default_factory=dict)

    @property
    def state_name(self) -> bytes:
        return self.layer.digest.encode() + b".json"

    def state_json(self) -> bytes:
        return json.dumps(self.layer.state()).encode() + b"\n"


class Operations:
    def __init__(self, options: FsOptions, metrics: FsMetrics) -> None:
        self.options = options
        self.metrics = metrics
        self.slots: dict[int, Mounted] = {}
        self.names: dict[bytes, int] = {}
        self._next_slot = 1
        #: Packed listings by (layer, directory node), least recently used first.
        self._listings: OrderedDict[tuple[Mounted, int], DirListing] = OrderedDict()
        self._listing_bytes = 0
        self._root_attr = self._dir_attr(ROOT_INODE, 0o755)
        #: Set by the filesystem once mounted: ``notify_store(inode, offset, data)``.
        self.notify_store: Callable[[int, int, bytes], None] | None = None
        #: Set by the filesystem when the kernel agreed to FUSE passthrough.
        self.passthrough: Passthrough | None = None
        #: ``on_open(layer digest, path)``: called on every OPEN of a file of a layer (a
        #: `stargz.fs.trace.AccessTrace` records the first ones; every read follows an open).
        self.on_open: Callable[[str, str], None] | None = None

    # --- the layer table (called by the FileSystem) ---------------------------------------

    def add(
        self, name: bytes, layer: Layer, tree: Tree | None = None, slot: int | None = None
    ) -> Mounted:
        """Show ``layer`` as ``name`` in the FUSE root, in ``slot`` (default: the next)."""
        if slot is None:
            slot = self._next_slot
        elif slot in self.slots:
            raise ValueError(f"inode slot {slot} is in use")
        self._next_slot = max(self._next_slot, slot + 1)
        if tree is None:
            tree = Tree(layer.reader, self.options.opaque_xattr)
        m = Mounted(slot, name, layer, tree)
        self.slots[slot] = m
        self.names[name] = slot
        return m

    def remove(self, name: bytes) -> Mounted | None:
        slot = self.names.pop(name, None)
        if slot is None:
            return None
        m = self.slots.pop(slot, None)
        if m is not None:
            for key in [k for k in self._listings if k[0] is m]:
                self._listing_bytes -= _listing_size(self._listings.pop(key))
        if m is not None and self.passthrough is not None:
            self.passthrough.drop(m)
        return m

    # --- attributes ------------------------------------------------------------------------

    def _dir_attr(self, ino: int, perm: int, timeout: float | None = None) -> EntryAttributes:
        a = EntryAttributes()
        a.st_ino = ino
        a.st_mode = stat.S_IFDIR | perm
        a.st_nlink = 2
        a.st_blksize = BLOCK_SIZE
        t = self.options.attr_timeout if timeout is None else timeout
        a.attr_timeout = t
        a.entry_timeout = self.options.entry_timeout if timeout is None else timeout
        return a

    def _attr(self, m: Mounted, local: int) -> Attr:
        a = m.attrs.get(local)
        if a is not None:
            return a
        ino = (m.slot << SLOT_SHIFT) | local
        if local == STATE_DIR:
            return self._dir_attr(ino, 0o500, 0)
        if local == STATE_FILE:
            a = EntryAttributes()
            a.st_ino = ino
            a.st_mode = stat.S_IFREG | 0o400
            a.st_nlink = 1
            a.st_size = len(m.state_json())
            a.st_blksize = BLOCK_SIZE
            a.st_blocks = (a.st_size + 511) // 512
            a.attr_timeout = a.entry_timeout = 0
            return a
        node = local - NODE_BASE
        if not 0 <= node < len(m.tree.nodes):
            raise FUSEError(errno.ENOENT)
        a = pack_entry(
            ino,
            self.options.entry_timeout,
            self.options.attr_timeout,
            m.tree.stat_of(node),
            m.layer.mtime_ns(node),
            BLOCK_SIZE,
        )
        if len(m.attrs) >= ATTR_CACHE_MAX:
            m.attrs.clear()  # (a walk of a 100k-file layer must not keep 100k of them)
        m.attrs[local] = a
        return a

    def _split(self, inode: int) -> tuple[Mounted, int]:
        m = self.slots.get(inode >> SLOT_SHIFT)
        if m is None:
            raise FUSEError(errno.ENOENT)
        return m, inode & LOCAL_MASK

    def _negative(self) -> EntryAttributes:
        # st_ino 0: the kernel caches "no such entry" for entry_timeout (overlayfs looks up
        # every path in every lower layer, so negative answers are a hot path too)
        a = EntryAttributes()
        a.st_ino = 0
        a.entry_timeout = self.options.entry_timeout
        return a

    # --- handlers --------------------------------------------------------------------------

    def lookup(self, parent_inode: int, name: bytes) -> Attr:
        if parent_inode == ROOT_INODE:
            slot = self.names.get(name)
            if slot is None:
                raise FUSEError(errno.ENOENT)
            return self._attr(self.slots[slot], NODE_BASE)
        m, local = self._split(parent_inode)
        if local == STATE_DIR:
            if name == m.state_name:
                return self._attr(m, STATE_FILE)
            raise FUSEError(errno.ENOENT)
        node = local - NODE_BASE
        if node == 0 and name == STATE_DIR_NAME:
            return self._attr(m, STATE_DIR)
        if not (0 <= node < len(m.tree.nodes)) or not m.tree.is_dir(node):
            raise FUSEError(errno.ENOTDIR)
        child = m.tree.lookup(node, name)
        if child < 0:
            return self._negative()
        return self._attr(m, child + NODE_BASE)

    def getattr(self, inode: int) -> Attr:
        if inode == ROOT_INODE:
            return self._root_attr
        m, local = self._split(inode)
        return self._attr(m, local)

    def readlink(self, inode: int) -> bytes:
        m, local = self._split(inode)
        if local < NODE_BASE:
            raise FUSEError(errno.EINVAL)
        target = m.tree.readlink(local - NODE_BASE)
        if target is None:
            raise FUSEError(errno.EINVAL)
        return target

    def opendir(self, inode: int) -> int:
        if inode == ROOT_INODE:
            return inode
        m, local = self._split(inode)
        if local == STATE_DIR or (local >= NODE_BASE and m.tree.is_dir(local - NODE_BASE)):
            return inode
        raise FUSEError(errno.ENOTDIR)

    def _small_dir(self, inode: int) -> list[tuple[bytes, Attr]]:
        """Entries of the FUSE root or a state directory (a handful)."""
        if inode == ROOT_INODE:
            out = [(b".", self._root_attr), (b"..", self._root_attr)]
            for name, slot in list(self.names.items()):
                m = self.slots.get(slot)
                if m is not None:
                    out.append((name, self._attr(m, NODE_BASE)))
            return out
        m, _ = self._split(inode)
        return [
            (b".", self._attr(m, STATE_DIR)),
            (b"..", self._attr(m, NODE_BASE)),
            (m.state_name, self._attr(m, STATE_FILE)),
        ]

    def readdir(self, fh: int, start_id: int, token: DirBuffer) -> None:
        # ids: 0 ".", 1 "..", 2 + i the i-th visible entry; each call continues at start_id
        if fh == ROOT_INODE or fh & LOCAL_MASK == STATE_DIR:
            entries = self._small_dir(fh)
            for i in range(start_id, len(entries)):
                name, attr = entries[i]
                if not token.add(name, attr, i + 1):
                    return
            return
        m, local = self._split(fh)
        node = local - NODE_BASE
        if start_id == 0:
            if not token.add(b".", self._attr(m, local), 1):
                return
            start_id = 1
        if start_id == 1:
            parent = (
                self._root_attr
                if node == 0
                else self._attr(m, m.tree.parent.get(node, 0) + NODE_BASE)
            )
            if not token.add(b"..", parent, 2):
                return
            start_id = 2
        self._listing(m, node).fill(token, start_id)

    def _listing(self, m: Mounted, node: int) -> DirListing:
        """The visible entries of directory ``node``, ids 2.. (packed on first use; the
        layer never changes, so a packed listing is good as long as it is kept)."""
        key = (m, node)
        got = self._listings.get(key)
        if got is not None:
            self._listings.move_to_end(key)
        else:
            base = (m.slot << SLOT_SHIFT) | NODE_BASE
            stat_of, mtime_ns = m.tree.stat_of, m.layer.mtime_ns
            got = pack_listing(
                [(name, base + c, stat_of(c), mtime_ns(c)) for name, c in m.tree.listing(node)],
                2,
                self.options.entry_timeout,
                self.options.attr_timeout,
                BLOCK_SIZE,
            )
            self._listings[key] = got
            self._listing_bytes += _listing_size(got)
            while self._listing_bytes > LISTING_CACHE_BYTES and len(self._listings) > 1:
                self._listing_bytes -= _listing_size(self._listings.popitem(last=False)[1])
        return got

    def open(self, inode: int, flags: int) -> FileInfo:
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise FUSEError(errno.EROFS)
        m, local = self._split(inode)
        if local == STATE_FILE:
            return FileInfo(fh=inode, direct_io=True, keep_cache=False)
        node = local - NODE_BASE
        if local < NODE_BASE or not m.tree.is_reg(node):
            raise FUSEError(errno.EISDIR if local == STATE_DIR else errno.EINVAL)
        if self.on_open is not None:
            self.on_open(m.layer.digest, m.tree.nodes[node].path)
        if node not in m.accessed:
            m.accessed.add(node)
            if self.options.log_file_access:
                log.info(
                    "file access",
                    extra={"layer": m.layer.digest, "path": m.tree.nodes[node].path},
                )
        if self.passthrough is not None:
            bid = self.passthrough.backing_for(m, node)
            if bid:
                self.metrics.passthrough_opens += 1
                return FileInfo(fh=inode | PASSTHROUGH_FH, backing_id=bid)
        m.cached_opens[node] = m.cached_opens.get(node, 0) + 1
        if (
            self.notify_store is not None
            and self.options.notify_store
            and node not in m.pushed
            and not flags & os.O_DIRECT
        ):
            m.pushed.add(node)
            self._push(m, inode, node)
        return FileInfo(fh=inode, keep_cache=True)

    def release(self, fh: int) -> None:
        if fh & PASSTHROUGH_FH:
            m = self.slots.get((fh & ~PASSTHROUGH_FH) >> SLOT_SHIFT)
            if m is not None and self.passthrough is not None:
                self.passthrough.closed(m, (fh & LOCAL_MASK) - NODE_BASE)
            return
        m = self.slots.get(fh >> SLOT_SHIFT)
        local = fh & LOCAL_MASK
        if m is None or local < NODE_BASE:  # (the state file)
            return
        node = local - NODE_BASE
        left = m.cached_opens.get(node, 0) - 1
        if left > 0:
            m.cached_opens[node] = left
            return
        m.cached_opens.pop(node, None)
        if self.passthrough is not None:
            self.passthrough.released(m, node)

    def _push(self, m: Mounted, inode: int, node: int) -> None:
        """Hand the file's already-cached chunks to the kernel page cache (notify_store)."""
        for off, data in m.layer.cached_chunks(node, NOTIFY_STORE_LIMIT):
            try:
                self.notify_store(inode, off, data)
            except OSError as e:
                log.debug("notify_store of %s failed: %s", m.tree.nodes[node].path, e)
                return
            m.layer.metrics.notify_store_bytes += len(data)

    def read(self, fh: int, off: int, size: int) -> bytes | FileRanges | Coroutine[Any, Any, bytes]:
        """The bytes, or (when a chunk must be fetched or checked first) a coroutine that
        returns them."""
        m = self.slots.get(fh >> SLOT_SHIFT)
        if m is None:
            raise FUSEError(errno.EIO)
        local = fh & LOCAL_MASK
        if local == STATE_FILE:
            return m.state_json()[off : off + size]
        try:
            ranges = size >= SPLICE_MIN and self.options.splice
            out = m.layer.read_now(local - NODE_BASE, off, size, ranges)
        except Exception as e:
            raise self._read_error(m, local, e) from None
        if out is None:
            return self._guarded(m, local, m.layer.read_later(local - NODE_BASE, off, size))
        if out.__class__ is FileRanges:
            out.fallback = functools.partial(self._copy, m, local, out.fallback)
        return out

    def _copy(
        self, m: Mounted, local: int, copy: Callable[[], Any]
    ) -> bytes | Coroutine[Any, Any, bytes]:
        """The bytes of a `FileRanges` answer the session could not splice."""
        try:
            out = copy()
        except Exception as e:
            raise self._read_error(m, local, e) from None
        return out if out.__class__ is bytes else self._guarded(m, local, out)

    async def _guarded(self, m: Mounted, local: int, read: Coroutine[Any, Any, bytes]) -> bytes:
        try:
            return await read
        except Exception as e:
            raise self._read_error(m, local, e) from None

    def _read_error(self, m: Mounted, local: int, e: Exception) -> FUSEError:
        """The errno a failed read answers with (always EIO), logged and counted."""
        if isinstance(e, FUSEError):
            return e
        m.layer.metrics.read_errors += 1
        path = m.tree.nodes[local - NODE_BASE].path
        m.layer.metrics.note_error(f"read of {path} failed: {e}")
        if isinstance(e, (VerificationError, LayerClosed)):
            log.debug("read of %s failed: %s", path, e)
        elif isinstance(e, (StargzError, OSError, TimeoutError)):
            log.warning(
                "read failed", extra={"layer": m.layer.digest, "path": path, "error": str(e)}
            )
        else:
            self.metrics.handler_errors += 1
            log.error("FUSE read of %s failed", path, exc_info=e)
        return FUSEError(errno.EIO)

    def statfs(self) -> StatvfsData:
        s = StatvfsData()
        s.f_bsize = BLOCK_SIZE
        s.f_frsize = BLOCK_SIZE
        s.f_blocks = s.f_bfree = s.f_bavail = 0
        s.f_files = s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s

    def _xattrs(self, inode: int) -> dict[bytes, bytes]:
        if inode == ROOT_INODE:
            return {}
        m, local = self._split(inode)
        if local < NODE_BASE:
            return {}
        return m.tree.xattrs(local - NODE_BASE)

    def getxattr(self, inode: int, name: bytes) -> bytes:
        if name.startswith(OVERLAY_XATTR_NAMESPACES):
            # overlayfs asks every lower file for its metacopy/origin/... xattrs: only the
            # tree's own opaque marker is ever served from these namespaces
            m, local = self._split(inode) if inode != ROOT_INODE else (None, 0)
            if m is None or local < NODE_BASE or not m.tree.is_opaque(local - NODE_BASE, name):
                raise FUSEError(errno.ENODATA)
            return b"y"
        value = self._xattrs(inode).get(name)
        if value is None:
            raise FUSEError(errno.ENODATA)
        return value

    def listxattr(self, inode: int) -> list[bytes]:
        return list(self._xattrs(inode))
