"""Both ends of an image copy, as the converter sees them, and the OCI layout pair.

A :class:`Source` gives manifests, configs and layer blobs (a local path, or a download
into a file); a :class:`Target` takes blobs (from a file), manifests by digest and, last,
the tag. The registry pair lives in :mod:`stargz.image.registry`. Everything is async so
registry ends can run their requests concurrently; the layout ends do their small file
operations inline.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any, BinaryIO, Protocol

from stargz.errors import DigestMismatch, InvalidArgument, NotFound
from stargz.estargz import reader as esgz_reader
from stargz.estargz.writer import TOC_DIGEST_ANNOTATION
from stargz.image.layout import REF_NAME, Layout

#: ``on_progress(bytes done so far)``
OnProgress = Callable[[int], None]


class Source(Protocol):
    #: For messages: ``oci:DIR:TAG`` or ``host/repo:tag``.
    name: str
    #: (registry netloc, repository) for a cross-repository mount; None for a layout.
    mount_from: tuple[str, str] | None

    async def resolve(self) -> tuple[dict[str, Any], bytes]:
        """The descriptor the reference points at (``mediaType``, ``digest``, ``size``)
        and the manifest or index bytes."""
        ...

    async def fetch(self, digest: str, *, manifest: bool = False) -> bytes:
        """A manifest or index (``manifest``), or a small blob such as a config, verified
        against ``digest``."""
        ...

    def local_path(self, digest: str) -> str | None:
        """The blob's file if it is on this machine already (no download needed)."""
        ...

    async def download(
        self, digest: str, size: int | None, dst: BinaryIO, on_progress: OnProgress
    ) -> None:
        """Write the blob into ``dst``, verified."""
        ...

    async def estargz_kind(self, desc: dict[str, Any]) -> str | None:
        """The footer kind (``gzip``, ``zstd``) of a layer whose TOC matches its TOC digest
        annotation; None when it has no annotation or does not open as eStargz."""
        ...

    async def close(self) -> None: ...


class Target(Protocol):
    name: str
    #: Where temp files go (downloads, the converter's work files).
    workdir: str

    async def has_blob(self, digest: str) -> bool: ...

    async def mount_blob(self, digest: str, source: Source) -> bool | str | None:
        """Try a cross-repository mount: True when mounted; else an open upload session
        (for :meth:`put_file`'s ``location``) or None."""
        ...

    async def put_file(
        self,
        path: str,
        digest: str,
        *,
        owned: bool,
        on_progress: OnProgress,
        location: str | None = None,
    ) -> None:
        """Store the blob in ``path``. ``owned``: ``path`` is a temp file of ours the target
        may move (the caller deletes it if it is still there)."""
        ...

    async def put_bytes(self, data: bytes, digest: str) -> None: ...

    async def put_manifest(self, raw: bytes, media_type: str, digest: str) -> None:
        """Store a manifest or index by digest (not tagged)."""
        ...

    async def tag(self, desc: dict[str, Any], raw: bytes) -> None:
        """Point the destination tag at ``desc`` (done last)."""
        ...

    async def close(self) -> None: ...


def sha256_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def estargz_kind_of_file(path: str, toc_digest: str) -> str | None:
    """The footer kind of the blob in ``path`` if its TOC hashes to ``toc_digest``."""
    try:
        with esgz_reader.open_file(path, toc_digest=toc_digest) as r:
            return r.footer.kind
    except (InvalidArgument, DigestMismatch):
        return None


