"""Xattrs of the overlayfs namespaces in a TOC never reach overlayfs.

A layer's TOC may carry ``trusted.overlay.*`` / ``user.overlay.*`` xattrs (redirect,
metacopy, origin, opaque...): served as they are, they would steer the kernel's overlayfs
stacked on the mount. Through a real FUSE mount (and an overlay of it): none is listed
or readable, other xattrs are, and the opaque marker the tree itself makes from
``.wh..wh..opq`` still works.
"""

from __future__ import annotations

import errno
import io
import os
import tarfile
from types import SimpleNamespace

import pytest
from conftest import make_tar

from stargz.estargz import build
from stargz.fs import LocalLayerSource

from .conftest import overlay

STEERING = {
    "trusted.overlay.redirect": "/elsewhere",
    "trusted.overlay.opaque": "y",
    "trusted.overlay.metacopy": "",
    "trusted.overlay.origin": "\x00\xfb",
    "user.overlay.opaque": "y",
    "user.overlay.redirect": "/elsewhere",
}


def _pax(xattrs: dict[str, str]) -> dict[str, str]:
    return {f"SCHILY.xattr.{k}": v for k, v in xattrs.items()}


def _dir(name: str, xattrs: dict[str, str] | None = None) -> tuple:
    attrs = {"type": tarfile.DIRTYPE, "mode": 0o755}
    if xattrs:
        attrs["pax_headers"] = _pax(xattrs)
    return (name, None, attrs)


@pytest.fixture
def layer(tmp_path):
    tar = make_tar(
        _dir("steer", {**STEERING, "user.keep": "kept"}),
        ("steer/f", b"data\n", {"pax_headers": _pax({**STEERING, "user.k": "v"})}),
        _dir("opq"),
        ("opq/.wh..wh..opq", b"", {}),
        ("opq/new", b"new\n", {}),
    )
    blob = tmp_path / "layer.esgz"
    with open(blob, "wb") as out:
        res = build(io.BytesIO(tar), out, chunk_size=1 << 16)
    return SimpleNamespace(digest=res.blob_digest, toc_digest=res.toc_digest, path=blob)


def test_toc_overlay_xattrs_are_not_served(fs_env, layer, tmp_path):
    fs = fs_env.start(LocalLayerSource(blobs={layer.digest: layer.path}))
    mp = fs_env.mount(layer)
    # (the TOC does carry them: the writer kept what the tar said)
    reader = fs.layer(layer.digest).reader
    assert set(STEERING) <= set(reader.lookup("steer").xattrs)

    assert sorted(os.listxattr(mp / "steer")) == ["user.keep"]
    assert os.getxattr(mp / "steer", "user.keep") == b"kept"
    assert sorted(os.listxattr(mp / "steer/f")) == ["user.k"]
    for path in ("steer", "steer/f"):
        for name in STEERING:
            with pytest.raises(OSError) as e:
                os.getxattr(mp / path, name)
            assert e.value.errno == errno.ENODATA, (path, name)

    # the tree's own opaque marker is still served
    assert os.getxattr(mp / "opq", "trusted.overlay.opaque") == b"y"
    assert os.listxattr(mp / "opq") == ["trusted.overlay.opaque"]

    # and overlayfs obeys only that one: "steer" merges with the lower dir, "opq" hides it
    lower = tmp_path / "lower"
    for d in ("steer", "opq"):
        (lower / d).mkdir(parents=True)
        (lower / d / "old").write_bytes(b"old\n")
    with overlay([mp, lower], fs_env.base / "merged") as merged:
        assert sorted(os.listdir(merged / "steer")) == ["f", "old"]
        assert os.listdir(merged / "opq") == ["new"]
        assert (merged / "steer/f").read_bytes() == b"data\n"
    assert fs.metrics.handler_errors == 0
