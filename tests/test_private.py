"""The daemon's own files are 0600 and its directories 0700, whatever the umask, and a
directory left wider (by an older daemon, or ``mkdir``) is narrowed with a warning.

The end-to-end proof (a host user refused, containers served) is
tests/e2e/test_private_root.py; these are the pieces, quick and without mounts.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from stargz.fs.cache import DiskCache
from stargz.fs.passthrough import _merge
from stargz.private import private_dir
from stargz.snapshot.store import MetaStore


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(p: Path | str) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


def test_private_dir_creates_0700_and_narrows_a_wider_one(tmp_path, caplog):
    with umask(0):
        new = tmp_path / "a" / "b"
        private_dir(str(new))
        assert mode(new) == 0o700
        wide = tmp_path / "wide"
        wide.mkdir(0o755)
        caplog.set_level(logging.WARNING, "stargz")
        private_dir(str(wide))
    assert mode(wide) == 0o700
    (rec,) = [r for r in caplog.records if getattr(r, "path", None) == str(wide)]
    assert rec.levelno == logging.WARNING and rec.old_mode == "0755"
    caplog.clear()
    private_dir(str(wide))  # already right: nothing to say
    assert not caplog.records


def test_metadata_files_are_0600_new_or_existing(tmp_path):
    with umask(0o022):
        db = tmp_path / "metadata.db"
        s = MetaStore(str(db))
        try:
            with s.transaction(write=True):
                pass
            files = sorted(p.name for p in tmp_path.iterdir())
            assert {"metadata.db", "metadata.db-wal", "metadata.db-shm"} <= set(files)
            assert {f: oct(mode(tmp_path / f)) for f in files} == dict.fromkeys(files, "0o600")
        finally:
            s.close()
        for f in tmp_path.iterdir():  # as an older daemon left them
            f.chmod(0o644)
        MetaStore(str(db)).close()
    assert {f.name: oct(mode(f)) for f in tmp_path.iterdir()} == {
        f.name: "0o600" for f in tmp_path.iterdir()
    }


def test_cache_files_and_dirs_are_private(tmp_path):
    root = tmp_path / "cache"
    root.mkdir(0o755)
    with umask(0):
        cache = DiskCache(str(root))
        cache.load()
        cache.write_file("ab" + "0" * 62, b"chunk")
        cache.write_tail("sha256:" + "1" * 64, 10, 20, b"x" * 10)
        part = (cache.path("ab" + "0" * 62), 5)
        merged = _merge([part, part], cache, "m-" + "2" * 64 + "-7")
        assert merged is not None and merged[1] == 10
        assert cache.commit("m-" + "2" * 64 + "-7", 10, merged[0])
    found = {str(p.relative_to(tmp_path)): oct(mode(p)) for p in tmp_path.rglob("*")}
    assert found == {
        "cache": "0o700",
        "cache/chunks": "0o700",
        "cache/chunks/ab": "0o700",
        "cache/chunks/ab" + "/ab" + "0" * 62: "0o600",
        "cache/layers": "0o700",
        "cache/layers/sha256-" + "1" * 64: "0o600",
        "cache/merged": "0o700",
        "cache/merged/" + "2" * 64 + "-7": "0o600",
        "cache/tmp": "0o700",
    }
