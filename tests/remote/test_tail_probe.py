"""The blob probe brings the blob's last bytes (``Range: bytes=-N``), and opening a layer
uses them: resolve + footer + TOC in fewer requests. Against the real docker-registry,
with the fault proxy (tests/harness/faults.py) where the registry cannot misbehave."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import pytest
from aiohttp import web
from harness.faults import MultiRange, Proxy, RedirectBlobs, Storage

from stargz import config
from stargz.errors import BlobNotFound, InvalidArgument
from stargz.remote import BlobOptions, Platform, RegistryClient, ResolverOptions
from stargz.remote.client import TAIL_PROBE_SIZE


def _resolver(table: dict) -> ResolverOptions:
    """Resolver options from a ``[resolver]`` table, validated as the daemon's config is."""
    return ResolverOptions.from_config(config.parse({"resolver": table}).resolver)


FAST = BlobOptions(min_wait_msec=1, max_wait_msec=20, max_retries=3)


def client(**kw) -> RegistryClient:
    kw.setdefault("keychain", None)
    kw.setdefault("blob", FAST)
    kw.setdefault("platform", Platform("linux", "amd64"))
    return RegistryClient(**kw)


def blob_gets(proxy: Proxy) -> list[str]:
    """The Range header of each blob GET the proxy saw, in order."""
    return [s.headers.get("Range", "") for s in proxy.requests("GET", "/blobs/")]


@pytest.fixture(scope="module")
def small_blobs(registry) -> dict[str, tuple[str, bytes]]:
    """name -> (digest, bytes) in repository ``tails``: empty, 1 KB, and one byte short of
    the probe size, exactly it, one byte over."""
    rnd = random.Random(77)
    out = {}
    for name, n in [
        ("empty", 0),
        ("1k", 1000),
        ("under", TAIL_PROBE_SIZE - 1),
        ("exact", TAIL_PROBE_SIZE),
        ("over", TAIL_PROBE_SIZE + 1),
    ]:
        data = rnd.randbytes(n)
        out[name] = (registry.push_blob("tails", data), data)
    return out


def test_probe_brings_the_tail_in_one_request(images, run_both):
    async def main():
        async with Proxy(images.registry.url) as p, client() as c:
            b = await c.open_blob(f"{p.netloc}/blobs", images.blob_digest)
            assert b.size == len(images.blob)
            start, data = b.take_tail()
            assert start == len(images.blob) - TAIL_PROBE_SIZE
            assert data == images.blob[start:]
            assert b.take_tail() is None  # handed over once
            assert blob_gets(p) == [f"bytes=-{TAIL_PROBE_SIZE}"]
            assert b.stats.requests == 1 and b.stats.bytes_fetched == TAIL_PROBE_SIZE
            # reads are unchanged
            assert await b.read_at(100, 50) == images.blob[100:150]

    run_both(main)


@pytest.mark.parametrize("n", [0, 100, 70_000])
def test_probe_size_is_configurable(images, run, n):
    async def main():
        async with Proxy(images.registry.url) as p, client(tail_probe_size=n) as c:
            b = await c.open_blob(f"{p.netloc}/blobs", images.blob_digest)
            assert b.size == len(images.blob)
            if n == 0:  # the old probe
                assert blob_gets(p) == ["bytes=0-0"] and b.take_tail() is None
            else:
                assert blob_gets(p) == [f"bytes=-{n}"]
                assert b.take_tail() == (len(images.blob) - n, images.blob[-n:])

    run(main)
    with pytest.raises(InvalidArgument, match="negative"):
        client(tail_probe_size=-1)


@pytest.mark.parametrize("name", ["empty", "1k", "under", "exact", "over"])
def test_small_and_empty_blobs(images, small_blobs, run, name):
    """The real registry (Go's http.ServeContent) answers a suffix range longer than the
    blob with the whole blob, and an empty blob with ``206 bytes 0--1/0``."""
    digest, data = small_blobs[name]

    async def main():
        async with Proxy(images.registry.url) as p, client() as c:
            b = await c.open_blob(f"{p.netloc}/tails", digest, size=len(data))
            assert b.size == len(data)
            keep = min(len(data), TAIL_PROBE_SIZE)
            assert b.take_tail() == (len(data) - keep, data[len(data) - keep :])
            assert len(blob_gets(p)) == 1
            if data:
                assert await b.read_at(len(data) - 1, 1) == data[-1:]
            # the old probe: 416 for the empty blob, as before
            async with client(tail_probe_size=0) as c0:
                b0 = await c0.open_blob(f"{p.netloc}/tails", digest)
                assert b0.size == len(data) and b0.take_tail() is None

    run(main)


def test_server_that_ignores_ranges(images, small_blobs, run):
    """A 200 to the probe: its size is the blob's; a body no longer than the probe size is
    the whole blob (kept), a longer one is not read (the connection is dropped)."""
    hook = MultiRange("ignore")  # every ranged blob GET is answered 200, whole blob

    async def main():
        async with Proxy(images.registry.url, hook) as p, client() as c:
            b = await c.open_blob(f"{p.netloc}/blobs", images.blob_digest)
            assert b.size == len(images.blob) and b.take_tail() is None
            assert b.stats.bytes_fetched == 0
            assert await b.read_at(10, 20) == images.blob[10:30]
            for name in ("1k", "exact", "over"):
                digest, data = small_blobs[name]
                b = await c.open_blob(f"{p.netloc}/tails", digest)
                assert b.size == len(data)
                if len(data) <= TAIL_PROBE_SIZE:
                    assert b.take_tail() == (0, data)
                else:
                    assert b.take_tail() is None
            assert hook.hits == 5

    run(main)


