"""Where layer bytes come from: the `LayerSource` seam and the snapshot labels that name a layer.

The filesystem never talks HTTP itself. It asks a :class:`LayerSource` to resolve an image
reference and a layer digest into a :class:`Blob` (a random-access view of the compressed
layer), and reads that blob only through ``read_ranges``. The registry-backed source lives
in :mod:`stargz.fs.registry`; :class:`LocalLayerSource` serves blobs from local files (OCI
image layouts, or an explicit digest -> path map) for tests, benchmarks and air-gapped use.

Labels (SPEC §7.4): containerd's CRI set (``containerd.io/snapshot/cri.image-ref`` +
``cri.layer-digest``) is tried first, then the stargz set
(``containerd.io/snapshot/remote/stargz.reference`` + ``stargz.digest``), as the Go
snapshotter's ``sources(sourceFromCRILabels, source.FromDefaultLabels)`` does.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from stargz.errors import InvalidArgument, NotFound, NoTOCDigest, Unavailable

CRI_IMAGE_REF_LABEL = "containerd.io/snapshot/cri.image-ref"
CRI_LAYER_DIGEST_LABEL = "containerd.io/snapshot/cri.layer-digest"
CRI_IMAGE_LAYERS_LABEL = "containerd.io/snapshot/cri.image-layers"
STARGZ_REFERENCE_LABEL = "containerd.io/snapshot/remote/stargz.reference"
STARGZ_DIGEST_LABEL = "containerd.io/snapshot/remote/stargz.digest"
STARGZ_LAYERS_LABEL = "containerd.io/snapshot/remote/stargz.layers"
TOC_DIGEST_LABEL = "containerd.io/snapshot/stargz/toc.digest"
PREFETCH_SIZE_LABEL = "containerd.io/snapshot/remote/stargz.prefetch"
SKIP_VERIFY_LABEL = "containerd.io/snapshot/remote/stargz.skipverify"

_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}\Z")


@runtime_checkable
class Blob(Protocol):
    """A random-access view of one compressed layer blob.

    - ``size``: the blob's length in bytes.
    - ``read_ranges(ranges)``: the bytes of each ``(offset, length)`` range, in order, each
      exactly ``length`` long (raise rather than return short data). One call may become
      one multi-range HTTP request; callers pass ranges sorted and non-overlapping.
    - ``check()``: raise if the blob cannot be reached any more (connectivity check).

    Optional (looked up with ``getattr``, so not a member here): ``take_tail()`` returns
    ``(offset, bytes)``, the blob's last bytes that resolving it already fetched (the
    registry blob's probe asks for them), handed over once; None when there are none.
    Opening a layer uses them instead of asking for its footer again.
    """

    @property
    def size(self) -> int: ...

    async def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]: ...

    async def check(self) -> None: ...


@runtime_checkable
class LayerSource(Protocol):
    """Resolves (image reference, layer digest, snapshot labels) to a :class:`Blob`.

    Raise :class:`stargz.errors.NotFound` when the layer does not exist there and
    :class:`stargz.errors.Unavailable` when it can't be reached; the mount then fails and
    the snapshotter falls back to a normal pull.
    """

    async def resolve(self, ref: str, digest: str, labels: Mapping[str, str]) -> Blob: ...


@dataclass(frozen=True)
class LayerSpec:
    """What the snapshot labels say about the layer to mount."""

    ref: str
    digest: str
    #: The TOC digest the manifest vouches for; None when verification is waived.
    toc_digest: str | None
    #: Prefetch size from the ``stargz.prefetch`` label (None: not given).
    prefetch_size: int | None = None
    skip_verify: bool = False
    #: Other layers of the same image (``cri.image-layers``/``stargz.layers``), for pre-resolve.
    neighbours: tuple[str, ...] = field(default=())


def layer_spec(
    labels: Mapping[str, str],
    *,
    disable_verification: bool = False,
    allow_no_verification: bool = False,
) -> LayerSpec:
    """Read a :class:`LayerSpec` from snapshot labels; InvalidArgument says what is missing.

    The TOC digest label is required unless ``disable_verification``, or the snapshot
    carries ``stargz.skipverify`` and ``allow_no_verification`` is set (SPEC §1, Go
    ``fs/fs.go`` Mount).
    """
    ref, digest, layers_label = "", "", ""
    if labels.get(CRI_IMAGE_REF_LABEL) and labels.get(CRI_LAYER_DIGEST_LABEL):
        ref, digest = labels[CRI_IMAGE_REF_LABEL], labels[CRI_LAYER_DIGEST_LABEL]
        layers_label = labels.get(CRI_IMAGE_LAYERS_LABEL, "")
    elif labels.get(STARGZ_REFERENCE_LABEL) and labels.get(STARGZ_DIGEST_LABEL):
        ref, digest = labels[STARGZ_REFERENCE_LABEL], labels[STARGZ_DIGEST_LABEL]
        layers_label = labels.get(STARGZ_LAYERS_LABEL, "")
    else:
        raise InvalidArgument(
            "no layer source in the labels: need "
            f"{CRI_IMAGE_REF_LABEL} + {CRI_LAYER_DIGEST_LABEL}, or "
            f"{STARGZ_REFERENCE_LABEL} + {STARGZ_DIGEST_LABEL}"
        )
    if not _DIGEST_RE.match(digest):
        raise InvalidArgument(f"layer digest {digest!r} is not a sha256 digest")
    skip = SKIP_VERIFY_LABEL in labels
    toc_digest = labels.get(TOC_DIGEST_LABEL) or None
    if toc_digest is not None and not _DIGEST_RE.match(toc_digest):
        raise InvalidArgument(f"TOC digest {toc_digest!r} is not a sha256 digest")
    if toc_digest is None and not (disable_verification or (skip and allow_no_verification)):
        raise NoTOCDigest(f"digest of TOC JSON must be passed (label {TOC_DIGEST_LABEL})")
    prefetch: int | None = None
    raw = labels.get(PREFETCH_SIZE_LABEL)
    if raw is not None:
        try:
            prefetch = int(raw)
        except ValueError:
            raise InvalidArgument(
                f"label {PREFETCH_SIZE_LABEL}={raw!r} is not an integer"
            ) from None
        if prefetch < 0:
            raise InvalidArgument(f"label {PREFETCH_SIZE_LABEL}={raw!r} is negative")
    neighbours = tuple(d for d in (x.strip() for x in layers_label.split(",")) if d and d != digest)
    return LayerSpec(
        ref=ref,
        digest=digest,
        toc_digest=toc_digest,
        prefetch_size=prefetch,
        skip_verify=skip,
        neighbours=neighbours,
    )


# --- local files ------------------------------------------------------------------------


class FileBlob:
    """A blob in a local file, read with pread in a worker thread.

    ``source`` (the :class:`LocalLayerSource` that made it) counts requests and bytes, so
    tests can assert what a read cost, the way a registry's access log would.
    """

    def __init__(self, path: str, digest: str, source: LocalLayerSource) -> None:
        self.path = path
        self.digest = digest
        self._source = source
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self._size = os.fstat(self._fd).st_size

    @property
    def size(self) -> int:
        return self._size

    def _pread_all(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        out = []
        for off, n in ranges:
            if off < 0 or n < 0 or off + n > self._size:
                raise InvalidArgument(
                    f"range [{off}, +{n}) is outside blob {self.digest} of {self._size} bytes"
                )
            data = os.pread(self._fd, n, off)
            if len(data) != n:
                raise Unavailable(f"short read of {self.path} at {off}: {len(data)} of {n}")
            out.append(data)
        return out

    async def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        src = self._source
        if src.fail_reads is not None:
            raise src.fail_reads
        if src.latency:
            await asyncio.sleep(src.latency)
        if sum(n for _, n in ranges) <= 256 << 10:
            data = self._pread_all(ranges)  # a page-cache pread: cheaper than a thread hop
        else:
            data = await asyncio.get_running_loop().run_in_executor(None, self._pread_all, ranges)
        n = sum(len(d) for d in data)
        src.requests += 1
        src.bytes_read += n
        src.bytes_by_digest[self.digest] = src.bytes_by_digest.get(self.digest, 0) + n
        src.log.append((self.digest, tuple(ranges)))
        return data

    async def check(self) -> None:
        if self._source.fail_reads is not None:
            raise self._source.fail_reads
        if not os.path.exists(self.path):
            raise Unavailable(f"blob file {self.path} is gone")

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class LocalLayerSource:
    """Resolves layer digests to local files: explicit ``blobs`` first, then OCI ``layouts``.

    The image reference is ignored (content is addressed by digest). Counters:
    ``requests`` (read_ranges calls), ``bytes_read``, ``bytes_by_digest``, ``resolves``,
    and ``log`` (digest, ranges) per request. Set ``fail_reads`` to an exception to make
    every read and check raise it (a registry that went away); ``latency`` (seconds) is
    added to every read, to emulate a remote registry.
    """

    def __init__(
        self,
        blobs: Mapping[str, str | os.PathLike[str]] | None = None,
        layouts: Sequence[str | os.PathLike[str]] = (),
        *,
        latency: float = 0.0,
    ) -> None:
        self.blobs = {k: os.fspath(v) for k, v in (blobs or {}).items()}
        self.layouts = [os.fspath(p) for p in layouts]
        self.latency = latency
        self.fail_reads: BaseException | None = None
        self.requests = 0
        self.bytes_read = 0
        self.resolves = 0
        self.bytes_by_digest: dict[str, int] = {}
        self.log: list[tuple[str, tuple[tuple[int, int], ...]]] = []

    def path_of(self, digest: str) -> str:
        if digest in self.blobs:
            return self.blobs[digest]
        algo, _, hexd = digest.partition(":")
        for root in self.layouts:
            p = os.path.join(root, "blobs", algo, hexd)
            if os.path.isfile(p):
                return p
        raise NotFound(f"layer {digest} is not in any local blob store")

    async def resolve(self, ref: str, digest: str, labels: Mapping[str, str]) -> Blob:
        self.resolves += 1
        if self.fail_reads is not None:
            raise Unavailable(f"cannot resolve {ref} {digest}: {self.fail_reads}")
        return FileBlob(self.path_of(digest), digest, self)
