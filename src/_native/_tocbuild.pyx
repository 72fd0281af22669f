# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Native TOC builder: the one pass over a layer's TOC entries that opening it needs.

The contract is the pure-Python twin's, ``stargz.estargz._tocbuild_py``: same result,
same errors. This module is only the fast path, with two front ends over one per-entry
builder (`_Builder.entry`, fed one `Entry` of C values at a time):

- `build` (``build_fast``) walks the entries as ``json.loads`` made them, with C-level
  dict iteration, and copies every string it keeps;
- `build_json` (``build_json_fast``) reads the TOC JSON bytes itself: a scanner in C,
  run without the GIL, checks the whole document and writes one compact token per
  known key (`Tok`); then, with the GIL, the strings a node keeps are decoded from their
  byte spans and the same builder runs. No per-entry dict, no JSON-made object.

Neither formats errors: on the first thing one does not accept it stops (``_Reject``)
and the slow path runs on the same input (the twin on the entries; ``load_toc_doc`` and
then `build` on the bytes), which raises the exact error with its message, or returns
the reference result if it accepts what the fast path refused (the twin never changes
the entries, so re-running is safe). ``tests/estargz/test_tocbuild.py`` and
``tests/estargz/test_tocjson.py`` check that neither fast path refuses the corpus.
"""

from cpython.array cimport array, clone
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_GetItem, PyDict_Next, PyDict_SetItem
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from cpython.long cimport PyLong_AsLongLongAndOverflow
from cpython.mem cimport PyMem_Free, PyMem_Realloc
from cpython.object cimport Py_TYPE, PyObject, PyTypeObject
from cpython.unicode cimport PyUnicode_AsEncodedString, PyUnicode_GET_LENGTH
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcmp, memcpy, memset

from stargz.estargz import _tocbuild_py as _twin
from stargz.estargz.node import NO_CHILDREN, Node, OpenedTOC
from stargz.estargz.toc import (
    NO_PREFETCH_LANDMARK,
    PREFETCH_LANDMARK,
    clean_name,
    load_toc_doc,
)

__all__ = ["build", "build_json"]

cdef extern from "Python.h":
    bint PyBytes_CheckExact(object)
    object PyBytes_FromStringAndSize(const char *, Py_ssize_t)
    Py_ssize_t PyUnicode_Tailmatch(object, object, Py_ssize_t, Py_ssize_t, int) except -1
    bint PyDict_CheckExact(object)
    bint PyLong_CheckExact(object)
    bint PyUnicode_CheckExact(object)
    Py_ssize_t PyUnicode_FindChar(object, Py_UCS4, Py_ssize_t, Py_ssize_t, int) except -2
    const char *PyUnicode_AsUTF8AndSize(object, Py_ssize_t *) except NULL
    object PyUnicode_DecodeUTF8(const char *, Py_ssize_t, const char *)
    int PyUnicode_KIND(object)
    void *PyUnicode_DATA(object)
    object PyUnicode_FromKindAndData(int, const void *, Py_ssize_t)


class _Reject(Exception):
    """Raised by a fast path at the first entry (or byte) it does not accept."""


# JSON keys of a TOC entry -> code. (K_DIGEST and K_CDIGEST must stay adjacent.)
cdef enum:
    K_NAME, K_TYPE, K_SIZE, K_MODE, K_OFFSET, K_LINK, K_DIGEST, K_CDIGEST, K_COFF, K_CSIZE,
    K_INNER, K_XATTRS, K_MODTIME, K_UNAME, K_GNAME, K_UID, K_GID, K_DEVMAJ, K_DEVMIN, N_KEYS

cdef dict _KEYS = {
    "name": K_NAME, "type": K_TYPE, "size": K_SIZE, "mode": K_MODE, "offset": K_OFFSET,
    "linkName": K_LINK, "digest": K_DIGEST, "chunkDigest": K_CDIGEST,
    "chunkOffset": K_COFF, "chunkSize": K_CSIZE, "innerOffset": K_INNER, "xattrs": K_XATTRS,
    "modtime": K_MODTIME, "userName": K_UNAME, "groupName": K_GNAME,
    "uid": K_UID, "gid": K_GID, "devMajor": K_DEVMAJ, "devMinor": K_DEVMIN,
}
# The keys whose values are 64-bit ints; the rest are strings but for xattrs (an object).
cdef uint32_t INT_KEYS = (
    (1u << K_SIZE) | (1u << K_MODE) | (1u << K_OFFSET) | (1u << K_COFF) | (1u << K_CSIZE)
    | (1u << K_INNER) | (1u << K_UID) | (1u << K_GID) | (1u << K_DEVMAJ) | (1u << K_DEVMIN)
)

cdef enum:
    T_DIR, T_REG, T_SYMLINK, T_HARDLINK, T_CHAR, T_BLOCK, T_FIFO, T_CHUNK

cdef dict _TYPES = {
    "dir": T_DIR, "reg": T_REG, "symlink": T_SYMLINK, "hardlink": T_HARDLINK,
    "char": T_CHAR, "block": T_BLOCK, "fifo": T_FIFO, "chunk": T_CHUNK,
}
cdef tuple _TYPE_NAMES = ("dir", "reg", "symlink", "hardlink", "char", "block", "fifo", "chunk")
cdef array _Q = array("q")

# A Node is made without running Node.__init__ (bytecode: ~40% of a node's cost): its
# slots are set through their member descriptors, to what __init__ sets them to.
# tests/estargz/test_tocjson.py compares every slot with the twin's nodes.
_NODE_FIELDS = ("id", "name", "parent", "type", "mode", "size", "nlink", "children", "attrs",
                "offset", "_entry")
if sorted(_NODE_FIELDS) != sorted(Node.__slots__):  # (then the twin is used: see _backend)
    raise ImportError(f"Node's slots changed to {Node.__slots__}: update _tocbuild._node")
cdef tuple _NODE_SLOTS = tuple([Node.__dict__[k] for k in _NODE_FIELDS])
cdef tuple _NO_ARGS = ()


cdef object _node(object ident, str name, object parent, int t, object mode, int64_t size,
                  object attrs, int64_t offset):
    """Node(ident, name, parent, _TYPE_NAMES[t], mode, size, attrs, offset)."""
    cdef object node = (<PyTypeObject *>Node).tp_new(Node, <PyObject *>_NO_ARGS, NULL)
    cdef tuple d = _NODE_SLOTS
    cdef bint is_dir = t == T_DIR
    Py_TYPE(d[0]).tp_descr_set(d[0], node, ident)
    Py_TYPE(d[1]).tp_descr_set(d[1], node, name)
    Py_TYPE(d[2]).tp_descr_set(d[2], node, parent)
    Py_TYPE(d[3]).tp_descr_set(d[3], node, _TYPE_NAMES[t])
    Py_TYPE(d[4]).tp_descr_set(d[4], node, mode)
    Py_TYPE(d[5]).tp_descr_set(d[5], node, size)
    Py_TYPE(d[6]).tp_descr_set(d[6], node, 2 if is_dir else 1)
    Py_TYPE(d[7]).tp_descr_set(d[7], node, {} if is_dir else NO_CHILDREN)
    Py_TYPE(d[8]).tp_descr_set(d[8], node, attrs)
    Py_TYPE(d[9]).tp_descr_set(d[9], node, offset)
    Py_TYPE(d[10]).tp_descr_set(d[10], node, None)
    return node


cdef struct Vec:
    int64_t *p
    Py_ssize_t n
    Py_ssize_t cap


cdef int _push(Vec *v, int64_t x) except -1:
    cdef Py_ssize_t cap
    cdef int64_t *p
    if v.n == v.cap:
        cap = v.cap * 2 if v.cap else 256
        p = <int64_t *>PyMem_Realloc(v.p, cap * sizeof(int64_t))
        if p == NULL:
            raise MemoryError()
        v.p = p
        v.cap = cap
    v.p[v.n] = x
    v.n += 1
    return 0


cdef array _to_array(Vec *v):
    cdef array a = clone(_Q, v.n, False)
    if v.n:
        memcpy(a.data.as_voidptr, v.p, v.n * sizeof(int64_t))
    return a


# Lowercase hex digit -> value; 0xFF for every other byte.
cdef uint8_t _HEX[256]
memset(_HEX, 0xFF, 256)
for _c in range(10):
    _HEX[48 + _c] = _c
for _c in range(6):
    _HEX[97 + _c] = 10 + _c


cdef int _digest_into(const char *s, Py_ssize_t n, Vec *out) except -1:
    """Append the 32 bytes of ``sha256:<64 lowercase hex>`` (UTF-8 ``s[:n]``) to ``out``
    (as 4 int64s; NULL: only check it); _Reject if it is not one."""
    cdef const uint8_t *u = <const uint8_t *>s + 7
    cdef uint8_t buf[32]
    cdef uint8_t hi, lo, bad = 0
    cdef int k
    cdef int64_t word
    if n != 71 or memcmp(s, b"sha256:", 7) != 0:
        raise _Reject()
    for k in range(32):
        hi = _HEX[u[2 * k]]
        lo = _HEX[u[2 * k + 1]]
        bad |= hi | lo
        buf[k] = <uint8_t>((hi << 4) | lo)
    if bad & 0xF0:
        raise _Reject()
    if out != NULL:
        for k in range(4):
            memcpy(&word, buf + 8 * k, 8)
            _push(out, word)
    return 0


# One entry, as C values: what `_Builder.entry` reads, whichever front end filled it.
cdef struct Entry:
    uint32_t has              # bit k: key k is present and not null
    int t                     # T_* (when K_TYPE is present)
    int64_t num[N_KEYS]       # the int keys (0 when absent: every default is 0)
    PyObject *obj[N_KEYS]     # the other str keys and xattrs (borrowed)
    const char *dig[2]        # digest, chunkDigest: their UTF-8 bytes (not NUL-terminated)
    Py_ssize_t dlen[2]


# Memory: every object that outlives the build is made here, not taken from the parsed
# JSON. A survivor allocated by json.loads would sit among the entries' dicts, and one of
# them keeps a whole 1 MiB pymalloc arena of freed dicts resident: with the values taken
# as they were, 100k entries kept ~70 MB of freed JSON in RSS after the open. (The JSON
# scanner's strings are made for the build already: it passes copy=False.)


cdef inline str _copy_str(str s):
    """A new str equal to ``s`` (``s[:]`` would return ``s`` itself)."""
    return PyUnicode_FromKindAndData(
        PyUnicode_KIND(s), PyUnicode_DATA(s), PyUnicode_GET_LENGTH(s)
    )


cdef inline object _num(Entry *e, int k):
    """A new int for int key ``k``; None when absent."""
    if not (e.has & (1u << k)):
        return None
    return e.num[k]


cdef inline object _str(Entry *e, int k, bint copy):
    if not (e.has & (1u << k)):
        return None
    return _copy_str(<str>e.obj[k]) if copy else <object>e.obj[k]


cdef inline object _shared(Entry *e, int k, dict strings, bint copy):
    """Equal strings (modtimes, owners) share one object, the first seen (a copy)."""
    cdef PyObject *got
    if not (e.has & (1u << k)):
        return None
    got = PyDict_GetItem(strings, <object>e.obj[k])
    if got != NULL:
        return <object>got
    s = _copy_str(<str>e.obj[k]) if copy else <object>e.obj[k]
    PyDict_SetItem(strings, s, s)
    return s


cdef object _xattrs(Entry *e, bint copy):
    if not (e.has & (1u << K_XATTRS)):
        return None
    if not copy:
        return <object>e.obj[K_XATTRS]
    return {_copy_str(k): _copy_str(x) for k, x in (<dict>e.obj[K_XATTRS]).items()}


cdef tuple _attrs(Entry *e, dict strings, bint copy):
    """The node's ATTR_KEYS values (see stargz.estargz.node), as the twin's attrs_of:
    equal tuples without xattrs are one object."""
    cdef tuple attrs = (
        _shared(e, K_MODTIME, strings, copy),
        _str(e, K_LINK, copy),
        _num(e, K_UID),
        _num(e, K_GID),
        _shared(e, K_UNAME, strings, copy),
        _shared(e, K_GNAME, strings, copy),
        _num(e, K_DEVMAJ),
        _num(e, K_DEVMIN),
        _xattrs(e, copy),
    )
    if e.has & (1u << K_XATTRS):
        return attrs
    cdef PyObject *got = PyDict_GetItem(strings, attrs)
    if got != NULL:
        return <tuple>got
    PyDict_SetItem(strings, attrs, attrs)
    return attrs


cdef str _clean(str name):
    """clean_name's result; its fast path inline, the rest (and its errors) in Python."""
    cdef Py_ssize_t n = PyUnicode_GET_LENGTH(name), k
    cdef const uint8_t *p
    if n == 0:
        return name
    if PyUnicode_KIND(name) == 1:  # the usual case, in one pass: the checks below
        p = <const uint8_t *>PyUnicode_DATA(name)
        if p[0] == 47 or p[0] == 46:
            return clean_name(name)
        for k in range(n):
            if p[k] == 0 or (p[k] == 47 and k + 1 < n and (p[k + 1] == 47 or p[k + 1] == 46)):
                return clean_name(name)
        return name.rstrip("/") if p[n - 1] == 47 else name
    if (
        "\x00" in name or name[0] == "/" or name[0] == "." or "//" in name or "/." in name
    ):
        return clean_name(name)
    if name[n - 1] == "/":
        return name.rstrip("/")
    return name


