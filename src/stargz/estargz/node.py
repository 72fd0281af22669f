"""Inodes of an opened layer, and what the TOC builder hands the reader.

Shared by the native TOC builder and its pure-Python twin (``_tocbuild_py``), so both
return the very same classes. A `Node` keeps the facts the mount needs on every call (type,
mode, size, links, children) as plain attributes and the rest of its file attributes as
one tuple (``ATTR_KEYS``); its `TOCEntry` is made from them on first use. Opening a layer
therefore costs no `TOCEntry` per entry (most are never looked at), and a node holds no
JSON object: the entries' dicts and the chunk fields (kept in the chunk table) are freed.
"""

from __future__ import annotations

from array import array
from types import MappingProxyType

from stargz.estargz.toc import TOCEntry, decode_xattrs

#: The TOC keys a node keeps in ``attrs`` (in this order; None where the entry has none).
#: Not ``offset`` (a node's own slot): without it, equal tuples (same modtime and owner,
#: the usual case) are one shared object.
ATTR_KEYS = (
    "modtime",
    "linkName",
    "uid",
    "gid",
    "userName",
    "groupName",
    "devMajor",
    "devMinor",
    "xattrs",
)

#: The ``children`` of every non-directory: one shared, read-only empty mapping (an empty
#: dict per file cost 64 bytes a node).
NO_CHILDREN: MappingProxyType = MappingProxyType({})

S_IFMT_BY_TYPE = {
    "dir": 0o040000,
    "reg": 0o100000,
    "symlink": 0o120000,
    "char": 0o020000,
    "block": 0o060000,
    "fifo": 0o010000,
}


class Node:
    """One inode of the layer. Hardlinks share the Node of their target."""

    __slots__ = (
        "id",
        "name",
        "parent",
        "type",
        "mode",
        "size",
        "nlink",
        "children",
        "attrs",
        "offset",
        "_entry",
    )

    def __init__(
        self,
        id: int,
        name: str,
        parent: Node | None,
        type: str,
        mode: int,
        size: int,
        attrs: tuple | None,
        offset: int = 0,
    ) -> None:
        self.id = id
        #: The last component of the first (canonical) path; "" for the root.
        self.name = name
        #: The directory of that path (None for the root). A node keeps its name and its
        #: parent, never its whole path: a deep tree would cost the square of its depth.
        self.parent = parent
        self.type = type
        self.mode = mode
        self.size = size
        self.nlink = 2 if type == "dir" else 1
        #: name -> node id (directories; NO_CHILDREN for the rest).
        self.children: dict[str, int] = {} if type == "dir" else NO_CHILDREN  # type: ignore[assignment]
        #: The entry's ``ATTR_KEYS`` values (checked at open); None for implicit directories.
        self.attrs = attrs
        #: The TOC ``offset`` (of a regular file: its first chunk's compressed offset).
        self.offset = offset
        self._entry: TOCEntry | None = None

    def __repr__(self) -> str:
        return f"Node({self.id}, {self.path!r}, {self.type})"

    @property
    def path(self) -> str:
        """The first (canonical) path ("" for the root), made from the names on each call:
        for log lines and errors, not for hot paths."""
        names = []
        node: Node | None = self
        while node is not None and node.parent is not None:
            names.append(node.name)
            node = node.parent
        names.reverse()
        return "/".join(names)

    @property
    def entry(self) -> TOCEntry:
        """The node's TOC entry (name cleaned), made on first use.

        File attributes only: the chunk fields (``chunkDigest``...) and the file ``digest``
        are not kept per node (see `Reader.chunks`, or `Reader.toc` for the whole TOC).
        """
        e = self._entry
        if e is None:
            e = TOCEntry(name=self.path, type=self.type, size=self.size, mode=self.mode)
            a = self.attrs
            if a is not None:
                e.modtime = a[0] or ""
                e.link_name = a[1] or ""
                e.uid = a[2] or 0
                e.gid = a[3] or 0
                e.user_name = a[4] or ""
                e.group_name = a[5] or ""
                e.dev_major = a[6] or 0
                e.dev_minor = a[7] or 0
                if a[8]:
                    e.xattrs = decode_xattrs(self.id, a[8])
            e.offset = self.offset
            self._entry = e
        return e

    # The attributes a stat or readlink needs, straight from ``attrs`` (as `entry` would
    # say them, without making and keeping a TOCEntry per node looked at).

    @property
    def modtime(self) -> str:
        a = self.attrs
        return (a[0] or "") if a is not None else ""

    @property
    def link_name(self) -> str:
        a = self.attrs
        return (a[1] or "") if a is not None else ""

    @property
    def uid(self) -> int:
        a = self.attrs
        return (a[2] or 0) if a is not None else 0

    @property
    def gid(self) -> int:
        a = self.attrs
        return (a[3] or 0) if a is not None else 0

    @property
    def dev(self) -> tuple[int, int]:
        """(devMajor, devMinor)."""
        a = self.attrs
        return ((a[6] or 0), (a[7] or 0)) if a is not None else (0, 0)

    @property
    def xattrs(self) -> dict[str, bytes]:
        """The decoded xattrs (a new dict; empty for most nodes)."""
        a = self.attrs
        if a is None or not a[8]:
            return {}
        return decode_xattrs(self.id, a[8])

    @property
    def st_mode(self) -> int:
        """Tar mode bits plus the file-type bits of stat(2)."""
        return S_IFMT_BY_TYPE[self.type] | (self.mode & 0o7777)


