"""Behaviours the real registry cannot show on its own, with a proxy (tests/harness/faults.py)
in front of it: token and basic auth, redirects to storage, 5xx/429, stalls, servers that
refuse, ignore, merge or garble multi-range requests, and mirrors."""

from __future__ import annotations

import asyncio
import base64
import random
import time

import pytest
from aiohttp import web
from harness.faults import (
    BasicAuth,
    BearerAuth,
    FailFirst,
    MultiRange,
    Proxy,
    RedirectBlobs,
    Stall,
    Status,
    Storage,
    chain,
)

from stargz import config
from stargz.errors import AuthError, BlobNotFound, RegistryError
from stargz.remote import (
    BlobOptions,
    Credentials,
    Platform,
    RegistryClient,
    ResolverOptions,
    StaticKeychain,
)

from .conftest import free_port


def _resolver(table: dict) -> ResolverOptions:
    """Resolver options from a ``[resolver]`` table, validated as the daemon's config is."""
    return ResolverOptions.from_config(config.parse({"resolver": table}).resolver)


FAST = BlobOptions(min_wait_msec=1, max_wait_msec=20, max_retries=3)


def client(**kw) -> RegistryClient:
    kw.setdefault("keychain", None)
    kw.setdefault("blob", FAST)
    kw.setdefault("platform", Platform("linux", "amd64"))
    return RegistryClient(**kw)


def spans(blob: bytes, n: int, seed: int, width: int = 20_000) -> list[tuple[int, int]]:
    rnd = random.Random(seed)
    return [(rnd.randrange(len(blob) - width), rnd.randrange(1, width)) for _ in range(n)]


def want(blob: bytes, ranges) -> list[bytes]:
    return [blob[o : o + n] for o, n in ranges]


# --- auth ------------------------------------------------------------------------------------


def test_bearer_token_with_docker_config_credentials(images, run_both, docker_config):
    auth = BearerAuth(user="alice", password="pa:ss")

    async def main():
        async with Proxy(images.registry.url, auth) as p:
            docker_config(
                {"auths": {p.netloc: {"auth": base64.b64encode(b"alice:pa:ss").decode()}}}
            )
            # the default keychain: $DOCKER_CONFIG/config.json
            async with RegistryClient(blob=FAST) as c:
                ref = f"{p.netloc}/blobs"
                b = await c.open_blob(ref, images.blob_digest)
                rs = spans(images.blob, 15, 1)
                for o, n in rs:
                    assert await b.read_at(o, n) == images.blob[o : o + n]
                assert await b.read_ranges(rs) == want(images.blob, rs)
                m = await c.get_manifest(f"{p.netloc}/corners:esgz")
                assert m.digest == images.esgz_manifest_digest
        # one challenge for the host; one token per repository, then reused
        assert auth.challenges == 1
        assert len(auth.token_requests) == 2
        basic = "Basic " + base64.b64encode(b"alice:pa:ss").decode()
        assert all(t["auth"] == basic for t in auth.token_requests)
        assert auth.token_requests[0]["scope"] == ["repository:blobs:pull"]
        assert auth.token_requests[0]["service"] == "test-registry"
        api = [s for s in p.seen if s.path.startswith("/v2/")]
        assert "Authorization" not in api[0].headers  # anonymous first, then always a token
        assert all(s.headers["Authorization"].startswith("Bearer ") for s in api[1:])

    run_both(main)


def test_bearer_anonymous_and_refused(images, run, docker_config):
    async def main():
        anon = BearerAuth()
        async with Proxy(images.registry.url, anon) as p, client() as c:
            b = await c.open_blob(f"{p.netloc}/blobs", images.blob_digest)
            assert await b.read_at(5, 10) == images.blob[5:15]
            assert anon.token_requests[0]["auth"] is None
        gated = BearerAuth(user="alice", password="right")
        async with Proxy(images.registry.url, gated) as p:
            docker_config({"auths": {p.netloc: {"username": "alice", "password": "wrong"}}})
            async with RegistryClient(blob=FAST) as c:
                with pytest.raises(AuthError, match="401"):
                    await c.open_blob(f"{p.netloc}/blobs", images.blob_digest)
            assert len(gated.token_requests) == 1  # a refused token is not retried
            assert c.stats.retries == 0

    run(main)


