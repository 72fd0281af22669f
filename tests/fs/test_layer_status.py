"""What ``stargz status`` reads of the filesystem: each open layer with its reference,
repository and mount points, and the layer's last error (a real FUSE mount, a corrupted
chunk read through it)."""

from __future__ import annotations

import errno
import os

import pytest

from stargz.fs import LocalLayerSource
from stargz.fs.metrics import MAX_ERROR_MESSAGE, LayerMetrics

from .conftest import corrupt_first_chunk


def test_note_error_redacts_urls_and_is_bounded():
    m = LayerMetrics()
    assert (m.last_error, m.last_error_time) == ("", 0.0)
    m.note_error("GET https://user:pw@store.example/blob?X-Amz-Signature=secret: 403")
    assert m.last_error == "GET https://store.example/blob?REDACTED: 403"
    assert m.last_error_time > 0
    assert LayerMetrics().last_error == ""  # (one layer's error is not another's)
    m.note_error("x" * 10_000)
    assert len(m.last_error) == MAX_ERROR_MESSAGE
    assert "last_error" not in m.as_dict()  # (exporters walk the counters only)


def test_layer_status_names_ref_mounts_and_the_last_failed_read(fs_env, corners, tmp_path):
    """A layer whose chunk was corrupted: before any read its last error is empty; a read
    of that chunk fails with EIO and the layer's last error then names the file, with the
    verification failure counted."""
    layer = corners.layers("esgz")[0]
    bad = corrupt_first_chunk(layer, tmp_path / "bad-blob", "data/noise.bin")
    fs = fs_env.start(LocalLayerSource(blobs={layer.digest: bad}))
    mp = fs_env.mount(layer)

    async def status():
        return fs.layer_status()

    ((opened, ref, repository, mountpoints),) = fs_env.run(status())
    assert opened.digest == layer.digest and mountpoints == (str(mp),)
    assert ref and repository and ref.startswith(repository)
    assert opened.metrics.last_error == ""

    fd = os.open(mp / "data/noise.bin", os.O_RDONLY | os.O_DIRECT)
    try:
        with pytest.raises(OSError) as e:
            os.pread(fd, 4096, 0)
    finally:
        os.close(fd)
    assert e.value.errno == errno.EIO
    m = opened.metrics
    assert m.verification_failures >= 1 and m.read_errors >= 1
    assert "data/noise.bin" in m.last_error and m.last_error_time > 0, m.last_error
