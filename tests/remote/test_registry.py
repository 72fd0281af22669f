"""stargz.remote against the real docker-registry (no proxy, no fakes)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import random

import pytest

from stargz.errors import (
    BlobNotFound,
    DigestMismatch,
    InvalidArgument,
    ManifestNotFound,
    RangeNotSatisfiable,
    RegistryError,
)
from stargz.remote import (
    TOC_DIGEST_ANNOTATION,
    BlobOptions,
    Platform,
    RegistryClient,
    open_reader,
)
from stargz.remote.client import TAIL_PROBE_SIZE

from .conftest import _runner

TOC = TOC_DIGEST_ANNOTATION


def client(**kw) -> RegistryClient:
    kw.setdefault("keychain", None)
    kw.setdefault("platform", Platform("linux", "amd64"))
    return RegistryClient(**kw)


def test_manifest_by_tag_and_digest(images, run_both):
    async def main():
        async with client() as c:
            m = await c.get_manifest(images.esgz_ref)
            assert m.digest == images.esgz_manifest_digest
            assert m.index_digest is None
            assert [d.digest for d in m.layers] == [
                x["digest"] for x in images.esgz_manifest["layers"]
            ]
            assert m.layers[0].toc_digest == images.esgz_manifest["layers"][0]["annotations"][TOC]
            by_digest = await c.get_manifest(
                f"{images.registry.host}/corners@{images.esgz_manifest_digest}"
            )
            assert by_digest.raw == m.raw
            desc = await c.resolve(images.esgz_ref)
            assert (desc.digest, desc.size) == (m.digest, len(m.raw))
            config = json.loads(await c.fetch_blob(images.esgz_ref, m.config.digest))
            assert "rootfs" in config

    run_both(main)


def test_index_selects_the_host_platform(images, run):
    async def main():
        async with client() as c:
            m = await c.get_manifest(images.multi_ref)
            assert m.index_digest == images.multi_digest
            assert m.digest == images.esgz_manifest_digest
            arm = await c.get_manifest(images.multi_ref, platform=Platform("linux", "arm64"))
            assert arm.layers == ()
            with pytest.raises(ManifestNotFound, match="linux/riscv64"):
                await c.get_manifest(images.multi_ref, platform=Platform("linux", "riscv64"))
            desc = await c.resolve(images.multi_ref)
            assert desc.media_type == "application/vnd.oci.image.index.v1+json"
            # Docker schema 2 list and manifest
            d = await c.get_manifest(images.docker_list_ref)
            assert d.digest == images.docker_manifest_digest
            assert d.media_type == "application/vnd.docker.distribution.manifest.v2+json"

    run(main)


def test_not_found_and_bad_digest(images, run):
    async def main():
        async with client() as c:
            with pytest.raises(ManifestNotFound):
                await c.get_manifest(f"{images.registry.host}/corners:nope")
            with pytest.raises(ManifestNotFound):
                await c.get_manifest(f"{images.registry.host}/nothing-here:latest")
            missing = "sha256:" + "0" * 64
            with pytest.raises(BlobNotFound):
                await c.open_blob(images.blob_ref, missing)
            with pytest.raises(BlobNotFound):
                await c.fetch_blob(images.blob_ref, missing)
            before = c.stats.requests
            with pytest.raises(BlobNotFound):
                await c.blob_size(images.blob_ref, missing)
            assert c.stats.requests - before == 1  # a 404 is not retried
            with pytest.raises(RegistryError, match="size"):
                await c.open_blob(images.blob_ref, images.blob_digest, size=5)
            # a blob under the wrong digest: fetch_blob verifies what it returns
            wrong = images.blob_ref.replace("/blobs", "/corners")
            with pytest.raises(BlobNotFound):
                await c.fetch_blob(wrong, images.blob_digest)

    run(main)


def test_fetch_blob_verifies(images, run, monkeypatch):
    import stargz.remote.images as mod

    async def main():
        async with client() as c:
            assert await c.blob_size(images.blob_ref, images.blob_digest) == len(images.blob)
            data = await c.fetch_blob(images.blob_ref, images.blob_digest)
            assert data == images.blob
            monkeypatch.setattr(mod, "digest_of", lambda data, like: "sha256:" + "f" * 64)
            with pytest.raises(DigestMismatch):
                await c.fetch_blob(images.blob_ref, images.blob_digest)

    run(main)


def test_read_at_random_ranges(images, run_both):
    blob = images.blob
    rnd = random.Random(7)

    async def main():
        async with client() as c:
            b = await c.open_blob(images.blob_ref, images.blob_digest)
            assert b.size == len(blob) and not b.location.redirected
            for _ in range(30):
                off = rnd.randrange(len(blob))
                n = rnd.randrange(1, 200_000)
                assert await b.read_at(off, n) == blob[off : off + n]
            assert await b.read_at(len(blob) - 3, 3) == blob[-3:]
            assert await b.read_at(0, 0) == b"" and await b.read_at(len(blob), 0) == b""
            before = b.stats.requests
            for off, n in ((len(blob) - 3, 4), (len(blob) + 10, 5)):
                with pytest.raises(RangeNotSatisfiable):  # never short data
                    await b.read_at(off, n)
            with pytest.raises(InvalidArgument):
                await b.read_at(-1, 5)
            assert b.stats.requests == before
            # concurrent readers share the client's pool
            spans = [(rnd.randrange(len(blob) - 5000), 5000) for _ in range(40)]
            got = await asyncio.gather(*(b.read_at(o, n) for o, n in spans))
            assert got == [blob[o : o + n] for o, n in spans]
            assert b.stats.retries == 0 and b.stats.multi_range_fallbacks == 0

    run_both(main)


def test_multi_range_is_one_request(images, run_both):
    """The registry serves blobs with http.ServeContent: multipart/byteranges works."""
    blob = images.blob
    rnd = random.Random(11)

    async def main():
        async with client() as c:
            b = await c.open_blob(images.blob_ref, images.blob_digest)
            top = len(blob) - 70_000
            ranges = [(rnd.randrange(top), rnd.randrange(1, 70_000)) for _ in range(20)]
            ranges += [(100, 10), (105, 10), (0, 1)]  # overlapping and touching ones merge
            before = b.stats.requests
            got = await b.read_ranges(ranges)
            assert got == [blob[o : o + n] for o, n in ranges]
            assert b.stats.requests - before == 1
            assert b.stats.multi_range_requests == 1
            assert b.stats.multi_range_fallbacks == 0 and not b.single_range
            # more ranges than fit in one request: split, still exact
            many = [(i * 20_000, 100) for i in range(150)]
            before = b.stats.requests
            assert await b.read_ranges(many) == [blob[o : o + n] for o, n in many]
            assert b.stats.requests - before == 3  # 64 + 64 + 22
            assert b.stats.bytes_fetched < 200_000 + 400_000  # ranges + multipart framing

    run_both(main)


def test_forced_single_range_mode(images, run):
    blob = images.blob

    async def main():
        opts = BlobOptions(force_single_range_mode=True, chunk_size=1000)
        async with client(blob=opts) as c:
            b = await c.open_blob(images.blob_ref, images.blob_digest)
            ranges = [(0, 10), (500, 10), (100_000, 10), (200_000, 50)]
            before = b.stats.requests
            assert await b.read_ranges(ranges) == [blob[o : o + n] for o, n in ranges]
            # gaps under chunk_size share a request: (0..510), (100000..), (200000..)
            assert b.stats.requests - before == 3
            assert b.stats.multi_range_requests == 0

    run(main)


def test_check_respects_valid_interval(images, run):
    async def main():
        async with client(blob=BlobOptions(valid_interval=3600)) as c:
            b = await c.open_blob(images.blob_ref, images.blob_digest)
            before = b.stats.requests
            await b.check()
            await b.check()
            assert b.stats.checks == 1 and b.stats.requests - before == 1
        async with client(blob=BlobOptions(check_always=True)) as c:
            b = await c.open_blob(images.blob_ref, images.blob_digest)
            for _ in range(3):
                await b.check()
            assert b.stats.checks == 3

    run(main)


# The registry reads 4 MiB from disk for every blob GET (distribution's file reader
# buffer), ~14 ms here; reading a whole layer file by file is ~300 GETs, so each layer
# runs on one loop kind only.
@pytest.mark.parametrize("layer, loop_kind", [(0, "uvloop"), (1, "asyncio")])
def test_estargz_layer_through_the_sync_adapter(images, trees, layer, loop_kind):
    """Open an eStargz layer with stargz.estargz.Reader reading over HTTP ranges; every
    file of the layer equals the original (non-eStargz) layer's."""
    esgz = images.esgz_manifest["layers"][layer]
    orig_manifest = json.loads(
        images.layer_path(
            next(
                d["digest"]
                for d in json.loads((images.layout / "index.json").read_text())["manifests"]
                if d["annotations"]["org.opencontainers.image.ref.name"] == "orig"
            )
        ).read_bytes()
    )
    orig = images.layer_path(orig_manifest["layers"][layer]["digest"])

    async def main():
        async with client() as c:
            m = await c.get_manifest(images.esgz_ref)
            b = await c.open_layer(images.esgz_ref, m.layers[layer])
            reader = await open_reader(b, toc_digest=esgz["annotations"][TOC])
            opened_with = b.stats.requests
            got = await asyncio.to_thread(trees.reader, reader)
            trees.compare(got, trees.tar(orig))
            # a wrong TOC digest is refused
            with pytest.raises(DigestMismatch):
                await open_reader(b, toc_digest="sha256:" + "0" * 64)
            # calling the sync adapter on the loop thread would deadlock: refused
            with pytest.raises(RuntimeError, match="deadlock"):
                b.sync_read_at(asyncio.get_running_loop())(0, 1)
            return opened_with, b

    with _runner(loop_kind) as r:
        opened_with, b = r.run(main())
    assert opened_with <= 3  # probe + tail (footer and TOC) [+ rest of the TOC]
    # every file once (hardlinked ones once per name) plus the tail twice and the probe's
    # tail (open_reader does not use it): no gross waste
    probed = min(b.size, TAIL_PROBE_SIZE)
    assert b.stats.bytes_fetched <= b.size * 1.25 + 2 * min(b.size, 65536) + probed


