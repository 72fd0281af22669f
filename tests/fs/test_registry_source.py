"""Layers lazily mounted from a real registry (Debian's docker-registry) via stargz.remote."""

from __future__ import annotations

import os
import shutil

import pytest

from .conftest import overlay


@pytest.fixture
def registry(fuse_host):
    if shutil.which("docker-registry") is None or shutil.which("skopeo") is None:
        pytest.fail("docker-registry and skopeo are needed (ci/setup.sh installs them)")
    from harness.procs import Registry

    reg = Registry.start()
    try:
        yield reg
    finally:
        reg.close()


def test_mount_from_registry(fs_env, registry, corners, tree_listing, merged_truth):
    from stargz.fs.registry import RegistryLayerSource

    ref = registry.push_oci(corners.root, "esgz", "corners:esgz")
    source = RegistryLayerSource()
    try:
        fs = fs_env.start(source)
        layers = corners.layers("esgz")
        mps = []
        for layer in layers:
            mp = fs_env.mountpoint()
            fs_env.run(
                fs.mount(
                    str(mp),
                    {
                        "containerd.io/snapshot/cri.image-ref": ref,
                        "containerd.io/snapshot/cri.layer-digest": layer.digest,
                        "containerd.io/snapshot/stargz/toc.digest": layer.toc_digest,
                    },
                )
            )
            mps.append(mp)
        blob = fs.layer(layers[0].digest).blob
        assert (mps[0] / "data/xattr-file").read_bytes()
        assert 0 < blob.stats.bytes_fetched < 0.05 * layers[0].size  # lazily
        with overlay([mps[1], mps[0]], fs_env.base / "merged") as merged:
            got = tree_listing(str(merged))
        assert got == merged_truth
        # everything was read once: about the blob, not more (the tail overlaps a little)
        assert blob.stats.bytes_fetched <= layers[0].size + (64 << 10)
        fs_env.run(fs.check(str(mps[0]), {}))
        assert os.listdir(mps[0])
    finally:
        fs_env.close_fs()
        fs_env.run(source.close())
