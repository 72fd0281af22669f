"""Lazy pulls through a pull-through cache, end to end, and what happens when it goes away.

The origin is a real docker-registry; the mirror is a second docker-registry in proxy mode
(``proxy: remoteurl: <origin>``), named in the daemon's
``[[resolver.host."<origin>".mirrors]]``. Who fetched what is read from both registries'
access logs (each line carries the client's User-Agent: ours is
``stargz-snapshotter-py/...``; the mirror's own fetches from the origin carry another).
The mirror is stopped and started by PID; a mirror that answers 500 or stalls is a fault
proxy in front of the real one. Every byte read is compared with the ground truth.
"""

from __future__ import annotations

import time

import pytest
from harness import Registry, mounted_image, tree_listing
from harness.faults import ProxyThread, Stall, Status, Switch

from .test_lazy import (
    assert_lazily_mounted,
    ground_truth,
    layers_of,
    pread_direct,
    remote_layer_dirs,
    rpull,
    tar_files,
)

pytestmark = [pytest.mark.e2e, pytest.mark.interop, pytest.mark.timeout(240)]

NS = "lazy"
OUR_AGENT = "stargz-snapshotter-py"
#: The mirror's per-request timeout, and how long a blob stays on the origin before the
#: mirror is tried again.
MIRROR_TIMEOUT = 2
VALID_INTERVAL = 2


def mirror_config(origin: Registry, mirror_netloc: str, valid_interval: int = 60) -> str:
    return f"""no_background_fetch = true
[fuse]
passthrough = false
[blob]
valid_interval = {valid_interval}
[[resolver.host."{origin.host}".mirrors]]
host = "{mirror_netloc}"
request_timeout_sec = {MIRROR_TIMEOUT}
"""


@pytest.fixture
def origin(e2e_host: None):
    reg = Registry.start(access_log=True)
    yield reg
    reg.close()


@pytest.fixture
def mirror(origin: Registry):
    reg = Registry.start(access_log=True, proxy_remote=origin.url)
    yield reg
    reg.close()


def ours(reg: Registry, digest: str) -> list:
    return [r for r in reg.blob_requests(digest) if r.agent.startswith(OUR_AGENT)]


def theirs(reg: Registry, digest: str) -> list:
    return [r for r in reg.blob_requests(digest) if not r.agent.startswith(OUR_AGENT)]


def test_lazy_pull_goes_through_the_mirror(origin, mirror, lazy_stack, shared):
    """With the mirror configured, every layer is mounted lazily and read entirely through
    the mirror: our daemon's blob requests all went to the mirror (its access log), none to
    the origin, whose log shows the mirror fetching the layers instead; the tree read
    through FUSE is the ground truth."""
    layout = shared / "fixtures" / "oci-corners"
    ref = origin.push_oci(layout, "esgz", "corners:esgz")
    layers = layers_of(layout, "esgz")
    sd, c = lazy_stack(mirror_config(origin, mirror.host))
    rpull(c, ref)
    assert_lazily_mounted(sd, c, layers)
    with mounted_image(c, ref, NS) as root:
        assert tree_listing(root) == ground_truth(shared)
    # docker-registry's proxy answers a range request for a blob it has not cached yet
    # with the whole blob (200, Range ignored) while it caches it; our client reads what
    # it needs and hangs up, which the mirror logs as 500 (the client got 200 and bytes).
    # Once cached, it answers ranges (206).
    for d in layers:
        via_mirror = ours(mirror, d["digest"])
        assert via_mirror and all(r.status in (200, 206, 500) for r in via_mirror), via_mirror
        assert any(r.status == 206 for r in via_mirror), via_mirror
        assert ours(origin, d["digest"]) == []
        assert [r for r in theirs(origin, d["digest"]) if r.method == "GET"], origin.log_text()
    bad = [r for r in sd.log_records() if r["level"] in ("warning", "error", "critical")]
    assert not bad, bad


