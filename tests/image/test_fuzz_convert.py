"""Fuzz: whole-image conversion (`stargz.image.convert`) of layouts with mutated layers.

Each example writes an OCI layout whose one or two layers are mutated tars from
`tests/estargz/test_fuzz_writer.py` (plain, gzip or zstd, maybe a broken stream, under
a media type that may not match). Converting it returns or raises a `StargzError`. A
failed conversion leaves no destination tag and no temporary blob; a finished one wrote
layers our reader opens with their TOC digest annotation, each with the files of its
source (where tarfile reads the source), blob digests and sizes that match the files,
and ``diff_ids`` that are the digests of the uncompressed layers.
"""

from __future__ import annotations

import hashlib
import os
import tempfile

import pytest
import zstandard
from conftest import compare_trees, reader_tree
from estargz.test_fuzz_writer import input_tree, inputs
from fuzzing import fuzz_settings, fuzz_timeout
from hypothesis import event, given
from hypothesis import strategies as st

from stargz.errors import StargzError
from stargz.estargz import Reader
from stargz.image.convert import ConvertOptions, convert
from stargz.image.layout import MT_OCI_CONFIG, MT_OCI_MANIFEST, REF_NAME, Layout

pytestmark = [pytest.mark.fuzz, fuzz_timeout(120)]

TOC = "containerd.io/snapshot/stargz/toc.digest"
MEDIA = {
    "plain": "application/vnd.oci.image.layer.v1.tar",
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
}
SCRATCH = "/dev/shm" if os.path.isdir("/dev/shm") else None


def _put(lay: Layout, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    tmp = lay.new_blob()
    tmp.write(data)
    lay.commit_blob(tmp, digest)
    return digest


def _source(root: str, layers: list[tuple[bytes, str]]) -> None:
    lay = Layout(root, create=True)
    descs = [{"mediaType": mt, "digest": _put(lay, data), "size": len(data)} for data, mt in layers]
    cdigest, csize = lay.put_json({"architecture": "amd64", "os": "linux", "rootfs": {}})
    man = {
        "schemaVersion": 2,
        "mediaType": MT_OCI_MANIFEST,
        "config": {"mediaType": MT_OCI_CONFIG, "digest": cdigest, "size": csize},
        "layers": descs,
    }
    digest, size = lay.put_json(man)
    lay.tag({"mediaType": MT_OCI_MANIFEST, "digest": digest, "size": size}, "src")


def _uncompressed(blob: bytes) -> bytes:
    if blob[:4] == b"\x28\xb5\x2f\xfd":
        return zstandard.ZstdDecompressor().stream_reader(blob, read_across_frames=True).read()
    import gzip

    return gzip.decompress(blob)


@st.composite
def layer(draw) -> tuple[tuple, str]:
    case = draw(inputs())
    data = case[2]
    kind = {b"\x1f\x8b": "gzip", b"\x28\xb5": "zstd"}.get(data[:2], "plain")
    if draw(st.integers(0, 7)) == 0:
        kind = draw(st.sampled_from(sorted(MEDIA)))  # a media type that may not match
    return case, MEDIA[kind]


@fuzz_settings(300, deadline_s=20)
@given(
    layers=st.lists(layer(), min_size=1, max_size=2),
    compression=st.sampled_from(["gzip", "zstd"]),
    chunk=st.sampled_from([64, 4096]),
)
def test_mutated_layers_convert_or_fail_cleanly(layers, compression, chunk) -> None:
    with tempfile.TemporaryDirectory(dir=SCRATCH) as d:
        src, dst = os.path.join(d, "src"), os.path.join(d, "dst")
        _source(src, [(case[2], mt) for case, mt in layers])
        opts = ConvertOptions(compression=compression, chunk_size=chunk, workers=2)
        try:
            desc, _stats = convert(f"oci:{src}:src", f"oci:{dst}:out", opts)
        except StargzError as e:
            event(f"refused: {type(e).__name__}")
            out = Layout(dst)
            tags = [(m.get("annotations") or {}).get(REF_NAME) for m in out.index()["manifests"]]
            assert "out" not in tags
            left = [n for n in os.listdir(os.path.join(dst, "blobs", "sha256")) if "tmp" in n]
            assert left == [], f"temporary blobs left behind: {left}"
            return
        out = Layout(dst)
        man = out.read_json(desc["digest"])
        config = out.read_json(man["config"]["digest"])
        assert len(man["layers"]) == len(layers)
        for (case, _), new, diff_id in zip(
            layers, man["layers"], config["rootfs"]["diff_ids"], strict=True
        ):
            with out.open_blob(new["digest"]) as f:
                blob = f.read()
            assert len(blob) == new["size"]
            assert "sha256:" + hashlib.sha256(blob).hexdigest() == new["digest"]
            assert "sha256:" + hashlib.sha256(_uncompressed(blob)).hexdigest() == diff_id
            try:
                r = Reader(
                    lambda off, n, b=blob: b[off : off + n],
                    len(blob),
                    toc_digest=new["annotations"][TOC],
                )
            except StargzError as e:
                pytest.fail(f"converted a layer our reader refuses: {e}")
            back = reader_tree(r)
            plain = case[1]
            assert plain is not None, "converted a layer whose compressed stream is broken"
            want = input_tree(plain)
            if want is not None:
                compare_trees(back, want)
        event("converted")