# The builders run no bytecode, and the interpreter hands the GIL to a thread that has
# waited for it (the event loop; it asks after the switch interval, 5 ms) only when it runs
# bytecode: json.loads never does. So every so many entries (~0.3 ms of work) the builders
# call a Python function that does nothing. (Releasing the GIL there would not do: a
# waiter asks only if the GIL changed hands for none of its 5 ms, and would not get it.)
cdef enum:
    YIELD_EVERY = 255
    # A name component of more characters may be longer than NAME_MAX bytes in UTF-8.
    NAME_MAX_CHARS = 63

cdef int64_t MAX_ID = _twin.MAX_ID
cdef int64_t DEV_MAJOR_LIMIT = _twin.DEV_MAJOR_LIMIT
cdef int64_t DEV_MINOR_LIMIT = _twin.DEV_MINOR_LIMIT
cdef int64_t MODE_LIMIT = _twin.MODE_LIMIT

cdef object _checkpoint = _twin.gil_checkpoint


cdef class _Builder:
    """The per-entry logic of the twin's `build`, on `Entry` values; `finish` -> OpenedTOC."""
    cdef Vec ntype, nsize, nlink
    cdef Vec c_file, c_off, c_comp, c_inner, c_size, trailing
    cdef list nodes
    cdef dict by_path
    cdef dict ints  # mode values: a few distinct ones, one int object each
    cdef dict strings  # shared strings and attrs tuples
    cdef list pending  # hardlinks, linked at the end
    cdef Vec digests  # 32 bytes a chunk row
    cdef str last_dir  # the parent directory of the previous entry, and its id
    cdef int64_t last_dir_id
    cdef object root, out
    cdef int64_t cur, cur_size, expect_off, last_off, last_end
    cdef int64_t payload_end, max_chunk_size, max_depth, names_left
    cdef str cur_path  # the path of node `cur`
    cdef bint verify, copy

    def __dealloc__(self):
        PyMem_Free(self.ntype.p)
        PyMem_Free(self.nsize.p)
        PyMem_Free(self.nlink.p)
        PyMem_Free(self.c_file.p)
        PyMem_Free(self.c_off.p)
        PyMem_Free(self.c_comp.p)
        PyMem_Free(self.c_inner.p)
        PyMem_Free(self.c_size.p)
        PyMem_Free(self.trailing.p)
        PyMem_Free(self.digests.p)

    def __init__(self, int64_t payload_end, bint verify, int64_t max_chunk_size, bint copy,
                 int64_t max_depth, int64_t max_name_bytes):
        if max_depth < 1:
            raise _Reject()  # (no entry but the root fits: the twin decides)
        self.max_depth = max_depth
        self.names_left = max_name_bytes
        self.cur_path = ""
        self.payload_end = payload_end
        self.verify = verify
        self.max_chunk_size = max_chunk_size
        self.copy = copy
        self.nodes = []
        self.by_path = {}
        self.ints = {}
        self.strings = {}
        self.pending = []
        self.last_dir = ""
        self.last_dir_id = 0
        self.cur = -1
        self.cur_size = 0
        self.expect_off = 0
        self.last_off = -1
        self.last_end = 0
        self.add("", T_DIR, 0o755, 0, None, 0, -1, "")
        self.root = self.nodes[0]
        self.out = OpenedTOC(self.nodes, self.by_path, None)

    cdef int64_t add(self, str path, int t, int64_t mode, int64_t size, object attrs,
                     int64_t offset, int64_t parent, str base) except -1:
        cdef int64_t nid = len(self.nodes)
        ident = nid  # one int object for the node, by_path and its parent's children
        m = self.ints.get(mode)
        if m is None:
            m = mode
            self.ints[m] = m
        pnode = self.nodes[parent] if parent >= 0 else None
        node = _node(ident, base, pnode, t, m, size, attrs, offset)
        self.nodes.append(node)
        _push(&self.ntype, t)
        _push(&self.nsize, size)
        _push(&self.nlink, 2 if t == T_DIR else 1)
        PyDict_SetItem(self.by_path, path, ident)
        if parent >= 0:
            pnode.children[base] = ident
            if t == T_DIR:
                self.nlink.p[parent] += 1
        return nid

    cdef int64_t dir_for(self, str path) except -1:
        """The directory at ``path``, creating implicit parents top-down. Rejects a path
        whose entries would be deeper than max_depth (before walking it)."""
        cdef list missing = None
        cdef PyObject *got
        cdef Py_ssize_t j
        cdef int64_t nid
        if path.count("/") + 2 > self.max_depth:
            raise _Reject()
        got = PyDict_GetItem(self.by_path, path)
        while got == NULL:
            if missing is None:
                missing = []
            self.names_left -= PyUnicode_GET_LENGTH(path)
            if self.names_left < 0:
                raise _Reject()
            missing.append(path)
            j = PyUnicode_FindChar(path, 0x2F, 0, PyUnicode_GET_LENGTH(path), -1)
            path = path[:j] if j >= 0 else ""
            got = PyDict_GetItem(self.by_path, path)
        nid = <object>got
        if self.ntype.p[nid] != T_DIR:
            raise _Reject()
        if missing is not None:
            for sub in reversed(missing):
                j = PyUnicode_FindChar(sub, 0x2F, 0, PyUnicode_GET_LENGTH(sub), -1)
                base = sub[j + 1:]
                if PyUnicode_GET_LENGTH(base) > NAME_MAX_CHARS and _twin.component_too_long(base):
                    raise _Reject()
                nid = self.add(sub, T_DIR, 0o755, 0, None, 0, nid, base)
        return nid

    cdef int set_dir(self, int64_t nid, Entry *e) except -1:
        """A later entry of an existing directory (or the layer root) replaces its facts."""
        node = self.nodes[nid]
        node.mode = e.num[K_MODE]
        node.size = e.num[K_SIZE]
        node.attrs = _attrs(e, self.strings, self.copy)
        node.offset = e.num[K_OFFSET]
        self.nsize.p[nid] = e.num[K_SIZE]
        return 0

    cdef int entry(self, Py_ssize_t i, Entry *e) except -1:
        """Entry ``i``: the twin's loop body, or _Reject where the twin would raise."""
        cdef uint32_t has = e.has
        cdef int t = e.t
        cdef int64_t size = e.num[K_SIZE]
        cdef int64_t coff = e.num[K_COFF]
        cdef int64_t nid, parent, csize, offset, inner
        cdef Py_ssize_t j
        cdef PyObject *got
        cdef bint is_data
        cdef str name, raw, base
        if has & (1u << K_XATTRS):
            _twin.decode_xattrs(i, <object>e.obj[K_XATTRS])
        if not (has & (1u << K_NAME)) or not (has & (1u << K_TYPE)):
            raise _Reject()
        raw = name = <str>e.obj[K_NAME]
        is_data = t == T_REG or t == T_CHUNK
        if self.trailing.n and (not is_data or (t == T_REG and size <= 0)):
            self.trailing.p[self.trailing.n - 1] += 1
        if t == T_CHUNK:
            if self.cur < 0 or (
                PyUnicode_GET_LENGTH(name) and _clean(name) != self.cur_path
            ):
                raise _Reject()
        else:
            if self.cur >= 0 and self.expect_off != self.cur_size:
                raise _Reject()
            self.cur = -1
            name = _clean(name)
            # (the twin's check_values; fields left out are 0)
            if not (0 <= e.num[K_UID] <= MAX_ID and 0 <= e.num[K_GID] <= MAX_ID
                    and 0 <= e.num[K_DEVMAJ] < DEV_MAJOR_LIMIT
                    and 0 <= e.num[K_DEVMIN] < DEV_MINOR_LIMIT
                    and 0 <= e.num[K_MODE] < MODE_LIMIT and size >= 0):
                raise _Reject()
            if (t != T_REG or size == 0) and not (0 <= e.num[K_OFFSET] <= self.payload_end):
                raise _Reject()
            if self.copy and name is raw:
                name = _copy_str(name)  # a node's path and by_path key: not the JSON's
        if is_data and (t == T_CHUNK or size > 0):
            if t == T_REG:
                self.expect_off = 0
            if coff != self.expect_off:
                raise _Reject()
        if t == T_CHUNK:
            nid = self.cur
        elif PyUnicode_GET_LENGTH(name) == 0:
            if t != T_DIR:
                raise _Reject()
            self.set_dir(0, e)
            return 0
        else:
            self.names_left -= PyUnicode_GET_LENGTH(name)
            if self.names_left < 0:
                raise _Reject()
            j = PyUnicode_FindChar(name, 0x2F, 0, PyUnicode_GET_LENGTH(name), -1)
            if j < 0:
                parent = 0
            elif j == PyUnicode_GET_LENGTH(self.last_dir) and PyUnicode_Tailmatch(
                name, self.last_dir, 0, j, -1
            ):  # (entries come directory by directory: no slice and lookup for most)
                parent = self.last_dir_id
            else:
                self.last_dir = name[:j]
                self.last_dir_id = parent = self.dir_for(self.last_dir)
            base = name[j + 1:]
            if PyUnicode_GET_LENGTH(base) > NAME_MAX_CHARS and _twin.component_too_long(base):
                raise _Reject()
            if t == T_HARDLINK:
                link = <object>e.obj[K_LINK] if has & (1u << K_LINK) else ""
                self.pending.append((i, name, base, link))
                return 0
            got = PyDict_GetItem(self.by_path, name)
            if got != NULL:
                nid = <object>got
                if self.ntype.p[nid] == T_DIR and t == T_DIR:
                    self.set_dir(nid, e)
                    return 0
                if self.ntype.p[nid] == T_DIR or t == T_DIR:
                    raise _Reject()
            nid = self.add(name, t, e.num[K_MODE], size, _attrs(e, self.strings, self.copy),
                           e.num[K_OFFSET], parent, base)
            if name == PREFETCH_LANDMARK or name == NO_PREFETCH_LANDMARK:
                self.out.landmark = name
            if t == T_REG and size > 0:
                self.cur = nid
                self.cur_size = size
                self.cur_path = name
            if t == T_REG and (has & (1u << K_DIGEST)) and e.dlen[0]:
                if not (has & (1u << K_CDIGEST)) or e.dlen[0] != e.dlen[1] or memcmp(
                    e.dig[0], e.dig[1], e.dlen[0]
                ) != 0:
                    _digest_into(e.dig[0], e.dlen[0], NULL)  # (else checked as chunkDigest)
        if not is_data or (t == T_REG and size == 0):
            return 0
        # a chunk of node `nid`'s content
        csize = e.num[K_CSIZE]
        if csize == 0:
            csize = self.nsize.p[nid] - coff
        if csize <= 0 or coff + csize > self.nsize.p[nid] or csize > self.max_chunk_size:
            raise _Reject()
        offset = e.num[K_OFFSET]
        inner = e.num[K_INNER]
        if not (0 <= offset < self.payload_end) or inner < 0:
            raise _Reject()
        if offset < self.last_off or (offset == self.last_off and inner < self.last_end):
            raise _Reject()
        self.last_off = offset
        self.last_end = inner + csize
        if (has & (1u << K_CDIGEST)) and e.dlen[1]:
            _digest_into(e.dig[1], e.dlen[1], &self.digests)
        elif self.verify:
            raise _Reject()
        else:
            for j in range(4):
                _push(&self.digests, 0)
        _push(&self.c_file, nid)
        _push(&self.c_off, coff)
        _push(&self.c_comp, offset)
        _push(&self.c_inner, inner)
        _push(&self.c_size, csize)
        _push(&self.trailing, 0)
        self.expect_off = coff + csize
        return 0

    cdef object finish(self):
        cdef int64_t m
        if self.cur >= 0 and self.expect_off != self.cur_size:
            raise _Reject()
        for m in range(self.nlink.n):
            if self.nlink.p[m] != (2 if self.ntype.p[m] == T_DIR else 1):
                self.nodes[m].nlink = self.nlink.p[m]
        for item in self.pending:
            try:
                _twin._link(self.nodes, self.by_path, item[1], item[2], item[3])
            except Exception:
                raise _Reject()
        out = self.out
        out.chunk_file = _to_array(&self.c_file)
        out.chunk_off = _to_array(&self.c_off)
        out.chunk_comp = _to_array(&self.c_comp)
        out.chunk_inner = _to_array(&self.c_inner)
        out.chunk_size = _to_array(&self.c_size)
        out.trailing = _to_array(&self.trailing)
        out.chunk_digests = PyBytes_FromStringAndSize(
            <const char *>self.digests.p, self.digests.n * 8
        )
        _dirents(self, out)
        return out


