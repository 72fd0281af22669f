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

import gc
import hashlib
import io
import os
import tarfile
import zlib
from array import array
from collections.abc import Callable, Iterator

from stargz.errors import ChunkError, DigestMismatch, TOCError
from stargz.estargz import codec, tocbuild
from stargz.estargz.footer import MAX_FOOTER_SIZE, Footer, parse_footer
from stargz.estargz.node import S_IFMT_BY_TYPE, Node, OpenedTOC
from stargz.estargz.toc import (
    NO_PREFETCH_LANDMARK,
    PREFETCH_LANDMARK,
    TOC,
    TOC_TAR_NAME,
    clean_name,
    entry_from_obj,
    load_toc_doc,
)
from stargz.estargz.tocindex import ChunkTable, NameTable

ReadAt = Callable[[int, int], bytes]

DEFAULT_TAIL_SIZE = 64 << 10  # one read usually brings the footer and the whole TOC
DEFAULT_MAX_TOC_SIZE = 512 << 20  # uncompressed TOC JSON; ~5M entries
DEFAULT_MAX_CHUNK_SIZE = 256 << 20  # largest chunk decoded in one piece
DEFAULT_MAX_DEPTH = tocbuild.python.DEFAULT_MAX_DEPTH  # path components of a name
#: Slack for implied directories' paths, on top of the TOC JSON's size (see `Reader`).
DEFAULT_MAX_NAME_BYTES = tocbuild.python.DEFAULT_MAX_NAME_BYTES
_ZERO_DIGEST = bytes(32)
_TRAILING_PER_ENTRY = 8 << 10  # generous tar header + PAX records of one entry

