"""Benchmark inputs built from files already on this machine (no network), and sizes.

`make_layout` packs directory trees into a gzip'd single- or multi-layer OCI image, so
the converter benchmarks run on realistic content (ELF binaries, Python sources, text).
The converter benchmarks compare output sizes with `layout_layers_size` (ours, an OCI
layout) and `go_image_layers_size` (Go's, an image in a containerd content store).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterable
from typing import Any

from stargz.image.layout import MT_OCI_CONFIG, MT_OCI_MANIFEST, Layout


def _tar_gz_layer(roots: list[str], level: int = 6) -> tuple[bytes, bytes]:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
        parents: set[str] = set()
        for root in roots:
            # the parent directories first, as an image builder writes them (Go's optimizer
            # refuses a layer whose prioritized file has no parent entry)
            parts = root.strip("/").split("/")[:-1]
            for i in range(1, len(parts) + 1):
                d = "/".join(parts[:i])
                if d not in parents:
                    parents.add(d)
                    tf.add("/" + d, arcname=d, recursive=False)
            tf.add(root, arcname=root.lstrip("/"), recursive=True)
    return raw.getvalue(), gzip.compress(raw.getvalue(), level, mtime=0)


def write_image(
    path: str, tag: str, layers: Iterable[tuple[bytes, bytes]], image_config: dict
) -> dict:
    """Write ``path:tag``: the ``(raw tar, gzip blob)`` layers, bottom first, and an amd64
    config whose ``config`` section is ``image_config``; returns sizes."""
    layout = Layout(path, create=True)
    descs, diff_ids, raw_total = [], [], 0
    for raw, blob in layers:
        raw_total += len(raw)
        digest = "sha256:" + hashlib.sha256(blob).hexdigest()
        tmp = layout.new_blob()
        tmp.write(blob)
        layout.commit_blob(tmp, digest)
        descs.append(
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": digest,
                "size": len(blob),
            }
        )
        diff_ids.append("sha256:" + hashlib.sha256(raw).hexdigest())
    config = {
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "config": image_config,
    }
    cdigest, csize = layout.put_json(config)
    manifest = {
        "schemaVersion": 2,
        "mediaType": MT_OCI_MANIFEST,
        "config": {"mediaType": MT_OCI_CONFIG, "digest": cdigest, "size": csize},
        "layers": descs,
    }
    mdigest, msize = layout.put_json(manifest)
    layout.tag({"mediaType": MT_OCI_MANIFEST, "digest": mdigest, "size": msize}, tag)
    return {"uncompressed": raw_total, "compressed": sum(d["size"] for d in descs)}


def make_layout(path: str, tag: str, layers: list[list[str]]) -> dict:
    """Write an image whose layer i holds the trees ``layers[i]``; returns sizes."""
    return write_image(path, tag, (_tar_gz_layer(roots) for roots in layers), {"Cmd": ["/bin/sh"]})


def existing(paths: list[str]) -> list[str]:
    return [p for p in paths if os.path.isdir(p)]


def extend_image(path: str, tag: str, new_tag: str, roots: list[str]) -> dict:
    """Tag ``new_tag`` = image ``tag`` plus one gzip layer holding the trees ``roots``."""
    layout = Layout(path)
    desc = layout.resolve(tag)
    manifest = layout.read_json(desc["digest"])
    config = layout.read_json(manifest["config"]["digest"])
    raw, blob = _tar_gz_layer(roots)
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    tmp = layout.new_blob()
    tmp.write(blob)
    layout.commit_blob(tmp, digest)
    config["rootfs"]["diff_ids"].append("sha256:" + hashlib.sha256(raw).hexdigest())
    cdigest, csize = layout.put_json(config)
    manifest = dict(manifest)
    manifest["mediaType"] = MT_OCI_MANIFEST
    manifest["config"] = {"mediaType": MT_OCI_CONFIG, "digest": cdigest, "size": csize}
    manifest["layers"] = [
        *manifest["layers"],
        {
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": digest,
            "size": len(blob),
        },
    ]
    mdigest, msize = layout.put_json(manifest)
    layout.tag({"mediaType": MT_OCI_MANIFEST, "digest": mdigest, "size": msize}, new_tag)
    return {"uncompressed": len(raw), "compressed": len(blob)}


def layout_layers_size(layout: str, tag: str) -> int:
    """Sum of the layer sizes of ``layout:tag``."""
    lay = Layout(layout)
    man = lay.read_json(lay.resolve(tag)["digest"])
    return sum(x["size"] for x in man["layers"])


def go_image_layers_size(cd: Any, ref: str, ns: str) -> int:
    """Sum of the layer sizes of image ``ref`` in containerd ``cd`` (a harness Containerd)."""
    digest = None
    for line in cd.ctr("i", "ls", ns=ns).stdout.splitlines():
        parts = line.split()
        if parts and parts[0] == ref:
            digest = parts[2]
    if digest is None:
        raise RuntimeError(f"image {ref} not found after convert")
    man = json.loads(cd.ctr("content", "get", digest, ns=ns).stdout)
    return sum(x["size"] for x in man["layers"])
