"""Build small OCI image layouts for tests: a base image from a layout plus new layers.

Only what tests need: gzip tar layers made from ``{path: bytes}`` dicts, a config with
updated ``diff_ids``, a manifest, and an ``index.json`` entry per tag; an image index over
images of other layouts (a multi-platform image).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import tarfile
from collections.abc import Mapping, Sequence
from pathlib import Path

LAYER_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
INDEX_MEDIA_TYPE = "application/vnd.oci.image.index.v1+json"
CONFIG_MEDIA_TYPE = "application/vnd.oci.image.config.v1+json"
REF_NAME = "org.opencontainers.image.ref.name"


def _put_blob(layout: Path, data: bytes) -> dict[str, object]:
    digest = hashlib.sha256(data).hexdigest()
    path = layout / "blobs" / "sha256" / digest
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        path.write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def _read_blob(layout: Path, digest: str) -> bytes:
    return (layout / "blobs" / "sha256" / digest.split(":", 1)[1]).read_bytes()


def tar_layer(files: Mapping[str, bytes], mode: int = 0o644) -> bytes:
    """An uncompressed tar of regular files (parent dirs added), deterministic."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        dirs: set[str] = set()
        for name in sorted(files):
            parts = name.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                d = "/".join(parts[:i])
                if d not in dirs:
                    dirs.add(d)
                    ti = tarfile.TarInfo(d)
                    ti.type, ti.mode = tarfile.DIRTYPE, 0o755
                    tar.addfile(ti)
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode = len(files[name]), mode
            tar.addfile(ti, io.BytesIO(files[name]))
    return buf.getvalue()


def find_manifest(layout: Path, tag: str) -> dict[str, object]:
    index = json.loads((layout / "index.json").read_text())
    for m in index["manifests"]:
        if m.get("annotations", {}).get(REF_NAME) == tag:
            return json.loads(_read_blob(layout, m["digest"]))
    raise KeyError(f"{layout}: no tag {tag!r}")


