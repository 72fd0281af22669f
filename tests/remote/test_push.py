"""`stargz.remote.push` and `stargz.remote.download` against the real docker-registry:
HEAD, cross-repository mount (and the upload session a refused mount leaves), uploads
streamed from a file and re-read when retried, manifests by digest and by tag, and a
streamed download that is retried when cut and refused when its bytes are wrong.

Faults the registry cannot produce come from a proxy in front of it (`harness.faults`),
which passes its own address on as ``Host`` so the registry's upload URLs lead back to
the proxy.
"""

from __future__ import annotations

import hashlib
import io
import json
import os

import pytest
from aiohttp import web
from harness.faults import Body, FailFirst, Proxy, chain

from stargz.errors import BlobNotFound, DigestMismatch
from stargz.remote import RegistryClient, parse_reference
from stargz.remote.download import download_blob
from stargz.remote.options import BlobOptions
from stargz.remote.push import blob_exists, put_manifest, start_upload, upload_bytes, upload_file

FAST = BlobOptions(min_wait_msec=1, max_wait_msec=20, max_retries=3)


def client() -> RegistryClient:
    return RegistryClient(blob=FAST, keychain=None)


def blob_file(tmp_path, size: int) -> tuple[str, str, bytes]:
    data = os.urandom(size)
    path = tmp_path / "blob"
    path.write_bytes(data)
    return str(path), "sha256:" + hashlib.sha256(data).hexdigest(), data


async def keep_host(proxy: Proxy, request: web.Request) -> web.StreamResponse:
    """Forward with the proxy's address as Host: Location headers point back at it."""
    return await proxy.forward(request, headers={"Host": proxy.netloc})


def test_upload_exists_mount_and_manifests(images, run, tmp_path):
    path, digest, data = blob_file(tmp_path, 3 << 20 | 123)
    host = images.registry.host

    async def main():
        async with client() as c:
            a = parse_reference(f"{host}/push-a:t")
            b = parse_reference(f"{host}/push-b:t")
            assert not await blob_exists(c, a, digest)
            seen: list[int] = []
            await upload_file(c, a, digest, path, on_progress=seen.append)
            assert seen[0] == 0 and seen[-1] == len(data) and seen == sorted(seen)
            assert max(y - x for x, y in zip(seen, seen[1:], strict=False)) <= 1 << 20
            assert await blob_exists(c, a, digest)
            # mounted from push-a: no session, nothing sent
            assert await start_upload(c, b, mount=digest, from_repo="push-a") is None
            assert await blob_exists(c, b, digest)
            # a mount the registry cannot do leaves an upload session to use
            other = b"config"
            odigest = "sha256:" + hashlib.sha256(other).hexdigest()
            loc = await start_upload(c, b, mount=odigest, from_repo="push-a")
            assert isinstance(loc, str) and "/v2/push-b/blobs/uploads/" in loc
            await upload_bytes(c, b, odigest, other)
            got = io.BytesIO()
            await download_blob(c, b, digest, got, size=len(data))
            assert got.getvalue() == data
            # a manifest by digest, then the tag
            man = {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {
                    "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": odigest,
                    "size": len(other),
                },
                "layers": [
                    {
                        "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                        "digest": digest,
                        "size": len(data),
                    }
                ],
            }
            raw = json.dumps(man).encode()
            mdigest = "sha256:" + hashlib.sha256(raw).hexdigest()
            mt = man["mediaType"]
            assert await put_manifest(c, b, mdigest, raw, mt) == mdigest
            assert await put_manifest(c, b, "t", raw, mt) == mdigest
            assert (await c.resolve(b)).digest == mdigest

    run(main)


def test_upload_retried_after_a_5xx_sends_the_whole_file_again(images, run, tmp_path):
    path, digest, data = blob_file(tmp_path, 900 << 10)  # the proxy takes bodies <= 1 MiB
    fail = FailFirst(1, status=503, path_re=r"/blobs/uploads/.+")

    async def main():
        async with Proxy(images.registry.url, chain(fail, keep_host)) as p, client() as c:
            ref = parse_reference(f"{p.netloc}/push-retry:t")
            seen: list[int] = []
            await upload_file(c, ref, digest, path, on_progress=seen.append)
            assert fail.failed == 1
            puts = p.requests("PUT", r"/blobs/uploads/")
            assert len(puts) == 2 and all(len(s.body) == len(data) for s in puts)
            assert seen.count(0) == 2 and seen[-1] == len(data)
            got = io.BytesIO()
            await download_blob(c, ref, digest, got)
            assert got.getvalue() == data

    run(main)


def test_download_retries_a_cut_body_and_refuses_wrong_bytes(images, run, tmp_path):
    digest, data = images.blob_digest, images.blob
    cut = Body("cut")

    async def once(proxy: Proxy, request: web.Request) -> web.StreamResponse | None:
        if request.method == "GET" and "/blobs/" in request.path and cut.hits == 0:
            return await cut(proxy, request)
        return None

    async def main():
        async with Proxy(images.registry.url, once) as p, client() as c:
            ref = parse_reference(f"{p.netloc}/blobs")
            out = tmp_path / "out"
            with open(out, "wb") as f:
                seen: list[int] = []
                assert await download_blob(c, ref, digest, f, on_progress=seen.append) == len(data)
            assert out.read_bytes() == data  # the cut attempt's bytes were thrown away
            assert cut.hits == 1 and seen.count(0) == 2
        async with Proxy(images.registry.url, Body("flip")) as p, client() as c:
            with pytest.raises(DigestMismatch, match=digest):
                await download_blob(c, parse_reference(f"{p.netloc}/blobs"), digest, io.BytesIO())
        async with client() as c:
            missing = "sha256:" + "0" * 64
            with pytest.raises(BlobNotFound):
                await download_blob(
                    c, parse_reference(f"{images.registry.host}/blobs"), missing, io.BytesIO()
                )

    run(main)