def test_empty_blob_answered_416(images, small_blobs, run):
    """An RFC 9110 server answers a suffix range on an empty blob 416 ``bytes */0``."""
    digest, _ = small_blobs["empty"]

    async def rfc(proxy, request):
        if "/blobs/" in request.path and request.headers.get("Range", "").startswith("bytes=-"):
            return web.Response(status=416, headers={"Content-Range": "bytes */0"})
        return None

    async def main():
        async with Proxy(images.registry.url, rfc) as p, client() as c:
            b = await c.open_blob(f"{p.netloc}/tails", digest)
            assert b.size == 0 and b.take_tail() == (0, b"")

    run(main)


def test_answer_that_is_not_the_tail_is_not_kept(images, run):
    """A server that answers some other range (here: it rewrote the suffix range to
    ``bytes=0-0``) still gives the size; there is no tail, and reads work."""

    async def no_suffix(proxy, request):
        if "/blobs/" in request.path and request.headers.get("Range", "").startswith("bytes=-"):
            return await proxy.forward(request, headers={"Range": "bytes=0-0"})
        return None

    async def main():
        async with Proxy(images.registry.url, no_suffix) as p, client() as c:
            b = await c.open_blob(f"{p.netloc}/blobs", images.blob_digest)
            assert b.size == len(images.blob) and b.take_tail() is None
            assert await b.read_at(len(images.blob) - 5, 5) == images.blob[-5:]

    run(main)


def test_redirect_is_detected_and_the_tail_comes_from_storage(images, run_both):
    storage_hook = Storage()

    async def main():
        async with Proxy(images.registry.url, storage_hook) as storage:
            redirect = RedirectBlobs(storage)
            async with Proxy(images.registry.url, redirect) as reg, client() as c:
                b = await c.open_blob(f"{reg.netloc}/blobs", images.blob_digest)
                assert b.location.redirected and "/store/" in b.url
                assert b.size == len(images.blob)
                start, data = b.take_tail()
                assert data == images.blob[start:] and len(data) == TAIL_PROBE_SIZE
                assert [s.headers["Range"] for s in storage.seen] == [f"bytes=-{TAIL_PROBE_SIZE}"]
                assert redirect.redirects == 1
                assert await b.read_at(7, 7) == images.blob[7:14]
                assert redirect.redirects == 1 and len(storage.seen) == 2
            # a probe after the opening (the storage URL expired) asks bytes=0-0 only
            async with Proxy(images.registry.url, redirect) as reg, client(redirect_ttl=0) as c:
                b = await c.open_blob(f"{reg.netloc}/blobs", images.blob_digest)
                assert await b.read_at(7, 7) == images.blob[7:14]
                assert blob_gets(reg) == [f"bytes=-{TAIL_PROBE_SIZE}", "bytes=0-0"]
                assert b.take_tail()[1] == images.blob[-TAIL_PROBE_SIZE:]
            assert storage_hook.leaks == []

    run_both(main)


def test_mirror_without_the_blob_then_the_registry_gives_the_tail(images, run):
    async def no_blobs(proxy, request):
        if "/blobs/" in request.path:
            return web.Response(status=404)
        return None

    async def main():
        async with Proxy(images.registry.url) as origin, Proxy(images.registry.url, no_blobs) as m:
            resolver = _resolver({"host": {origin.netloc: {"mirrors": [{"host": m.netloc}]}}})
            async with client(resolver=resolver) as c:
                b = await c.open_blob(f"{origin.netloc}/blobs", images.blob_digest)
                assert b.location.host.netloc == origin.netloc
                start, data = b.take_tail()
                assert data == images.blob[start:]
                assert blob_gets(m) == blob_gets(origin) == [f"bytes=-{TAIL_PROBE_SIZE}"]
                with pytest.raises(BlobNotFound):
                    await c.open_blob(f"{origin.netloc}/blobs", "sha256:" + "2" * 64)

    run(main)


@pytest.mark.parametrize("probe", [0, 100, TAIL_PROBE_SIZE, 1 << 20])
def test_layer_tail_through_the_registry_source(images, run, probe):
    """fs.layer_open.fetch_tail on a registry blob returns the bytes from the TOC to the end,
    with the probe's tail used: a TOC inside the probed tail costs no request after the
    probe, a bigger one exactly one; a probed tail too short for a footer is ignored."""
    from stargz.estargz.footer import parse_footer
    from stargz.fs.layer_open import TAIL_FETCH_SIZE, fetch_tail
    from stargz.fs.registry import RegistryLayerSource

    layers = images.esgz_manifest["layers"]

    async def main():
        with ThreadPoolExecutor(1) as ex:
            async with Proxy(images.registry.url) as p:
                src = RegistryLayerSource(client(tail_probe_size=probe))
                try:
                    for d in layers:
                        local = images.layer_path(d["digest"]).read_bytes()
                        toc_offset = parse_footer(local[-64:], len(local)).toc_offset
                        blob = await src.resolve(f"{p.netloc}/corners:esgz", d["digest"], {})
                        before = len(p.requests("GET", "/blobs/"))
                        start, data, fetched = await fetch_tail(blob, d["digest"], None, ex)
                        asked = len(p.requests("GET", "/blobs/")) - before
                        assert (start, data) == (toc_offset, local[toc_offset:])
                        kept = min(probe, len(local))
                        first = kept or min(len(local), TAIL_FETCH_SIZE)
                        assert asked == (0 if kept else 1) + (toc_offset < len(local) - first)
                        assert fetched == max(first, len(local) - toc_offset)
                finally:
                    await src.close()

    run(main)