def test_read_one_file_of_the_layer(images, run):
    """The point of lazy pulling: one file costs a few requests, not the layer."""
    esgz = images.esgz_manifest["layers"][0]

    async def main():
        async with client() as c:
            b = await c.open_blob(images.esgz_ref, esgz["digest"])
            reader = await open_reader(b, toc_digest=esgz["annotations"][TOC])
            before_bytes = b.stats.bytes_fetched
            # a small file somewhere in the layer
            path, node = next(
                (p, n) for p, n in reader.walk() if n.type == "reg" and 0 < n.entry.size < 5000
            )
            data = await asyncio.to_thread(reader.read, node.id, 0, node.entry.size)
            want = next(e.digest for e in reader.toc.entries if e.name == path)
            assert hashlib.sha256(data).hexdigest() == want.split(":", 1)[1]
            return b.stats.bytes_fetched - before_bytes, b.size

    fetched, size = run(main)
    assert fetched < size // 50, (fetched, size)


def test_prefetch_splits_into_prefetch_chunk_size_gets(images, run):
    async def main():
        async with client(blob=BlobOptions(prefetch_chunk_size=100_000)) as c:
            b = await c.open_blob(images.blob_ref, images.blob_digest)
            before = b.stats.requests
            assert await b.prefetch(5, 1_000_000) == images.blob[5:1_000_005]
            assert b.stats.requests - before == 10
        async with client() as c:  # 0: one GET
            b = await c.open_blob(images.blob_ref, images.blob_digest)
            before = b.stats.requests
            assert await b.prefetch(0, len(images.blob)) == images.blob
            assert b.stats.requests - before == 1

    run(main)


