"""Chunk decode and sha256, pure Python: the twin of the native ``_codec`` module.

This module is the reference for the contract; ``src/_native/_codec.pyx`` must behave the
same (``tests/estargz/test_codec.py`` runs both over the same cases). Use it through
``stargz.estargz.codec``, which picks the native one when it is built.

What a chunk is. An eStargz blob is a concatenation of gzip members; a zstd:chunked blob a
concatenation of zstd frames. A TOC ``reg``/``chunk`` entry names the member that holds its
bytes (``offset``, compressed) and where they sit in that member's output (``innerOffset``,
and ``chunkSize`` bytes from there). ``decode_chunk`` gets the compressed bytes starting
exactly at ``offset`` (usually up to the next member, but anything after the member is
ignored) and returns the chunk's bytes.

Why a member inflates past its chunk. The writer starts a new member at each file's
payload, so the member that holds a file's last chunk also holds the tar padding after it
and the tar headers of every entry up to the next non-empty regular file (directories,
symlinks, empty files...). In the Go tools' fixtures, 308 of 309 chunks have such a tail
(up to 5 KiB there, unbounded in principle). So "exclusive" (the chunk owns its member) does
not mean "the member ends exactly at the chunk": it means the rest of the member is inflated
too (so its CRC32/ISIZE or zstd checksum is checked), allowing at most ``max_trailing``
further bytes. More than that is treated as a decompression bomb. Pass ``max_trailing=0``
for the strict reading. With ``exclusive=False`` (the member is shared, or the caller does
not care about the tail) decoding stops as soon as the chunk's bytes are out.

Memory is bounded whatever the input: the output is exactly ``size`` bytes, the bytes
before ``inner_offset`` and the tail are inflated into a fixed scratch buffer and dropped.
"""

from __future__ import annotations

import hashlib
import threading
import zlib

import zstandard

from stargz.errors import ChunkError, DecompressionBombError, DigestMismatch

__all__ = ["COMPRESSIONS", "DEFAULT_MAX_TRAILING", "decode_chunk", "sha256"]

COMPRESSIONS = ("gzip", "zstd")

#: Largest tail (tar padding + following tar headers) an exclusive member may have after
#: its chunk: 16 MiB is 32k tar header blocks, and inflating it costs ~20 ms natively.
DEFAULT_MAX_TRAILING = 16 << 20

_OUT_STEP = 1 << 20  # output pulled from zlib per call
_IN_STEP = 256 << 10  # compressed input fed to zlib per call (bounds unconsumed_tail copies)
_ZSTD_MAGIC = 0xFD2FB528


def sha256(data: bytes | bytearray | memoryview) -> bytes:
    """sha256 of a bytes-like object, as 32 raw bytes."""
    return hashlib.sha256(data).digest()


