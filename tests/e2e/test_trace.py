"""The daemon's production trace (``[trace] enable``): a container run under the daemon
(real containerd, ``ctr-remote i rpull``, ``ctr run``) has the files it opened recorded per
image and layer; ``stargz trace ls/show`` list them; ``stargz optimize --from-trace``
re-orders the image from the trace alone, with those files in each layer's prefetch range.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from harness.oci import stack_images
from harness.procs import REPO

from .test_lazy import NO_BACKGROUND, assert_lazily_mounted, convert, ctr_run, layers_of, rpull
from .test_optimize import WORKLOAD, blob_file, prefetch_list

pytestmark = [pytest.mark.e2e, pytest.mark.interop, pytest.mark.timeout(300)]

CONFIG = NO_BACKGROUND + "[fuse]\npassthrough = false\n[trace]\nenable = true\nwindow_sec = 10\n"


def stargz(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stargz.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, PYTHONPATH=str(REPO / "src")),
    )


def test_a_traced_container_reorders_the_image(logged_registry, lazy_stack, shared, tmp_path):
    fixtures = shared / "fixtures"
    layout = stack_images(
        tmp_path / "stack",
        "1",
        [(fixtures / "oci-busybox", "1"), (fixtures / "oci-corners", "orig")],
    )
    convert(layout, "1", "esgz")  # eStargz, nothing prioritized (.no.prefetch.landmark)
    layers = layers_of(layout, "esgz")
    assert [prefetch_list(blob_file(layout, d)) for d in layers] == [None, None, None]

    sd, c = lazy_stack(CONFIG)
    ref = logged_registry.push_oci(layout, "esgz", "stack:esgz")
    rpull(c, ref)
    assert_lazily_mounted(sd, c, layers)
    ctr_run(c, ref, "traced", "sh", "-c", WORKLOAD)

    # the trace is written when the window ends (10 s after the mounts)
    deadline = time.monotonic() + 60
    while True:
        ls = stargz("trace", "ls", "--root", sd.root, "--json")
        rows = json.loads(ls.stdout) if ls.returncode == 0 else []
        if rows or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert [(r["ref"], r["layers"], r["files"]) for r in rows] == [(ref, 2, 3)], ls.stderr
    trace_file = Path(rows[0]["file"])
    assert stat.S_IMODE(trace_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(trace_file.parent.stat().st_mode) == 0o700

    show = stargz("trace", "show", "--root", sd.root, "--json", ref)
    assert show.returncode == 0, show.stderr
    entries = [json.loads(x) for x in show.stdout.splitlines()]
    digests = [d["digest"] for d in layers]
    assert [(e["path"], digests.index(e["layerDigest"])) for e in entries] == [
        ("bin/busybox", 0),
        ("etc/greeting", 1),
        ("data/xattr-file", 1),
    ]
    text = stargz("trace", "show", "--root", sd.root, ref)
    assert text.returncode == 0 and "    etc/greeting" in text.stdout.splitlines(), text

    p = stargz(
        "optimize",
        "--from-trace",
        sd.root,
        "--record-out",
        str(tmp_path / "rec.json"),
        f"oci:{layout}:esgz",
        f"oci:{layout}:from-trace",
    )
    assert p.returncode == 0, p.stderr
    got = [prefetch_list(blob_file(layout, d)) for d in layers_of(layout, "from-trace")]
    print("prefetch lists from the trace:", got)
    assert got == [["bin/busybox"], ["etc/greeting", "data/xattr-file"], None]
    # the same from the one trace file, with Go's record format out
    p2 = stargz(
        "optimize", "--from-trace", str(trace_file), f"oci:{layout}:esgz", f"oci:{layout}:ft2"
    )
    assert p2.returncode == 0, p2.stderr
    assert layers_of(layout, "ft2") == layers_of(layout, "from-trace")
    rec = [json.loads(x) for x in (tmp_path / "rec.json").read_text().splitlines()]
    assert [(e["path"], e["layerIndex"]) for e in rec] == [
        ("bin/busybox", 0),
        ("etc/greeting", 1),
        ("data/xattr-file", 1),
    ]


def test_from_trace_errors_are_one_line(tmp_path, shared):
    missing = stargz(
        "optimize",
        "--from-trace",
        str(tmp_path / "nope"),
        f"oci:{shared / 'fixtures' / 'oci-busybox'}:1",
        f"oci:{tmp_path / 'out'}:x",
    )
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines() == [
        f"stargz: error: no trace at {str(tmp_path / 'nope')!r}"
    ]
    ls = stargz("trace", "ls", "--root", str(tmp_path))
    assert ls.returncode == 1 and len(ls.stderr.strip().splitlines()) == 1
    assert "no traces under" in ls.stderr
