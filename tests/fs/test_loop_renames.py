"""The event loop thread, which answers FUSE requests, never places a cache file.

A rename from one directory to another takes the filesystem-wide rename lock. An
overlayfs copy-up in a container holds that lock while it asks this daemon a FUSE
question (its upper dir lives under the snapshots, on the cache's filesystem): if the
thread that would answer is itself waiting for the lock, the container, the daemon and
every rename on that filesystem hang for good. Cache files are therefore placed by a
worker thread (with link + unlink, which take only their directories' locks); this test
watches every rename and link while chunks and merged passthrough files are written, and
fails on any cross-directory rename, or any placement, made on the loop's thread.
"""

from __future__ import annotations

import os
import threading
import time

from stargz.fs import LocalLayerSource

from .test_read_path import _busy, _content, _read


def test_no_cross_directory_rename_on_the_loop_thread(fs_env, corners, monkeypatch):
    fs = fs_env.start(LocalLayerSource(layouts=[corners.root]))

    async def loop_thread() -> int:
        return threading.get_ident()

    loop_ident = fs_env.run(loop_thread())
    moves: list[tuple[str, str, str, bool]] = []

    def watch(name: str):
        real = getattr(os, name)

        def watched(src, dst, *a, **kw):
            on_loop = threading.get_ident() == loop_ident
            moves.append((name, os.fspath(src), os.fspath(dst), on_loop))
            cross = os.path.dirname(os.fspath(src)) != os.path.dirname(os.fspath(dst))
            if cross and on_loop:
                raise AssertionError(f"{name} between directories on the loop thread: {src} {dst}")
            return real(src, dst, *a, **kw)

        return watched

    monkeypatch.setattr(os, "rename", watch("rename"))
    monkeypatch.setattr(os, "link", watch("link"))
    layer = corners.layers("esgz-64k")[0]
    mp = fs_env.mount(layer)
    for path in ("data/noise.bin", "data/text.txt"):
        assert _read(mp / path) == _content(layer, path)
    lay = fs.layer(str(mp))
    deadline = time.monotonic() + 10
    while fs_env.run(_busy(lay)):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    placed = [m for m in moves if os.path.dirname(m[1]) != os.path.dirname(m[2])]
    assert placed, "no cache file was placed: the test watched nothing"
    assert not [m for m in placed if m[3]], [m for m in placed if m[3]][:3]
    assert fs.disk.commits > 0
