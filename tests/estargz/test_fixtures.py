"""Our reader on every layer the Go tools wrote yields exactly the files of the original.

For each converted tag of the reference images (gzip eStargz with 4 MiB and 64 KiB chunks,
zstd:chunked, busybox plain and optimized) every layer is opened with the toc.digest
annotation of its manifest and listed through the Reader (content read back through
``Reader.read``); the listing must equal what Python's tarfile unpacks from the same layer
of the unconverted tag: paths, types, permission bits, owners, mtimes, sizes, sha256,
symlink targets, hardlink groups, device numbers and xattrs.

Every test runs over both backends of the native core (codec + TOC index): the native
Cython modules and their pure-Python twins.
"""

from __future__ import annotations

import functools
import hashlib
import os

import pytest

from stargz.estargz import open_file

# (layout, converted tag, layer count, original tag)
CONVERTED = {
    "oci-corners": (("esgz", "esgz-64k", "zstdchunked"), 2, "orig"),
    "oci-busybox": (("esgz", "opt"), 1, "1"),
}
WINDOW = (1 << 20) + 4097
CASES = [
    (layout, tag, i) for layout, (tags, n, _) in CONVERTED.items() for tag in tags for i in range(n)
]


# STARGZ_NO_EXTENSIONS=1 (CI's second run) leaves only the twins to test
NO_EXTENSIONS = os.environ.get("STARGZ_NO_EXTENSIONS") == "1"
BACKENDS = ["python"] if NO_EXTENSIONS else ["native", "python"]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch, swap_backend):
    return swap_backend(monkeypatch, request.param)


@functools.cache
def _orig_tree(trees, path):
    return trees.tar(path)


def _open(layer, **kw):
    assert layer.toc_digest, f"{layer.id} has no toc.digest annotation"
    return open_file(str(layer.path), toc_digest=layer.toc_digest, **kw)


def test_every_tag_is_covered(oci_layout):
    for name, (tags, n, orig) in CONVERTED.items():
        layout = oci_layout(name)
        assert sorted(layout.tags) == sorted([*tags, orig])
        for tag in [*tags, orig]:
            assert len(layout.layers(tag)) == n, (name, tag)


@pytest.mark.parametrize(
    ("layout", "tag", "index"), CASES, ids=[f"{a}:{b}:{c}" for a, b, c in CASES]
)
def test_reader_matches_original_layer(oci_layout, trees, backend, layout, tag, index):
    oci = oci_layout(layout)
    layer = oci.layers(tag)[index]
    orig = oci.layers(CONVERTED[layout][2])[index]
    want = _orig_tree(trees, orig.path)
    with _open(layer) as r:
        assert isinstance(r.chunks, backend.ChunkTable), "backend swap did not take"
        assert isinstance(r.names, backend.NameTable), "backend swap did not take"
        assert r.compression == ("zstd" if tag == "zstdchunked" else "gzip")
        assert r.toc_digest == layer.toc_digest
        trees.compare(trees.reader(r), want)
        # big files again, in odd windows that straddle chunk boundaries
        for path, rec in want.items():
            if rec.get("size", 0) < 100_000:
                continue
            node = r.lookup(path)
            h = hashlib.sha256()
            for off in range(0, rec["size"], WINDOW):
                h.update(r.read(node.id, off, WINDOW))
            assert h.hexdigest() == rec["sha256"], path


@pytest.mark.parametrize(
    ("layout", "tag", "index"), CASES, ids=[f"{a}:{b}:{c}" for a, b, c in CASES]
)
def test_lookup_child_and_links(oci_layout, backend, layout, tag, index):
    """lookup/child (the native name index) agree with walk; nlink counts every name."""
    layer = oci_layout(layout).layers(tag)[index]
    with _open(layer) as r:
        names_per_node: dict[int, int] = {}
        for path, node in r.walk():
            assert r.lookup(path) is node
            if path:
                parent, _, base = path.rpartition("/")
                assert r.child(r.lookup(parent).id, base) == node.id, path
                assert r.child(r.lookup(parent).id, base + "\x00nope") == -1
            if node.type != "dir":
                names_per_node[node.id] = names_per_node.get(node.id, 0) + 1
        for nid, count in names_per_node.items():
            assert r.nodes[nid].nlink == count, r.nodes[nid].path
        with pytest.raises(KeyError):
            r.lookup("no/such/file")


def test_hardlinks_share_a_node(corners):
    for tag in ("esgz", "esgz-64k", "zstdchunked"):
        with _open(corners.layers(tag)[0]) as r:
            text = r.lookup("data/text.txt")
            assert r.lookup("data/hardlink-to-text") is text
            assert r.lookup("data/hardlink-2") is text
            assert text.nlink == 3
            dev = r.lookup("data/chardev")
            assert (dev.type, dev.entry.dev_major, dev.entry.dev_minor) == ("char", 1, 3)
            assert r.lookup("data/xattr-file").entry.xattrs == {
                "user.purpose": b"testing",
                "user.empty": b"",
            }


def test_prefetch_landmarks(corners, busybox):
    with _open(busybox.layers("opt")[0]) as r:
        assert r.landmark == ".prefetch.landmark"
        assert r.prefetch_size is not None and r.prefetch_size > 0
        lm = r.lookup(".prefetch.landmark")
        assert r.read(lm.id, 0, 10) == b"\x0f"
        # the workload's files were put before the landmark
        for path in ("etc/greeting", "bin/busybox"):
            assert r.lookup(path).entry.offset < r.prefetch_size, path
    with _open(busybox.layers("esgz")[0]) as r:
        assert r.landmark == ".no.prefetch.landmark"
        assert r.prefetch_size == 0
    for tag in ("esgz", "esgz-64k", "zstdchunked"):
        for layer in corners.layers(tag):
            with _open(layer) as r:
                assert r.landmark == ".no.prefetch.landmark", layer.id
                assert r.prefetch_size == 0
                lm = r.lookup(".no.prefetch.landmark")
                assert r.read(lm.id, 0, 1) == b"\x0f"


def test_zstd_chunked_annotations_match_footer(corners):
    for layer in corners.layers("zstdchunked"):
        pos = layer.annotations["io.containers.zstd-chunked.manifest-position"]
        with _open(layer) as r:
            f = r.footer
            assert f.kind == "zstd"
            assert pos == f"{f.toc_offset}:{f.toc_size}:{f.toc_uncompressed_size}:1"


def test_64k_chunks_are_many(corners):
    """The 64 KiB tag really splits big files, so chunk lookups are exercised."""
    with _open(corners.layers("esgz-64k")[0]) as r:
        node = r.lookup("data/noise.bin")
        rows = r.chunk_rows(node.id, 0, node.entry.size)
        assert len(rows) == -(-node.entry.size // 65536)
        # a read straddling one boundary touches exactly two chunks
        assert len(r.chunk_rows(node.id, 65536 - 10, 20)) == 2
        assert r.read(node.id, 65536 - 10, 20) == r.read(node.id, 0, 65546)[-20:]