def build_image(
    out: Path,
    tag: str,
    layers: Sequence[Mapping[str, bytes] | bytes],
    *,
    base: tuple[Path, str] | None = None,
    level: int = 1,
    cmd: Sequence[str] = ("/bin/sh",),
) -> Path:
    """Write (or add ``tag`` to) the OCI layout ``out``: ``base`` image's layers, then
    ``layers`` (file dicts, or ready tar bytes), gzip ``level``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    layer_descs: list[dict[str, object]] = []
    diff_ids: list[str] = []
    config: dict[str, object] = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": list(cmd)},
    }
    if base is not None:
        blayout, btag = base
        bman = find_manifest(blayout, btag)
        config = json.loads(_read_blob(blayout, bman["config"]["digest"]))  # type: ignore[index]
        diff_ids = list(config["rootfs"]["diff_ids"])  # type: ignore[index]
        for desc in bman["layers"]:  # type: ignore[attr-defined]
            src = blayout / "blobs" / "sha256" / desc["digest"].split(":", 1)[1]
            dst = out / "blobs" / "sha256" / src.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            if not dst.exists():
                shutil.copyfile(src, dst)
            layer_descs.append({"mediaType": desc["mediaType"], **_desc(desc)})
    for layer in layers:
        raw = layer if isinstance(layer, bytes) else tar_layer(layer)
        diff_ids.append("sha256:" + hashlib.sha256(raw).hexdigest())
        blob = gzip.compress(raw, compresslevel=level, mtime=0)
        layer_descs.append({"mediaType": LAYER_MEDIA_TYPE, **_put_blob(out, blob)})
    config["rootfs"] = {"type": "layers", "diff_ids": diff_ids}
    config.pop("history", None)
    cdesc = _put_blob(out, json.dumps(config, sort_keys=True).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": {"mediaType": CONFIG_MEDIA_TYPE, **cdesc},
        "layers": layer_descs,
    }
    mdesc = _put_blob(out, json.dumps(manifest, sort_keys=True).encode())
    index_path = out / "index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {"schemaVersion": 2}
    entries = [
        m for m in index.get("manifests", []) if m.get("annotations", {}).get(REF_NAME) != tag
    ]
    entries.append({"mediaType": MANIFEST_MEDIA_TYPE, **mdesc, "annotations": {REF_NAME: tag}})
    index["manifests"] = entries
    index_path.write_text(json.dumps(index))
    return out


def _desc(desc: Mapping[str, object]) -> dict[str, object]:
    return {"digest": desc["digest"], "size": desc["size"]}


def _copy_blob(src: Path, dst: Path, digest: str) -> None:
    s = src / "blobs" / "sha256" / digest.split(":", 1)[1]
    d = dst / "blobs" / "sha256" / s.name
    d.parent.mkdir(parents=True, exist_ok=True)
    if not d.exists():
        shutil.copyfile(s, d)


def _tag_manifest(out: Path, tag: str, manifest: Mapping[str, object]) -> None:
    mdesc = _put_blob(out, json.dumps(manifest, sort_keys=True).encode())
    index_path = out / "index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {"schemaVersion": 2}
    entries = [
        m for m in index.get("manifests", []) if m.get("annotations", {}).get(REF_NAME) != tag
    ]
    entries.append({"mediaType": MANIFEST_MEDIA_TYPE, **mdesc, "annotations": {REF_NAME: tag}})
    index["manifests"] = entries
    index_path.write_text(json.dumps(index))


def stack_images(out: Path, tag: str, parts: Sequence[tuple[Path, str]]) -> Path:
    """Write ``out:tag``: the layers of each ``(layout, tag)`` in ``parts``, bottom first,
    descriptors kept as they are (media types and annotations such as the TOC digest), so
    ready-made eStargz layers can be stacked. The config is the first image's, with every
    part's ``diff_ids``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    layers: list[object] = []
    diff_ids: list[str] = []
    config: dict[str, object] | None = None
    for layout, ptag in parts:
        man = find_manifest(layout, ptag)
        cfg = json.loads(_read_blob(layout, man["config"]["digest"]))  # type: ignore[index]
        config = config or cfg
        diff_ids += cfg["rootfs"]["diff_ids"]
        for desc in man["layers"]:  # type: ignore[attr-defined]
            _copy_blob(layout, out, desc["digest"])
            layers.append(desc)
    assert config is not None
    config["rootfs"] = {"type": "layers", "diff_ids": diff_ids}
    config.pop("history", None)
    cdesc = _put_blob(out, json.dumps(config, sort_keys=True).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": {"mediaType": CONFIG_MEDIA_TYPE, **cdesc},
        "layers": layers,
    }
    _tag_manifest(out, tag, manifest)
    return out


