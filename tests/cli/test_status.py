"""``stargz status`` output on constructed answers (no daemon): the JSON document's shape
and the text table's one-line-per-layer rule. The real daemon's answers are checked in
tests/service/test_status.py."""

from __future__ import annotations

from stargz.cli.status import render_text, status_dict
from stargz.service.proto.stargz.v1 import status_pb2 as pb

A = "sha256:" + "a1" * 32
B = "sha256:" + "b2" * 32
C = "sha256:" + "c3" * 32


def answer() -> pb.GetStatusResponse:
    return pb.GetStatusResponse(
        daemon=pb.DaemonStatus(
            version="9.9", pid=42, root="/r", lazy=True, uptime_seconds=3725.5,
            fallbacks={"NoTOCDigest": 1},
        ),
        layers=[
            pb.LayerStatus(
                digest=A, ref="reg/app:1", repository="reg/app",
                snapshots=[pb.SnapshotMount(name="sha256:x", mountpoint="/r/snapshots/1/fs")],
                size=3 << 20, fetched_size=1 << 20, fetched_percent=100 / 3,
                cache_hits=7, cache_misses=3, verification_failures=1, read_errors=2,
                last_error=f"read of a/b failed: fetching layer {A} failed:\nconnection\nrefused",
                last_error_time=1000.0, prefetch_done=True,
            ),
            pb.LayerStatus(digest=B, ref="reg/app:1", size=10, fetched_size=10,
                           fetched_percent=100.0, prefetch_done=False),
        ],
        refused=[
            pb.RefusedLayer(
                digest=C, ref="reg/plain:1", snapshot="sha256:y", key="k sha256:y",
                reason="no-toc-digest", reason_text="not eStargz, or unverifiable",
                error="digest of TOC JSON\nmust be passed", time=999.0, count=2,
            )
        ],
    )  # fmt: skip


def test_default_address_is_the_daemons():
    from stargz.cli import daemon, status

    assert status.DEFAULT_ADDRESS == daemon.DEFAULT_ADDRESS


def test_json_document_keeps_full_digests_and_plain_numbers():
    doc = status_dict(answer())
    assert doc["daemon"] == {
        "version": "9.9",
        "pid": 42,
        "root": "/r",
        "lazy": True,
        "uptime_seconds": 3725.5,
        "fallbacks": {"NoTOCDigest": 1},
    }
    a, b = doc["layers"]
    assert a["digest"] == A and a["size"] == 3 << 20 and isinstance(a["size"], int)
    assert a["fetched_percent"] == 33.33
    assert a["snapshots"] == [{"name": "sha256:x", "mountpoint": "/r/snapshots/1/fs"}]
    assert (a["cache_hits"], a["cache_misses"], a["verification_failures"]) == (7, 3, 1)
    assert b["last_error"] is None and b["last_error_time"] is None
    (r,) = doc["refused"]
    assert (r["digest"], r["reason"], r["count"], r["snapshot"]) == (
        C,
        "no-toc-digest",
        2,
        "sha256:y",
    )


def test_text_has_one_line_per_layer_even_with_multiline_errors():
    out = render_text(status_dict(answer()), now=1065.0)
    lines = out.splitlines()
    assert len(lines) == 2 + 3, out
    assert lines[0].startswith("containerd-stargz-grpc 9.9, pid 42, up 1h02m, lazy pulling on")
    assert lines[1].split() == [
        "LAYER", "REF", "SNAPSHOTS", "SIZE", "FETCHED", "HITS", "MISSES", "VERIFY-FAIL", "STATE",
    ]  # fmt: skip
    a, b, c = lines[2:]
    assert a.startswith("sha256:a1a1a1a1a1a1 ") and "3.0 MiB" in a and "33.3%" in a
    assert (
        "last error 1m05s ago: read of a/b failed: fetching the layer failed: connection refused"
        in a
    )
    assert A not in a  # (the row names the layer already)
    assert b.startswith("sha256:b2b2b2b2b2b2 ") and b.endswith("lazy, prefetching")
    assert c.startswith("sha256:c3c3c3c3c3c3 ")
    assert c.endswith("unpacked: not eStargz, or unverifiable (digest of TOC JSON must be passed)")
    # the columns line up: every row's REF starts where the header's does
    col = lines[1].index("REF")
    assert all(line[col:].startswith("reg/") for line in lines[2:])
