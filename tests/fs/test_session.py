"""The FUSE protocol as our session speaks it (`stargz.fs.session`), through real mounts:
listings that need many READDIR(PLUS) answers, long names, reads larger than one request,
and the answers a read-only mount gives to writes.

Ground truth is the tar the layer was built from, read with Python's tarfile.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import tarfile
from types import SimpleNamespace

import pytest

from stargz.estargz import build
from stargz.fs import LocalLayerSource

N_FILES = 3000
BIG = (5 << 20) + 12345


def _layer(tmp_path):
    """A layer with one directory of N_FILES files (names up to 255 bytes) and one file
    of BIG bytes; returns (layer, {path: bytes})."""
    want: dict[str, bytes] = {}
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
        d = tarfile.TarInfo("many")
        d.type = tarfile.DIRTYPE
        d.mode = 0o755
        tf.addfile(d)
        for i in range(N_FILES):
            stem = f"f{i:05d}-"
            name = stem + "x" * (i % 249) if i % 7 else stem + "y" * (255 - len(stem))
            data = f"file {i}\n".encode() * (i % 5)
            ti = tarfile.TarInfo(f"many/{name}")
            ti.size = len(data)
            ti.mode = 0o644
            tf.addfile(ti, io.BytesIO(data))
            want[ti.name] = data
        big = hashlib.sha256(b"seed").digest() * (BIG // 32 + 1)
        big = big[:BIG]
        ti = tarfile.TarInfo("big.bin")
        ti.size = len(big)
        ti.mode = 0o600
        tf.addfile(ti, io.BytesIO(big))
        want["big.bin"] = big
    blob = tmp_path / "layer.esgz"
    raw.seek(0)
    with open(blob, "wb") as out:
        res = build(raw, out, chunk_size=1 << 20)
    layer = SimpleNamespace(digest=res.blob_digest, toc_digest=res.toc_digest, path=blob)
    return layer, want


@pytest.fixture
def mounted(fs_env, tmp_path):
    layer, want = _layer(tmp_path)
    fs = fs_env.start(LocalLayerSource(blobs={layer.digest: layer.path}))
    mp = fs_env.mount(layer)
    return fs, mp, want


def test_a_directory_listed_over_many_answers(mounted):
    fs, mp, want = mounted
    names = {n for n in want if n.startswith("many/")}
    # scandir reads the directory in kernel-buffer-sized pieces: many READDIRPLUS answers
    with os.scandir(mp / "many") as it:
        got = {f"many/{e.name}": e for e in it}
    assert set(got) == names
    for path, entry in got.items():
        assert entry.is_file(follow_symlinks=False)
        assert entry.stat(follow_symlinks=False).st_size == len(want[path]), path
    # and again (the kernel may answer from its cache now): same listing
    assert {f"many/{n}" for n in os.listdir(mp / "many")} == names
    assert fs.metrics.handler_errors == 0


def test_contents_and_large_reads(mounted):
    fs, mp, want = mounted
    for path in ("many/f00007-" + "y" * 248, "many/f00004-xxxx", "big.bin"):
        assert (mp / path).read_bytes() == want[path], path
    # one read() larger than the largest FUSE request (1 MiB), from an odd offset
    with open(mp / "big.bin", "rb", buffering=0) as f:
        f.seek(12345)
        got = f.read(3 << 20)
    assert got == want["big.bin"][12345 : 12345 + (3 << 20)]
    # past the end: short read, then EOF
    with open(mp / "big.bin", "rb", buffering=0) as f:
        f.seek(BIG - 10)
        assert f.read(100) == want["big.bin"][-10:]
        assert f.read(100) == b""


def test_the_mount_refuses_writes(mounted):
    fs, mp, want = mounted
    for op in (
        lambda: open(mp / "big.bin", "r+b"),
        lambda: open(mp / "new-file", "wb"),
        lambda: os.mkdir(mp / "new-dir"),
        lambda: os.unlink(mp / "big.bin"),
        lambda: os.rename(mp / "big.bin", mp / "moved"),
        lambda: os.setxattr(mp / "big.bin", "user.x", b"1"),
        lambda: os.chmod(mp / "big.bin", 0o777),
        lambda: os.symlink("big.bin", mp / "link"),
    ):
        with pytest.raises(OSError) as e:
            op()
        assert e.value.errno == errno.EROFS
    assert (mp / "big.bin").read_bytes() == want["big.bin"]


def test_missing_names_and_xattrs(mounted):
    fs, mp, want = mounted
    with pytest.raises(FileNotFoundError):
        os.lstat(mp / "many" / "no-such-file")
    with pytest.raises(NotADirectoryError):
        os.lstat(mp / "big.bin" / "child")
    with pytest.raises(OSError) as e:
        os.getxattr(mp / "big.bin", "user.none")
    assert e.value.errno == errno.ENODATA
    assert os.listxattr(mp / "big.bin") == []
    st = os.statvfs(mp)
    assert st.f_namemax == 255