def test_identity_token_is_a_refresh_token(images, run, docker_config):
    auth = BearerAuth(user="nobody", password="x", refresh_token="rt-123")

    async def main():
        async with Proxy(images.registry.url, auth) as p:
            docker_config({"auths": {p.netloc: {"identitytoken": "rt-123"}}})
            async with RegistryClient(blob=FAST) as c:
                b = await c.open_blob(f"{p.netloc}/blobs", images.blob_digest)
                assert await b.read_at(3, 4) == images.blob[3:7]
        (req,) = auth.token_requests
        assert req["method"] == "POST" and req["grant_type"] == "refresh_token"
        assert req["scope"] == ["repository:blobs:pull"] and req["auth"] is None

    run(main)


def test_token_expiry_and_revocation(images, run):
    auth = BearerAuth(expires_in=1)

    async def main():
        async with Proxy(images.registry.url, auth) as p, client() as c:
            b = await c.open_blob(f"{p.netloc}/blobs", images.blob_digest)
            await b.read_at(0, 10)
            assert (auth.challenges, len(auth.token_requests)) == (1, 1)
            await asyncio.sleep(1.0)
            await b.read_at(0, 10)  # renewed before use: no new challenge
            assert (auth.challenges, len(auth.token_requests)) == (1, 2)
            auth.revoke_all()  # the server forgets: our token is refused once
            assert await b.read_at(10, 10) == images.blob[10:20]
            assert (auth.challenges, len(auth.token_requests)) == (2, 3)

    run(main)


def test_concurrent_requests_share_one_token_fetch(images, run):
    auth = BearerAuth()

    async def main():
        async with Proxy(images.registry.url, auth) as p, client() as c:
            b = await c.open_blob(f"{p.netloc}/blobs", images.blob_digest)
            auth.revoke_all()
            rs = spans(images.blob, 20, 2)
            got = await asyncio.gather(*(b.read_at(o, n) for o, n in rs))
            assert got == want(images.blob, rs)
        # every request saw the 401, but the new token was fetched once
        assert len(auth.token_requests) == 2

    run(main)


def test_basic_auth(images, run):
    async def main():
        basic = BasicAuth("bob", "pw")
        async with Proxy(images.registry.url, basic) as p:
            kc = StaticKeychain({p.netloc: Credentials("bob", "pw")})
            async with client(keychain=kc) as c:
                b = await c.open_blob(f"{p.netloc}/blobs", images.blob_digest)
                for o, n in spans(images.blob, 5, 3):
                    assert await b.read_at(o, n) == images.blob[o : o + n]
            assert basic.challenges == 1  # then sent up front
            for kc in (None, StaticKeychain({p.netloc: Credentials("bob", "bad")})):
                async with client(keychain=kc) as c:
                    with pytest.raises(AuthError):
                        await c.open_blob(f"{p.netloc}/blobs", images.blob_digest)

    run(main)


# --- redirects --------------------------------------------------------------------------------


def test_redirect_to_storage_sends_no_credentials_or_headers(images, run_both):
    storage_hook = Storage()
    auth = BearerAuth()

    async def main():
        async with Proxy(images.registry.url, storage_hook) as storage:
            redirect = RedirectBlobs(storage)
            async with Proxy(images.registry.url, chain(auth, redirect)) as mirror:
                resolver = _resolver(
                    {
                        "host": {
                            images.registry.host: {
                                "mirrors": [
                                    {"host": mirror.netloc, "header": {"X-Mirror-Token": "t0p"}}
                                ]
                            }
                        }
                    }
                )
                async with client(resolver=resolver) as c:
                    b = await c.open_blob(images.blob_ref, images.blob_digest)
                    assert b.location.redirected and b.location.host.netloc == mirror.netloc
                    rs = spans(images.blob, 10, 4)
                    for o, n in rs:
                        assert await b.read_at(o, n) == images.blob[o : o + n]
                    assert await b.read_ranges(rs) == want(images.blob, rs)
                    await b.check()
                assert redirect.redirects == 1  # the storage URL is cached
                assert storage_hook.leaks == []
                blob_gets = [s for s in mirror.seen if "/blobs/" in s.path]
                assert blob_gets and all(s.headers["X-Mirror-Token"] == "t0p" for s in blob_gets)
                assert blob_gets[-1].headers["Authorization"].startswith("Bearer ")
                assert len(storage.seen) == 10 + 1 + 1 + 1  # reads, multi-range, check, probe

    run_both(main)


