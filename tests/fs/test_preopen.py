"""A layer opened ahead of its mount (`StargzFileSystem.preopen`: the daemon's own pull
knows the image's first layer before containerd prepares it)."""

from __future__ import annotations

import pytest

from stargz.errors import NotFound
from stargz.fs import LocalLayerSource

from .conftest import labels_for


def _listing(root) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_a_preopened_layer_is_what_the_mount_finds(fs_env, corners):
    layer = corners.layers("esgz")[0]
    source = LocalLayerSource(layouts=[corners.root])
    fs = fs_env.start(source)
    key = fs_env.run(fs.preopen(labels_for(layer)))
    assert key is not None
    opened = fs.layer(layer.digest)  # open, with no mount point yet
    assert source.resolves == 1 and fs.mountpoints == {}
    mp = fs_env.mount(layer)
    assert fs.layer(layer.digest) is opened and source.resolves == 1  # not opened again
    fs_env.run(fs.release_preopened(key))  # mounted: stays open
    assert fs.layer(str(mp)) is opened
    assert "etc" in _listing(mp)
    fs_env.run(fs.unmount(str(mp)))
    with pytest.raises(NotFound):
        fs.layer(layer.digest)


def test_a_preopened_layer_nobody_mounts_closes_on_release(fs_env, corners):
    layer = corners.layers("esgz")[0]
    fs = fs_env.start(LocalLayerSource(layouts=[corners.root]))
    key = fs_env.run(fs.preopen(labels_for(layer)))
    lay = fs.layer(layer.digest)
    fs_env.run(fs.release_preopened(key))
    with pytest.raises(NotFound):
        fs.layer(layer.digest)
    assert lay.fetcher.closed
    fs_env.run(fs.release_preopened(key))  # twice: nothing to do


def test_a_layer_that_cannot_be_opened_ahead_is_left_to_its_mount(fs_env, corners):
    layer = corners.layers("esgz")[0]
    source = LocalLayerSource(layouts=[])  # knows no blob
    fs = fs_env.start(source)
    assert fs_env.run(fs.preopen(labels_for(layer))) is None
    assert fs_env.run(fs.preopen({"bad": "labels"})) is None
    source.layouts.append(str(corners.root))
    mp = fs_env.mount(layer)  # the mount opens it itself
    assert "etc" in _listing(mp)