def decode_chunk(
    src: bytes | bytearray | memoryview,
    compression: str,
    inner_offset: int,
    size: int,
    digest: bytes | None = None,
    exclusive: bool = True,
    *,
    max_trailing: int = DEFAULT_MAX_TRAILING,
) -> bytes:
    """Bytes ``[inner_offset, inner_offset + size)`` of the member that starts at ``src[0]``.

    ``compression`` is ``"gzip"`` (one gzip member) or ``"zstd"`` (one zstd frame); bytes
    after the member are ignored. ``digest`` (32 raw bytes) is the sha256 the result must
    have. Raises:

    - ``ChunkError`` ("chunk is short: ...") if the member ends before
      ``inner_offset + size`` bytes; ("chunk is truncated: ...") if ``src`` ends inside the
      member; ("corrupt gzip member: ..."/"corrupt zstd frame: ...") if the codec rejects
      the data (bad header, bad block, bad CRC32/ISIZE or checksum).
    - ``DecompressionBombError`` if ``exclusive`` and more than ``max_trailing`` bytes
      follow the chunk in its member (see the module docstring).
    - ``DigestMismatch`` ("sha256 mismatch: want sha256:..., got sha256:...").
    - ``ValueError`` for an unknown ``compression``, a negative ``inner_offset``, ``size`` or
      ``max_trailing``, or a ``digest`` that is not 32 bytes.
    """
    if compression not in COMPRESSIONS:
        raise ValueError(f"unknown chunk compression {compression!r} (want 'gzip' or 'zstd')")
    if inner_offset < 0 or size < 0 or max_trailing < 0:
        raise ValueError(
            f"negative inner_offset/size/max_trailing: {inner_offset}/{size}/{max_trailing}"
        )
    if digest is not None and (not isinstance(digest, bytes) or len(digest) != 32):
        raise ValueError("digest must be 32 raw bytes (a sha256) or None")
    mv = memoryview(src).cast("B")
    member: _Member = _GzipMember(mv) if compression == "gzip" else _ZstdFrame(mv)
    end = inner_offset + size

    member.skip(inner_offset, end, inner_offset, size)
    parts = []
    left = size
    while left > 0:
        piece = member.pull(left)
        if piece is None:
            raise member.short(end, inner_offset, size)
        parts.append(piece)
        left -= len(piece)
    out = b"".join(parts)
    if exclusive:
        member.drain_tail(max_trailing, inner_offset, size)
    if digest is not None:
        got = hashlib.sha256(out).digest()
        if got != digest:
            raise DigestMismatch(
                f"sha256 mismatch: want sha256:{digest.hex()}, got sha256:{got.hex()}"
            )
    return out


class _Member:
    """Pulls bounded pieces of one member's output; None once the member has ended."""

    unit = ""

    def __init__(self, mv: memoryview) -> None:
        self.mv = mv
        self.produced = 0

    def pull(self, want: int) -> bytes | None:  # pragma: no cover - abstract
        raise NotImplementedError

    def skip(self, n: int, end: int, inner_offset: int, size: int) -> None:
        while n > 0:
            piece = self.pull(min(n, _OUT_STEP))
            if piece is None:
                raise self.short(end, inner_offset, size)
            n -= len(piece)

    def drain_tail(self, max_trailing: int, inner_offset: int, size: int) -> None:
        left = max_trailing + 1
        while left > 0:
            piece = self.pull(min(left, _OUT_STEP))
            if piece is None:
                return
            left -= len(piece)
        raise DecompressionBombError(
            f"chunk inflates past its declared size {size}: its {self.unit} has more than "
            f"{max_trailing} bytes after inner offset {inner_offset} + size {size}"
        )

    def short(self, end: int, inner_offset: int, size: int) -> ChunkError:
        return ChunkError(
            f"chunk is short: the {self.unit} ends after {self.produced} bytes, "
            f"want {end} (inner offset {inner_offset} + size {size})"
        )

    def truncated(self) -> ChunkError:
        return ChunkError(
            f"chunk is truncated: the compressed input ({len(self.mv)} bytes) ends inside the "
            f"{self.unit} after {self.produced} output bytes"
        )


class _GzipMember(_Member):
    """One gzip member through zlib (which parses FEXTRA/FNAME/FCOMMENT/FHCRC and checks
    CRC32 and ISIZE), never asked for more than ``want`` bytes at a time."""

    unit = "gzip member"

    def __init__(self, mv: memoryview) -> None:
        super().__init__(mv)
        self.pos = 0
        self.d = zlib.decompressobj(16 + zlib.MAX_WBITS)

    def pull(self, want: int) -> bytes | None:
        d = self.d
        while not d.eof:
            if d.unconsumed_tail:
                data = d.unconsumed_tail
            elif self.pos < len(self.mv):
                data = self.mv[self.pos : self.pos + _IN_STEP]
                self.pos += len(data)
            else:
                data = b""  # let zlib flush what it holds; nothing out means truncated
            try:
                out = d.decompress(data, want)  # want > 0: 0 would mean "unbounded"
            except zlib.error as e:
                why = str(e).rpartition("while decompressing data: ")[2]
                raise ChunkError(f"corrupt gzip member: {why}") from None
            if out:
                self.produced += len(out)
                return out
            if not data and not d.eof:
                raise self.truncated()
        return None