def test_read_at_with_head_hands_over_the_first_bytes_before_the_rest(images, run_both):
    """The head callback gets exactly the first bytes while the body still streams (the
    TOC's first bytes start a layer's prefetch early), and the read returns them all."""
    blob = images.blob
    off, n, head = 1000, 2 << 20, 16 << 10

    async def main():
        async with client() as c:
            b = await c.open_blob(images.blob_ref, images.blob_digest)
            heads: list[tuple[bytes, int]] = []
            before = b.stats.bytes_fetched
            got = await b.read_at_with_head(
                off, n, head, lambda h: heads.append((h, b.stats.bytes_fetched - before))
            )
            assert got == blob[off : off + n]
            assert [h for h, _ in heads] == [blob[off : off + head]]
            # called when the head was in, not after the whole 2 MiB
            assert head <= heads[0][1] < n
            # a callback that fails changes nothing about the read
            got = await b.read_at_with_head(off, n, head, lambda h: 1 / 0)
            assert got == blob[off : off + n]
            # a read no longer than the head hands over all of it
            short = await b.read_at_with_head(off, 100, head, lambda h: heads.append((h, 0)))
            assert short == blob[off : off + 100] and heads[-1][0] == short

    run_both(main)


def test_read_at_streaming_hands_over_every_piece_in_order(images, run_both):
    """One GET; each piece (the last one shorter) reaches the callback as it arrives."""
    blob = images.blob
    off, n, piece = 777, (2 << 20) + 12345, 512 << 10

    async def main():
        async with client() as c:
            b = await c.open_blob(images.blob_ref, images.blob_digest)
            got_pieces: list[tuple[int, bytes]] = []
            before = b.stats.range_requests
            got = await b.read_at_streaming(
                off, n, piece, lambda pos, d: got_pieces.append((pos, d))
            )
            assert got == blob[off : off + n]
            assert b.stats.range_requests == before + 1
            assert [p for p, _ in got_pieces] == list(range(0, n, piece))
            assert b"".join(d for _, d in got_pieces) == got
            assert len(got_pieces[-1][1]) == n % piece

    run_both(main)
