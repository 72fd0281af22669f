"""Registry ends of an image copy: read an image from a registry, write one to it.

Built on the daemon's own registry client (:class:`stargz.remote.RegistryClient`: the
same transport, retries, docker-config credentials, bearer and basic auth) plus its
push side (:mod:`stargz.remote.push`). Blobs the destination has are not sent again
(``HEAD`` first); from another repository of the same registry they are mounted
(``POST ...?mount=<digest>&from=<repo>``) instead of uploaded. Layer blobs travel
through files, never whole in memory.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterable
from typing import Any, BinaryIO

from stargz.errors import DigestMismatch, InvalidArgument
from stargz.estargz.writer import TOC_DIGEST_ANNOTATION
from stargz.image.endpoints import OnProgress, Source
from stargz.remote import images, push
from stargz.remote.client import RegistryClient
from stargz.remote.download import download_blob
from stargz.remote.layer import open_reader
from stargz.remote.manifest import load_json, media_type_of
from stargz.remote.options import HostOptions, MirrorOptions, ResolverOptions
from stargz.remote.reference import Reference


def make_client(refs: Iterable[Reference], *, plain_http: bool) -> RegistryClient:
    """A client for the registries of ``refs``. ``plain_http``: talk http to them (it is
    automatic for localhost and loopback addresses). Credentials come from the docker
    config file (``$DOCKER_CONFIG/config.json`` or ``~/.docker/config.json``)."""
    hosts: dict[str, HostOptions] = {}
    if plain_http:
        for ref in refs:
            hosts[ref.host] = HostOptions(mirrors=(MirrorOptions(host=ref.host, insecure=True),))
    return RegistryClient(resolver=ResolverOptions(host=hosts), tail_probe_size=64 << 10)


class RegistrySource:
    """An image in a registry (``host/repo:tag`` or ``host/repo@digest``)."""

    def __init__(self, client: RegistryClient, ref: Reference) -> None:
        self.client = client
        self.ref = ref
        self.name = str(ref)
        self.mount_from = (push.origin(client, ref).netloc, ref.repository)

    async def resolve(self) -> tuple[dict[str, Any], bytes]:
        raw, ctype, digest = await images.manifest_bytes(
            self.client, self.ref, self.ref.object, self.ref.digest
        )
        mt = media_type_of(load_json(raw, f"manifest {self.ref}"), ctype)
        return {"mediaType": mt, "digest": digest, "size": len(raw)}, raw

    async def fetch(self, digest: str, *, manifest: bool = False) -> bytes:
        if manifest:
            raw, _, _ = await images.manifest_bytes(self.client, self.ref, digest, digest)
            return raw
        return await images.fetch_blob(self.client, self.ref, digest)

    def local_path(self, digest: str) -> str | None:
        return None

    async def download(
        self, digest: str, size: int | None, dst: BinaryIO, on_progress: OnProgress
    ) -> None:
        await download_blob(self.client, self.ref, digest, dst, size=size, on_progress=on_progress)

    async def estargz_kind(self, desc: dict[str, Any]) -> str | None:
        toc = (desc.get("annotations") or {}).get(TOC_DIGEST_ANNOTATION)
        if not toc:
            return None
        blob = await self.client.open_blob(self.ref, desc["digest"], size=desc.get("size"))
        try:
            reader = await open_reader(blob, toc_digest=toc)
        except (InvalidArgument, DigestMismatch):
            return None
        with reader:
            return reader.footer.kind

    async def close(self) -> None:
        pass


class RegistryTarget:
    """A repository to push into; the tag (``ref.tag``) is written last."""

    def __init__(self, client: RegistryClient, ref: Reference) -> None:
        if not ref.tag or ref.digest:
            raise InvalidArgument(
                f"destination {ref}: name a tag (REGISTRY/REPO:TAG), not a digest"
            )
        self.client = client
        self.ref = ref
        self.name = str(ref)
        self.workdir = tempfile.mkdtemp(prefix="stargz-convert-")

    async def has_blob(self, digest: str) -> bool:
        return await push.blob_exists(self.client, self.ref, digest)

    async def mount_blob(self, digest: str, source: Source) -> bool | str | None:
        if source.mount_from is None:
            return None
        netloc, repo = source.mount_from
        if netloc != push.origin(self.client, self.ref).netloc or repo == self.ref.repository:
            return None
        location = await push.start_upload(self.client, self.ref, mount=digest, from_repo=repo)
        return True if location is None else location

    async def put_file(
        self,
        path: str,
        digest: str,
        *,
        owned: bool,
        on_progress: OnProgress,
        location: str | None = None,
    ) -> None:
        await push.upload_file(
            self.client, self.ref, digest, path, location=location, on_progress=on_progress
        )

    async def put_bytes(self, data: bytes, digest: str) -> None:
        if not await self.has_blob(digest):
            await push.upload_bytes(self.client, self.ref, digest, data)

    async def put_manifest(self, raw: bytes, media_type: str, digest: str) -> None:
        await push.put_manifest(self.client, self.ref, digest, raw, media_type)

    async def tag(self, desc: dict[str, Any], raw: bytes) -> None:
        assert self.ref.tag is not None
        await push.put_manifest(self.client, self.ref, self.ref.tag, raw, desc["mediaType"])

    async def close(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)