class _ZstdFrame(_Member):
    """One zstd frame. The ``zstandard`` package has no bounded-output decompressobj, and
    its stream_reader neither stops at the frame's end nor reports truncation, so the frame
    is walked block by block here (a block inflates to at most 128 KiB) and fed to a
    decompressobj one block at a time; libzstd still checks everything, including the
    content checksum."""

    unit = "zstd frame"
    _local = threading.local()

    def __init__(self, mv: memoryview) -> None:
        super().__init__(mv)
        dctx = getattr(self._local, "dctx", None)
        if dctx is None:
            dctx = self._local.dctx = zstandard.ZstdDecompressor()
        self.d = dctx.decompressobj()
        self.buf = b""
        self.bufpos = 0
        self.skippable = False
        self.content_size: int | None = None  # as the frame header declares it
        self.decoded = 0
        self.pieces = self._walk()

    def _need(self, end: int) -> None:
        if end > len(self.mv):
            raise self.truncated()

    def _walk(self):
        """Yield the frame in block-sized pieces (header with the first block)."""
        mv = self.mv
        self._need(4)
        magic = int.from_bytes(mv[0:4], "little")
        if magic & 0xFFFFFFF0 == 0x184D2A50:  # skippable frame: no output at all
            self._need(8)
            self._need(8 + int.from_bytes(mv[4:8], "little"))
            self.skippable = True
            return
        if magic != _ZSTD_MAGIC:
            raise ChunkError("corrupt zstd frame: Unknown frame descriptor")
        self._need(5)
        fhd = mv[4]
        single = (fhd >> 5) & 1
        pos = 5 + (0 if single else 1) + (0, 1, 2, 4)[fhd & 3]
        fcs_len = ((1 if single else 0), 2, 4, 8)[fhd >> 6]
        self._need(pos + fcs_len)
        if fcs_len:
            self.content_size = int.from_bytes(mv[pos : pos + fcs_len], "little")
            self.content_size += 256 if fcs_len == 2 else 0
        pos += fcs_len
        start = 0
        while True:
            self._need(pos + 3)
            bh = int.from_bytes(mv[pos : pos + 3], "little")
            last, btype, bsize = bh & 1, (bh >> 1) & 3, bh >> 3
            if btype == 3:
                raise ChunkError("corrupt zstd frame: Corrupted block detected")
            pos += 3 + (1 if btype == 1 else bsize)
            self._need(pos)
            yield mv[start:pos]
            start = pos
            if last:
                break
        if fhd & 4:  # content checksum, on its own: the last block's output comes first
            self._need(pos + 4)
            yield mv[pos : pos + 4]

    def pull(self, want: int) -> bytes | None:
        while self.bufpos >= len(self.buf):
            piece = next(self.pieces, None)
            if piece is None:
                if self.d.eof or self.skippable:
                    return None
                # The blocks all arrived but libzstd wants more: the header lied.
                raise ChunkError("corrupt zstd frame: frame ends before its header says")
            try:
                self.buf = self.d.decompress(piece)
            except zstandard.ZstdError as e:
                raise ChunkError(f"corrupt zstd frame: {_zstd_reason(e)}") from None
            self.bufpos = 0
            self.decoded += len(self.buf)
            if self.d.eof and self.content_size is not None and self.decoded != self.content_size:
                # libzstd checks the declared size only on some paths (not when streaming
                # a frame whose last block is empty); the native side checks it too.
                raise ChunkError("corrupt zstd frame: Data corruption detected")
        out = self.buf[self.bufpos : self.bufpos + want]
        self.bufpos += len(out)
        self.produced += len(out)
        return out


def _zstd_reason(e: Exception) -> str:
    # "zstd decompress error: Corrupted block detected" -> "Corrupted block detected"
    return str(e).rpartition(": ")[2] or str(e)