cdef int _dirents(_Builder st, object out) except -1:
    """OpenedTOC.dirents_from_nodes, in C: same rows, same order."""
    cdef Vec parents, targets
    cdef list names = []
    cdef Py_ssize_t pos
    cdef PyObject *k
    cdef PyObject *v
    cdef int64_t m
    cdef dict children
    parents.p = targets.p = NULL
    parents.n = parents.cap = targets.n = targets.cap = 0
    try:
        for m in range(st.ntype.n):
            if st.ntype.p[m] != T_DIR:
                continue
            children = st.nodes[m].children
            pos = 0
            while PyDict_Next(children, &pos, &k, &v):
                _push(&parents, m)
                names.append(PyUnicode_AsEncodedString(<object>k, "utf-8", "surrogateescape"))
                _push(&targets, <object>v)
                if (targets.n & YIELD_EVERY) == YIELD_EVERY:
                    _checkpoint()
        out.dirent_parent = _to_array(&parents)
        out.dirent_name = names
        out.dirent_target = _to_array(&targets)
    finally:
        PyMem_Free(parents.p)
        PyMem_Free(targets.p)
    return 0


# --- front end 1: the entries as json.loads made them ----------------------------------


def build(list entries, *, payload_end, verify, max_chunk_size,
          max_depth=_twin.DEFAULT_MAX_DEPTH, max_name_bytes=_twin.DEFAULT_MAX_NAME_BYTES):
    """See ``stargz.estargz._tocbuild_py.build``."""
    try:
        return build_fast(entries, payload_end, verify, max_chunk_size, max_depth,
                          max_name_bytes)
    except _Reject:
        pass
    except Exception:  # e.g. UnsafePathError from clean_name: the twin raises it in order
        pass
    return _twin.build(
        entries, payload_end=payload_end, verify=verify, max_chunk_size=max_chunk_size,
        max_depth=max_depth, max_name_bytes=max_name_bytes,
    )


