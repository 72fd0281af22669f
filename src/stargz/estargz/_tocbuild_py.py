"""Pure-Python TOC builder: the reference for the native ``stargz.estargz._tocbuild``.

``build(entries, ...)`` takes the TOC's ``entries`` array as ``json.loads`` returns it and
does, in one pass, what opening a layer needs: type-check every entry (the same checks and
messages as `stargz.estargz.toc.entry_from_obj`), clean and check names, link the inode
tree (implicit parents, replacements, hardlinks), and check every chunk (coverage, order,
bounds, digests). It returns an `OpenedTOC`. Both backends must return equal results and
raise the same errors with the same messages (``tests/estargz/test_tocbuild.py``).

``build_json(data, ...)`` does the same from the TOC JSON bytes: here exactly
``build(load_toc_doc(data)[1], ...)`` (so it raises `load_toc_doc`'s errors too); the
native one reads the bytes itself (``tests/estargz/test_tocjson.py``).
"""

from __future__ import annotations

import re
from typing import Any

from stargz.errors import ChunkError, TOCError, VerificationError
from stargz.estargz.node import Node, OpenedTOC
from stargz.estargz.toc import (
    _INT64_MAX,
    _INT64_MIN,
    _KEY_TYPES,
    _TYPE_NAMES,
    ENTRY_TYPES,
    NO_PREFETCH_LANDMARK,
    PREFETCH_LANDMARK,
    clean_name,
    decode_xattrs,
    load_toc_doc,
)

_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}\Z")
ZERO_DIGEST = bytes(32)


#: Most path components (the entry's own name included) a name may have. A deep name
#: implies one directory per level, and paths of those directories cost the square of the
#: depth while the layer opens; no real image comes near (PATH_MAX 4096 allows ~2048).
DEFAULT_MAX_DEPTH = 256
#: Characters all the layer's paths may add up to: every entry's name, and the path of
#: every directory a name implies (which the TOC does not spell out). The reader's default
#: is the TOC JSON's size plus this: the entries' names are in the JSON, so only implied
#: directories can use the slack.
DEFAULT_MAX_NAME_BYTES = 64 << 20
#: Longest name component served (bytes). FUSE alone would carry 1024, but the mount
#: reports 255 (statfs f_namemax), overlayfs refuses longer names (ENAMETOOLONG), and no
#: Linux filesystem a layer is made from holds one.
NAME_MAX = 255


def short(name: str) -> str:
    """``name``, cut in the middle when it is long (error messages name hostile entries)."""
    return name if len(name) <= 200 else f"{name[:120]}...({len(name)} characters)...{name[-40:]}"


def _where(i: int, name: str) -> str:
    # Built only when an error is raised: formatting it for every entry is measurable.
    return f"TOC entry {i} ({short(name)!r})"


#: Owner ids a stat can carry: 32 bits, less (uid_t)-1, which chown(2) reads as "unchanged".
MAX_ID = (1 << 32) - 2
#: FUSE sends a 32-bit rdev, which the kernel splits as new_decode_dev does (and which
#: os.makedev makes for these ranges): a 12-bit major, a 20-bit minor.
DEV_MAJOR_LIMIT = 1 << 12
DEV_MINOR_LIMIT = 1 << 20
#: Mode bits a TOC may carry: permissions, setuid/setgid/sticky and (as some tar writers
#: put them in the header's mode) the S_IFMT type bits; the type itself is ``type``.
MODE_LIMIT = 1 << 16


def check_values(i: int, name: str, obj: dict, payload_end: int, etype: str, size: int) -> None:
    """Entry ``i``'s attributes fit what the mount sends the kernel (else a TOCError
    naming the field, once at open, instead of a failure on every LOOKUP)."""
    for key in ("uid", "gid"):
        v = _get(obj, key, 0)
        if not 0 <= v <= MAX_ID:
            raise TOCError(f"{_where(i, name)}: {key} {v} is not a valid owner (0 to {MAX_ID})")
    for key, limit in (("devMajor", DEV_MAJOR_LIMIT), ("devMinor", DEV_MINOR_LIMIT)):
        v = _get(obj, key, 0)
        if not 0 <= v < limit:
            raise TOCError(
                f"{_where(i, name)}: {key} {v} does not fit the 32-bit device number FUSE "
                f"sends (major below {DEV_MAJOR_LIMIT}, minor below {DEV_MINOR_LIMIT})"
            )
    mode = _get(obj, "mode", 0)
    if not 0 <= mode < MODE_LIMIT:
        raise TOCError(f"{_where(i, name)}: mode {mode:#o} is not a file mode (0 to 0o177777)")
    if size < 0:
        raise TOCError(f"{_where(i, name)}: negative size {size}")
    offset = _get(obj, "offset", 0)
    if (etype != "reg" or size == 0) and not 0 <= offset <= payload_end:
        # (a file's content offsets are checked with its chunks)
        raise TOCError(
            f"{_where(i, name)}: offset {offset} is outside the blob payload [0, {payload_end}]"
        )