def index_image(out: Path, tag: str, parts: Sequence[tuple[Path, str, str]]) -> Path:
    """Write ``out:tag``: an OCI image index with one entry per ``(layout, tag, platform)``
    (``platform`` as ``os/arch``), each pointing to that image's manifest, byte for byte
    (blobs copied). Push it with ``Registry.push_oci(..., all_platforms=True)``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    entries: list[dict[str, object]] = []
    for layout, ptag, platform in parts:
        index = json.loads((layout / "index.json").read_text())
        (desc,) = [m for m in index["manifests"] if m.get("annotations", {}).get(REF_NAME) == ptag]
        man = json.loads(_read_blob(layout, desc["digest"]))
        for d in [desc, man["config"], *man["layers"]]:
            _copy_blob(layout, out, d["digest"])
        osname, arch = platform.split("/")
        entries.append(
            {
                "mediaType": desc.get("mediaType", MANIFEST_MEDIA_TYPE),
                **_desc(desc),
                "platform": {"os": osname, "architecture": arch},
            }
        )
    doc = {"schemaVersion": 2, "mediaType": INDEX_MEDIA_TYPE, "manifests": entries}
    idesc = _put_blob(out, json.dumps(doc, sort_keys=True).encode())
    index_path = out / "index.json"
    top = json.loads(index_path.read_text()) if index_path.exists() else {"schemaVersion": 2}
    kept = [m for m in top.get("manifests", []) if m.get("annotations", {}).get(REF_NAME) != tag]
    kept.append({"mediaType": INDEX_MEDIA_TYPE, **idesc, "annotations": {REF_NAME: tag}})
    top["manifests"] = kept
    index_path.write_text(json.dumps(top))
    return out


def replace_layer(layout: Path, tag: str, digest: str, blob: bytes, new_tag: str) -> str:
    """Tag ``new_tag`` in ``layout``: image ``tag`` with layer ``digest``'s blob replaced by
    ``blob`` (descriptor digest and size updated, annotations and diff_ids kept: a registry
    accepts it, and only a reader that checks the blob's content notices). Returns the new
    layer digest."""
    man = find_manifest(layout, tag)
    new = _put_blob(layout, blob)
    layers = []
    for desc in man["layers"]:  # type: ignore[attr-defined]
        layers.append({**desc, **new} if desc["digest"] == digest else desc)
    if layers == man["layers"]:
        raise KeyError(f"{layout}:{tag} has no layer {digest}")
    _tag_manifest(layout, new_tag, {**man, "layers": layers})
    return str(new["digest"])


def with_entrypoint(
    src: Path, tag: str, out: Path, new_tag: str, entrypoint: Sequence[str], cmd: Sequence[str]
) -> Path:
    """Write ``out:new_tag``: image ``src:tag`` (its layers as they are) with the config's
    ``Entrypoint`` and ``Cmd`` replaced."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    man = find_manifest(src, tag)
    config = json.loads(_read_blob(src, man["config"]["digest"]))  # type: ignore[index]
    config.setdefault("config", {}).update(Entrypoint=list(entrypoint), Cmd=list(cmd))
    for desc in man["layers"]:  # type: ignore[attr-defined]
        _copy_blob(src, out, desc["digest"])
    cdesc = _put_blob(out, json.dumps(config, sort_keys=True).encode())
    _tag_manifest(out, new_tag, {**man, "config": {**man["config"], **cdesc}})  # type: ignore[dict-item]
    return out


def two_platform_layout(src: Path, tag: str, out: Path, index_tag: str = "multi") -> Path:
    """A writable copy of layout ``src`` whose tag ``index_tag`` is an index of ``src:tag``
    as linux/amd64 and the same layers with an arm64 config as linux/arm64."""
    shutil.copytree(src, out)
    for p in [out, *out.rglob("*")]:
        p.chmod(p.stat().st_mode | 0o200)
    amd = find_manifest(out, tag)
    config = json.loads(_read_blob(out, amd["config"]["digest"]))  # type: ignore[index]
    config["architecture"] = "arm64"
    arm = {**amd, "config": {**amd["config"], **_put_blob(out, json.dumps(config).encode())}}  # type: ignore[dict-item]
    entries = []
    for man, arch in ((amd, "amd64"), (arm, "arm64")):
        d = _put_blob(out, json.dumps(man).encode())
        entries.append(
            {
                "mediaType": MANIFEST_MEDIA_TYPE,
                **d,
                "platform": {"os": "linux", "architecture": arch},
            }
        )
    index_type = "application/vnd.oci.image.index.v1+json"
    idx = _put_blob(
        out,
        json.dumps({"schemaVersion": 2, "mediaType": index_type, "manifests": entries}).encode(),
    )
    index = json.loads((out / "index.json").read_text())
    index["manifests"].append(
        {"mediaType": index_type, **idx, "annotations": {REF_NAME: index_tag}}
    )
    (out / "index.json").write_text(json.dumps(index))
    return out
