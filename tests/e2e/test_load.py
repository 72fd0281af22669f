"""Bounded under load: containers reading lazily pulled images at once, while the disk
cache, far smaller than the images, evicts under their reads.

Real containerd 1.6 + runc, a real docker-registry, ``ctr-remote i rpull`` and our daemon
with background fetch on (the default). The long version, with its figures, is
``benchmarks/bench_load.py``; the machinery is :mod:`harness.load`.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import Containerd, Registry, StargzDaemon, free_port, make_tempdir
from harness.load import (
    LoadRun,
    check,
    component_from_files,
    component_from_layout,
    compose,
    daemon_config,
    dump,
    files_of,
    pick,
    rpull,
)

pytestmark = [pytest.mark.e2e, pytest.mark.interop, pytest.mark.timeout(240)]

#: The disk cache bound: under a third of the two images' distinct bytes (~17 MB), above
#: the converter's 4 MiB chunk (a single chunk bigger than the bound is kept on its own).
BOUND = 6 << 20
STDLIB = "/usr/lib/python3.11"
#: Daemon RSS bound (measured peak: 87-104 MB; ~65 MB after rpull, a 4 MiB memory cache,
#: up to 16 MiB of decoded chunks per fetch in flight).
RSS_BOUND = 200 << 20


@pytest.fixture
def work(e2e_host: None) -> Iterator[Path]:
    d = make_tempdir("sgz-load-")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_four_containers_two_images_stay_within_the_cache_bound(
    registry: Registry, shared: Path, work: Path
) -> None:
    """4 containers (2 per image) start at once and for 15 s hash their image's files in
    random order against the ground truth (the original tar layers), with the page cache of
    the layer files dropped every 2 s so reads keep reaching the daemon. Images: busybox +
    the corners fixture (3 layers), busybox + two layers of this machine's Python stdlib;
    every layer converted by our converter; the disk cache bound (6 MiB) is a third of
    their distinct bytes, the memory cache 4 MiB.

    Every container finishes its loop (no read hangs), no read fails, no byte is wrong,
    the cache's files (their lengths and their blocks on disk, sampled every 0.5 s) and
    the daemon's own count never pass
    the bound, ``stargz_fs_disk_cache_evictions_total`` grows during the run, and the
    daemon's RSS stays under 200 MiB."""
    fixtures = shared / "fixtures"
    busybox = component_from_layout(work, "busybox", fixtures / "oci-busybox", "1")
    corners = component_from_layout(work, "corners", fixtures / "oci-corners", "orig")
    py1 = component_from_files(work, "py-json", files_of([f"{STDLIB}/json"], STDLIB))
    py2 = component_from_files(work, "py-email", files_of([f"{STDLIB}/email"], STDLIB))
    images = [
        compose(work, "corners", [busybox, corners]),
        compose(work, "py", [busybox, py1, py2]),
    ]
    metrics = f"127.0.0.1:{free_port()}"
    with contextlib.ExitStack() as stack:
        sd = StargzDaemon.start(
            config_text=daemon_config(metrics, BOUND, 4 << 20), log_level="info"
        )
        stack.callback(sd.close)
        c = Containerd.start(sd.address)
        stack.callback(c.close)
        for img in images:
            img.ref = registry.push_oci(img.layout, img.tag, f"load-{img.name}:1")
            rpull(c, img.ref)
        distinct = {d["digest"]: d for img in images for d in img.layers}
        assert len(distinct) == 5
        assert BOUND < 0.4 * sum(size for img in images for _, size in img.files.values()), (
            "the bound must be well under what the containers read"
        )
        lr = LoadRun(c, sd, metrics, work, duration=15, grace=60)
        report = lr.run(pick(images, 4))
        problems = check(report, BOUND)
        if report["rss_peak"] > RSS_BOUND:
            problems.append(f"daemon RSS peak {report['rss_peak']} B > {RSS_BOUND} B")
        assert not problems, f"{problems}\n{dump(report)}\n{sd.log_text()[-3000:]}"
        assert sd.alive()
        assert all(c["passes"] >= 1 and c["ok"] > 0 for c in report["containers"])