def test_redirect_refreshed_on_403_and_after_ttl(images, run):
    storage_hook = Storage()

    async def main():
        async with Proxy(images.registry.url, storage_hook) as storage:
            redirect = RedirectBlobs(storage)
            async with Proxy(images.registry.url, redirect) as reg:
                async with client() as c:
                    b = await c.open_blob(f"{reg.netloc}/blobs", images.blob_digest)
                    storage_hook.expired.add(b.url.rpartition("sig=")[2])
                    assert await b.read_at(100, 50) == images.blob[100:150]
                    assert redirect.redirects == 2
                    assert not b.url.endswith(tuple(storage_hook.expired))
                async with client(redirect_ttl=0) as c:
                    b = await c.open_blob(f"{reg.netloc}/blobs", images.blob_digest)
                    for i in range(3):
                        await b.read_at(i, 1)
                    assert redirect.redirects == 2 + 1 + 3

    run(main)


# --- retries and timeouts -------------------------------------------------------------------


def test_503_then_success(images, run):
    fail = FailFirst(3, 503, path_re="/blobs/")

    async def main():
        async with Proxy(images.registry.url, fail) as p, client() as c:
            b = await c.open_blob(f"{p.netloc}/blobs", images.blob_digest)
            fail.failed = 0  # and again during a read
            assert await b.read_at(7, 70) == images.blob[7:77]
            assert b.stats.retries == 6 and c.stats.retries == 6

    run(main)


def test_retries_give_up_and_4xx_is_final(images, run):
    async def main():
        fail = FailFirst(100, 503)
        async with Proxy(images.registry.url, fail) as p, client() as c:
            t0 = time.monotonic()
            with pytest.raises(RegistryError, match="503") as ei:
                await c.get_manifest(f"{p.netloc}/corners:esgz")
            assert ei.value.status == 503
            assert fail.failed == 1 + FAST.max_retries
            assert time.monotonic() - t0 < 2
        bad = FailFirst(100, 400)
        async with Proxy(images.registry.url, bad) as p, client() as c:
            with pytest.raises(RegistryError, match="400"):
                await c.get_manifest(f"{p.netloc}/corners:esgz")
            assert bad.failed == 1 and c.stats.retries == 0
        nimpl = FailFirst(100, 501)  # 501 is not retried either (retryablehttp)
        async with Proxy(images.registry.url, nimpl) as p, client() as c:
            with pytest.raises(RegistryError, match="501"):
                await c.get_manifest(f"{p.netloc}/corners:esgz")
            assert nimpl.failed == 1

    run(main)


def test_retry_after_is_honoured(images, run):
    fail = FailFirst(1, 429, retry_after="1")

    async def main():
        opts = BlobOptions(min_wait_msec=1, max_wait_msec=5000)
        async with Proxy(images.registry.url, fail) as p, client(blob=opts) as c:
            t0 = time.monotonic()
            await c.get_manifest(f"{p.netloc}/corners:esgz")
            assert time.monotonic() - t0 >= 1.0

    run(main)


def test_request_timeout_then_retry(images, run):
    stall = Stall(1, 4.0, path_re="/blobs/")

    async def main():
        resolver = ResolverOptions(request_timeout_sec=1)
        async with Proxy(images.registry.url, stall) as p, client(resolver=resolver) as c:
            t0 = time.monotonic()
            b = await c.open_blob(f"{p.netloc}/blobs", images.blob_digest)
            assert 1.0 <= time.monotonic() - t0 < 3.0  # not the 4 s stall
            assert b.stats.retries == 1
            assert await b.read_at(0, 3) == images.blob[:3]

    run(main)


def test_fetching_timeout_bounds_a_read(images, run):
    stall = Stall(0, 5.0, path_re="/blobs/")

    async def main():
        opts = BlobOptions(fetching_timeout_sec=1, min_wait_msec=1, max_wait_msec=10)
        async with Proxy(images.registry.url, stall) as p, client(blob=opts) as c:
            b = await c.open_blob(f"{p.netloc}/blobs", images.blob_digest)
            stall.n = 100
            t0 = time.monotonic()
            with pytest.raises(RegistryError, match="not done after 1 s"):
                await b.read_at(0, 10)
            assert time.monotonic() - t0 < 3.0  # not the 5 s stall

    run(main)