__all__ = ["S_IFMT_BY_TYPE", "Node", "Reader", "open_file"]


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
        max_depth: int = DEFAULT_MAX_DEPTH,
        max_name_bytes: int | None = None,
        on_close: Callable[[], None] | None = None,
        keep_toc: bool = True,
        on_toc_json: Callable[[bytes], None] | None = None,
    ) -> None:
        """Open a blob. ``toc_digest`` ("sha256:...") is checked against the TOC JSON.

        With ``verify`` (the default) every regular file must carry chunk digests, and
        every chunk is checked on read. Without ``keep_toc`` the TOC's entries are never
        kept (the mount needs only the nodes and the chunk table): the builder reads the
        TOC JSON bytes itself (``tocbuild.build_json``: no ``json.loads``, the same
        errors), and `toc` is not available. ``on_toc_json`` sees the TOC JSON once its
        digest is checked, before the (longer) parse: the daemon starts the prefetch
        download from it.

        Bounds on what a (hostile) TOC may make the reader keep: ``max_depth`` path
        components in a name; ``max_name_bytes`` characters of paths in all (every name,
        and every directory a name implies without an entry of its own), by default the
        TOC JSON's size plus `DEFAULT_MAX_NAME_BYTES` (the names are in the JSON, so only
        implied directories can use the slack). A name component longer than 255 bytes
        (NAME_MAX: overlayfs would not look it up) is refused too.
        """
        if max_depth < 1:
            raise ValueError(f"max_depth must be at least 1, got {max_depth}")
        if max_name_bytes is not None and max_name_bytes < 0:
            raise ValueError(f"max_name_bytes must not be negative, got {max_name_bytes}")
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
        if on_toc_json is not None:
            on_toc_json(toc_json)
        self.max_depth = max_depth
        self.max_name_bytes = (
            len(toc_json) + DEFAULT_MAX_NAME_BYTES if max_name_bytes is None else max_name_bytes
        )
        self._toc: TOC | None = None
        if keep_toc:
            self._toc_version, self._entries = load_toc_doc(toc_json)
            self._build(None)
        else:
            # The daemon's case: from the JSON bytes (the native builder scans them
            # without json.loads and without the GIL, then builds); no entries to keep.
            self._toc_version, self._entries = 1, None
            self._build(toc_json)

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
            footer_start = self.blob_size - f.footer_size
            if end != footer_start:
                raise TOCError(
                    f"{footer_start - end} bytes between the zstd TOC (which ends at {end}) "
                    f"and the footer (at {footer_start}): junk after the TOC"
                )
            return _inflate_zstd_toc(raw, f.toc_uncompressed_size, max_toc_size)
        return _untar_gzip_toc(raw, max_toc_size)

    def _build(self, toc_json: bytes | None) -> None:
        """Check and index the entries (native builder when built), then the name index:
        ``self._entries``, or with ``toc_json`` the TOC JSON bytes (the same errors)."""
        # The build makes a Node and a tuple per entry: with the cyclic GC on, its
        # collections walk them again and again (100k entries: 590 -> 390 ms without).
        # Nothing it makes is cyclic, so pausing the collector frees nothing late.
        kw = {
            "payload_end": self.footer.toc_offset,
            "verify": self.verify,
            "max_chunk_size": self.max_chunk_size,
            "max_depth": self.max_depth,
            "max_name_bytes": self.max_name_bytes,
        }
        paused = gc.isenabled()
        gc.disable()
        try:
            if toc_json is None:
                built = tocbuild.build(self._entries, **kw)
            else:
                built = tocbuild.build_json(toc_json, **kw)
        finally:
            if paused:
                gc.enable()
        # (built.by_path is not kept: ~50 bytes an entry; `lookup` walks the directories)
        self.nodes: list[Node] = built.nodes
        self.landmark: str | None = built.landmark
        self._trailing = built.trailing
        self.chunks = ChunkTable(
            built.chunk_file,
            built.chunk_off,
            built.chunk_comp,
            built.chunk_inner,
            built.chunk_size,
            built.chunk_digests,
        )
        #: The chunk columns and digests as built (row order), for per-layer indexes.
        self.chunk_off, self.chunk_comp = built.chunk_off, built.chunk_comp
        self.chunk_size, self.chunk_digests = built.chunk_size, built.chunk_digests
        # The name index copies the names and parents; only the targets are kept here.
        self._dirent_target = built.dirent_target
        self.names = NameTable(built.dirent_parent, built.dirent_name)

    @property
    def dirents(self) -> tuple[array, list[bytes], array]:
        """Directory entries as (parent ids, UTF-8 names, target ids) rows, in the name
        index's row order. Made on use (not kept: the nodes' children say the same)."""
        rows = OpenedTOC([], {}, None)
        rows.nodes = self.nodes
        rows.dirents_from_nodes()
        return rows.dirent_parent, rows.dirent_name, rows.dirent_target

    @property
    def toc(self) -> TOC:
        """The whole TOC as `TOCEntry` objects (names of non-chunk entries cleaned).

        Made on first use: the mount itself never needs it.
        """
        if self._toc is None:
            if self._entries is None:
                raise TOCError("the TOC was not kept (the reader was opened with keep_toc=False)")
            entries = []
            for i, obj in enumerate(self._entries):
                e = entry_from_obj(i, obj)
                if e.type != "chunk":
                    e.name = clean_name(e.name)
                entries.append(e)
            self._toc = TOC(version=self._toc_version, entries=entries)
        return self._toc

    # --- lookups ----------------------------------------------------------------------

    @property
    def by_path(self) -> dict[str, int]:
        """Layer path -> node id of every name (hardlinks: their target). Made on use."""
        return {path: node.id for path, node in self.walk()}

    def lookup(self, path: str) -> Node:
        """The node at a layer path (hardlinks resolve to their target). KeyError if absent."""
        path = clean_name(path)
        node = self.nodes[0]
        if path:
            for name in path.split("/"):
                node = self.nodes[node.children[name]]  # KeyError if absent / not a dir
        return node

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
        size = min(size, node.size - offset)
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
    if d.unused_data:
        # The TOC member must end where the footer starts (Go writes nothing between).
        raise TOCError(
            f"{len(d.unused_data)} bytes between the TOC gzip member and the footer "
            f"(starting {d.unused_data[:8]!r}): junk after the TOC"
        )
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
    end = member.offset_data + -(-member.size // 512) * 512
    if data.count(0, end) != len(data) - end:  # only end-of-archive zero blocks may follow
        raise TOCError(
            f"TOC tar stream holds {len(data[end:].rstrip(bytes(1)))} bytes after the "
            f"{TOC_TAR_NAME} entry: junk after the TOC"
        )
    if len(out) > max_size:  # the inflate bound above leaves room for the tar framing
        raise TOCError(f"TOC of {len(out)} bytes is larger than the limit of {max_size} bytes")
    return out


def _inflate_zstd_toc(raw: bytes, declared: int, max_size: int) -> bytes:
    import zstandard

    if declared > max_size:
        raise TOCError(f"TOC of {declared} bytes is larger than the limit of {max_size} bytes")
    frame = _zstd_frame_size(raw)
    if frame != len(raw):
        raise TOCError(
            f"the zstd TOC frame is {frame} bytes, followed by {len(raw) - frame} more bytes "
            f"up to the footer: junk after the TOC"
        )
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


def _zstd_frame_size(raw: bytes) -> int:
    """Compressed bytes of the zstd frame at the start of ``raw`` (RFC 8878 §3.1.1: the
    header, then block headers say their sizes), without decompressing it."""
    if raw[:4] != b"\x28\xb5\x2f\xfd" or len(raw) < 6:
        raise TOCError("zstd TOC does not start with a zstd frame")
    fhd = raw[4]
    fcs_flag, single, has_checksum, did_flag = fhd >> 6, (fhd >> 5) & 1, (fhd >> 2) & 1, fhd & 3
    fcs_size = (1 if single else 0, 2, 4, 8)[fcs_flag]
    pos = 5 + (0 if single else 1) + (0, 1, 2, 4)[did_flag] + fcs_size
    while True:
        if pos + 3 > len(raw):
            raise TOCError("zstd TOC frame is truncated")
        header = int.from_bytes(raw[pos : pos + 3], "little")
        last, kind, size = header & 1, (header >> 1) & 3, header >> 3
        if kind == 3:
            raise TOCError("zstd TOC frame has a reserved block type")
        pos += 3 + (1 if kind == 1 else size)  # an RLE block stores its one byte
        if last:
            break
    pos += 4 if has_checksum else 0
    if pos > len(raw):
        raise TOCError("zstd TOC frame is truncated")
    return pos


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