def component_too_long(base: str) -> bool:
    """Whether a name component is longer than `NAME_MAX` bytes in UTF-8."""
    return len(base) > NAME_MAX // 4 and len(base.encode("utf-8", "surrogatepass")) > NAME_MAX


def _long_component(i: int, name: str, base: str) -> TOCError:
    n = len(base.encode("utf-8", "surrogatepass"))
    return TOCError(
        f"{_where(i, name)}: name component {short(base)!r} is {n} bytes, "
        f"longer than NAME_MAX ({NAME_MAX} bytes)"
    )


def _too_many_names(i: int, name: str, limit: int) -> TOCError:
    return TOCError(
        f"{_where(i, name)}: the layer's paths (names and the directories they imply) "
        f"exceed the limit of {limit} characters"
    )


def parse_digest(value: str, i: int, name: str, key: str) -> bytes:
    """The 32 raw bytes of ``sha256:<64 lowercase hex>`` (entry ``i``'s ``key``)."""
    if len(value) == 71 and value.startswith("sha256:") and _DIGEST_RE.match(value):
        return bytes.fromhex(value[7:])
    raise TOCError(f"{_where(i, name)} {key}: {value!r} is not a sha256 digest")


def check_entry(i: int, obj: Any) -> None:
    """The checks of `entry_from_obj`, without building the entry."""
    if type(obj) is not dict:
        raise TOCError(f"TOC entry {i} is not a JSON object")
    for key, value in obj.items():
        want = _KEY_TYPES.get(key)
        if want is None or value is None:
            continue  # unknown keys (e.g. NumLink) are ignored, as Go does
        if type(value) is not want:
            raise TOCError(f"TOC entry {i}: {key!r} must be {_TYPE_NAMES[want]}, got {value!r}")
        if want is int and not (_INT64_MIN <= value <= _INT64_MAX):
            raise TOCError(f"TOC entry {i}: {key!r} must be a 64-bit integer, got {value!r}")
    xattrs = obj.get("xattrs")
    if xattrs is not None:
        decode_xattrs(i, xattrs)
    name = obj.get("name")
    if name is None:
        raise TOCError(f"TOC entry {i} has no name")
    etype = obj.get("type")
    if etype not in ENTRY_TYPES:
        raise TOCError(f"TOC entry {i} ({name!r}) has unknown type {etype!r}")


def attrs_of(obj: dict, strings: dict[Any, Any]) -> tuple:
    """The node's ``ATTR_KEYS`` values; equal strings (modtimes, owners) share one object,
    and so do equal tuples (without xattrs)."""
    modtime = obj.get("modtime")
    if modtime is not None:
        modtime = strings.setdefault(modtime, modtime)
    user, group = obj.get("userName"), obj.get("groupName")
    if user is not None:
        user = strings.setdefault(user, user)
    if group is not None:
        group = strings.setdefault(group, group)
    xattrs = obj.get("xattrs")
    attrs = (
        modtime,
        obj.get("linkName"),
        obj.get("uid"),
        obj.get("gid"),
        user,
        group,
        obj.get("devMajor"),
        obj.get("devMinor"),
        xattrs,
    )
    return attrs if xattrs is not None else strings.setdefault(attrs, attrs)


def _get(obj: dict, key: str, default: Any) -> Any:
    value = obj.get(key)
    return default if value is None else value


