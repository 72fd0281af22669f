"""The POSIX view through a real FUSE mount, alone and stacked with kernel overlayfs.

The ground truth is ``shared/fixtures/oci-corners.merged-tree.json``: what containerd's
own overlayfs snapshotter shows for the two ``orig`` layers unpacked. Each converted tag,
mounted lazily through our filesystem (one subtree per layer, bind-mounted where
containerd would put it) and stacked by the kernel's overlayfs, must list the same.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess

import pytest

from .conftest import overlay

TAGS = ["esgz", "esgz-64k", "zstdchunked"]


@pytest.mark.parametrize("tag", TAGS)
def test_overlay_of_lazy_layers_equals_ground_truth(
    fs_env, corners, corners_source, tree_listing, merged_truth, tag
):
    fs_env.start(corners_source)
    lower1, lower2 = (fs_env.mount(layer) for layer in corners.layers(tag))
    with overlay([lower2, lower1], fs_env.base / "merged") as merged:
        got = tree_listing(str(merged))
        # the whiteout hides the lower file; the opaque dir hides the lower dir's entries
        assert (lower1 / "etc/to-delete").exists() and not (merged / "etc/to-delete").exists()
        assert sorted(os.listdir(lower1 / "opaque")) == ["old-1", "old-2"]
        assert os.listdir(merged / "opaque") == ["new"]
        assert (merged / "etc/to-replace").read_bytes() == (lower2 / "etc/to-replace").read_bytes()
    assert got["hardlink_groups"] == merged_truth["hardlink_groups"]
    want = merged_truth["entries"]
    assert sorted(got["entries"]) == sorted(want)
    diffs = {p: (got["entries"][p], w) for p, w in want.items() if got["entries"][p] != w}
    assert not diffs, f"{len(diffs)} entries differ, e.g. {next(iter(diffs.items()))}"


def test_layer_view_details(fs_env, corners, corners_source):
    fs = fs_env.start(corners_source)
    l1, l2 = corners.layers("esgz")
    m1, m2 = fs_env.mount(l1), fs_env.mount(l2)

    # hardlinks: one inode, the right link count
    group = ["data/text.txt", "data/hardlink-2", "data/hardlink-to-text"]
    sts = [os.lstat(m1 / p) for p in group]
    assert len({s.st_ino for s in sts}) == 1
    assert all(s.st_nlink == 3 for s in sts)

    # st_blocks in 512-byte units, 4096-byte blocks, mtime from the TOC
    st = os.stat(m1 / "data/noise.bin")
    assert st.st_blocks == (st.st_size + 511) // 512
    assert st.st_blksize == 4096
    assert st.st_mtime > 1_600_000_000

    # devices, fifo, symlinks, xattrs
    assert stat.S_ISCHR(os.lstat(m1 / "data/chardev").st_mode)
    assert os.major(os.lstat(m1 / "data/chardev").st_rdev) == 1
    assert stat.S_ISBLK(os.lstat(m1 / "data/blockdev").st_mode)
    assert stat.S_ISFIFO(os.lstat(m1 / "data/fifo").st_mode)
    reader = fs.layer(l1.digest).reader
    symlinks = [p for p, n in reader.walk() if n.type == "symlink"]
    assert symlinks
    for p in symlinks:
        assert os.readlink(m1 / p) == reader.lookup(p).entry.link_name
        assert os.lstat(m1 / p).st_size == len(os.fsencode(os.readlink(m1 / p)))
    want = reader.lookup("data/xattr-file").entry.xattrs
    assert want and sorted(os.listxattr(m1 / "data/xattr-file")) == sorted(want)
    for name, value in want.items():
        assert os.getxattr(m1 / "data/xattr-file", name) == value
    with pytest.raises(OSError) as e:
        os.getxattr(m1 / "data/xattr-file", "user.not-there")
    assert e.value.errno == errno.ENODATA

    # whiteout: `.wh.to-delete` shows as the overlayfs whiteout char 0/0 `to-delete`
    names = os.listdir(m2 / "etc")
    assert "to-delete" in names and not any(n.startswith(".wh.") for n in names)
    wh = os.lstat(m2 / "etc/to-delete")
    assert stat.S_ISCHR(wh.st_mode) and wh.st_rdev == 0
    with pytest.raises(FileNotFoundError):
        os.lstat(m2 / "etc/.wh.to-delete")

    # opaque dir: marker hidden, xattr set; other dirs are not opaque
    assert ".wh..wh..opq" not in os.listdir(m2 / "opaque")
    assert os.getxattr(m2 / "opaque", "trusted.overlay.opaque") == b"y"
    assert "trusted.overlay.opaque" in os.listxattr(m2 / "opaque")
    with pytest.raises(OSError):
        os.getxattr(m2 / "etc", "trusted.overlay.opaque")

    # readdir has . and .. (os.listdir hides them; scandir via the raw fd does not)
    fd = os.open(m1 / "data", os.O_RDONLY | os.O_DIRECTORY)
    try:
        raw = _getdents_names(fd)
    finally:
        os.close(fd)
    assert b"." in raw and b".." in raw

    # the landmark is hidden at the layer root
    assert ".no.prefetch.landmark" not in os.listdir(m1)
    assert not os.path.exists(m1 / ".no.prefetch.landmark")

    # hidden state dir: not listed, 0500 / 0400, JSON with the layer's numbers
    assert ".stargz-snapshotter" not in os.listdir(m1)
    sd = m1 / ".stargz-snapshotter"
    assert stat.S_IMODE(os.stat(sd).st_mode) == 0o500
    sf = sd / f"{l1.digest}.json"
    assert os.listdir(sd) == [sf.name]
    assert stat.S_IMODE(os.stat(sf).st_mode) == 0o400
    state = json.loads(sf.read_text())
    assert state["digest"] == l1.digest and state["size"] == l1.size
    assert 0 < state["fetchedSize"] <= l1.size
    assert 0 < state["fetchedPercent"] <= 100

    # statfs answers (overlayfs needs it); the mount is read-only
    sv = os.statvfs(m1)
    assert sv.f_bsize == 4096
    with pytest.raises(OSError) as e:
        open(m1 / "data/new-file", "w")
    assert e.value.errno == errno.EROFS

    # the FUSE root lists each layer's subtree; the mount options are ours
    assert sorted(os.listdir(fs.fuse_dir)) == sorted(x.digest[7:] for x in (l1, l2))
    opts = _mount_line(fs.fuse_dir)
    assert "fuse.stargz" in opts and "stargz" in opts.split(" - ")[1].split()[1]
    assert "allow_other" in opts and " ro" in opts


def _getdents_names(fd: int) -> list[bytes]:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(1 << 16)
    names = []
    while True:
        n = libc.syscall(217, fd, buf, len(buf))  # getdents64
        if n <= 0:
            break
        pos = 0
        while pos < n:
            reclen = int.from_bytes(buf.raw[pos + 16 : pos + 18], "little")
            name = buf.raw[pos + 19 : pos + reclen].split(b"\0", 1)[0]
            names.append(name)
            pos += reclen
    return names


def _mount_line(path: str) -> str:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            if line.split(" ")[4] == path:
                return line.strip()
    raise AssertionError(f"{path} is not mounted")


def test_cri_labels_and_shared_layer(fs_env, corners, corners_source):
    """CRI labels work; the same layer at two snapshot dirs is opened once."""
    fs = fs_env.start(corners_source)
    l1 = corners.layers("esgz")[0]
    a = fs_env.mount(l1, cri=True)
    b = fs_env.mount(l1)
    assert corners_source.resolves == 1
    assert os.lstat(a / "data/text.txt").st_ino == os.lstat(b / "data/text.txt").st_ino
    fs_env.run(fs.unmount(str(a)))
    assert not os.path.ismount(a)
    assert (b / "data/text.txt").read_bytes()[:4] == b"line"
    fs_env.run(fs.unmount(str(b)))
    assert os.listdir(fs.fuse_dir) == []
    fs_env.run(fs.unmount(str(b)))  # tolerated: not mounted any more


def test_bad_toc_digest_refuses_mount(fs_env, corners, corners_source):
    from stargz.errors import DigestMismatch, InvalidArgument
    from stargz.fs.source import TOC_DIGEST_LABEL

    fs = fs_env.start(corners_source)
    l1 = corners.layers("esgz")[0]
    mp = fs_env.mountpoint()
    bad = {**_labels(l1), TOC_DIGEST_LABEL: "sha256:" + "0" * 64}
    with pytest.raises(DigestMismatch):
        fs_env.run(fs.mount(str(mp), bad))
    assert not os.path.ismount(mp) and os.listdir(mp) == []
    assert os.listdir(fs.fuse_dir) == []
    nolabel = {k: v for k, v in _labels(l1).items() if k != TOC_DIGEST_LABEL}
    with pytest.raises(InvalidArgument, match="digest of TOC JSON must be passed"):
        fs_env.run(fs.mount(str(mp), nolabel))
    assert fs.metrics.mount_failures == 2


def _labels(layer):
    from .conftest import labels_for

    return labels_for(layer)


def test_mode_bits_are_enforced_for_other_users(fs_env, corners, corners_source):
    """The mount is allow_other: a host user must not read what the layer's modes forbid."""
    fs_env.start(corners_source)
    m1 = fs_env.mount(corners.layers("esgz")[0])
    secret, public = m1 / "data/noise.bin", m1 / "data/text.txt"
    for d in m1.parents:  # the test's temporary dirs are 0700: let uid 1000 walk to m1
        if d == fs_env.base.parent:
            break
        os.chmod(d, 0o755)
    assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600 and os.stat(secret).st_uid == 0
    # uid 1000 owns data/ (0750) and data/text.txt (0644); noise.bin is root's, 0600
    user = ["setpriv", "--reuid=1000", "--regid=1000", "--clear-groups", "cat"]
    denied = subprocess.run([*user, str(secret)], capture_output=True, text=True)
    assert denied.returncode != 0 and "Permission denied" in denied.stderr
    allowed = subprocess.run([*user, str(public)], capture_output=True)
    assert allowed.returncode == 0 and allowed.stdout == public.read_bytes()
    # root still reads everything (overlayfs reads lower layers with the mounter's creds)
    assert len(secret.read_bytes()) == os.stat(secret).st_size


def test_a_lone_surrogate_in_a_link_target_or_xattr_name_reads_as_u_fffd():
    """The TOC builders refuse a name holding ``"\\ud800"``, but a symlink target or an
    xattr name may hold one: the mount answers U+FFFD there (as Go's JSON decoder reads
    it), never an encoding error on every READLINK / LISTXATTR."""
    from estargz.hostile import gzip_blob, toc_json

    from stargz.estargz import Reader
    from stargz.fs.tree import Tree

    entries = [
        {"name": "link", "type": "symlink", "linkName": "to-\ud800", "mode": 0o777},
        {"name": "f", "type": "reg", "size": 0, "mode": 0o644, "xattrs": {"user.\ud800": "dg=="}},
    ]
    blob = gzip_blob(b"", toc_json(entries))
    reader = Reader(lambda off, n: blob[off : off + n], len(blob))
    tree = Tree(reader)
    link = reader.lookup("link").id
    f = reader.lookup("f").id
    assert tree.readlink(link) == "to-\ufffd".encode()
    assert tree.xattrs(f) == {"user.\ufffd".encode(): b"v"}
