"""What our writer produces, the Go implementation reads; and it stays an ordinary tar.gz.

Every ``orig`` layer of the reference images is converted by `stargz.estargz.build` in
several variants (gzip and zstd:chunked, 4 MiB and 64 KiB chunks, with and without
prioritized files). Each blob must:

* pass the Go reference reader (``esgz-verify``, built from Debian's stargz-snapshotter
  sources): TOC verified against the digest we return for the annotation, every chunk
  against its chunkDigest, and its listing equal to the input tar's entries;
* decompress with plain gzip / zstd into a tar holding the input's files plus the
  landmark (and, for gzip, ``stargz.index.json`` whose content hashes to the TOC digest),
  with ``diff_id`` = sha256 of that stream and the uncompressed-size annotation = its length;
* read back through our own Reader as the same tree.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import subprocess
import tarfile
from pathlib import Path

import pytest
import zstandard

from stargz.estargz import build, open_file

LANDMARK_SHA256 = "dc0e9c3658a1a3ed1ec94274d8b19925c93e1abb7ddba294923ad9bde30f8cb8"
TOC_DIGEST = "containerd.io/snapshot/stargz/toc.digest"
UNCOMPRESSED = "io.containers.estargz.uncompressed-size"
ZSTD_CHECKSUM = "io.containers.zstd-chunked.manifest-checksum"
ZSTD_POSITION = "io.containers.zstd-chunked.manifest-position"

# (layout, tag, layer index) of every unconverted layer
ORIG = [("oci-corners", "orig", 0), ("oci-corners", "orig", 1), ("oci-busybox", "1", 0)]
PRIORITIZED = {
    # a hardlink (its target must come along), a deep file with implicit parents, a big file
    ("oci-corners", 0): [
        "etc/greeting",
        "data/hardlink-2",
        "data/deep/a/b/c/d/e/f/leaf",
        "data/noise.bin",
    ],
    ("oci-corners", 1): ["opaque/new", "etc/added"],
    ("oci-busybox", 0): ["etc/greeting", "bin/busybox", "bin/sh"],
}
# name -> build() keyword arguments
VARIANTS = {
    "gzip": {"compression": "gzip"},
    "gzip-64k": {"compression": "gzip", "chunk_size": 65536, "level": 6},
    # level 0 stores (Go's NoCompression); 2-9 are libdeflate's, 1 ISA-L's
    "gzip-stored": {"compression": "gzip", "level": 0},
    "gzip-9": {"compression": "gzip", "chunk_size": 65536, "level": 9},
    "zstd": {"compression": "zstd"},
    "zstd-64k": {"compression": "zstd", "chunk_size": 65536, "level": 9},
    "gzip-prio": {"compression": "gzip", "chunk_size": 1 << 20, "level": 1, "prio": True},
    "zstd-prio": {"compression": "zstd", "chunk_size": 65536, "prio": True},
}
CASES = [(o, v) for o in ORIG for v in VARIANTS]
IDS = [f"{o[0]}:{o[1]}:{o[2]}-{v}" for o, v in CASES]


class Built:
    def __init__(self, src: Path, blob: Path, result, prioritized: list[str]) -> None:
        self.src = src
        self.blob = blob
        self.result = result
        self.prioritized = prioritized


@pytest.fixture(scope="module")
def built(oci_layout, tmp_path_factory):
    """``built(orig, variant)`` -> Built, converting each (layer, variant) once."""
    cache: dict[tuple, Built] = {}
    out_dir = tmp_path_factory.mktemp("interop")

    def get(orig: tuple[str, str, int], variant: str) -> Built:
        key = (orig, variant)
        if key not in cache:
            layout, tag, index = orig
            src = oci_layout(layout).layers(tag)[index].path
            kw = dict(VARIANTS[variant])
            prio = PRIORITIZED[(layout, index)] if kw.pop("prio", False) else []
            blob = out_dir / f"{layout}-{tag}-{index}-{variant}.blob"
            with open(src, "rb") as f, open(blob, "wb") as dst:
                result = build(f, dst, prioritized_files=prio or None, **kw)
            cache[key] = Built(src, blob, result, prio)
        return cache[key]

    return get


def _go_listing(tree: dict[str, dict], landmark: str) -> dict[str, dict]:
    """What esgz-verify prints for a layer whose files are ``tree`` (a tar listing)."""
    out = {
        landmark: {
            "name": landmark,
            "type": "reg",
            "mode": 0,
            "size": 1,
            "sha256": LANDMARK_SHA256,
            "uid": 0,
            "gid": 0,
        }
    }
    for path, rec in tree.items():
        if path == "":
            continue  # the root is not listed
        if rec.get("implicit"):
            out[path] = {"name": path, "type": "dir", "mode": 0o755, "uid": 0, "gid": 0}
            continue
        g = {"name": path, "type": rec["type"], "mode": rec["mode"], "uid": rec["uid"]}
        g["gid"] = rec["gid"]
        if rec["type"] == "reg":
            if rec["size"]:
                g["size"] = rec["size"]
            g["sha256"] = rec["sha256"]
        if rec.get("link"):
            g["link"] = rec["link"]
        out[path] = g
    return out


@pytest.mark.interop
@pytest.mark.timeout(300)
@pytest.mark.parametrize(("orig", "variant"), CASES, ids=IDS)
def test_go_reader_accepts_our_blob(built, trees, esgz_verify, orig, variant):
    b = built(orig, variant)
    proc = subprocess.run(
        [str(esgz_verify), str(b.blob), b.result.toc_digest],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"esgz-verify rejected our blob:\n{proc.stderr}"
    got = {}
    for line in proc.stdout.splitlines():
        rec = json.loads(line)
        got[rec["name"]] = rec
    landmark = ".prefetch.landmark" if b.prioritized else ".no.prefetch.landmark"
    want = _go_listing(trees.tar(b.src), landmark)
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name] == want[name], name


@pytest.mark.interop
@pytest.mark.timeout(120)
def test_go_reader_rejects_a_wrong_digest(built, esgz_verify):
    """The interop check has teeth: a wrong TOC digest makes esgz-verify fail."""
    b = built(ORIG[1], "gzip")
    bad = "sha256:" + hashlib.sha256(b"not the toc").hexdigest()
    proc = subprocess.run(
        [str(esgz_verify), str(b.blob), bad], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode != 0


def _plain_decompress(blob: bytes, compression: str) -> bytes:
    if compression == "gzip":
        return gzip.decompress(blob)
    with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob), read_across_frames=True) as r:
        return r.read()


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("orig", "variant"), CASES, ids=IDS)
def test_blob_is_a_plain_tar_stream(built, trees, orig, variant):
    b = built(orig, variant)
    res = b.result
    blob = b.blob.read_bytes()
    assert res.blob_size == len(blob)
    assert res.blob_digest == "sha256:" + hashlib.sha256(blob).hexdigest()
    assert res.compression == VARIANTS[variant]["compression"]
    assert res.media_type.endswith("+zstd" if res.compression == "zstd" else "+gzip")

    raw = _plain_decompress(blob, res.compression)
    assert res.diff_id == "sha256:" + hashlib.sha256(raw).hexdigest()
    assert res.uncompressed_size == len(raw)
    assert res.annotations[UNCOMPRESSED] == str(len(raw))
    assert res.annotations[TOC_DIGEST] == res.toc_digest

    landmark = ".prefetch.landmark" if b.prioritized else ".no.prefetch.landmark"
    extra = {landmark: hashlib.sha256(b"\x0f").hexdigest()}
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tf:
        names = tf.getnames()
        if res.compression == "gzip":
            assert names[-1] == "stargz.index.json"
            toc = tf.extractfile("stargz.index.json").read()
            assert "sha256:" + hashlib.sha256(toc).hexdigest() == res.toc_digest
            assert json.loads(toc)["version"] == 1
        else:
            assert "stargz.index.json" not in names
        lm = tf.extractfile(landmark).read()
        assert hashlib.sha256(lm).hexdigest() == extra[landmark]
    got = trees.tar(raw)
    got.pop(landmark)
    got.pop("stargz.index.json", None)
    assert got == trees.tar(b.src)

    if res.compression == "zstd":
        off, clen, ulen, kind = (int(x) for x in res.annotations[ZSTD_POSITION].split(":"))
        assert kind == 1
        ctoc = blob[off : off + clen]
        assert res.annotations[ZSTD_CHECKSUM] == "sha256:" + hashlib.sha256(ctoc).hexdigest()
        toc = zstandard.ZstdDecompressor().decompress(ctoc, max_output_size=ulen)
        assert len(toc) == ulen
        assert "sha256:" + hashlib.sha256(toc).hexdigest() == res.toc_digest
    else:
        assert ZSTD_POSITION not in res.annotations


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("orig", "variant"), CASES, ids=IDS)
def test_our_reader_reads_our_blob(built, trees, orig, variant):
    b = built(orig, variant)
    with open_file(str(b.blob), toc_digest=b.result.toc_digest) as r:
        trees.compare(trees.reader(r), trees.tar(b.src))
        chunk = VARIANTS[variant].get("chunk_size", 4 << 20)
        for _, node in r.walk():
            if node.type == "reg" and node.entry.size:
                rows = r.chunk_rows(node.id, 0, node.entry.size)
                assert len(rows) == -(-node.entry.size // chunk), node.path
        if b.prioritized:
            assert r.landmark == ".prefetch.landmark"
            assert r.prefetch_size and r.prefetch_size > 0
            for path in b.prioritized:
                node = r.lookup(path)
                if node.entry.size:
                    assert node.entry.offset < r.prefetch_size, path
            early = {r.lookup(p).id for p in b.prioritized} | {r.lookup(r.landmark).id}
            late = [
                n for _, n in r.walk() if n.type == "reg" and n.entry.size and n.id not in early
            ]
            assert all(n.entry.offset > r.prefetch_size for n in late)
        else:
            assert r.landmark == ".no.prefetch.landmark"
            assert r.prefetch_size == 0
        assert b.result.missed_prioritized == []


@pytest.mark.timeout(120)
def test_input_compression_does_not_matter(corners, tmp_path):
    """Plain, gzip and zstd input tars of the same layer give the same TOC and blob."""
    raw = gzip.decompress(corners.layers("orig")[1].path.read_bytes())
    inputs = {
        "tar": raw,
        "gzip": gzip.compress(raw, 1),
        "zstd": zstandard.ZstdCompressor().compress(raw),
    }
    results = {}
    for kind, data in inputs.items():
        out = io.BytesIO()
        res = build(io.BytesIO(data), out, compression="gzip", level=6)
        results[kind] = (res.toc_digest, res.diff_id, out.getvalue())
    assert results["tar"] == results["gzip"] == results["zstd"]