class OpenedTOC:
    """Everything the TOC builder derives from the entries, in one pass.

    ``chunk_*``: one row per chunk in TOC order (file id, offset in the file, compressed
    offset, inner offset, size) and 32 digest bytes per row; ``trailing[row]``: entries
    listed after the chunk whose tar headers share its member; ``dirent_*``: one row per
    directory entry (parent id, name, target id) for the name index.
    """

    __slots__ = (
        "nodes",
        "by_path",
        "landmark",
        "chunk_file",
        "chunk_off",
        "chunk_comp",
        "chunk_inner",
        "chunk_size",
        "chunk_digests",
        "trailing",
        "dirent_parent",
        "dirent_name",
        "dirent_target",
    )

    def __init__(self, nodes: list[Node], by_path: dict[str, int], landmark: str | None) -> None:
        self.nodes = nodes
        self.by_path = by_path
        self.landmark = landmark
        self.chunk_file = array("q")
        self.chunk_off = array("q")
        self.chunk_comp = array("q")
        self.chunk_inner = array("q")
        self.chunk_size = array("q")
        self.chunk_digests = b""
        self.trailing = array("q")
        self.dirent_parent = array("q")
        self.dirent_name: list[bytes] = []
        self.dirent_target = array("q")

    def dirents_from_nodes(self) -> None:
        """Fill the ``dirent_*`` rows from the nodes' children."""
        parents, names, targets = self.dirent_parent, self.dirent_name, self.dirent_target
        for node in self.nodes:
            if node.type != "dir":
                continue
            nid = node.id
            for name, child in node.children.items():
                parents.append(nid)
                names.append(name.encode("utf-8", "surrogateescape"))
                targets.append(child)


def same(a: OpenedTOC, b: OpenedTOC) -> list[str]:
    """Where two builds differ (empty when equal): the twin test's yardstick."""
    out = []
    for k in OpenedTOC.__slots__:
        if k == "nodes":
            continue
        if getattr(a, k) != getattr(b, k):
            out.append(k)
    if len(a.nodes) != len(b.nodes):
        out.append("len(nodes)")
    else:
        for x, y in zip(a.nodes, b.nodes, strict=True):
            fx = (x.id, x.path, x.type, x.mode, x.size, x.nlink, x.children, x.attrs, x.offset)
            fy = (y.id, y.path, y.type, y.mode, y.size, y.nlink, y.children, y.attrs, y.offset)
            fx += (x.name, x.parent.id if x.parent is not None else None)
            fy += (y.name, y.parent.id if y.parent is not None else None)
            if fx != fy:
                out.append(f"node {x.id}: {fx!r} != {fy!r}")
                break
    return out
