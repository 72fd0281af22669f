"""Materialize a layer into a directory through random-access reads of its TOC.

Unlike a sequential ``tar -xzf``, every file is read chunk by chunk through the same
`Reader` the filesystem uses, so every chunk is verified against its digest. Whiteouts
(``.wh.*``) are written as the plain files the layer holds. Nothing is created outside
``dest``: names are cleaned by the reader, ``dest`` must be empty, and files are opened
with ``O_NOFOLLOW | O_EXCL``.
"""

from __future__ import annotations

import datetime
import errno
import os
import stat
import sys

from stargz.errors import InvalidArgument
from stargz.estargz.reader import Node, Reader


def _mtime(node: Node) -> float | None:
    if not node.entry.modtime:
        return None
    try:
        t = datetime.datetime.strptime(node.entry.modtime, "%Y-%m-%dT%H:%M:%SZ")
    except ValueError:
        return None
    return t.replace(tzinfo=datetime.UTC).timestamp()


def extract(reader: Reader, dest: str, *, warn=None) -> int:
    """Write the layer's tree into ``dest`` (created; must be empty). Returns #entries."""
    warn = warn or (lambda msg: print(f"stargz: warning: {msg}", file=sys.stderr))
    os.makedirs(dest, exist_ok=True)
    if os.listdir(dest):
        raise InvalidArgument(f"destination {dest!r} is not empty")
    root = os.geteuid() == 0
    first_path: dict[int, str] = {}
    dirs: list[tuple[str, Node]] = []
    count = 0
    for rel, node in reader.walk():
        path = os.path.join(dest, rel) if rel else dest
        e = node.entry
        if node.id in first_path and node.type != "dir":
            os.link(first_path[node.id], path, follow_symlinks=False)
            count += 1
            continue
        first_path[node.id] = path
        if node.type == "dir":
            if rel:
                os.mkdir(path, 0o700)
            dirs.append((path, node))
        elif node.type == "reg":
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            try:
                for row in reader.chunk_rows(node.id, 0, e.size):
                    os.write(fd, reader.read_chunk(row))
            finally:
                os.close(fd)
        elif node.type == "symlink":
            os.symlink(e.link_name, path)
        elif node.type == "fifo":
            os.mkfifo(path, 0o600)
        elif node.type in ("char", "block"):
            if not root:
                warn(f"skipping device {rel!r}: creating devices needs root")
                continue
            kind = stat.S_IFCHR if node.type == "char" else stat.S_IFBLK
            os.mknod(path, kind | 0o600, os.makedev(e.dev_major, e.dev_minor))
        count += 1
        if node.type != "dir":
            _set_attrs(path, node, root, warn)
    for path, node in reversed(dirs):  # children first, so a 0500 dir can be filled
        _set_attrs(path, node, root, warn)
    return count


def _set_attrs(path: str, node: Node, root: bool, warn) -> None:
    e = node.entry
    for name, value in e.xattrs.items():
        try:
            os.setxattr(path, name, value, follow_symlinks=False)
        except OSError as err:
            if err.errno not in (errno.ENOTSUP, errno.EPERM):
                raise
            warn(f"cannot set xattr {name!r} on {path!r}: {err.strerror}")
    if root:
        os.chown(path, e.uid, e.gid, follow_symlinks=False)
    if node.type != "symlink":
        os.chmod(path, e.mode & 0o7777)
    mtime = _mtime(node)
    if mtime is not None:
        os.utime(path, (mtime, mtime), follow_symlinks=False)