class LayoutSource:
    """An image in an OCI layout (``oci:DIR[:TAG]``)."""

    mount_from = None

    def __init__(self, path: str, tag: str | None) -> None:
        if not os.path.exists(os.path.join(path, "index.json")):
            hint = (
                "" if path.startswith((".", "/")) else " (for a registry image write docker://REF)"
            )
            raise NotFound(f"{path!r} is not an OCI image layout (no index.json){hint}")
        self.layout = Layout(path)
        self.tag = tag
        self.name = f"oci:{path}" + (f":{tag}" if tag else "")

    async def resolve(self) -> tuple[dict[str, Any], bytes]:
        if self.tag is not None:
            desc = self.layout.resolve(self.tag)
        else:
            entries = self.layout.index().get("manifests") or []
            if len(entries) != 1:
                tags = [(d.get("annotations") or {}).get(REF_NAME, "?") for d in entries]
                raise InvalidArgument(
                    f"{self.layout.path!r} holds {len(entries)} images (tags: "
                    f"{', '.join(tags) or 'none'}): name one as oci:DIR:TAG"
                )
            desc = entries[0]
        return desc, await self.fetch(desc["digest"])

    async def fetch(self, digest: str, *, manifest: bool = False) -> bytes:
        with self.layout.open_blob(digest) as f:
            data = f.read()
        if sha256_of(data) != digest:
            raise DigestMismatch(f"blob {digest} in {self.layout.path!r} does not match its digest")
        return data

    def local_path(self, digest: str) -> str | None:
        path = self.layout.blob_path(digest)
        if not os.path.exists(path):
            raise NotFound(f"blob {digest} is missing from {self.layout.path!r}")
        return path

    async def download(
        self, digest: str, size: int | None, dst: BinaryIO, on_progress: OnProgress
    ) -> None:
        raise AssertionError("a layout's blobs are read in place")

    async def estargz_kind(self, desc: dict[str, Any]) -> str | None:
        toc = (desc.get("annotations") or {}).get(TOC_DIGEST_ANNOTATION)
        if not toc:
            return None
        path = self.local_path(desc["digest"])
        assert path is not None
        return estargz_kind_of_file(path, toc)

    async def close(self) -> None:
        pass


class LayoutTarget:
    """An OCI layout to write into (created if missing); the tag is written last."""

    def __init__(self, path: str, tag: str) -> None:
        self.layout = Layout(path, create=True)
        self.tag_name = tag
        self.name = f"oci:{path}:{tag}"
        self.workdir = os.path.join(path, "blobs", "sha256")

    async def has_blob(self, digest: str) -> bool:
        return os.path.exists(self.layout.blob_path(digest))

    async def mount_blob(self, digest: str, source: Source) -> bool | str | None:
        return None

    async def put_file(
        self,
        path: str,
        digest: str,
        *,
        owned: bool,
        on_progress: OnProgress,
        location: str | None = None,
    ) -> None:
        final = self.layout.blob_path(digest)
        if owned:
            os.replace(path, final)
        else:
            tmp = self.layout.new_blob()
            try:
                with open(path, "rb") as f:
                    shutil.copyfileobj(f, tmp, 1 << 20)
                self.layout.commit_blob(tmp, digest)
            except BaseException:
                tmp.close()
                os.unlink(tmp.name)
                raise
        on_progress(os.path.getsize(final))

    async def put_bytes(self, data: bytes, digest: str) -> None:
        if sha256_of(data) != digest:
            raise AssertionError("put_bytes: digest does not match")
        tmp = self.layout.new_blob()
        tmp.write(data)
        self.layout.commit_blob(tmp, digest)

    async def put_manifest(self, raw: bytes, media_type: str, digest: str) -> None:
        await self.put_bytes(raw, digest)

    async def tag(self, desc: dict[str, Any], raw: bytes) -> None:
        self.layout.tag(desc, self.tag_name)

    async def close(self) -> None:
        pass


def new_temp(workdir: str) -> tempfile._TemporaryFileWrapper:
    """A temp file in ``workdir`` that the caller deletes."""
    return tempfile.NamedTemporaryFile(dir=workdir, prefix=".tmp-", delete=False)


def load_object(raw: bytes, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(raw)
    except ValueError as e:
        raise InvalidArgument(f"{what} is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise InvalidArgument(f"{what} is not a JSON object")
    return doc