cdef int _fill_from_dict(Entry *e, object obj) except -1:
    cdef Py_ssize_t pos = 0
    cdef PyObject *k
    cdef PyObject *v
    cdef PyObject *got
    cdef int code, overflow
    cdef uint32_t bit
    cdef int64_t x
    if not PyDict_CheckExact(obj):
        raise _Reject()
    e.has = 0
    memset(e.num, 0, sizeof(e.num))
    while PyDict_Next(obj, &pos, &k, &v):
        got = PyDict_GetItem(_KEYS, <object>k)
        if got == NULL or <object>v is None:
            continue
        code = <object>got
        bit = 1u << code
        if bit & INT_KEYS:
            if not PyLong_CheckExact(<object>v):
                raise _Reject()
            overflow = 0
            x = PyLong_AsLongLongAndOverflow(<object>v, &overflow)
            if overflow:
                raise _Reject()
            e.num[code] = x
        elif code == K_XATTRS:
            if not PyDict_CheckExact(<object>v):
                raise _Reject()
            e.obj[code] = v
        elif not PyUnicode_CheckExact(<object>v):
            raise _Reject()
        elif code == K_TYPE:
            got = PyDict_GetItem(_TYPES, <object>v)
            if got == NULL:
                raise _Reject()
            e.t = <object>got
        elif code == K_DIGEST or code == K_CDIGEST:
            e.dig[code - K_DIGEST] = PyUnicode_AsUTF8AndSize(<object>v, &e.dlen[code - K_DIGEST])
        else:
            e.obj[code] = v
        e.has |= bit
    return 0


