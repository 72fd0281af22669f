"""This process's mount table, read from /proc/self/mountinfo.

Shared by the snapshotter (unmounting what is left under a snapshot) and the filesystem
(is a layer's bind mount still there?), which must not import each other.
"""

from __future__ import annotations


def _unescape(field: str) -> str:
    # The kernel escapes space, tab, newline and backslash as \ooo in mountinfo.
    out, i = [], 0
    while i < len(field):
        code = field[i + 1 : i + 4]
        if field[i] == "\\" and len(code) == 3 and code.isdigit():
            out.append(chr(int(code, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mount_points() -> list[str]:
    """Every mount point, in mount order (a path mounted twice appears twice)."""
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        return [_unescape(line.split(" ", 5)[4]) for line in f]


def entries() -> list[tuple[str, str, str, str]]:
    """``(mount point, "major:minor", root, fstype)`` of every mount, in mount order."""
    out = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.rstrip("\n").split(" ")
            sep = fields.index("-", 6)
            out.append((_unescape(fields[4]), fields[2], _unescape(fields[3]), fields[sep + 1]))
    return out