# --- multi-range fallbacks ------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["refuse", "ignore", "garbage"])
def test_multi_range_fallback(images, run, mode):
    hook = MultiRange(mode)

    async def main():
        async with Proxy(images.registry.url, hook) as p, client() as c:
            b = await c.open_blob(f"{p.netloc}/blobs", images.blob_digest)
            rs = [(10, 100), (200_000, 5000), (90_000, 10)]
            assert await b.read_ranges(rs) == want(images.blob, rs)
            if mode == "ignore":  # a 200 body is read only up to the last byte needed
                assert b.stats.bytes_fetched == 205_000
            assert b.single_range and p.netloc in c.single_range_hosts
            assert b.stats.multi_range_fallbacks == 1
            hits = hook.hits
            rs2 = spans(images.blob, 8, 5)
            assert await b.read_ranges(rs2) == want(images.blob, rs2)
            if mode != "ignore":
                assert hook.hits == hits  # no multi-range request any more
            assert b.stats.multi_range_fallbacks == 1

    run(main)


def test_merged_single_range_answer_is_used(images, run):
    hook = MultiRange("merge")

    async def main():
        async with Proxy(images.registry.url, hook) as p, client() as c:
            b = await c.open_blob(f"{p.netloc}/blobs", images.blob_digest)
            rs = [(10, 100), (50_000, 5000), (20_000, 10)]
            assert await b.read_ranges(rs) == want(images.blob, rs)
            assert hook.hits == 1 and b.stats.multi_range_fallbacks == 0 and not b.single_range

    run(main)


# --- mirrors --------------------------------------------------------------------------------


def _mirrors(registry: str, *mirrors: dict) -> ResolverOptions:
    return _resolver({"host": {registry: {"mirrors": list(mirrors)}}})


def test_mirror_down_uses_the_registry(images, run):
    dead = f"127.0.0.1:{free_port()}"

    async def main():
        async with Proxy(images.registry.url) as origin:
            resolver = _mirrors(origin.netloc, {"host": dead})
            async with client(resolver=resolver) as c:
                m = await c.get_manifest(f"{origin.netloc}/corners:esgz")
                assert m.digest == images.esgz_manifest_digest
                b = await c.open_blob(f"{origin.netloc}/blobs", images.blob_digest)
                assert b.location.host.netloc == origin.netloc
                assert await b.read_at(1, 9) == images.blob[1:10]
            assert origin.requests("GET", "/manifests/") and origin.requests("GET", "/blobs/")

    run(main)


def test_mirror_up_is_used_and_gets_its_headers(images, run_both):
    async def main():
        async with Proxy(images.registry.url) as origin, Proxy(images.registry.url) as mirror:
            resolver = _mirrors(
                origin.netloc,
                {"host": mirror.netloc, "header": {"X-Multi": ["a", "b"], "X-One": "1"}},
            )
            async with client(resolver=resolver) as c:
                m = await c.get_manifest(f"{origin.netloc}/corners:esgz")
                assert m.digest == images.esgz_manifest_digest
                b = await c.open_blob(f"{origin.netloc}/blobs", images.blob_digest)
                rs = spans(images.blob, 5, 6)
                assert await b.read_ranges(rs) == want(images.blob, rs)
            assert origin.seen == []
            assert len(mirror.seen) >= 3
            for s in mirror.seen:
                assert s.headers.getall("X-Multi") == ["a", "b"]
                assert s.headers["X-One"] == "1"
                assert s.query["ns"] == origin.netloc

    run_both(main)


def test_mirror_failures_fall_back(images, run):
    async def no_blobs(proxy, request):
        if "/blobs/" in request.path:
            return web.Response(status=404)
        return None

    async def main():
        async with Proxy(images.registry.url) as origin, Proxy(images.registry.url, no_blobs) as m1:
            dead = f"127.0.0.1:{free_port()}"
            resolver = _mirrors(origin.netloc, {"host": dead}, {"host": m1.netloc})
            async with client(resolver=resolver) as c:
                # manifest from the 2nd mirror, blob from the registry
                await c.get_manifest(f"{origin.netloc}/corners:esgz")
                assert m1.requests("GET", "/manifests/")
                assert not origin.requests("GET", "/manifests/")
                b = await c.open_blob(f"{origin.netloc}/blobs", images.blob_digest)
                assert b.location.host.netloc == origin.netloc
                with pytest.raises(BlobNotFound):
                    await c.open_blob(f"{origin.netloc}/blobs", "sha256:" + "1" * 64)

    run(main)