cpdef object build_fast(list entries, int64_t payload_end, bint verify, int64_t max_chunk_size,
                        int64_t max_depth=_twin.DEFAULT_MAX_DEPTH,
                        int64_t max_name_bytes=_twin.DEFAULT_MAX_NAME_BYTES):
    """The fast path: an `OpenedTOC`, or `_Reject` at the first doubtful entry."""
    cdef _Builder b = _Builder(payload_end, verify, max_chunk_size, True, max_depth,
                               max_name_bytes)
    cdef Entry e
    cdef Py_ssize_t i
    for i in range(PyList_GET_SIZE(entries)):
        _fill_from_dict(&e, <object>PyList_GET_ITEM(entries, i))
        b.entry(i, &e)
        if (i & YIELD_EVERY) == YIELD_EVERY:
            _checkpoint()
    return b.finish()


# --- front end 2: the TOC JSON bytes -------------------------------------------------------
#
# The scanner (`_scan`, no GIL) checks the document against the TOC's shape:
#
#     {"version": 1, "entries": [ {KEY: VALUE, ...}, ... ], OTHER: SCALAR, ...}
#
# with JSON's grammar as json.loads applies it (whitespace is " \t\n\r"; no control
# character in a string; escapes \" \\ \/ \b \f \n \r \t \uXXXX; strict UTF-8), and
# writes one `Tok` per entry and per known key with a non-null value. It refuses (the
# slow path then decides) anything where the dict build could differ or fail: a
# duplicate key, a number that is not a plain 64-bit int, a lone surrogate, a known key
# of the wrong JSON type, an unknown key (entry or top level) holding an array or an
# object, a key or a type/digest value spelled with escapes, an unknown type.
# `build_json_fast` alternates: the scanner writes the tokens of the next SCAN_BATCH
# entries without the GIL, then with it the strings a node keeps are made from their byte
# spans and `_Builder` runs on each entry. (Not the whole document first: its tokens,
# ~15 MB for 100k entries, stayed resident after free() once glibc had raised its mmap
# threshold, as the TOC's inflate does; a batch's stay hot in cache.) The result is
# returned only once the scanner has reached the end of a valid document: entries built
# before a later refusal are thrown away, and the slow path decides.
cdef enum:
    SCAN_BATCH = 1024

cdef enum:
    TK_ENTRY = N_KEYS  # n: the entry's tokens that follow
    TK_XKEY            # an xattr name; the next token is its value
    TK_XVAL

cdef struct Tok:
    uint8_t key    # K_* (n: pairs that follow, for K_XATTRS) or TK_*
    uint8_t esc    # a string with backslash escapes
    uint32_t n     # bytes of a string, or a count (see key)
    int64_t v      # int value; a string's offset in the document; T_* for K_TYPE


cdef enum:  # where a paused scan resumes (Scan.state)
    S_START, S_KEY, S_ENTRY, S_NEXT


cdef struct Scan:
    const uint8_t *s  # the document; s[n] is the NUL that ends every bytes object
    Py_ssize_t n
    Py_ssize_t i
    int state  # S_*
    bint version, entries  # seen
    Tok *tok  # the tokens of the entries scanned since ntok was last reset
    Py_ssize_t ntok
    Py_ssize_t cap
    bint nomem


cdef void _scan_init(Scan *sc, bytes data) noexcept:
    sc.s = <const uint8_t *>PyBytes_AS_STRING(data)
    sc.n = PyBytes_GET_SIZE(data)
    sc.i = 0
    sc.state = S_START
    sc.version = sc.entries = False
    sc.tok = NULL
    sc.ntok = sc.cap = 0
    sc.nomem = False


# Every loop below stops at a NUL byte without a bounds check: the document's terminating
# NUL is invalid wherever it can be met (not whitespace, not a digit, a control character
# in a string), and multi-byte look-aheads test one byte at a time, so none reads past it.


cdef inline void _ws(Scan *sc) noexcept nogil:
    cdef const uint8_t *s = sc.s
    cdef Py_ssize_t i = sc.i
    while s[i] == 32 or s[i] == 10 or s[i] == 13 or s[i] == 9:
        i += 1
    sc.i = i


cdef inline Tok *_tok(Scan *sc, int key) noexcept nogil:
    cdef Tok *p
    cdef Py_ssize_t cap
    if sc.ntok == sc.cap:
        cap = sc.cap * 2 if sc.cap else 4096
        p = <Tok *>realloc(sc.tok, cap * sizeof(Tok))
        if p == NULL:
            sc.nomem = True
            return NULL
        sc.tok = p
        sc.cap = cap
    p = &sc.tok[sc.ntok]
    sc.ntok += 1
    p.key = <uint8_t>key
    p.esc = 0
    p.n = 0
    p.v = 0
    return p


cdef inline int _anyhex(uint8_t c) noexcept nogil:
    if 48 <= c <= 57:
        return c - 48
    if 97 <= c <= 102:
        return c - 87
    if 65 <= c <= 70:
        return c - 55
    return -1


cdef inline int _hex4(const uint8_t *p) noexcept nogil:
    """The code unit of 4 hex digits (either case), or -1. Stops at the first non-digit."""
    cdef int x = 0, d, k
    for k in range(4):
        d = _anyhex(p[k])
        if d < 0:
            return -1
        x = x * 16 + d
    return x


cdef inline int _utf8_len(const uint8_t *p) noexcept nogil:
    """Length of the valid UTF-8 sequence (not ASCII, not a surrogate) at p, else 0."""
    cdef uint8_t c = p[0]
    cdef uint8_t lo = 0x80, hi = 0xBF
    if c < 0xC2:
        return 0
    if c < 0xE0:
        return 2 if (p[1] & 0xC0) == 0x80 else 0
    if c < 0xF0:
        if c == 0xE0:
            lo = 0xA0
        elif c == 0xED:
            hi = 0x9F  # (json.loads would pass UTF-8 surrogates: "surrogatepass")
        if p[1] < lo or p[1] > hi:
            return 0
        return 3 if (p[2] & 0xC0) == 0x80 else 0
    if c < 0xF5:
        if c == 0xF0:
            lo = 0x90
        elif c == 0xF4:
            hi = 0x8F
        if p[1] < lo or p[1] > hi or (p[2] & 0xC0) != 0x80:
            return 0
        return 4 if (p[3] & 0xC0) == 0x80 else 0
    return 0


