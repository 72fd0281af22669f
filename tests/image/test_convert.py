"""`stargz.image.convert`: a whole OCI image converted layer by layer.

Ground truth is the source image itself: each converted layer must hold exactly the files
of the layer it came from (read back with our reader and with the Go reference reader),
and the new config's diff_ids must be the digests of the converted layers' tar streams.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import shutil
import subprocess
from pathlib import Path

import pytest
import zstandard

from stargz.errors import InvalidArgument, NotFound
from stargz.estargz import open_file
from stargz.image.convert import ConvertOptions, convert
from stargz.image.layout import Layout

TOC = "containerd.io/snapshot/stargz/toc.digest"
USIZE = "io.containers.estargz.uncompressed-size"


def _uncompressed(path, media_type: str) -> bytes:
    data = Path(path).read_bytes()
    if media_type.endswith("+zstd"):
        frames = zstandard.ZstdDecompressor().stream_reader(
            io.BytesIO(data), read_across_frames=True
        )
        return frames.read()
    if media_type.endswith("gzip"):
        return gzip.decompress(data)
    return data


@pytest.fixture(scope="module")
def converted(tmp_path_factory, corners):
    """oci-corners:orig converted to eStargz (64 KiB chunks) and to zstd:chunked."""
    out = tmp_path_factory.mktemp("converted")
    src = f"oci:{corners.root}:orig"
    esgz, _ = convert(src, f"oci:{out}:esgz", ConvertOptions(chunk_size=65536))
    zst, stats = convert(src, f"oci:{out}:zstd", ConvertOptions(compression="zstd"))
    return out, {"esgz": esgz, "zstd": zst}, stats


@pytest.mark.parametrize("tag", ["esgz", "zstd"])
def test_every_layer_holds_the_files_of_its_source(converted, corners, trees, tag):
    out, descs, _ = converted
    lay = Layout(str(out))
    man = lay.read_json(descs[tag]["digest"])
    config = lay.read_json(man["config"]["digest"])
    src_layers = corners.layers("orig")
    assert len(man["layers"]) == len(src_layers) == len(config["rootfs"]["diff_ids"])
    for new, old, diff_id in zip(
        man["layers"], src_layers, config["rootfs"]["diff_ids"], strict=True
    ):
        want_type = "tar+zstd" if tag == "zstd" else "tar+gzip"
        assert new["mediaType"] == f"application/vnd.oci.image.layer.v1.{want_type}"
        ann = new["annotations"]
        raw = _uncompressed(lay.blob_path(new["digest"]), new["mediaType"])
        assert diff_id == "sha256:" + hashlib.sha256(raw).hexdigest()
        assert int(ann[USIZE]) == len(raw)
        if tag == "zstd":
            assert {
                "io.containers.zstd-chunked.manifest-checksum",
                "io.containers.zstd-chunked.manifest-position",
            } <= set(ann)
        reader = open_file(lay.blob_path(new["digest"]), toc_digest=ann[TOC])
        want = trees.tar(_uncompressed(old.path, old.media_type))
        trees.compare(trees.reader(reader), want)


def test_the_go_reader_verifies_every_converted_layer(converted, esgz_verify):
    out, descs, _ = converted
    lay = Layout(str(out))
    for tag in ("esgz", "zstd"):
        for layer in lay.read_json(descs[tag]["digest"])["layers"]:
            proc = subprocess.run(
                [str(esgz_verify), lay.blob_path(layer["digest"]), layer["annotations"][TOC]],
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert proc.returncode == 0, (tag, proc.stderr[-2000:])


def test_stats_and_tags(converted, corners):
    out, descs, stats = converted
    assert [s.src_digest for s in stats] == [x.digest for x in corners.layers("orig")]
    assert all(s.dst_size > 0 and s.uncompressed_size > 0 for s in stats)
    lay = Layout(str(out))
    assert lay.resolve("esgz")["digest"] == descs["esgz"]["digest"]
    assert lay.resolve("zstd")["digest"] == descs["zstd"]["digest"]


def test_an_already_converted_image_converts_to_the_same_files(tmp_path, busybox, trees):
    """Converting Go's eStargz output again gives a layer with the same files."""
    out = tmp_path / "again"
    desc, _ = convert(f"oci:{busybox.root}:esgz", f"oci:{out}:esgz2", ConvertOptions())
    lay = Layout(str(out))
    (new,) = lay.read_json(desc["digest"])["layers"]
    (old,) = busybox.layers("esgz")
    got = trees.reader(open_file(lay.blob_path(new["digest"]), toc_digest=new["annotations"][TOC]))
    want = trees.reader(open_file(str(old.path), toc_digest=old.toc_digest))
    trees.compare(got, want)


def test_bad_input_is_a_clear_error(tmp_path, busybox):
    with pytest.raises(NotFound, match="tag 'nope'"):
        convert(f"oci:{busybox.root}:nope", f"oci:{tmp_path}/o:x", ConvertOptions())
    src = tmp_path / "src"
    shutil.copytree(busybox.root, src)
    lay = Layout(str(src))
    man_desc = lay.resolve("1")
    man = lay.read_json(man_desc["digest"])
    man["layers"][0] = {**man["layers"][0], "mediaType": "application/x-unknown"}
    digest, size = lay.put_json(man)
    lay.tag({**man_desc, "digest": digest, "size": size}, "bad")
    with pytest.raises(InvalidArgument, match="unsupported media type 'application/x-unknown'"):
        convert(f"oci:{src}:bad", f"oci:{tmp_path}/o:x", ConvertOptions())
    # the destination tag is not written when a conversion fails
    assert "x" not in [
        d.get("annotations", {}).get("org.opencontainers.image.ref.name")
        for d in Layout(str(tmp_path / "o")).index()["manifests"]
    ]
