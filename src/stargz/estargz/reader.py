"""Random-access reader of eStargz and zstd:chunked blobs.

The reader sees the blob only through ``read_at(offset, size) -> bytes``, so the same
code reads a local file, the disk cache or HTTP ranges. Opening costs one read of the
blob's tail (footer, and usually the whole TOC with it) and maybe one more for the TOC.

Trust chain: the caller passes the TOC digest from the layer annotation; the TOC's
``chunkDigest`` values then vouch for every chunk, which `read` checks before returning
a byte. Names are cleaned and checked so that no entry, hardlink or parent can point
outside the layer.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tarfile
import zlib
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from stargz.errors import (
    ChunkError,
    DigestMismatch,
    TOCError,
    VerificationError,
)
from stargz.estargz import codec
from stargz.estargz.footer import MAX_FOOTER_SIZE, Footer, parse_footer
from stargz.estargz.toc import (
    DATA_TYPES,
    NO_PREFETCH_LANDMARK,
    PREFETCH_LANDMARK,
    TOC,
    TOC_TAR_NAME,
    TOCEntry,
    clean_name,
    parse_toc,
)
from stargz.estargz.tocindex import ChunkTable, NameTable

ReadAt = Callable[[int, int], bytes]

DEFAULT_TAIL_SIZE = 64 << 10  # one read usually brings the footer and the whole TOC
DEFAULT_MAX_TOC_SIZE = 512 << 20  # uncompressed TOC JSON; ~5M entries
DEFAULT_MAX_CHUNK_SIZE = 256 << 20  # largest chunk decoded in one piece
_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}\Z")
_ZERO_DIGEST = bytes(32)
_TRAILING_PER_ENTRY = 8 << 10  # generous tar header + PAX records of one entry

S_IFMT_BY_TYPE = {
    "dir": 0o040000,
    "reg": 0o100000,
    "symlink": 0o120000,
    "char": 0o020000,
    "block": 0o060000,
    "fifo": 0o010000,
}


@dataclass(slots=True)
class Node:
    """One inode of the layer. Hardlinks share the Node of their target."""

    id: int
    path: str  # the first (canonical) path; "" for the root
    entry: TOCEntry
    nlink: int = 1
    children: dict[str, int] = field(default_factory=dict)

    @property
    def type(self) -> str:
        return self.entry.type

    @property
    def st_mode(self) -> int:
        """Tar mode bits plus the file-type bits of stat(2)."""
        return S_IFMT_BY_TYPE[self.entry.type] | (self.entry.mode & 0o7777)


def _parse_digest(value: str, i: int, e: TOCEntry, key: str) -> bytes:
    """The 32 raw bytes of ``sha256:<64 lowercase hex>`` (entry ``i``'s ``key``)."""
    if len(value) == 71 and value.startswith("sha256:") and _DIGEST_RE.match(value):
        return bytes.fromhex(value[7:])
    raise TOCError(f"{_where(i, e)} {key}: {value!r} is not a sha256 digest")


def _where(i: int, e: TOCEntry) -> str:
    # Built only when an error is raised: formatting it for every entry is measurable.
    return f"TOC entry {i} ({e.name!r})"


class Reader:
    """An opened layer: footer, TOC, inode tree and chunk index."""

    def __init__(
        self,
        read_at: ReadAt,
        blob_size: int,
        *,
        toc_digest: str | None = None,
        verify: bool = True,
        tail_size: int = DEFAULT_TAIL_SIZE,
        max_toc_size: int = DEFAULT_MAX_TOC_SIZE,
        max_chunk_size: int = DEFAULT_MAX_CHUNK_SIZE,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        """Open a blob. ``toc_digest`` ("sha256:...") is checked against the TOC JSON.

        With ``verify`` (the default) every regular file must carry chunk digests, and
        every chunk is checked on read.
        """
        self._read_at = read_at
        self._on_close = on_close
        self.blob_size = blob_size
        self.verify = verify
        self.max_chunk_size = max_chunk_size
        if blob_size < 1:
            raise TOCError("blob is empty")
        tail_len = min(blob_size, max(tail_size, MAX_FOOTER_SIZE))
        tail = self._read(blob_size - tail_len, tail_len)
        self.footer: Footer = parse_footer(tail, blob_size)
        self.compression = self.footer.compression
        toc_json = self._read_toc_json(tail, blob_size - tail_len, max_toc_size)
        self.toc_digest = "sha256:" + hashlib.sha256(toc_json).hexdigest()
        if toc_digest is not None and toc_digest != self.toc_digest:
            raise DigestMismatch(
                f"TOC digest mismatch: the layer annotation says {toc_digest}, "
                f"the TOC hashes to {self.toc_digest}"
            )
        self.toc: TOC = parse_toc(toc_json)
        self._build()

    def close(self) -> None:
        if self._on_close is not None:
            self._on_close()
            self._on_close = None

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- opening --------------------------------------------------------------------

    def _read(self, offset: int, size: int) -> bytes:
        data = self._read_at(offset, size)
        if len(data) != size:
            raise ChunkError(f"short read at offset {offset}: wanted {size} bytes, got {len(data)}")
        return data

    def _read_toc_json(self, tail: bytes, tail_start: int, max_toc_size: int) -> bytes:
        f = self.footer
        end = f.toc_offset + f.toc_size if f.toc_size else self.blob_size - f.footer_size
        if f.toc_offset >= tail_start:
            raw = tail[f.toc_offset - tail_start : end - tail_start]
        else:
            raw = self._read(f.toc_offset, end - f.toc_offset)
        if f.kind == "zstd":
            return _inflate_zstd_toc(raw, f.toc_uncompressed_size, max_toc_size)
        return _untar_gzip_toc(raw, max_toc_size)

    def _build(self) -> None:
        """Clean names, link the inode tree, check chunks, build the native indexes."""
        root = TOCEntry(name="", type="dir", mode=0o755)
        self.nodes: list[Node] = [Node(0, "", root, nlink=2)]
        by_path: dict[str, int] = {"": 0}
        # chunk rows, in TOC order, for the native ChunkTable
        c_file, c_off, c_comp, c_inner, c_size = (array("q") for _ in range(5))
        c_digest = bytearray()
        # per row: entries listed after the chunk whose tar headers share its member
        self._trailing = array("q")
        self.landmark: str | None = None
        payload_end = self.footer.toc_offset
        last_comp = (-1, 0)  # (offset, inner end) of the previous data entry
        current: Node | None = None  # the file whose chunks are being listed
        expect_off = 0
        pending_links: list[tuple[str, TOCEntry]] = []

        for i, e in enumerate(self.toc.entries):
            if self._trailing and (e.type not in DATA_TYPES or (e.type == "reg" and e.size <= 0)):
                self._trailing[-1] += 1
            if e.type == "chunk":
                if current is None or (e.name and clean_name(e.name) != current.path):
                    raise TOCError(f"{_where(i, e)}: chunk does not follow its file")
            else:
                if current is not None and expect_off != current.entry.size:
                    raise ChunkError(
                        f"file {current.path!r}: chunks cover {expect_off} of "
                        f"{current.entry.size} bytes"
                    )
                current = None
                e.name = clean_name(e.name)
            if e.type in DATA_TYPES and (e.type == "chunk" or e.size > 0):
                if e.type == "reg":
                    expect_off = 0
                if e.chunk_offset != expect_off:
                    raise ChunkError(
                        f"{_where(i, e)}: chunk offset {e.chunk_offset} leaves a gap or overlaps "
                        f"(expected {expect_off})"
                    )
            if e.type == "chunk":
                assert current is not None
                node = current
            elif e.name == "":
                # the layer's own root directory ("./")
                if e.type != "dir":
                    raise TOCError(f"{_where(i, e)}: the layer root must be a directory")
                self.nodes[0].entry = e
                continue
            else:
                parent = self._dir_for(e.name.rpartition("/")[0], by_path, i, e)
                base = e.name.rpartition("/")[2]
                if e.type == "hardlink":
                    pending_links.append((base, e))
                    continue
                if e.type == "reg" and e.size < 0:
                    raise TOCError(f"{_where(i, e)}: negative size {e.size}")
                old = by_path.get(e.name)
                if old is not None:  # a later entry replaces an earlier one, as tar does
                    prev = self.nodes[old]
                    if prev.type == "dir" and e.type == "dir":
                        prev.entry = e
                        continue
                    if prev.type == "dir" or e.type == "dir":
                        raise TOCError(f"{_where(i, e)}: replaces a {prev.type} with a {e.type}")
                # A replacement gets a fresh id (the old node becomes unreachable), so chunk
                # rows stay sorted by file id.
                node = Node(len(self.nodes), e.name, e)
                self.nodes.append(node)
                by_path[e.name] = node.id
                parent.children[base] = node.id
                if e.type == "dir":
                    node.nlink = 2
                    parent.nlink += 1
                if e.name in (PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK):
                    self.landmark = e.name
                if e.type == "reg" and e.size > 0:
                    current = node
                if e.type == "reg" and e.digest and e.digest != e.chunk_digest:
                    _parse_digest(e.digest, i, e, "digest")  # (else checked as chunkDigest)
            if e.type not in DATA_TYPES or (e.type == "reg" and e.size == 0):
                continue
            # a chunk of `node`'s content
            size = e.chunk_size or (node.entry.size - e.chunk_offset)
            if size <= 0 or e.chunk_offset + size > node.entry.size:
                raise ChunkError(
                    f"{_where(i, e)}: chunk [{e.chunk_offset}, +{size}) is outside the file "
                    f"of {node.entry.size} bytes"
                )
            if size > self.max_chunk_size:
                raise ChunkError(
                    f"{_where(i, e)}: chunk of {size} bytes exceeds the limit of "
                    f"{self.max_chunk_size}"
                )
            if not (0 <= e.offset < payload_end) or e.inner_offset < 0:
                raise ChunkError(
                    f"{_where(i, e)}: offset {e.offset} is outside the blob payload "
                    f"[0, {payload_end})"
                )
            if (e.offset, e.inner_offset) < last_comp:
                raise ChunkError(
                    f"{_where(i, e)}: compressed offset {e.offset}+{e.inner_offset} overlaps the "
                    f"previous chunk (which ends at {last_comp[0]}+{last_comp[1]})"
                )
            last_comp = (e.offset, e.inner_offset + size)
            if e.chunk_digest:
                c_digest += _parse_digest(e.chunk_digest, i, e, "chunkDigest")
            elif self.verify:
                raise VerificationError(f"{_where(i, e)}: no chunkDigest, cannot verify content")
            else:
                c_digest += _ZERO_DIGEST
            c_file.append(node.id)
            c_off.append(e.chunk_offset)
            c_comp.append(e.offset)
            c_inner.append(e.inner_offset)
            c_size.append(size)
            self._trailing.append(0)
            expect_off = e.chunk_offset + size
        if current is not None and expect_off != current.entry.size:
            raise ChunkError(
                f"file {current.path!r}: chunks cover {expect_off} of {current.entry.size} bytes"
            )

        for base, e in pending_links:
            self._link(base, e, by_path)
        self.by_path = by_path
        self.chunks = ChunkTable(c_file, c_off, c_comp, c_inner, c_size, bytes(c_digest))
        parents = array("q")
        names: list[bytes] = []
        self._dirent_target = array("q")
        for node in self.nodes:
            if node.type != "dir":
                continue
            for name, child in node.children.items():
                parents.append(node.id)
                names.append(name.encode("utf-8", "surrogateescape"))
                self._dirent_target.append(child)
        self.names = NameTable(parents, names)

    def _dir_for(self, path: str, by_path: dict[str, int], i: int, e: TOCEntry) -> Node:
        """The directory node at ``path``, creating implicit parents as Go does."""
        nid = by_path.get(path)
        if nid is not None:
            node = self.nodes[nid]
            if node.type != "dir":
                raise TOCError(f"{_where(i, e)}: parent {path!r} is a {node.type}, not a directory")
            return node
        parent = self._dir_for(path.rpartition("/")[0], by_path, i, e)
        node = Node(len(self.nodes), path, TOCEntry(name=path, type="dir", mode=0o755), nlink=2)
        self.nodes.append(node)
        by_path[path] = node.id
        parent.children[path.rpartition("/")[2]] = node.id
        parent.nlink += 1
        return node

    def _link(self, base: str, e: TOCEntry, by_path: dict[str, int]) -> None:
        where = f"hardlink {e.name!r}"
        target = clean_name(e.link_name)
        tid = by_path.get(target)
        if tid is None:
            raise TOCError(f"{where}: target {e.link_name!r} is not in the layer")
        node = self.nodes[tid]
        if node.type == "dir":
            raise TOCError(f"{where}: target {e.link_name!r} is a directory")
        parent = self.nodes[by_path[e.name.rpartition("/")[0]]]
        if base in parent.children:
            raise TOCError(f"{where}: the name is already taken")
        parent.children[base] = tid
        by_path[e.name] = tid
        node.nlink += 1

    # --- lookups ----------------------------------------------------------------------

    def lookup(self, path: str) -> Node:
        """The node at a layer path (hardlinks resolve to their target). KeyError if absent."""
        return self.nodes[self.by_path[clean_name(path)]]

    def child(self, parent: int, name: str) -> int:
        """Inode id of ``name`` in directory ``parent``, -1 if absent (native index)."""
        row = self.names.child(parent, name.encode("utf-8", "surrogateescape"))
        return -1 if row < 0 else self._dirent_target[row]

    def walk(self) -> Iterator[tuple[str, Node]]:
        """Every (path, node) pair, parents before children, hardlinks under each name."""
        stack = [("", self.nodes[0])]
        while stack:
            path, node = stack.pop()
            yield path, node
            if node.type == "dir":
                for name in sorted(node.children, reverse=True):
                    sub = f"{path}/{name}" if path else name
                    stack.append((sub, self.nodes[node.children[name]]))

    @property
    def prefetch_size(self) -> int | None:
        """Compressed bytes up to the prefetch landmark; 0 with the no-prefetch landmark."""
        if self.landmark == NO_PREFETCH_LANDMARK:
            return 0
        if self.landmark == PREFETCH_LANDMARK:
            return self.lookup(PREFETCH_LANDMARK).entry.offset
        return None

    # --- content ----------------------------------------------------------------------

    def chunk_rows(self, node_id: int, offset: int, size: int) -> range:
        """Rows of the chunk table covering [offset, offset+size) of a file."""
        return range(*self.chunks.cover(node_id, offset, size))

    def chunk_span(self, row: int) -> tuple[int, int]:
        """Compressed [start, end) bytes that hold a chunk (its member, up to the next one)."""
        comp = self.chunks.row(row)[1]
        return comp, self.chunks.next_comp_offset(row, self.footer.toc_offset)

    def decode_chunk(self, row: int, compressed: bytes) -> bytes:
        """Decode (and verify) one chunk from the bytes of its `chunk_span`."""
        _, _, inner, size, digest = self.chunks.row(row)
        want = digest if (self.verify and digest != _ZERO_DIGEST) else None
        exclusive = not self.chunks.shares_member(row)
        # The member also holds the tar headers of the entries listed after the chunk (up to
        # the next file with content): allow for them, so that only a real bomb is refused.
        trailing = codec.DEFAULT_MAX_TRAILING + self._trailing[row] * _TRAILING_PER_ENTRY
        return codec.decode_chunk(
            compressed, self.compression, inner, size, want, exclusive, max_trailing=trailing
        )

    def read_chunk(self, row: int) -> bytes:
        start, end = self.chunk_span(row)
        return self.decode_chunk(row, self._read(start, end - start))

    def read(self, node_id: int, offset: int, size: int) -> bytes:
        """``size`` bytes of a regular file from ``offset`` (less at end of file)."""
        node = self.nodes[node_id]
        if node.type != "reg":
            raise TOCError(f"{node.path!r} is a {node.type}, not a regular file")
        size = min(size, node.entry.size - offset)
        if size <= 0:
            return b""
        parts = []
        for row in self.chunk_rows(node_id, offset, size):
            chunk_off = self.chunks.row(row)[0]
            data = self.read_chunk(row)
            lo = max(offset - chunk_off, 0)
            hi = min(offset + size - chunk_off, len(data))
            parts.append(data[lo:hi])
        return b"".join(parts)


def _untar_gzip_toc(raw: bytes, max_size: int) -> bytes:
    """The TOC JSON from its gzip member: a tar with one entry named stargz.index.json."""
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        data = d.decompress(raw, max_size + 4096)
    except zlib.error as e:
        raise TOCError(f"malformed TOC gzip stream: {e}") from e
    if d.unconsumed_tail:
        raise TOCError(f"TOC is larger than the limit of {max_size} bytes")
    if not d.eof:
        raise TOCError("TOC gzip stream is truncated")
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
            member = tf.next()
            if member is None:
                raise TOCError("TOC tar stream holds no entry")
            if member.name != TOC_TAR_NAME:
                raise TOCError(f"TOC tar entry had name {member.name!r}; expected {TOC_TAR_NAME!r}")
            f = tf.extractfile(member)
            if f is None or not member.isreg():
                raise TOCError("TOC tar entry is not a regular file")
            out = f.read()
    except tarfile.TarError as e:
        raise TOCError(f"TOC tar stream is malformed: {e}") from e
    if len(out) != member.size:
        raise TOCError("TOC tar entry is truncated")
    if len(out) > max_size:  # the inflate bound above leaves room for the tar framing
        raise TOCError(f"TOC of {len(out)} bytes is larger than the limit of {max_size} bytes")
    return out


def _inflate_zstd_toc(raw: bytes, declared: int, max_size: int) -> bytes:
    import zstandard

    if declared > max_size:
        raise TOCError(f"TOC of {declared} bytes is larger than the limit of {max_size} bytes")
    out = bytearray()
    try:
        with zstandard.ZstdDecompressor().stream_reader(raw) as r:
            while len(out) <= declared:
                piece = r.read(declared + 1 - len(out))
                if not piece:
                    break
                out += piece
    except zstandard.ZstdError as e:
        raise TOCError(f"malformed zstd TOC frame: {e}") from e
    if len(out) != declared:
        raise TOCError(f"zstd TOC inflated to {len(out)}+ bytes, the footer says {declared}")
    return bytes(out)


def open_file(path: str, **kwargs) -> Reader:
    """Open a blob stored in a local file (reads through pread)."""
    fd = os.open(path, os.O_RDONLY)
    size = os.fstat(fd).st_size

    def read_at(offset: int, n: int) -> bytes:
        return os.pread(fd, n, offset)

    try:
        return Reader(read_at, size, on_close=lambda: os.close(fd), **kwargs)
    except BaseException:
        os.close(fd)
        raise