cdef uint64_t ONES = 0x0101010101010101ULL
cdef uint64_t HIGH = 0x8080808080808080ULL
cdef uint64_t CTRL = 0x20 * ONES
cdef uint64_t QUOTES = 0x22 * ONES
cdef uint64_t BACKSLASHES = 0x5C * ONES


cdef int _string(Scan *sc, Tok *t) noexcept nogil:
    """The string at s[i] == '"': its span and escape flag into ``t`` (if not NULL)."""
    cdef const uint8_t *s = sc.s
    cdef Py_ssize_t start = sc.i + 1
    cdef Py_ssize_t i = start, last8 = sc.n - 8
    cdef uint8_t c, esc = 0
    cdef int cp, k
    cdef uint64_t w
    while True:
        # 8 bytes at a time while none is special: >= 0x80 (w), < 0x20 (w - 0x20..: only
        # a byte below 0x20 borrows), '"' or '\\' (a zero byte in w ^ 0x22.., w ^ 0x5C..).
        # (A borrow can flag a byte above a special one, never hide one.)
        while i <= last8:
            memcpy(&w, s + i, 8)
            if (w | (w - CTRL) | ((w ^ QUOTES) - ONES) | ((w ^ BACKSLASHES) - ONES)) & HIGH:
                break
            i += 8
        c = s[i]
        if 0x20 <= c < 0x80 and c != 34 and c != 92:
            i += 1
        elif c == 34:
            break
        elif c == 92:
            esc = 1
            c = s[i + 1]
            if c == 117:  # \uXXXX, a surrogate only as a high-low pair
                cp = _hex4(s + i + 2)
                if cp < 0 or 0xDC00 <= cp <= 0xDFFF:
                    return -1
                i += 6
                if 0xD800 <= cp <= 0xDBFF:
                    if s[i] != 92 or s[i + 1] != 117:
                        return -1
                    cp = _hex4(s + i + 2)
                    if not (0xDC00 <= cp <= 0xDFFF):
                        return -1
                    i += 6
            elif c in b'"\\/bfnrt':
                i += 2
            else:
                return -1
        elif c < 0x20:
            return -1  # a control character, or the end of the document
        else:
            k = _utf8_len(s + i)
            if k == 0:
                return -1
            i += k
    if t != NULL:
        t.v = start
        t.n = <uint32_t>(i - start)
        t.esc = esc
    sc.i = i + 1
    return 0


cdef int _int(Scan *sc, int64_t *out) noexcept nogil:
    """A JSON number that is a 64-bit int (-?(0|[1-9][0-9]*)); -1 for anything else."""
    cdef const uint8_t *s = sc.s
    cdef Py_ssize_t i = sc.i
    cdef uint64_t mag = 0, limit = 9223372036854775807ULL
    cdef bint neg = s[i] == 45
    cdef uint8_t c
    if neg:
        i += 1
        limit += 1
    c = s[i]
    if c == 48:
        i += 1
    elif 49 <= c <= 57:
        while 48 <= s[i] <= 57:
            if mag > (limit - (s[i] - 48)) // 10:
                return -1
            mag = mag * 10 + (s[i] - 48)
            i += 1
    else:
        return -1
    c = s[i]
    if c == 46 or c == 101 or c == 69 or 48 <= c <= 57:  # a float, or a leading zero
        return -1
    out[0] = <int64_t>(0 - mag) if neg else <int64_t>mag
    sc.i = i
    return 0


cdef int _literal(Scan *sc) noexcept nogil:
    """null -> 0, true -> 1, false -> 2, else -1."""
    cdef const uint8_t *s = sc.s + sc.i
    if s[0] == 110 and s[1] == 117 and s[2] == 108 and s[3] == 108:
        sc.i += 4
        return 0
    if s[0] == 116 and s[1] == 114 and s[2] == 117 and s[3] == 101:
        sc.i += 4
        return 1
    if s[0] == 102 and s[1] == 97 and s[2] == 108 and s[3] == 115 and s[4] == 101:
        sc.i += 5
        return 2
    return -1


cdef int _scalar(Scan *sc) noexcept nogil:
    """Skip a string, a 64-bit int, true, false or null (an unknown key's value)."""
    cdef uint8_t c = sc.s[sc.i]
    cdef int64_t x
    if c == 34:
        return _string(sc, NULL)
    if c == 45 or 48 <= c <= 57:
        return _int(sc, &x)
    return -1 if _literal(sc) < 0 else 0


cdef inline bint _is(const uint8_t *p, uint32_t n, const char *word, uint32_t m) noexcept nogil:
    return n == m and memcmp(p, word, m) == 0


cdef int _key_code(const uint8_t *p, uint32_t n) noexcept nogil:
    """K_* of an entry key spelled without escapes, -1 for an unknown key."""
    if n < 3:
        return -1
    c = p[0]
    if c == 110:
        return K_NAME if _is(p, n, "name", 4) else -1
    if c == 116:
        return K_TYPE if _is(p, n, "type", 4) else -1
    if c == 115:
        return K_SIZE if _is(p, n, "size", 4) else -1
    if c == 109:
        if _is(p, n, "mode", 4):
            return K_MODE
        return K_MODTIME if _is(p, n, "modtime", 7) else -1
    if c == 111:
        return K_OFFSET if _is(p, n, "offset", 6) else -1
    if c == 108:
        return K_LINK if _is(p, n, "linkName", 8) else -1
    if c == 100:
        if _is(p, n, "digest", 6):
            return K_DIGEST
        if _is(p, n, "devMajor", 8):
            return K_DEVMAJ
        return K_DEVMIN if _is(p, n, "devMinor", 8) else -1
    if c == 99:
        if _is(p, n, "chunkDigest", 11):
            return K_CDIGEST
        if _is(p, n, "chunkOffset", 11):
            return K_COFF
        return K_CSIZE if _is(p, n, "chunkSize", 9) else -1
    if c == 105:
        return K_INNER if _is(p, n, "innerOffset", 11) else -1
    if c == 120:
        return K_XATTRS if _is(p, n, "xattrs", 6) else -1
    if c == 117:
        if _is(p, n, "userName", 8):
            return K_UNAME
        return K_UID if _is(p, n, "uid", 3) else -1
    if c == 103:
        if _is(p, n, "groupName", 9):
            return K_GNAME
        return K_GID if _is(p, n, "gid", 3) else -1
    return -1


cdef int _type_code(const uint8_t *p, uint32_t n) noexcept nogil:
    if _is(p, n, "reg", 3):
        return T_REG
    if _is(p, n, "dir", 3):
        return T_DIR
    if _is(p, n, "chunk", 5):
        return T_CHUNK
    if _is(p, n, "symlink", 7):
        return T_SYMLINK
    if _is(p, n, "hardlink", 8):
        return T_HARDLINK
    if _is(p, n, "char", 4):
        return T_CHAR
    if _is(p, n, "block", 5):
        return T_BLOCK
    if _is(p, n, "fifo", 4):
        return T_FIFO
    return -1


