"""Writer: tar (plain, gzip or zstd) -> eStargz (gzip) or zstd:chunked.

The output is an ordinary tar.gz / tar.zst: a run of gzip members (zstd frames) that
decompress, concatenated, to the input tar's entries plus the landmark and TOC entries.
A new member starts (SPEC §1) at the payload of every non-empty regular file, at every
chunk of ``chunk_size`` bytes, at the TOC and at the footer, so that each chunk can be
fetched and decoded alone. A file's tar header, and its payload padding, sit in the
member before/after the payload, exactly as Go's ``estargz.Writer`` lays them out.

Entry order follows Go's ``estargz.Build``: the prioritized files (with their parent
directories and hardlink targets) in the order given, then ``.prefetch.landmark``, then
everything else in archive order; with no prioritized files, ``.no.prefetch.landmark``
comes first. Members are compressed on a small thread pool (ISA-L, libdeflate and zstd
release the GIL) and written in order, so a single large layer uses every core.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import functools
import hashlib
import math
import os
import shutil
import tarfile
import tempfile
import threading
import zlib
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

from stargz.errors import FormatError, InvalidArgument
from stargz.estargz import tocbuild
from stargz.estargz.footer import gzip_footer, skippable_frame, zstd_footer_frame
from stargz.estargz.reader import DEFAULT_MAX_CHUNK_SIZE
from stargz.estargz.toc import (
    LANDMARK_CONTENTS,
    NO_PREFETCH_LANDMARK,
    PREFETCH_LANDMARK,
    TOC,
    TOC_TAR_NAME,
    TOCEntry,
    clean_name,
    dump_toc,
)

DEFAULT_CHUNK_SIZE = 4 << 20
# Go defaults to 9 (gzip.BestCompression). We default to libdeflate's level 5: on the
# benchmark image (benchmarks/bench_convert.py) its layers are Go's size (-0.3%) at ~15x
# Go's speed; ISA-L's level 1 is as fast in wall time (27% less CPU) but its layers are
# ~14% larger, and every lazy pull fetches those bytes again (see _gzip_compressor).
DEFAULT_GZIP_LEVEL = 5
DEFAULT_ZSTD_LEVEL = 3
BLOCK = 512

TOC_DIGEST_ANNOTATION = "containerd.io/snapshot/stargz/toc.digest"
UNCOMPRESSED_SIZE_ANNOTATION = "io.containers.estargz.uncompressed-size"
ZSTD_MANIFEST_CHECKSUM_ANNOTATION = "io.containers.zstd-chunked.manifest-checksum"
ZSTD_MANIFEST_POSITION_ANNOTATION = "io.containers.zstd-chunked.manifest-position"

_TYPES = {
    tarfile.REGTYPE: "reg",
    tarfile.AREGTYPE: "reg",
    tarfile.CONTTYPE: "reg",
    tarfile.LNKTYPE: "hardlink",
    tarfile.SYMTYPE: "symlink",
    tarfile.DIRTYPE: "dir",
    tarfile.CHRTYPE: "char",
    tarfile.BLKTYPE: "block",
    tarfile.FIFOTYPE: "fifo",
}


@dataclass
class BuildResult:
    """What a registry manifest needs to know about the written layer."""

    compression: str
    blob_digest: str
    blob_size: int
    diff_id: str
    toc_digest: str
    uncompressed_size: int
    annotations: dict[str, str] = field(default_factory=dict)
    missed_prioritized: list[str] = field(default_factory=list)

    @property
    def media_type(self) -> str:
        suffix = "zstd" if self.compression == "zstd" else "gzip"
        return f"application/vnd.oci.image.layer.v1.tar+{suffix}"


# --- compression ------------------------------------------------------------------------


class _Codec:
    """Compresses one member/frame from a list of byte strings; thread-safe."""

    def __init__(self, compression: str, level: int) -> None:
        self.compression = compression
        self.level = level
        self._local = threading.local()
        if compression == "gzip":
            if not 0 <= level <= 9:
                raise InvalidArgument(f"gzip compression level must be 0-9, got {level}")
            self._gzip = _gzip_compressor(level)
        elif compression == "zstd":
            import zstandard  # noqa: F401

            if not 1 <= level <= 22:
                raise InvalidArgument(f"zstd compression level must be 1-22, got {level}")
        else:
            raise InvalidArgument(f"unknown compression {compression!r} (gzip or zstd)")

    def compress(self, parts: list[bytes]) -> bytes | bytearray:
        if self.compression == "zstd":
            c = getattr(self._local, "zc", None)
            if c is None:
                import zstandard

                c = self._local.zc = zstandard.ZstdCompressor(level=self.level)
            return c.compress(b"".join(parts))
        return self._gzip(parts)


#: A member of several parts larger than this (only a long run of non-file entries' headers
#: gets there: a chunk is at most DEFAULT_MAX_CHUNK_SIZE) streams through zlib instead of
#: being copied into one buffer for libdeflate.
_ONE_BUFFER_MAX = DEFAULT_MAX_CHUNK_SIZE + (16 << 20)


def _gzip_compressor(level: int) -> Callable[[list[bytes]], bytes | bytearray]:
    """One gzip member from a member's parts, at a gzip ``level`` 0-9 in Go's sense.

    1 is ISA-L's level 1 (the fastest that still compresses well). 0 (stored, as Go's
    NoCompression) and 2-9 are libdeflate's levels of the same number: on the benchmark
    image its level 5 is as dense as zlib's 6 at ~3x the speed and its 6 denser than
    zlib's 9 at ~17x (members are whole buffers, which libdeflate needs and streams
    don't help). zlib's level of the same number stands in when a library is missing.
    Every codec releases the GIL while it compresses, so the writer's threads overlap.
    """

    def zlib_(parts: list[bytes]) -> bytes:
        c = zlib.compressobj(level, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
        out = [c.compress(p) for p in parts]
        out.append(c.flush())
        return b"".join(out)

    if level == 1:
        try:
            from isal import isal_zlib

            def isal(parts: list[bytes]) -> bytes:
                c = isal_zlib.compressobj(level, isal_zlib.DEFLATED, 16 + isal_zlib.MAX_WBITS)
                out = [c.compress(p) for p in parts]
                out.append(c.flush())
                return b"".join(out)

            return isal
        except ImportError:
            pass
    else:
        try:
            import deflate

            def libdeflate(parts: list[bytes]) -> bytes | bytearray:
                if len(parts) > 1 and sum(map(len, parts)) > _ONE_BUFFER_MAX:
                    return zlib_(parts)  # (don't copy a huge run of headers into one buffer)
                data = parts[0] if len(parts) == 1 else b"".join(parts)
                return deflate.gzip_compress(data, level)

            return libdeflate
        except ImportError:
            pass

    return zlib_


# --- input ----------------------------------------------------------------------------


def _open_tar(src: BinaryIO, tmpdir: str | None) -> tuple[BinaryIO, bool]:
    """A seekable plain-tar file for ``src``; decompresses gzip/zstd into a temp file."""
    head = src.read(4)
    src.seek(0)
    if head[:2] == b"\x1f\x8b":
        from isal import igzip, isal_zlib

        errors: tuple[type[Exception], ...] = (OSError, EOFError, zlib.error, isal_zlib.error)
        copy = functools.partial(
            shutil.copyfileobj, igzip.IGzipFile(fileobj=src, mode="rb"), length=1 << 20
        )
    elif head == b"\x28\xb5\x2f\xfd":
        import zstandard

        errors = (OSError, zstandard.ZstdError)
        copy = functools.partial(_unzstd, src)
    else:
        return src, False
    tmp = tempfile.TemporaryFile(dir=tmpdir)
    try:
        copy(tmp)
    except errors as e:
        tmp.close()
        raise FormatError(f"input layer does not decompress: {e}") from e
    except BaseException:
        tmp.close()
        raise
    tmp.seek(0)
    return tmp, True


def _unzstd(src: BinaryIO, dst: BinaryIO) -> None:
    """Every zstd frame of ``src`` into ``dst``; a stream that ends inside a frame is an
    error (zstandard's stream reader would just stop, converting part of the layer)."""
    import zstandard

    dctx = zstandard.ZstdDecompressor()
    dobj = dctx.decompressobj()
    in_frame = False
    while data := src.read(1 << 20):
        while data:
            dst.write(dobj.decompress(data))
            in_frame = True
            if not dobj.eof:
                break
            data = dobj.unused_data
            dobj = dctx.decompressobj()
            in_frame = False
    if in_frame:
        raise FormatError("input layer does not decompress: the zstd stream is truncated")


@dataclass
class _Item:
    info: tarfile.TarInfo
    key: str  # cleaned name
    payload: bytes | None = None  # for synthesized entries (landmarks)


def _read_entries(tar: BinaryIO) -> OrderedDict[str, _Item]:
    entries: OrderedDict[str, _Item] = OrderedDict()
    try:
        tf = tarfile.open(fileobj=tar, mode="r:", encoding="utf-8", errors="surrogateescape")
        for info in tf:
            if info.type not in _TYPES:
                raise FormatError(f"unsupported input tar entry {info.name!r} (type {info.type!r})")
            if info.size < 0:  # (a PAX size record or a base-256 size field can say so;
                # tarfile would seek before the member to find the next one)
                raise FormatError(f"tar entry {info.name!r}: negative size {info.size}")
            if info.issparse():
                raise FormatError(f"sparse file {info.name!r} is not supported")
            key = clean_name(info.name)
            if key == TOC_TAR_NAME or key in (PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK):
                continue  # a layer "stargzified" twice gets fresh ones
            if info.type == tarfile.LNKTYPE:
                clean_name(info.linkname)
            entries.pop(key, None)  # a later entry replaces an earlier one
            entries[key] = _Item(info, key)
    except (tarfile.TarError, ValueError, OverflowError, EOFError) as e:
        # (tarfile lets a ValueError out of some broken PAX records, e.g. a sparse map)
        raise FormatError(f"input is not a valid tar stream: {e}") from e
    return entries


def _landmark(name: str) -> _Item:
    info = tarfile.TarInfo(name)
    info.size = len(LANDMARK_CONTENTS)
    info.mode = 0
    info.mtime = 0
    return _Item(info, name, LANDMARK_CONTENTS)


def _sort(
    entries: OrderedDict[str, _Item], prioritized: list[str], allow_missing: bool
) -> tuple[list[_Item], list[str]]:
    """Prioritized files first (with parents and link targets), then the landmark."""
    out: OrderedDict[str, _Item] = OrderedDict()
    missed: list[str] = []

    def move(name: str, parent: bool = False) -> None:
        key = clean_name(name)
        if key == "":
            if "" in entries:
                out[""] = entries.pop("")
            return
        if key not in entries and key not in out:
            if not parent:
                raise KeyError(name)
            # a parent the tar only implies (no entry of its own): its parents may exist
        move(key.rpartition("/")[0], parent=True)
        item = entries.get(key)
        if item is not None and item.info.type == tarfile.LNKTYPE:
            move(item.info.linkname)
        item = entries.pop(key, None)
        if item is not None:
            out[key] = item

    for name in prioritized:
        try:
            move(name)
        except KeyError:
            if not allow_missing:
                raise InvalidArgument(f"prioritized file {name!r} is not in the layer") from None
            missed.append(name)
    landmark = _landmark(PREFETCH_LANDMARK if prioritized else NO_PREFETCH_LANDMARK)
    return [*out.values(), landmark, *entries.values()], missed


#: The seconds of 0001-01-01T00:00:00Z and 9999-12-31T23:59:59Z (RFC 3339 years, as Go).
_MIN_MTIME = -62135596800
_MAX_MTIME = 253402300799


def _check_servable(items: list[_Item]) -> None:
    """Refuse, before a byte is written, a layer our reader would refuse to open: ids,
    device numbers, modes, names and links the mount can't serve (the TOC builder's own
    checks, on the entries without their data), text a TOC can't carry (not UTF-8) and
    times outside its years 1-9999. The message names the tar entry."""
    entries = []
    for item in items:
        info = item.info
        texts = [("name", info.name), ("link target", info.linkname)]
        texts += [("user name", info.uname), ("group name", info.gname)]
        texts += [("xattr", k) for k in info.pax_headers if k.startswith("SCHILY.xattr.")]
        for what, text in texts:
            if text.isascii():
                continue
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise FormatError(
                    f"tar entry {info.name!r}: {what} {text!r} is not UTF-8, which a TOC "
                    "(JSON) can't carry"
                ) from None
        if not _MIN_MTIME <= info.mtime < _MAX_MTIME + 1:  # (NaN fails it too)
            raise FormatError(
                f"tar entry {info.name!r}: mtime {info.mtime} is outside the years 1-9999 "
                "a TOC's modtime can carry"
            )
        etype = _TYPES[info.type]
        ent = {"name": _toc_name(info.name, etype), "type": etype, "mode": info.mode}
        ent.update(uid=info.uid, gid=info.gid)
        if etype in ("symlink", "hardlink"):
            ent["linkName"] = info.linkname
        elif etype in ("char", "block"):
            ent.update(devMajor=info.devmajor, devMinor=info.devminor)
        entries.append(ent)
    try:
        tocbuild.build(entries, payload_end=0, verify=False, max_chunk_size=1)
    except FormatError as e:
        raise FormatError(f"input layer can't be served as eStargz: {e}") from None


def _check_toc(toc_json: bytes, payload_end: int) -> None:
    """The TOC written opens in our reader (its defaults), or the build fails: a blob it
    refuses is never handed out as converted."""
    try:
        tocbuild.build_json(
            toc_json, payload_end=payload_end, verify=True, max_chunk_size=DEFAULT_MAX_CHUNK_SIZE
        )
    except FormatError as e:
        raise FormatError(f"the converted layer's TOC does not open: {e}") from None


# --- layout ------------------------------------------------------------------------------


@dataclass
class _Member:
    """One gzip member / zstd frame to be: uncompressed parts, and the TOC entries whose
    ``offset`` is the compressed start of this member."""

    parts: list[bytes] = field(default_factory=list)
    size: int = 0
    starts: list[TOCEntry] = field(default_factory=list)

    def add(self, data: bytes) -> None:
        if data:
            self.parts.append(data)
            self.size += len(data)


class _Layout:
    """Turns sorted tar entries into members, computing digests and TOC entries."""

    def __init__(self, tar: BinaryIO, chunk_size: int) -> None:
        self.tar = tar
        self.chunk_size = chunk_size
        self.toc = TOC()
        self._names: dict[str, dict[int, str]] = {"u": {}, "g": {}}

    def _name_if_changed(self, kind: str, ident: int, name: str) -> str:
        # Go writes userName/groupName only where the name of an id changes.
        if not name or self._names[kind].get(ident) == name:
            return ""
        self._names[kind][ident] = name
        return name

    def members(self, items: Iterable[_Item]) -> Iterator[_Member]:
        cur = _Member()
        for item in items:
            info = item.info
            etype = _TYPES[info.type]
            name = _toc_name(info.name, etype)
            xattrs = {
                k[len("SCHILY.xattr.") :]: v.encode("utf-8", "surrogateescape")
                for k, v in info.pax_headers.items()
                if k.startswith("SCHILY.xattr.")
            }
            ent = TOCEntry(
                name=name,
                type=etype,
                mode=info.mode,
                uid=info.uid,
                gid=info.gid,
                user_name=self._name_if_changed("u", info.uid, info.uname),
                group_name=self._name_if_changed("g", info.gid, info.gname),
                modtime=_modtime(info.mtime),
                xattrs=xattrs,
            )
            if etype in ("symlink", "hardlink"):
                ent.link_name = info.linkname
            elif etype in ("char", "block"):
                ent.dev_major, ent.dev_minor = info.devmajor, info.devminor
            elif etype == "reg":
                ent.size = info.size
            cur.add(_header(info))
            if etype != "reg":
                self.toc.entries.append(ent)
                continue
            file_hash = hashlib.sha256()
            if info.size == 0:
                ent.digest = "sha256:" + file_hash.hexdigest()
                self.toc.entries.append(ent)
                continue
            reg_ent = ent
            pieces = self._payload(item)
            written = 0
            while written < info.size:
                yield cur
                cur = _Member()
                n = min(self.chunk_size, info.size - written)
                if n == self.chunk_size:
                    ent.chunk_size = n  # Go leaves it 0 only on a shorter last chunk
                ent.chunk_offset = written
                # (a file of one chunk: its chunk digest is its digest; hash it once)
                chunk_hash = file_hash if n == info.size else hashlib.sha256()
                got = 0
                while got < n:
                    piece = next(pieces, b"")
                    if not piece:
                        raise FormatError(f"input tar is truncated in {info.name!r}")
                    if got + len(piece) > n:
                        piece, rest = piece[: n - got], piece[n - got :]
                        pieces = _prepend(rest, pieces)
                    chunk_hash.update(piece)
                    if chunk_hash is not file_hash:
                        file_hash.update(piece)
                    cur.add(piece)
                    got += len(piece)
                ent.chunk_digest = "sha256:" + chunk_hash.hexdigest()
                cur.starts.append(ent)
                self.toc.entries.append(ent)
                written += n
                ent = TOCEntry(name=name, type="chunk")
            reg_ent.digest = "sha256:" + file_hash.hexdigest()
            pad = -info.size % BLOCK
            if pad:
                cur.add(bytes(pad))
        yield cur

    def _payload(self, item: _Item) -> Iterator[bytes]:
        if item.payload is not None:
            yield item.payload
            return
        remaining = item.info.size
        pos = item.info.offset_data
        while remaining > 0:
            self.tar.seek(pos)
            piece = self.tar.read(min(remaining, 1 << 20))
            if not piece:
                return
            pos += len(piece)
            remaining -= len(piece)
            yield piece


def _prepend(first: bytes, rest: Iterator[bytes]) -> Iterator[bytes]:
    yield first
    yield from rest


def _toc_name(name: str, etype: str) -> str:
    """A directory's TOC name ends in "/", as Go writes it (an empty one, the root, is
    "./": "/" would be absolute)."""
    if etype == "dir" and not name.endswith("/"):
        return name + "/" if name else "./"
    return name


def _modtime(mtime: float) -> str:
    # The whole second the time falls in (a PAX mtime has a fraction): what Go's
    # RFC 3339 formatting writes, and the st_mtime of the file a tar unpacks to.
    t = math.floor(mtime)
    if t == 0:
        return ""
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _header(info: tarfile.TarInfo) -> bytes:
    try:
        return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    except ValueError as e:
        raise FormatError(f"cannot write tar header for {info.name!r}: {e}") from e


def _toc_tar(toc_json: bytes) -> bytes:
    info = tarfile.TarInfo(TOC_TAR_NAME)
    info.size = len(toc_json)
    info.mode = 0
    info.mtime = 0
    info.uname = info.gname = ""
    return (
        info.tobuf(tarfile.USTAR_FORMAT)
        + toc_json
        + bytes(-len(toc_json) % BLOCK)
        + bytes(2 * BLOCK)
    )


# --- build ---------------------------------------------------------------------------


def build(
    src: BinaryIO,
    dst: BinaryIO,
    *,
    compression: str = "gzip",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    level: int | None = None,
    prioritized_files: list[str] | None = None,
    allow_missing_prioritized: bool = False,
    workers: int | None = None,
    tmpdir: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> BuildResult:
    """Convert the tar layer in ``src`` and write the blob to ``dst``.

    ``prioritized_files`` lists layer paths in first-access order; they go first,
    followed by ``.prefetch.landmark``. ``level`` defaults to 1 (ISA-L) for gzip and 3
    for zstd. ``progress(done, total)`` is called (from this thread) as members are
    written: bytes of the input tar done, of its total size.
    """
    if not 0 < chunk_size <= DEFAULT_MAX_CHUNK_SIZE:
        raise InvalidArgument(
            f"chunk size must be 1 to {DEFAULT_MAX_CHUNK_SIZE} (what the reader decodes in one "
            f"piece), got {chunk_size}"
        )
    if level is None:
        level = DEFAULT_ZSTD_LEVEL if compression == "zstd" else DEFAULT_GZIP_LEVEL
    codec = _Codec(compression, level)
    tar, owned = _open_tar(src, tmpdir)
    try:
        entries = _read_entries(tar)
        items, missed = _sort(entries, list(prioritized_files or []), allow_missing_prioritized)
        _check_servable(items)
        layout = _Layout(tar, chunk_size)
        writer = _OrderedWriter(dst, codec, workers or os.cpu_count() or 1)
        if progress is not None:
            total = tar.seek(0, os.SEEK_END)
            tar.seek(0)
            writer.progress = lambda done: progress(min(done, total), total)
        for member in layout.members(items):
            writer.submit(member)
        if compression == "zstd":
            # zstd:chunked keeps the TOC out of the tar stream; end the archive here.
            writer.submit(_Member(parts=[bytes(2 * BLOCK)], size=2 * BLOCK))
        writer.drain()
    finally:
        if owned:
            tar.close()

    toc_json = dump_toc(layout.toc)
    toc_digest = "sha256:" + hashlib.sha256(toc_json).hexdigest()
    toc_offset = writer.offset
    _check_toc(toc_json, toc_offset + 8 if compression == "zstd" else toc_offset)
    annotations = {TOC_DIGEST_ANNOTATION: toc_digest}
    if compression == "zstd":
        import zstandard

        ctoc = zstandard.ZstdCompressor(level=level).compress(toc_json)
        writer.write_raw(skippable_frame(ctoc))
        writer.write_raw(zstd_footer_frame(toc_offset + 8, len(ctoc), len(toc_json)))
        annotations[ZSTD_MANIFEST_CHECKSUM_ANNOTATION] = (
            "sha256:" + hashlib.sha256(ctoc).hexdigest()
        )
        annotations[ZSTD_MANIFEST_POSITION_ANNOTATION] = (
            f"{toc_offset + 8}:{len(ctoc)}:{len(toc_json)}:1"
        )
    else:
        toc_tar = _toc_tar(toc_json)
        writer.diff_hash.update(toc_tar)
        writer.uncompressed += len(toc_tar)
        writer.write_raw(codec.compress([toc_tar]))
        writer.write_raw(gzip_footer(toc_offset))
    annotations[UNCOMPRESSED_SIZE_ANNOTATION] = str(writer.uncompressed)
    return BuildResult(
        compression=compression,
        blob_digest="sha256:" + writer.blob_hash.hexdigest(),
        blob_size=writer.offset,
        diff_id="sha256:" + writer.diff_hash.hexdigest(),
        toc_digest=toc_digest,
        uncompressed_size=writer.uncompressed,
        annotations=annotations,
        missed_prioritized=missed,
    )


class _OrderedWriter:
    """Compresses members on a thread pool and writes them in order, fixing offsets."""

    def __init__(self, dst: BinaryIO, codec: _Codec, workers: int) -> None:
        self.dst = dst
        self.codec = codec
        self.pool = concurrent.futures.ThreadPoolExecutor(max(1, workers))
        self.window = max(2, 2 * workers)
        self.pending: deque[tuple[_Member, concurrent.futures.Future[bytes | bytearray]]] = deque()
        self.offset = 0
        self.uncompressed = 0
        self.diff_hash = hashlib.sha256()
        self.blob_hash = hashlib.sha256()
        self.progress: Callable[[int], None] | None = None
        self._done = 0

    def submit(self, member: _Member) -> None:
        if not member.size and not member.starts:
            return
        for p in member.parts:
            self.diff_hash.update(p)
        self.uncompressed += member.size
        self.pending.append((member, self.pool.submit(self.codec.compress, member.parts)))
        while len(self.pending) > self.window:
            self._write_one()

    def _write_one(self) -> None:
        member, fut = self.pending.popleft()
        data = fut.result()
        for ent in member.starts:
            ent.offset = self.offset
        self.write_raw(data)
        member.parts.clear()
        if self.progress is not None:
            self._done += member.size
            self.progress(self._done)

    def drain(self) -> None:
        try:
            while self.pending:
                self._write_one()
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def write_raw(self, data: bytes | bytearray) -> None:
        self.dst.write(data)
        self.blob_hash.update(data)
        self.offset += len(data)
