"""The FUSE protocol as our session speaks it (`stargz.fuse.session`), through real mounts:
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


_DIRECT_READER = r"""
import mmap, os, sys
buf = mmap.mmap(-1, 1 << 16)
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECT)
print("reading", flush=True)
os.preadv(fd, [buf], 0)
print("read", flush=True)
"""


def test_a_killed_reader_is_answered_at_once(fs_env, corners, corners_source):
    """A reader killed while its read waits for a slow fetch: the kernel sends INTERRUPT,
    the session answers EINTR and the process dies at once, not when the fetch ends.
    (O_DIRECT: a read the reader waits on itself; readahead has no waiting process.)"""
    import signal
    import subprocess
    import sys
    import time

    layer = corners.layers("esgz")[0]
    fs = fs_env.start(corners_source, noprefetch=True)
    mp = fs_env.mount(layer)
    corners_source.latency = 4.0  # the registry answers slowly from now on
    with subprocess.Popen(
        [sys.executable, "-c", _DIRECT_READER, str(mp / "data/noise.bin")],
        stdout=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            assert proc.stdout.readline() == "reading\n"
            deadline = time.monotonic() + 10
            while fs._session.in_flight == 0:
                assert time.monotonic() < deadline, "the read never reached the daemon"
                time.sleep(0.01)
            t0 = time.monotonic()
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=20)
            waited = time.monotonic() - t0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == -signal.SIGKILL
    # (before INTERRUPT was handled: the whole 4 s of the fetch)
    assert waited < 2, f"the killed reader waited {waited:.1f} s for its answer"
    deadline = time.monotonic() + 5
    while fs._session.in_flight:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    # the fetch itself was not cancelled with the waiting read: when it ends, the file
    # reads whole
    corners_source.latency = 0.0
    from stargz.estargz import open_file

    with open_file(str(layer.path)) as r:
        node = r.lookup("data/noise.bin")
        want = r.read(node.id, 0, node.entry.size)
    assert (mp / "data/noise.bin").read_bytes() == want
    assert fs.metrics.handler_errors == 0