cdef int _xattrs_obj(Scan *sc) noexcept nogil:
    """An xattrs object at s[i] == '{': K_XATTRS (n pairs), then TK_XKEY, TK_XVAL pairs."""
    cdef const uint8_t *s = sc.s
    cdef Py_ssize_t head = sc.ntok
    cdef uint32_t pairs = 0
    cdef Tok *t = _tok(sc, K_XATTRS)
    if t == NULL:
        return -1
    sc.i += 1
    _ws(sc)
    if s[sc.i] == 125:
        sc.i += 1
        return 0
    while True:
        if s[sc.i] != 34:
            return -1
        t = _tok(sc, TK_XKEY)
        if t == NULL or _string(sc, t):
            return -1
        _ws(sc)
        if s[sc.i] != 58:
            return -1
        sc.i += 1
        _ws(sc)
        if s[sc.i] != 34:
            return -1  # not a string: decode_xattrs raises
        t = _tok(sc, TK_XVAL)
        if t == NULL or _string(sc, t):
            return -1
        pairs += 1
        _ws(sc)
        if s[sc.i] == 44:
            sc.i += 1
            _ws(sc)
        elif s[sc.i] == 125:
            sc.i += 1
            sc.tok[head].n = pairs
            return 0
        else:
            return -1


cdef int _entry(Scan *sc) noexcept nogil:
    """One entry object at s[i] == '{': TK_ENTRY, then a token per known non-null key."""
    cdef const uint8_t *s = sc.s
    cdef Py_ssize_t head = sc.ntok
    cdef uint32_t seen = 0, bit
    cdef int code, lit
    cdef Tok key
    cdef Tok *t = _tok(sc, TK_ENTRY)
    cdef uint8_t c
    if t == NULL:
        return -1
    sc.i += 1
    _ws(sc)
    if s[sc.i] == 125:
        sc.i += 1
        return 0
    while True:
        if s[sc.i] != 34 or _string(sc, &key) or key.esc:
            return -1
        code = _key_code(s + key.v, key.n)
        _ws(sc)
        if s[sc.i] != 58:
            return -1
        sc.i += 1
        _ws(sc)
        c = s[sc.i]
        if code < 0:
            if _scalar(sc):
                return -1
        else:
            bit = 1u << code
            if seen & bit:
                return -1  # a duplicate key: json.loads keeps the last one
            seen |= bit
            if c == 110 or c == 116 or c == 102:
                if _literal(sc) != 0:
                    return -1  # true/false: the wrong type
            elif bit & INT_KEYS:
                t = _tok(sc, code)
                if t == NULL or _int(sc, &t.v):
                    return -1
            elif code == K_XATTRS:
                if c != 123 or _xattrs_obj(sc):
                    return -1
            else:
                if c != 34:
                    return -1
                t = _tok(sc, code)
                if t == NULL or _string(sc, t):
                    return -1
                if code == K_TYPE or code == K_DIGEST or code == K_CDIGEST:
                    if t.esc:
                        return -1
                    if code == K_TYPE:
                        t.v = _type_code(s + t.v, t.n)
                        if t.v < 0:
                            return -1
        _ws(sc)
        c = s[sc.i]
        if c == 44:
            sc.i += 1
            _ws(sc)
        elif c == 125:
            sc.i += 1
            sc.tok[head].n = <uint32_t>(sc.ntok - head - 1)
            return 0
        else:
            return -1


cdef int _scan(Scan *sc, Py_ssize_t max_entries) noexcept nogil:
    """Scan on, writing the tokens of up to ``max_entries`` entries: 1 paused between two
    entries, 0 at the valid end of a TOC this module reads exactly, -1 refused."""
    cdef const uint8_t *s = sc.s
    cdef Py_ssize_t done = 0
    cdef int64_t x
    cdef Tok key
    while True:
        if sc.state == S_ENTRY:  # at the next entry of the entries array
            if done == max_entries:
                return 1
            if s[sc.i] != 123 or _entry(sc):
                return -1
            done += 1
            _ws(sc)
            if s[sc.i] == 44:
                sc.i += 1
                _ws(sc)
            elif s[sc.i] == 93:
                sc.i += 1
                sc.state = S_NEXT
            else:
                return -1
        elif sc.state == S_KEY:  # at a key of the document
            if s[sc.i] != 34 or _string(sc, &key) or key.esc:
                return -1  # (this also refuses "{}": no version)
            _ws(sc)
            if s[sc.i] != 58:
                return -1
            sc.i += 1
            _ws(sc)
            sc.state = S_NEXT
            if _is(s + key.v, key.n, "version", 7):
                if sc.version or _int(sc, &x) or x != 1:
                    return -1
                sc.version = True
            elif _is(s + key.v, key.n, "entries", 7):
                if sc.entries:
                    return -1
                sc.entries = True
                if s[sc.i] == 91:
                    sc.i += 1
                    _ws(sc)
                    if s[sc.i] == 93:
                        sc.i += 1
                    else:
                        sc.state = S_ENTRY
                elif _literal(sc) != 0:
                    return -1
            elif _scalar(sc):
                return -1
        elif sc.state == S_NEXT:  # after a value of the document
            _ws(sc)
            if s[sc.i] == 44:
                sc.i += 1
                _ws(sc)
                sc.state = S_KEY
            elif s[sc.i] == 125:
                sc.i += 1
                _ws(sc)
                return 0 if sc.version and sc.i == sc.n else -1
            else:
                return -1
        else:  # S_START
            _ws(sc)
            if s[sc.i] != 123:
                return -1
            sc.i += 1
            _ws(sc)
            sc.state = S_KEY


cdef Py_ssize_t _unescape(const uint8_t *p, Py_ssize_t n, uint8_t *out) noexcept nogil:
    """UTF-8 of a JSON string body ``p[:n]`` that `_string` accepted; its length."""
    cdef Py_ssize_t i = 0, o = 0
    cdef uint8_t c
    cdef uint32_t cp
    while i < n:
        c = p[i]
        if c != 92:
            out[o] = c
            o += 1
            i += 1
            continue
        c = p[i + 1]
        if c != 117:
            out[o] = (
                8 if c == 98 else 12 if c == 102 else 10 if c == 110 else 13 if c == 114
                else 9 if c == 116 else c
            )
            o += 1
            i += 2
            continue
        cp = <uint32_t>_hex4(p + i + 2)
        i += 6
        if 0xD800 <= cp <= 0xDBFF:
            cp = 0x10000 + ((cp - 0xD800) << 10) + (<uint32_t>_hex4(p + i + 2) - 0xDC00)
            i += 6
        if cp < 0x80:
            out[o] = <uint8_t>cp
            o += 1
        elif cp < 0x800:
            out[o] = <uint8_t>(0xC0 | (cp >> 6))
            out[o + 1] = <uint8_t>(0x80 | (cp & 0x3F))
            o += 2
        elif cp < 0x10000:
            out[o] = <uint8_t>(0xE0 | (cp >> 12))
            out[o + 1] = <uint8_t>(0x80 | ((cp >> 6) & 0x3F))
            out[o + 2] = <uint8_t>(0x80 | (cp & 0x3F))
            o += 3
        else:
            out[o] = <uint8_t>(0xF0 | (cp >> 18))
            out[o + 1] = <uint8_t>(0x80 | ((cp >> 12) & 0x3F))
            out[o + 2] = <uint8_t>(0x80 | ((cp >> 6) & 0x3F))
            out[o + 3] = <uint8_t>(0x80 | (cp & 0x3F))
            o += 4
    return o