def build(
    entries: list[Any],
    *,
    payload_end: int,
    verify: bool,
    max_chunk_size: int,
    max_depth: int = DEFAULT_MAX_DEPTH,
    max_name_bytes: int = DEFAULT_MAX_NAME_BYTES,
) -> OpenedTOC:
    """Check and index a TOC's entries (see the module docstring).

    ``max_depth`` bounds the path components of a name, ``max_name_bytes`` the characters
    of all paths (`DEFAULT_MAX_NAME_BYTES`): a few KB of TOC cannot take gigabytes.
    """
    root = Node(0, "", None, "dir", 0o755, 0, None)
    nodes: list[Node] = [root]
    by_path: dict[str, int] = {"": 0}
    out = OpenedTOC(nodes, by_path, None)
    c_file, c_off, c_comp, c_inner, c_size = (
        out.chunk_file,
        out.chunk_off,
        out.chunk_comp,
        out.chunk_inner,
        out.chunk_size,
    )
    c_digest = bytearray()
    trailing = out.trailing
    last_comp = (-1, 0)  # (offset, inner end) of the previous data entry
    current: Node | None = None  # the file whose chunks are being listed
    current_path = ""
    names_left = max_name_bytes
    expect_off = 0
    pending_links: list[tuple[int, str, str, str]] = []  # (i, name, base, link target)
    strings: dict[Any, Any] = {}

    def dir_for(path: str, i: int, name: str) -> Node:
        """The directory node at ``path``, creating implicit parents as Go does."""
        nonlocal names_left
        missing = []
        nid = by_path.get(path)
        while nid is None:  # (the depth is checked: at most max_depth - 1 levels)
            names_left -= len(path)
            if names_left < 0:
                raise _too_many_names(i, name, max_name_bytes)
            missing.append(path)
            path = path.rpartition("/")[0]
            nid = by_path.get(path)
        node = nodes[nid]
        if node.type != "dir":
            raise TOCError(f"{_where(i, name)}: parent {path!r} is a {node.type}, not a directory")
        for sub in reversed(missing):
            base = sub.rpartition("/")[2]
            if len(base) > NAME_MAX // 4 and component_too_long(base):
                raise _long_component(i, name, base)
            child = Node(len(nodes), base, node, "dir", 0o755, 0, None)
            nodes.append(child)
            by_path[sub] = child.id
            node.children[base] = child.id
            node.nlink += 1
            node = child
        return node

    for i, obj in enumerate(entries):
        check_entry(i, obj)
        name: str = obj["name"]
        etype: str = obj["type"]
        size: int = _get(obj, "size", 0)
        chunk_offset: int = _get(obj, "chunkOffset", 0)
        is_data = etype == "reg" or etype == "chunk"
        if trailing and (not is_data or (etype == "reg" and size <= 0)):
            trailing[-1] += 1
        if etype == "chunk":
            if current is None or (name and clean_name(name) != current_path):
                raise TOCError(f"{_where(i, name)}: chunk does not follow its file")
        else:
            if current is not None and expect_off != current.size:
                raise ChunkError(
                    f"file {current.path!r}: chunks cover {expect_off} of {current.size} bytes"
                )
            current = None
            name = clean_name(name)
            get = obj.get
            if not (
                0 <= (get("uid") or 0) <= MAX_ID
                and 0 <= (get("gid") or 0) <= MAX_ID
                and 0 <= (get("devMajor") or 0) < DEV_MAJOR_LIMIT
                and 0 <= (get("devMinor") or 0) < DEV_MINOR_LIMIT
                and 0 <= (get("mode") or 0) < MODE_LIMIT
                and size >= 0
                and (etype == "reg" and size or 0 <= (get("offset") or 0) <= payload_end)
            ):  # (inline: a call per entry costs; check_values says what is wrong)
                check_values(i, name, obj, payload_end, etype, size)
        if is_data and (etype == "chunk" or size > 0):
            if etype == "reg":
                expect_off = 0
            if chunk_offset != expect_off:
                raise ChunkError(
                    f"{_where(i, name)}: chunk offset {chunk_offset} leaves a gap or overlaps "
                    f"(expected {expect_off})"
                )
        if etype == "chunk":
            assert current is not None
            node = current
        elif name == "":
            # the layer's own root directory ("./")
            if etype != "dir":
                raise TOCError(f"{_where(i, name)}: the layer root must be a directory")
            root.mode, root.size, root.attrs = _get(obj, "mode", 0), size, attrs_of(obj, strings)
            root.offset = _get(obj, "offset", 0)
            continue
        else:
            depth = name.count("/") + 1
            if depth > max_depth:
                raise TOCError(
                    f"{_where(i, name)}: {depth} path components, more than the limit "
                    f"of {max_depth}"
                )
            names_left -= len(name)
            if names_left < 0:
                raise _too_many_names(i, name, max_name_bytes)
            head, _, base = name.rpartition("/")
            if len(base) > NAME_MAX // 4 and component_too_long(base):
                raise _long_component(i, name, base)
            parent = dir_for(head, i, name)
            if etype == "hardlink":
                pending_links.append((i, name, base, _get(obj, "linkName", "")))
                continue
            old = by_path.get(name)
            if old is not None:  # a later entry replaces an earlier one, as tar does
                prev = nodes[old]
                if prev.type == "dir" and etype == "dir":
                    prev.mode, prev.size = _get(obj, "mode", 0), size
                    prev.attrs = attrs_of(obj, strings)
                    prev.offset = _get(obj, "offset", 0)
                    continue
                if prev.type == "dir" or etype == "dir":
                    raise TOCError(f"{_where(i, name)}: replaces a {prev.type} with a {etype}")
            # A replacement gets a fresh id (the old node becomes unreachable), so chunk
            # rows stay sorted by file id.
            node = Node(
                len(nodes),
                base,
                parent,
                etype,
                _get(obj, "mode", 0),
                size,
                attrs_of(obj, strings),
                _get(obj, "offset", 0),
            )
            nodes.append(node)
            by_path[name] = node.id
            parent.children[base] = node.id
            if etype == "dir":
                parent.nlink += 1
            if name == PREFETCH_LANDMARK or name == NO_PREFETCH_LANDMARK:
                out.landmark = name
            if etype == "reg" and size > 0:
                current = node
                current_path = name
            digest = obj.get("digest")
            if etype == "reg" and digest and digest != obj.get("chunkDigest"):
                parse_digest(digest, i, name, "digest")  # (else checked as chunkDigest)
        if not is_data or (etype == "reg" and size == 0):
            continue
        # a chunk of `node`'s content
        csize = _get(obj, "chunkSize", 0) or (node.size - chunk_offset)
        if csize <= 0 or chunk_offset + csize > node.size:
            raise ChunkError(
                f"{_where(i, name)}: chunk [{chunk_offset}, +{csize}) is outside the file "
                f"of {node.size} bytes"
            )
        if csize > max_chunk_size:
            raise ChunkError(
                f"{_where(i, name)}: chunk of {csize} bytes exceeds the limit of {max_chunk_size}"
            )
        offset = _get(obj, "offset", 0)
        inner = _get(obj, "innerOffset", 0)
        if not (0 <= offset < payload_end) or inner < 0:
            raise ChunkError(
                f"{_where(i, name)}: offset {offset} is outside the blob payload [0, {payload_end})"
            )
        if (offset, inner) < last_comp:
            raise ChunkError(
                f"{_where(i, name)}: compressed offset {offset}+{inner} overlaps the "
                f"previous chunk (which ends at {last_comp[0]}+{last_comp[1]})"
            )
        last_comp = (offset, inner + csize)
        chunk_digest = obj.get("chunkDigest")
        if chunk_digest:
            c_digest += parse_digest(chunk_digest, i, name, "chunkDigest")
        elif verify:
            raise VerificationError(f"{_where(i, name)}: no chunkDigest, cannot verify content")
        else:
            c_digest += ZERO_DIGEST
        c_file.append(node.id)
        c_off.append(chunk_offset)
        c_comp.append(offset)
        c_inner.append(inner)
        c_size.append(csize)
        trailing.append(0)
        expect_off = chunk_offset + csize
    if current is not None and expect_off != current.size:
        raise ChunkError(
            f"file {current.path!r}: chunks cover {expect_off} of {current.size} bytes"
        )

    for _i, name, base, link_name in pending_links:
        _link(nodes, by_path, name, base, link_name)
    out.chunk_digests = bytes(c_digest)
    out.dirents_from_nodes()
    return out