def test_mirror_stopped_mid_run_fails_over_and_is_used_again(origin, mirror, lazy_stack, shared):
    """Reading ``data/noise.bin`` (a 64 KiB-chunk eStargz layer) in three places, each a
    chunk nothing has fetched yet:

    1. mirror up: the bytes come through the mirror;
    2. mirror stopped (by PID): the read returns the right bytes from the origin at once
       (a refused connection is not retried on a mirror), well within the mirror's
       per-request timeout;
    3. mirror started again on the same port: after ``valid_interval`` the blob goes back
       to the mirror, and the read comes through it again.
    """
    layout = shared / "fixtures" / "oci-corners"
    ref = origin.push_oci(layout, "esgz-64k", "corners:esgz-64k")
    layers = layers_of(layout, "esgz-64k")
    sd, c = lazy_stack(mirror_config(origin, mirror.host, VALID_INTERVAL))
    rpull(c, ref)
    assert_lazily_mounted(sd, c, layers)
    truth = tar_files(shared, "oci-corners", "orig")["data/noise.bin"]
    (big,) = [d for d in layers if (remote_layer_dirs(sd)[d["digest"]] / "data/noise.bin").exists()]
    path = remote_layer_dirs(sd)[big["digest"]] / "data/noise.bin"
    digest = big["digest"]
    third = (len(truth) // 3) & ~4095

    def read(offset: int) -> float:
        t0 = time.monotonic()
        got = pread_direct(path, offset)
        took = time.monotonic() - t0
        assert got == truth[offset : offset + 4096], f"wrong bytes at {offset}"
        return took

    read(0)
    mirror_before, origin_before = len(ours(mirror, digest)), len(ours(origin, digest))
    assert mirror_before > 0 and origin_before == 0

    mirror.stop()
    took = read(third)
    assert took < MIRROR_TIMEOUT, took
    assert len(ours(origin, digest)) > origin_before, "the read did not go to the origin"

    mirror.restart()
    time.sleep(VALID_INTERVAL + 0.5)
    mirror_up = len(ours(mirror, digest))
    origin_up = len(ours(origin, digest))
    read(2 * third)
    assert len(ours(mirror, digest)) > mirror_up, "the mirror was not used again"
    # the read itself came from the mirror: the origin saw nothing more of ours
    assert len(ours(origin, digest)) == origin_up
    assert sd.alive()


@pytest.mark.parametrize("fault", ["500", "stall"])
def test_failing_mirror_is_passed_over(fault, origin, mirror, lazy_stack, shared):
    """A fault proxy in front of the real mirror answers every request with 500, or holds
    it for a minute: each layer is mounted lazily all the same (the origin serves it after
    one failed mirror request: no retries against a mirror, the stall cut at the mirror's
    ``request_timeout_sec``), the pull takes seconds, and the tree read through FUSE is
    the ground truth (nothing from the mirror was served)."""
    layout = shared / "fixtures" / "oci-corners"
    ref = origin.push_oci(layout, "esgz", "corners:esgz")
    layers = layers_of(layout, "esgz")
    hook = Status(500) if fault == "500" else Stall(n=10**6, seconds=60)
    with ProxyThread() as pt:
        front = pt.start(mirror.url, hook)
        sd, c = lazy_stack(mirror_config(origin, front.netloc))
        t0 = time.monotonic()
        rpull(c, ref)
        took = time.monotonic() - t0
        assert_lazily_mounted(sd, c, layers)
        with mounted_image(c, ref, NS) as root:
            assert tree_listing(root) == ground_truth(shared)
        seen = front.requests(path_re="/blobs/")
    assert seen, "the mirror was never asked"
    # each layer: one mirror request (the probe), then the origin
    assert len(seen) <= 2 * len(layers), [s.path for s in seen]
    assert took < 4 * MIRROR_TIMEOUT * len(layers) + 10, took
    for d in layers:
        assert ours(origin, d["digest"]), d
        assert ours(mirror, d["digest"]) == []


@pytest.mark.parametrize("fault", ["500", "stall"])
def test_mirror_failing_mid_run_fails_over_within_its_timeout(
    fault, origin, mirror, lazy_stack, shared
):
    """The mirror serves the pull, then (a fault proxy in front of it switched on) answers
    500 or holds every request for a minute: a read of a chunk nothing has fetched yet
    returns the right bytes from the origin, after at most the mirror's
    ``request_timeout_sec`` (the stall) plus the origin's answer; the next read goes
    straight to the origin."""
    layout = shared / "fixtures" / "oci-corners"
    ref = origin.push_oci(layout, "esgz-64k", "corners:esgz-64k")
    layers = layers_of(layout, "esgz-64k")
    switch = Switch()
    with ProxyThread() as pt:
        front = pt.start(mirror.url, switch)
        sd, c = lazy_stack(mirror_config(origin, front.netloc))
        rpull(c, ref)
        assert_lazily_mounted(sd, c, layers)
        truth = tar_files(shared, "oci-corners", "orig")["data/noise.bin"]
        dirs = remote_layer_dirs(sd)
        (digest,) = [d["digest"] for d in layers if (dirs[d["digest"]] / "data/noise.bin").exists()]
        path = dirs[digest] / "data/noise.bin"
        assert pread_direct(path, 0) == truth[:4096]
        assert ours(origin, digest) == []

        switch.fault = Status(500) if fault == "500" else Stall(n=10**6, seconds=60)
        third = (len(truth) // 3) & ~4095
        t0 = time.monotonic()
        assert pread_direct(path, third) == truth[third : third + 4096]
        took = time.monotonic() - t0
        assert took < MIRROR_TIMEOUT + 3, took
        assert ours(origin, digest), "the read did not go to the origin"
        asked = len(front.requests(path_re="/blobs/"))
        t0 = time.monotonic()
        assert pread_direct(path, 2 * third) == truth[2 * third : 2 * third + 4096]
        assert time.monotonic() - t0 < 3
        assert len(front.requests(path_re="/blobs/")) == asked  # the mirror was not asked
