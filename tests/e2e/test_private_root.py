"""The daemon root keeps host users out of lazily mounted images.

The FUSE mount is ``allow_other`` (containers need it), so a host user reaching
``<root>/fuse/<layer>/`` or a snapshot's ``fs`` dir would read every lazily pulled image.
Here the root already exists with mode 0755 inside a directory anyone may traverse (what
an older daemon, or a careless ``mkdir``, leaves behind): the daemon narrows it to 0700 at
start, an unprivileged process (uid/gid 65534) is refused with EACCES everywhere under it,
containerd (root) still runs a container from the lazily mounted layer, and every file
the daemon wrote under the root is 0600 and every directory it made 0700.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from harness import Containerd, StargzDaemon, mounts_under
from harness.procs import make_tempdir, unmount_under

from e2e.test_lazy import (
    BUSYBOX_WORKLOAD,
    assert_lazily_mounted,
    busybox_expected_output,
    ctr_run,
    layers_of,
    rpull,
)

pytestmark = [pytest.mark.e2e, pytest.mark.interop, pytest.mark.timeout(180)]

NOBODY = 65534

#: Run as root, drops to nobody, then tries each path: {path: "ok" | errno name}.
_AS_NOBODY = """
import errno, json, os, sys
os.setgroups([])
os.setresgid(65534, 65534, 65534)
os.setresuid(65534, 65534, 65534)
out = {}
for p in sys.argv[1:]:
    try:
        if os.path.isdir(p):
            os.listdir(p)
        else:
            with open(p, "rb") as f:
                f.read(1)
        out[p] = "ok"
    except OSError as e:
        out[p] = errno.errorcode.get(e.errno, str(e.errno))
print(json.dumps(out))
"""


def as_nobody(paths: list[str]) -> dict[str, str]:
    """What uid/gid 65534 gets trying to list (dirs) or read (files) each path."""
    proc = subprocess.run(
        [sys.executable, "-c", _AS_NOBODY, *paths], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def own_entries(root: Path) -> tuple[dict[str, int], dict[str, int]]:
    """Modes of the dirs and regular files the daemon made under ``root``: mounts (the FUSE
    root, the snapshot ``fs`` dirs) and containerd's snapshot contents are not walked."""
    dirs: dict[str, int] = {}
    files: dict[str, int] = {}
    snapshots = root / "snapshots"
    for d, subdirs, names in os.walk(root):
        dp = Path(d)
        dirs[str(dp)] = stat.S_IMODE(dp.lstat().st_mode)
        if dp.parent == snapshots:  # <id>/fs and <id>/work belong to overlayfs
            subdirs[:] = []
            continue
        subdirs[:] = [s for s in subdirs if not os.path.ismount(dp / s)]
        for n in names:
            st = (dp / n).lstat()
            if stat.S_ISREG(st.st_mode):
                files[str(dp / n)] = stat.S_IMODE(st.st_mode)
    return dirs, files


def test_a_host_user_cannot_read_lazily_mounted_layers_but_containers_can(logged_registry, shared):
    base = make_tempdir("sgz-priv-")
    base.chmod(0o755)  # anyone may traverse: only the root's own mode protects it
    root = base / "root"
    root.mkdir(mode=0o755)
    root.chmod(0o755)
    (base / "daemon").mkdir()
    sd = c = None
    try:
        sd = StargzDaemon.start(base / "daemon", root=str(root))
        c = Containerd.start(sd.address)
        assert stat.S_IMODE(root.stat().st_mode) == 0o700
        narrowed = [r for r in sd.log_records() if r.get("path") == str(root)]
        assert narrowed and narrowed[0]["old_mode"] == "0755", sd.log_text()[-2000:]

        layout = shared / "fixtures" / "oci-busybox"
        ref = logged_registry.push_oci(layout, "opt", "busybox:opt")
        rpull(c, ref)
        assert_lazily_mounted(sd, c, layers_of(layout, "opt"))
        # containerd (root) mounts overlayfs over the FUSE-backed snapshot and runs it
        assert ctr_run(c, ref, "priv", *BUSYBOX_WORKLOAD) == busybox_expected_output(shared)

        fuse = root / "fuse"
        snap_mounts = sorted(mounts_under(root / "snapshots"))
        assert snap_mounts
        layer_dirs = [
            str(fuse / m.root.lstrip("/")) for m in mounts_under(root / "snapshots").values()
        ]
        targets = [
            str(root),
            str(fuse),
            *layer_dirs,
            *(str(Path(d) / "bin" / "busybox") for d in layer_dirs),
            str(root / "snapshots"),
            *snap_mounts,
            *(str(Path(mp) / "etc" / "greeting") for mp in snap_mounts),
            str(root / "metadata.db"),
            str(root / "cache"),
        ]
        # the same paths are readable by root: the refusals below are permissions only
        assert all(os.path.exists(p) for p in targets), targets
        got = as_nobody(targets)
        assert got == dict.fromkeys(targets, "EACCES"), got

        dirs, files = own_entries(root)
        assert {p: oct(m) for p, m in dirs.items() if m != 0o700} == {}
        assert {p: oct(m) for p, m in files.items() if m != 0o600} == {}
        names = {Path(p).name for p in files}
        assert "metadata.db" in names and "metadata.db-wal" in names, sorted(names)
        cache = root / "cache"
        assert any(str(cache / "layers") in p for p in files), "no TOC tail file was written"
        assert any(str(cache / "chunks") in p for p in files), "no chunk was cached"
    finally:
        for d in (c, sd):
            if d is not None:
                d.close()
        unmount_under(base)
        subprocess.run(["rm", "-rf", "--one-file-system", str(base)], check=False)