cdef object _text(const char *doc, Tok *t):
    """The str of a string token."""
    cdef uint8_t *buf
    cdef Py_ssize_t m
    if not t.esc:
        return PyUnicode_DecodeUTF8(doc + t.v, t.n, NULL)
    buf = <uint8_t *>malloc(t.n + 1)  # an escape never encodes to more bytes than it has
    if buf == NULL:
        raise MemoryError()
    try:
        m = _unescape(<const uint8_t *>doc + t.v, t.n, buf)
        return PyUnicode_DecodeUTF8(<const char *>buf, m, NULL)
    finally:
        free(buf)


# Modtimes and owners repeat (the python TOC: 367 modtimes in 8242 entries): a small cache
# from their bytes to the shared str skips making, hashing and dropping a str for most.
cdef enum:
    MEMO_SLOTS = 512

cdef uint32_t SHARED_KEYS = (1u << K_MODTIME) | (1u << K_UNAME) | (1u << K_GNAME)

cdef struct Memo:
    int64_t off  # bytes doc[off:off + n]
    uint32_t n
    PyObject *s  # the shared str (owned by the builder's ``strings``); NULL: empty slot


cdef PyObject *_shared_text(const char *doc, Tok *t, Memo *memo, dict strings) except NULL:
    """The str of string token ``t`` (no escapes), the one ``strings`` shares."""
    cdef const uint8_t *p = <const uint8_t *>doc + t.v
    cdef uint32_t h = 2166136261u, k
    cdef Memo *m
    cdef PyObject *got
    for k in range(t.n):  # FNV-1a
        h = (h ^ p[k]) * 16777619u
    m = &memo[h & (MEMO_SLOTS - 1)]
    if m.s != NULL and m.n == t.n and memcmp(doc + m.off, p, t.n) == 0:
        return m.s
    s = _text(doc, t)
    got = PyDict_GetItem(strings, s)
    if got == NULL:
        PyDict_SetItem(strings, s, s)
        got = <PyObject *>s
    m.off = t.v
    m.n = t.n
    m.s = got
    return got


def build_json(data, *, payload_end, verify, max_chunk_size,
               max_depth=_twin.DEFAULT_MAX_DEPTH, max_name_bytes=_twin.DEFAULT_MAX_NAME_BYTES):
    """See ``stargz.estargz._tocbuild_py.build_json``."""
    global _fallbacks
    if PyBytes_CheckExact(data):
        try:
            return build_json_fast(data, payload_end, verify, max_chunk_size, max_depth,
                                   max_name_bytes)
        except Exception:  # _Reject, or e.g. UnsafePathError: the slow path decides
            pass
    _fallbacks += 1
    return build(
        load_toc_doc(data)[1],
        payload_end=payload_end,
        verify=verify,
        max_chunk_size=max_chunk_size,
        max_depth=max_depth,
        max_name_bytes=max_name_bytes,
    )


cdef Py_ssize_t _fallbacks = 0


def json_fallbacks():
    """How many `build_json` calls took the slow path (json.loads + `build`) so far."""
    return _fallbacks


def scan(bytes data not None):
    """Whether the fast path reads ``data`` (the whole document checked, no GIL held);
    for tests and benchmarks."""
    cdef Scan sc
    cdef int rc = 1
    if PyBytes_GET_SIZE(data) >= (1 << 32):
        return False  # (as build_json_fast)
    _scan_init(&sc, data)
    try:
        with nogil:
            while rc == 1:
                sc.ntok = 0
                rc = _scan(&sc, SCAN_BATCH)
        if sc.nomem:
            raise MemoryError()
        return rc == 0
    finally:
        free(sc.tok)


cpdef object build_json_fast(bytes data, int64_t payload_end, bint verify,
                             int64_t max_chunk_size,
                             int64_t max_depth=_twin.DEFAULT_MAX_DEPTH,
                             int64_t max_name_bytes=_twin.DEFAULT_MAX_NAME_BYTES):
    """The fast path of `build_json`: an `OpenedTOC`, or `_Reject`."""
    cdef Scan sc
    cdef int rc = 1
    cdef Py_ssize_t t, end, i = 0, pairs
    cdef const char *doc = PyBytes_AS_STRING(data)
    cdef Tok *tk
    cdef Entry e
    cdef int code
    cdef uint32_t bit
    cdef _Builder b = _Builder(payload_end, verify, max_chunk_size, False, max_depth,
                               max_name_bytes)
    cdef dict x
    cdef list hold = [None] * N_KEYS  # keeps the entry's strings alive while e borrows them
    cdef Memo memo[MEMO_SLOTS]
    memset(memo, 0, sizeof(memo))
    if PyBytes_GET_SIZE(data) >= (1 << 32):
        raise _Reject()  # a string's length must fit Tok.n
    _scan_init(&sc, data)
    try:
        while rc == 1:
            sc.ntok = 0
            with nogil:
                rc = _scan(&sc, SCAN_BATCH)
            if sc.nomem:
                raise MemoryError()
            if rc < 0:
                raise _Reject()
            t = 0
            while t < sc.ntok:  # one entry: TK_ENTRY, then its keys' tokens
                end = t + 1 + sc.tok[t].n
                t += 1
                e.has = 0
                memset(e.num, 0, sizeof(e.num))
                while t < end:
                    tk = &sc.tok[t]
                    code = tk.key
                    bit = 1u << code
                    t += 1
                    if bit & INT_KEYS:
                        e.num[code] = tk.v
                    elif code == K_TYPE:
                        e.t = <int>tk.v
                    elif code == K_DIGEST or code == K_CDIGEST:
                        e.dig[code - K_DIGEST] = doc + tk.v
                        e.dlen[code - K_DIGEST] = tk.n
                    elif code == K_XATTRS:
                        x = {}
                        for pairs in range(tk.n):
                            k = _text(doc, &sc.tok[t])
                            if k in x:
                                raise _Reject()  # a duplicate name: json.loads keeps the last
                            x[k] = _text(doc, &sc.tok[t + 1])
                            t += 2
                        hold[code] = x
                        e.obj[code] = <PyObject *>x
                    elif bit & SHARED_KEYS and not tk.esc:
                        e.obj[code] = _shared_text(doc, tk, memo, b.strings)
                    else:
                        s = _text(doc, tk)
                        hold[code] = s
                        e.obj[code] = <PyObject *>s
                    e.has |= bit
                b.entry(i, &e)
                if (i & YIELD_EVERY) == YIELD_EVERY:
                    _checkpoint()
                i += 1
        return b.finish()
    finally:
        free(sc.tok)
