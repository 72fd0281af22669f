"""Hostile TOCs (`tests/estargz/hostile.py`) get their typed error, the same from both
TOC builders and through a whole blob, in bounded memory."""

from __future__ import annotations

import json
import re
import tracemalloc

import pytest
from conftest import backend_of

from stargz.estargz import tocbuild
from stargz.estargz.node import same

from .hostile import ACCEPTED, BLOB_SEEDS, SEEDS, BlobSeed, Seed, gzip_blob, toc_json, zstd_blob
from .test_bad_input import Parts, make_blob, open_blob

pytestmark = pytest.mark.timeout(120)

KW = {"payload_end": 1 << 40, "verify": True, "max_chunk_size": 1 << 20}


def _outcome(build, data: bytes, seed: Seed):
    try:
        return None, build(data, **KW, **seed.limits)
    except Exception as e:  # noqa: BLE001 - the exception is the result
        return (type(e), str(e)), None


@pytest.fixture(params=["python", "native"])
def builder(request):
    return backend_of(tocbuild, request.param)


@pytest.mark.parametrize("seed", SEEDS, ids=lambda s: s.name)
def test_seed_is_refused_by_both_builders(builder, seed: Seed) -> None:
    data = toc_json(seed.entries)
    tracemalloc.start()
    try:
        err, _ = _outcome(builder.build_json, data, seed)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert err is not None, f"{seed.name}: opened"
    kind, message = err
    assert kind is seed.error and re.search(seed.match, message), message
    # the reference's error, word for word, from the bytes and from the parsed entries
    assert _outcome(tocbuild.python.build_json, data, seed)[0] == err
    entries = json.loads(data)["entries"]
    try:
        builder.build(entries, **KW, **seed.limits)
    except Exception as e:  # noqa: BLE001
        assert (type(e), str(e)) == err
    else:
        pytest.fail("build() opened what build_json() refuses")
    assert peak < (100 << 20) + 40 * len(data), f"{seed.name}: {peak} bytes at the peak"


@pytest.mark.parametrize("seed", ACCEPTED, ids=lambda s: s.name)
def test_just_inside_the_limits_opens_the_same(builder, seed: Seed) -> None:
    data = toc_json(seed.entries)
    err, got = _outcome(builder.build_json, data, seed)
    assert err is None, err
    want = tocbuild.python.build_json(data, **KW, **seed.limits)
    assert same(got, want) == []
    leaf = got.nodes[-1]
    assert leaf.path == seed.entries[-1]["name"]


@pytest.fixture(scope="module")
def good_parts() -> dict[str, Parts]:
    return {c: Parts(make_blob(compression=c)) for c in ("gzip", "zstd")}


@pytest.mark.parametrize("seed", [s for s in SEEDS if not s.limits], ids=lambda s: s.name)
@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_seed_in_a_blob_is_refused(good_parts, compression: str, seed: Seed) -> None:
    """Through the reader (both the daemon's and the CLI's way), with its default limits."""
    blob = good_parts[compression].assemble(toc_json(seed.entries))
    with pytest.raises(seed.error, match=seed.match):
        open_blob(blob)


def test_deep_tree_keeps_memory_linear_in_its_depth(builder) -> None:
    """With the depth limit lifted, 8000 implied directories cost their names, not their
    paths: 67 MB kept when every node held its whole path, ~3 MB now."""
    data = toc_json(SEEDS[0].entries)
    tracemalloc.start()
    try:
        built = builder.build_json(data, **KW, max_depth=8001)
        built.by_path = {}  # (the reader does not keep it)
        built.dirent_parent = built.dirent_name = built.dirent_target = None
        kept = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert len(built.nodes) == 8002
    assert built.nodes[-1].path == SEEDS[0].entries[0]["name"]
    assert kept < 8 << 20, kept


@pytest.mark.parametrize("seed", BLOB_SEEDS, ids=lambda s: s.name)
def test_junk_after_the_toc_is_refused(good_parts, seed: BlobSeed) -> None:
    parts = good_parts[seed.compression]
    blob = seed.make(parts.payload, parts.toc_json)
    with pytest.raises(seed.error, match=seed.match):
        open_blob(blob)


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_blob_makers_without_junk_open(good_parts, compression: str) -> None:
    """The seeds' framing, without junk, is what the reader (and Go) accept."""
    parts = good_parts[compression]
    make = gzip_blob if compression == "gzip" else zstd_blob
    r = open_blob(make(parts.payload, parts.toc_json))
    assert r.read(r.lookup("dir/small").id, 0, 100) == b"hello, world\n"


@pytest.mark.parametrize("checksum", [True, False])
@pytest.mark.parametrize("level", [1, 19])
def test_zstd_frame_size_walks_every_block_kind(checksum: bool, level: int) -> None:
    """Raw, RLE and compressed blocks, many of them, with and without the checksum and
    content size: the frame's length is found without decompressing it."""
    import os

    import zstandard

    from stargz.estargz.reader import _zstd_frame_size

    data = b"a" * 300_000 + os.urandom(200_000) + b'{"x": "' + b"b" * 200_000 + b'"}'
    c = zstandard.ZstdCompressor(
        level=level, write_checksum=checksum, write_content_size=checksum
    ).compress(data)
    assert _zstd_frame_size(c) == len(c)
    assert _zstd_frame_size(c + b"junk") == len(c)
