"""Range answers are read only as far as the request asked, and a range answer that is not
the range asked for is a typed error, never wrong bytes.

The real registry serves every byte; the fault proxy (tests/harness/faults.py) asks it for
another range than the client did and passes its honest 206 on.
"""

from __future__ import annotations

import pytest
from harness.faults import MultiRange, PerRequest, Proxy, ReshapeRange

from stargz.errors import RangeMismatch, RegistryProtocolError

from .test_faults import client


def test_a_longer_206_is_read_only_up_to_the_requested_end(images, run_both):
    """A 10-byte read answered with ``Content-Range: bytes 1000-<end of a 3 MiB blob>``:
    10 bytes are read (not 3 MiB), and the next read still works (on a new connection)."""
    reshape = ReshapeRange("longer")

    async def main():
        async with Proxy(images.registry.url, reshape) as p:
            async with client() as c:
                b = await c.open_blob(f"{p.netloc}/blobs", images.blob_digest)
                before = b.stats.bytes_fetched
                assert await b.read_at(1000, 10) == images.blob[1000:1010]
                assert b.stats.bytes_fetched - before == 10
                assert await b.read_at(5000, 3) == images.blob[5000:5003]
                assert b.stats.bytes_fetched - before == 13
                assert b.stats.retries == 0
        assert reshape.hits == 2

    run_both(main)


@pytest.mark.parametrize("mode", ["earlier", "shorter"])
def test_a_206_for_another_range_is_a_typed_error_naming_both(images, run, mode):
    async def main():
        async with Proxy(images.registry.url, ReshapeRange(mode, by=5)) as p:
            async with client() as c:
                b = await c.open_blob(f"{p.netloc}/blobs", images.blob_digest)
                with pytest.raises(RangeMismatch) as info:
                    await b.read_at(1000, 10)
                return str(info.value)

    msg = run(main)
    answered = "bytes 995-1009/" if mode == "earlier" else "bytes 1000-1004/"
    assert "bytes 1000-1009" in msg and answered in msg, msg
    assert issubclass(RangeMismatch, RegistryProtocolError)


@pytest.mark.parametrize("mode", ["earlier", "shorter"])
def test_a_206_for_another_range_once_is_retried(images, run, mode):
    """A cache on the way answers one request with another range: the read is asked again
    (a retry, as for a cut body) and gets the right bytes, instead of failing at once."""
    reshape = PerRequest(ReshapeRange(mode, by=5), times=1)

    async def main():
        async with Proxy(images.registry.url, reshape) as p:
            async with client() as c:
                b = await c.open_blob(f"{p.netloc}/blobs", images.blob_digest)
                assert await b.read_at(1000, 10) == images.blob[1000:1010]
                assert b.stats.retries == 1

    run(main)
    assert reshape.hits == 1


def test_a_200_answer_to_a_range_request_is_read_only_to_the_range_end(images, run):
    """The server ignores Range and sends the whole 3 MiB blob: bytes up to the end of the
    wanted range are read, then the connection is dropped."""
    ignore = MultiRange("ignore")

    async def main():
        async with Proxy(images.registry.url) as p:
            async with client() as c:
                b = await c.open_blob(f"{p.netloc}/blobs", images.blob_digest)
                p.hook = ignore
                before = b.stats.bytes_fetched
                assert await b.read_at(100, 20) == images.blob[100:120]
                assert b.stats.bytes_fetched - before == 120
                assert await b.read_at(7, 3) == images.blob[7:10]
        assert ignore.hits == 2

    run(main)