def test_mirror_dies_mid_read_then_comes_back(images, run):
    opts = BlobOptions(min_wait_msec=1, max_wait_msec=5, max_retries=1)

    async def main():
        async with Proxy(images.registry.url) as origin:
            mirror = await Proxy(images.registry.url).__aenter__()
            resolver = _mirrors(origin.netloc, {"host": mirror.netloc})
            async with client(resolver=resolver, blob=opts) as c:
                b = await c.open_blob(f"{origin.netloc}/blobs", images.blob_digest)
                assert b.location.host.netloc == mirror.netloc
                await mirror.__aexit__(None, None, None)
                assert await b.read_at(100, 10) == images.blob[100:110]
                assert b.location.host.netloc == origin.netloc
                assert b.stats.failovers == 1
                await b.check()  # the registry answers: stay there
                assert b.location.host.netloc == origin.netloc
                port = int(mirror.netloc.rsplit(":", 1)[1])
                async with Proxy(images.registry.url, port=port) as revived:
                    b2 = await c.open_blob(f"{origin.netloc}/blobs", images.blob_digest)
                    assert b2.location.host.netloc == revived.netloc

    run(main)


def test_a_failing_mirror_is_not_retried(images, run):
    """A mirror answering 503 gets one request per blob probe: the next host is the retry
    (the registry itself is retried, see ``test_503_then_success``)."""

    async def main():
        async with (
            Proxy(images.registry.url) as origin,
            Proxy(images.registry.url, Status(503)) as mirror,
        ):
            resolver = _mirrors(origin.netloc, {"host": mirror.netloc})
            async with client(resolver=resolver) as c:
                b = await c.open_blob(f"{origin.netloc}/blobs", images.blob_digest)
                assert b.location.host.netloc == origin.netloc
                assert await b.read_at(7, 5) == images.blob[7:12]
            assert len(mirror.requests("GET", "/blobs/")) == 1
            assert c.stats.retries == 0

    run(main)


def test_blob_goes_back_to_the_mirror_after_valid_interval(images, run):
    """A blob that failed over to the registry probes the mirror again once
    ``valid_interval`` has passed, and moves back when it answers; before that, reads
    stay on the registry without asking the mirror."""
    opts = BlobOptions(min_wait_msec=1, max_wait_msec=5, max_retries=1, valid_interval=1)

    async def main():
        async with Proxy(images.registry.url) as origin, Proxy(images.registry.url) as mirror:
            resolver = _mirrors(origin.netloc, {"host": mirror.netloc})
            async with client(resolver=resolver, blob=opts) as c:
                b = await c.open_blob(f"{origin.netloc}/blobs", images.blob_digest)
                assert b.location.host.netloc == mirror.netloc
                await mirror.down()
                assert await b.read_at(100, 10) == images.blob[100:110]
                assert b.location.host.netloc == origin.netloc
                await mirror.up()
                n = len(mirror.seen)
                assert await b.read_at(200, 10) == images.blob[200:210]
                assert b.location.host.netloc == origin.netloc and len(mirror.seen) == n
                await asyncio.sleep(1.1)
                assert await b.read_at(300, 10) == images.blob[300:310]
                assert b.location.host.netloc == mirror.netloc
                assert mirror.requests("GET", "/blobs/")[-1].headers["Range"] == "bytes=300-309"

    run(main)


def test_a_mirror_still_down_keeps_the_blob_on_the_registry(images, run):
    """The probe of a mirror that is still down costs one refused connection per
    ``valid_interval``; the read is served by the registry all the same."""
    opts = BlobOptions(min_wait_msec=1, max_wait_msec=5, max_retries=1, valid_interval=1)

    async def main():
        async with Proxy(images.registry.url) as origin, Proxy(images.registry.url) as mirror:
            resolver = _mirrors(origin.netloc, {"host": mirror.netloc})
            async with client(resolver=resolver, blob=opts) as c:
                b = await c.open_blob(f"{origin.netloc}/blobs", images.blob_digest)
                await mirror.down()
                assert await b.read_at(100, 10) == images.blob[100:110]
                await asyncio.sleep(1.1)
                t0 = time.monotonic()
                assert await b.read_at(300, 10) == images.blob[300:310]
                assert time.monotonic() - t0 < 1
                assert b.location.host.netloc == origin.netloc

    run(main)
