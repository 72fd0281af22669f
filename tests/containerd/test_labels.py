"""The labels ``stargz rpull`` leaves, against containerd's and ctr-remote's Go code
(``images.ChildGCLabels``, ``FilterInheritedLabels``, ``AppendDefaultLabelsHandlerWrapper``,
``AppendInfoHandlerWrapper``, ``AppendDistributionSourceLabel``, ``remotes.MakeRefKey``)."""

from __future__ import annotations

import json
import re

from harness import shared_dir
from harness.oci import find_manifest

from stargz.containerd import labels as L
from stargz.containerd.identity import chain_ids
from stargz.containerd.unpack import extract_key
from stargz.remote.manifest import Descriptor
from stargz.remote.reference import parse_reference

OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
TOC = "containerd.io/snapshot/stargz/toc.digest"


def digest(n: int) -> str:
    return f"sha256:{n:064x}"


def layer(n: int, **ann: str) -> Descriptor:
    return Descriptor(OCI_LAYER, digest(n), 100 + n, ann)


def test_layer_annotations_are_both_label_sets():
    layers = [layer(1, **{TOC: digest(91)}), layer(2), layer(3)]
    got = L.layer_annotations("reg:5000/app:1", digest(50), layers, 1)
    assert got == {
        L.STARGZ_REFERENCE: "reg:5000/app:1",
        L.STARGZ_DIGEST: digest(2),
        L.STARGZ_LAYERS: f"{digest(2)},{digest(3)}",
        L.URLS_PREFIX + "0": "",
        L.URLS_PREFIX + "1": "",
        L.STARGZ_PREFETCH: "10485760",
        L.URLS: "",
        L.CRI_IMAGE_REF: "reg:5000/app:1",
        L.CRI_LAYER_DIGEST: digest(2),
        L.CRI_IMAGE_LAYERS: f"{digest(2)},{digest(3)}",
        L.CRI_MANIFEST_DIGEST: digest(50),
    }
    first = L.layer_annotations("r/a:1", digest(50), layers, 0, prefetch_size=7)
    assert first[TOC] == digest(91) and first[L.STARGZ_PREFETCH] == "7"
    urls = Descriptor(OCI_LAYER, digest(9), 1, {}, urls=("http://a/x", "http://b/x"))
    got = L.layer_annotations("r/a:1", digest(50), [urls], 0)
    assert got[L.URLS] == got[L.URLS_PREFIX + "0"] == "http://a/x,http://b/x"


def test_layer_lists_are_cut_to_fit_4096_bytes():
    """Each digest is 71 bytes: the stargz list (44-byte key, "d," items) holds 56 of 100,
    the CRI list (39-byte key, ",d" items) 56 as well; both stay under the limit."""
    layers = [layer(n) for n in range(100)]
    got = L.layer_annotations("r/a:1", digest(500), layers, 0)
    for key in (L.STARGZ_LAYERS, L.CRI_IMAGE_LAYERS):
        assert len(key) + len(got[key]) <= 4096
        assert got[key].split(",") == [digest(n) for n in range(56)]
    assert L.URLS_PREFIX + "55" in got and L.URLS_PREFIX + "56" not in got


def test_only_snapshot_labels_are_inherited():
    ann = {
        TOC: "t",
        "io.containers.estargz.uncompressed-size": "9",
        "containerd.io/snapshot.ref": "x",
        "containerd.io/snapshotter": "no",
        L.CRI_IMAGE_REF: "r",
    }
    assert L.inherited(ann) == {TOC: "t", "containerd.io/snapshot.ref": "x", L.CRI_IMAGE_REF: "r"}


def test_child_gc_labels_number_as_containerd():
    manifest = "application/vnd.oci.image.manifest.v1+json"
    children = [
        Descriptor(L.MT_OCI_CONFIG, digest(1), 1),
        layer(2),
        Descriptor("application/vnd.docker.image.rootfs.diff.tar.gzip", digest(3), 1),
        Descriptor(manifest, digest(4), 1),
        Descriptor(manifest, digest(5), 1),
        Descriptor("application/x-other", digest(6), 1),
        Descriptor("application/x-other", digest(7), 1),
    ]
    assert L.child_gc_labels(children) == {
        "containerd.io/gc.ref.content.config": digest(1),
        "containerd.io/gc.ref.content.l.0": digest(2),
        "containerd.io/gc.ref.content.l.1": digest(3),
        "containerd.io/gc.ref.content.m.0": digest(4),
        "containerd.io/gc.ref.content.m.1": digest(5),
        "containerd.io/gc.ref.content.0": digest(6),
        "containerd.io/gc.ref.content.1": digest(7),
    }


def test_distribution_source_label_drops_the_port_and_merges_repositories():
    ref = parse_reference("127.0.0.1:5000/team/app:1")
    assert L.distribution_source(ref, None) == (
        "containerd.io/distribution.source.127.0.0.1",
        "team/app",
    )
    assert L.distribution_source(ref, "zz,team/app,a") == (
        "containerd.io/distribution.source.127.0.0.1",
        "a,team/app,zz",
    )


def test_ingest_refs_and_media_types():
    assert L.ingest_ref(layer(1)) == "layer-" + digest(1)
    assert L.ingest_ref(Descriptor(L.MT_DOCKER_CONFIG, digest(2), 1)) == "config-" + digest(2)
    idx = "application/vnd.docker.distribution.manifest.list.v2+json"
    assert L.ingest_ref(Descriptor(idx, digest(3), 1)) == "index-" + digest(3)
    mt = "application/vnd.oci.image.manifest.v1+json"
    assert L.ingest_ref(Descriptor(mt, digest(4), 1)) == "manifest-" + digest(4)
    assert L.ingest_ref(Descriptor("text/plain", digest(5), 1)) == "unknown-" + digest(5)
    assert L.is_layer("application/vnd.oci.image.layer.v1.tar+zstd")
    assert L.is_layer("application/vnd.docker.image.rootfs.diff.tar.gzip")
    assert not L.is_layer(L.MT_OCI_CONFIG)


def test_lease_expires_in_a_day():
    ((key, when),) = L.lease_labels().items()
    assert key == "containerd.io/gc.expire"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", when)


def test_chain_ids_match_what_containerd_named_the_snapshots():
    """The chain IDs of ``oci-corners:esgz`` are the snapshot names containerd gave them
    when Go's ``ctr-remote i rpull`` pulled that image."""
    layout = shared_dir() / "fixtures" / "oci-corners"
    cfg = find_manifest(layout, "esgz")["config"]["digest"].split(":")[1]  # type: ignore[index]
    diff_ids = json.loads((layout / "blobs" / "sha256" / cfg).read_bytes())["rootfs"]["diff_ids"]
    assert chain_ids(diff_ids) == [
        "sha256:168786e5a3f5ecfaf64ed32bd5e317f880ab3f46f7ebd54db4ffa4498cda0e57",
        "sha256:3ee24909c1ef8970b60fbc2435a170c3ab967a3f631605a39bd76ff32718debf",
    ]
    assert chain_ids([]) == []


def test_extract_key_is_containerds_unpack_key_format():
    key = extract_key(digest(1))
    assert re.fullmatch(r"extract-\d{1,9}-[A-Za-z0-9_-]{4} " + digest(1), key), key
    assert extract_key(digest(1)) != key