def build_json(
    data: bytes,
    *,
    payload_end: int,
    verify: bool,
    max_chunk_size: int,
    max_depth: int = DEFAULT_MAX_DEPTH,
    max_name_bytes: int = DEFAULT_MAX_NAME_BYTES,
) -> OpenedTOC:
    """`build` of the entries of TOC JSON bytes (see the module docstring)."""
    return build(
        load_toc_doc(data)[1],
        payload_end=payload_end,
        verify=verify,
        max_chunk_size=max_chunk_size,
        max_depth=max_depth,
        max_name_bytes=max_name_bytes,
    )


def gil_checkpoint() -> None:
    """Nothing, in bytecode: the native builders call it now and then so that a thread
    waiting for the GIL gets it (see ``YIELD_EVERY`` in ``src/_native/_tocbuild.pyx``)."""


def _link(nodes: list[Node], by_path: dict[str, int], name: str, base: str, link_name: str) -> None:
    where = f"hardlink {name!r}"
    target = clean_name(link_name)
    tid = by_path.get(target)
    if tid is None:
        raise TOCError(f"{where}: target {link_name!r} is not in the layer")
    node = nodes[tid]
    if node.type == "dir":
        raise TOCError(f"{where}: target {link_name!r} is a directory")
    parent = nodes[by_path[name.rpartition("/")[0]]]
    if base in parent.children:
        raise TOCError(f"{where}: the name is already taken")
    parent.children[base] = tid
    by_path[name] = tid
    node.nlink += 1
