# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Native TOC builder: the one pass over a layer's TOC entries that opening it needs.

The contract is the pure-Python twin's, ``stargz.estargz._tocbuild_py.build``: same
result, same errors. This module is only the fast path. It walks the entries with C-level
dict iteration, keeps per-node facts and the chunk columns in C arrays, and creates one
`Node` per inode but no `TOCEntry`. It does not format errors: on the first thing it
does not accept it stops (``_Reject``) and `build` runs the twin on the same entries,
which raises the exact error with its message. The twin never changes the entries, so
re-running it is safe; if it accepts what this module rejected, its result is returned
(the twin is the reference) — ``tests/test_native_tocbuild.py`` checks that this never
happens on the corpus.
"""

from cpython.array cimport array, clone
from cpython.dict cimport PyDict_GetItem, PyDict_Next, PyDict_SetItem
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from cpython.long cimport PyLong_AsLongLongAndOverflow, PyLong_FromLongLong
from cpython.mem cimport PyMem_Free, PyMem_Realloc
from cpython.object cimport PyObject
from cpython.unicode cimport PyUnicode_AsEncodedString, PyUnicode_GET_LENGTH
from libc.stdint cimport int64_t, uint8_t
from libc.string cimport memcmp, memcpy

from stargz.estargz import _tocbuild_py as _twin
from stargz.estargz.node import Node, OpenedTOC
from stargz.estargz.toc import NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK, clean_name

__all__ = ["build"]

cdef extern from "Python.h":
    bint PyDict_CheckExact(object)
    bint PyLong_CheckExact(object)
    bint PyUnicode_CheckExact(object)
    Py_ssize_t PyUnicode_FindChar(object, Py_UCS4, Py_ssize_t, Py_ssize_t, int) except -2
    const char *PyUnicode_AsUTF8AndSize(object, Py_ssize_t *) except NULL
    int PyUnicode_KIND(object)
    void *PyUnicode_DATA(object)
    object PyUnicode_FromKindAndData(int, const void *, Py_ssize_t)


class _Reject(Exception):
    """Raised by the fast path at the first entry it does not accept."""


# JSON keys of a TOC entry -> (code, kind). kind: 0 str, 1 int, 2 object.
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

cdef enum:
    T_DIR, T_REG, T_SYMLINK, T_HARDLINK, T_CHAR, T_BLOCK, T_FIFO, T_CHUNK

cdef dict _TYPES = {
    "dir": T_DIR, "reg": T_REG, "symlink": T_SYMLINK, "hardlink": T_HARDLINK,
    "char": T_CHAR, "block": T_BLOCK, "fifo": T_FIFO, "chunk": T_CHUNK,
}
cdef tuple _TYPE_NAMES = ("dir", "reg", "symlink", "hardlink", "char", "block", "fifo", "chunk")
cdef array _Q = array("q")


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


cdef inline int _hex(uint8_t c) noexcept nogil:
    if 48 <= c <= 57:
        return c - 48
    if 97 <= c <= 102:
        return c - 87
    return -1


cdef int _digest_into(object value, bytearray out) except -1:
    """Append the 32 bytes of ``sha256:<64 lowercase hex>``; _Reject if it is not one."""
    cdef Py_ssize_t n, k
    cdef const char *s = PyUnicode_AsUTF8AndSize(value, &n)
    cdef const uint8_t *u = <const uint8_t *>s
    cdef uint8_t buf[32]
    cdef int hi, lo
    if n != 71 or PyUnicode_GET_LENGTH(value) != 71 or memcmp(s, b"sha256:", 7) != 0:
        raise _Reject()
    for k in range(32):
        hi = _hex(u[7 + 2 * k])
        lo = _hex(u[8 + 2 * k])
        if hi < 0 or lo < 0:
            raise _Reject()
        buf[k] = <uint8_t>(hi * 16 + lo)
    out += (<char *>buf)[:32]
    return 0


cdef inline int64_t _int(PyObject *v, int64_t default) except? -1:
    cdef int overflow = 0
    if v == NULL:
        return default
    return PyLong_AsLongLongAndOverflow(<object>v, &overflow)


# Memory: every object that outlives the build is made here, not taken from the parsed
# JSON. A survivor allocated by json.loads would sit among the entries' dicts, and one of
# them keeps a whole 1 MiB pymalloc arena of freed dicts resident: with the values taken
# as they were, 100k entries kept ~70 MB of freed JSON in RSS after the open.


cdef inline str _copy_str(str s):
    """A new str equal to ``s`` (``s[:]`` would return ``s`` itself)."""
    return PyUnicode_FromKindAndData(
        PyUnicode_KIND(s), PyUnicode_DATA(s), PyUnicode_GET_LENGTH(s)
    )


cdef inline object _int_copy(PyObject *v):
    """A new int equal to the (checked, 64-bit) JSON int ``v``; None when absent."""
    cdef int overflow = 0
    if v == NULL:
        return None
    return PyLong_FromLongLong(PyLong_AsLongLongAndOverflow(<object>v, &overflow))


cdef inline object _str_copy(PyObject *v):
    return None if v == NULL else _copy_str(<str>v)


cdef inline object _shared(PyObject *v, dict strings):
    """Equal strings (modtimes, owners) share one object, a copy of the first seen."""
    cdef PyObject *got
    if v == NULL:
        return None
    got = PyDict_GetItem(strings, <object>v)
    if got != NULL:
        return <object>got
    s = _copy_str(<str>v)
    PyDict_SetItem(strings, s, s)
    return s


cdef object _xattrs_copy(PyObject *v):
    if v == NULL:
        return None
    return {_copy_str(k): _copy_str(x) for k, x in (<dict>v).items()}


cdef tuple _attrs(PyObject **vals, dict strings):
    """The node's ATTR_KEYS values (see stargz.estargz.node), as the twin's attrs_of:
    equal tuples without xattrs are one object."""
    cdef tuple attrs = (
        _shared(vals[K_MODTIME], strings),
        _str_copy(vals[K_LINK]),
        _int_copy(vals[K_UID]),
        _int_copy(vals[K_GID]),
        _shared(vals[K_UNAME], strings),
        _shared(vals[K_GNAME], strings),
        _int_copy(vals[K_DEVMAJ]),
        _int_copy(vals[K_DEVMIN]),
        _xattrs_copy(vals[K_XATTRS]),
    )
    if vals[K_XATTRS] != NULL:
        return attrs
    cdef PyObject *got = PyDict_GetItem(strings, attrs)
    if got != NULL:
        return <tuple>got
    PyDict_SetItem(strings, attrs, attrs)
    return attrs


cdef str _clean(str name):
    """clean_name's result; its fast path inline, the rest (and its errors) in Python."""
    cdef Py_ssize_t n = PyUnicode_GET_LENGTH(name)
    if n == 0:
        return name
    if (
        "\x00" in name or name[0] == "/" or name[0] == "." or "//" in name or "/." in name
    ):
        return clean_name(name)
    if name[n - 1] == "/":
        return name.rstrip("/")
    return name


def build(list entries, *, payload_end, verify, max_chunk_size):
    """See ``stargz.estargz._tocbuild_py.build``."""
    try:
        return build_fast(entries, payload_end, verify, max_chunk_size)
    except _Reject:
        pass
    except Exception:  # e.g. UnsafePathError from clean_name: the twin raises it in order
        pass
    return _twin.build(
        entries, payload_end=payload_end, verify=verify, max_chunk_size=max_chunk_size
    )


cdef class _State:
    cdef Vec ntype, nsize, nlink
    cdef Vec c_file, c_off, c_comp, c_inner, c_size, trailing
    cdef list nodes
    cdef dict by_path
    cdef dict ints  # mode values: a few distinct ones, one int object each

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

    cdef int64_t add(self, str path, int t, int64_t mode, int64_t size, object attrs,
                     int64_t offset, int64_t parent, str base) except -1:
        cdef int64_t nid = len(self.nodes)
        ident = nid  # one int object for the node, by_path and its parent's children
        m = self.ints.get(mode)
        if m is None:
            m = mode
            self.ints[m] = m
        node = Node(ident, path, _TYPE_NAMES[t], m, size, attrs, offset)
        self.nodes.append(node)
        _push(&self.ntype, t)
        _push(&self.nsize, size)
        _push(&self.nlink, 2 if t == T_DIR else 1)
        PyDict_SetItem(self.by_path, path, ident)
        if parent >= 0:
            self.nodes[parent].children[base] = ident
            if t == T_DIR:
                self.nlink.p[parent] += 1
        return nid

    cdef int64_t dir_for(self, str path) except -1:
        """The directory at ``path``, creating implicit parents top-down."""
        cdef list missing = None
        cdef PyObject *got = PyDict_GetItem(self.by_path, path)
        cdef Py_ssize_t j
        cdef int64_t nid
        while got == NULL:
            if missing is None:
                missing = []
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
                nid = self.add(sub, T_DIR, 0o755, 0, None, 0, nid, sub[j + 1:])
        return nid


cpdef object build_fast(list entries, int64_t payload_end, bint verify, int64_t max_chunk_size):
    """The fast path: an `OpenedTOC`, or `_Reject` at the first doubtful entry."""
    cdef _State st = _State()
    st.nodes = []
    st.by_path = {}
    st.ints = {}
    st.add("", T_DIR, 0o755, 0, None, 0, -1, "")
    root = st.nodes[0]
    out = OpenedTOC(st.nodes, st.by_path, None)
    cdef bytearray digests = bytearray()
    cdef Py_ssize_t i, n = PyList_GET_SIZE(entries), pos, j
    cdef PyObject *k
    cdef PyObject *v
    cdef PyObject *got
    cdef PyObject *vals[N_KEYS]
    cdef object obj
    cdef int code, t, overflow
    cdef int64_t size, coff, csize, offset, inner, mode, nid, parent
    cdef int64_t cur = -1
    cdef int64_t cur_size = 0
    cdef int64_t expect_off = 0
    cdef int64_t last_off = -1, last_end = 0
    cdef bint is_data
    cdef str name, base
    cdef list pending = []
    cdef dict strings = {}
    cdef int64_t m

    for i in range(n):
        obj = <object>PyList_GET_ITEM(entries, i)
        if not PyDict_CheckExact(obj):
            raise _Reject()
        for j in range(N_KEYS):
            vals[j] = NULL
        pos = 0
        while PyDict_Next(obj, &pos, &k, &v):
            got = PyDict_GetItem(_KEYS, <object>k)
            if got == NULL or <object>v is None:
                continue
            code = <object>got
            if code == K_XATTRS:
                if not PyDict_CheckExact(<object>v):
                    raise _Reject()
            elif code in (K_SIZE, K_MODE, K_OFFSET, K_COFF, K_CSIZE, K_INNER, K_UID, K_GID,
                          K_DEVMAJ, K_DEVMIN):
                if not PyLong_CheckExact(<object>v):
                    raise _Reject()
                overflow = 0
                PyLong_AsLongLongAndOverflow(<object>v, &overflow)
                if overflow:
                    raise _Reject()
            elif not PyUnicode_CheckExact(<object>v):
                raise _Reject()
            vals[code] = v
        if vals[K_XATTRS] != NULL:
            _twin.decode_xattrs(i, <object>vals[K_XATTRS])
        if vals[K_NAME] == NULL or vals[K_TYPE] == NULL:
            raise _Reject()
        got = PyDict_GetItem(_TYPES, <object>vals[K_TYPE])
        if got == NULL:
            raise _Reject()
        t = <object>got
        name = <str>vals[K_NAME]
        size = _int(vals[K_SIZE], 0)
        coff = _int(vals[K_COFF], 0)
        is_data = t == T_REG or t == T_CHUNK
        if st.trailing.n and (not is_data or (t == T_REG and size <= 0)):
            st.trailing.p[st.trailing.n - 1] += 1
        if t == T_CHUNK:
            if cur < 0 or (PyUnicode_GET_LENGTH(name) and _clean(name) != st.nodes[cur].path):
                raise _Reject()
        else:
            if cur >= 0 and expect_off != cur_size:
                raise _Reject()
            cur = -1
            name = _clean(name)
            if <PyObject *>name == vals[K_NAME]:
                name = _copy_str(name)  # a node's path and by_path key: not the JSON's
        if is_data and (t == T_CHUNK or size > 0):
            if t == T_REG:
                expect_off = 0
            if coff != expect_off:
                raise _Reject()
        if t == T_CHUNK:
            nid = cur
        elif PyUnicode_GET_LENGTH(name) == 0:
            if t != T_DIR:
                raise _Reject()
            root.mode = _int(vals[K_MODE], 0)
            root.size = size
            root.attrs = _attrs(vals, strings)
            root.offset = _int(vals[K_OFFSET], 0)
            st.nsize.p[0] = size
            continue
        else:
            j = PyUnicode_FindChar(name, 0x2F, 0, PyUnicode_GET_LENGTH(name), -1)
            parent = st.dir_for(name[:j] if j >= 0 else "")
            base = name[j + 1:]
            if t == T_HARDLINK:
                pending.append((i, name, base, <object>vals[K_LINK] if vals[K_LINK] != NULL else ""))
                continue
            if t == T_REG and size < 0:
                raise _Reject()
            got = PyDict_GetItem(st.by_path, name)
            if got != NULL:
                nid = <object>got
                if st.ntype.p[nid] == T_DIR and t == T_DIR:
                    prev = st.nodes[nid]
                    prev.mode = _int(vals[K_MODE], 0)
                    prev.size = size
                    prev.attrs = _attrs(vals, strings)
                    prev.offset = _int(vals[K_OFFSET], 0)
                    st.nsize.p[nid] = size
                    continue
                if st.ntype.p[nid] == T_DIR or t == T_DIR:
                    raise _Reject()
            nid = st.add(name, t, _int(vals[K_MODE], 0), size, _attrs(vals, strings),
                         _int(vals[K_OFFSET], 0), parent, base)
            if name == PREFETCH_LANDMARK or name == NO_PREFETCH_LANDMARK:
                out.landmark = name
            if t == T_REG and size > 0:
                cur = nid
                cur_size = size
            if t == T_REG and vals[K_DIGEST] != NULL and PyUnicode_GET_LENGTH(<object>vals[K_DIGEST]):
                if vals[K_CDIGEST] == NULL or <object>vals[K_DIGEST] != <object>vals[K_CDIGEST]:
                    _digest_into(<object>vals[K_DIGEST], bytearray())
        if not is_data or (t == T_REG and size == 0):
            continue
        # a chunk of node `nid`'s content
        csize = _int(vals[K_CSIZE], 0)
        if csize == 0:
            csize = st.nsize.p[nid] - coff
        if csize <= 0 or coff + csize > st.nsize.p[nid] or csize > max_chunk_size:
            raise _Reject()
        offset = _int(vals[K_OFFSET], 0)
        inner = _int(vals[K_INNER], 0)
        if not (0 <= offset < payload_end) or inner < 0:
            raise _Reject()
        if offset < last_off or (offset == last_off and inner < last_end):
            raise _Reject()
        last_off = offset
        last_end = inner + csize
        if vals[K_CDIGEST] != NULL and PyUnicode_GET_LENGTH(<object>vals[K_CDIGEST]):
            _digest_into(<object>vals[K_CDIGEST], digests)
        elif verify:
            raise _Reject()
        else:
            digests += b"\0" * 32
        _push(&st.c_file, nid)
        _push(&st.c_off, coff)
        _push(&st.c_comp, offset)
        _push(&st.c_inner, inner)
        _push(&st.c_size, csize)
        _push(&st.trailing, 0)
        expect_off = coff + csize
    if cur >= 0 and expect_off != cur_size:
        raise _Reject()

    for m in range(st.nlink.n):
        if st.nlink.p[m] != (2 if st.ntype.p[m] == T_DIR else 1):
            st.nodes[m].nlink = st.nlink.p[m]
    for item in pending:
        try:
            _twin._link(st.nodes, st.by_path, item[1], item[2], item[3])
        except Exception:
            raise _Reject()
    out.chunk_file = _to_array(&st.c_file)
    out.chunk_off = _to_array(&st.c_off)
    out.chunk_comp = _to_array(&st.c_comp)
    out.chunk_inner = _to_array(&st.c_inner)
    out.chunk_size = _to_array(&st.c_size)
    out.trailing = _to_array(&st.trailing)
    out.chunk_digests = bytes(digests)
    _dirents(st, out)
    return out


cdef int _dirents(_State st, object out) except -1:
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
        out.dirent_parent = _to_array(&parents)
        out.dirent_name = names
        out.dirent_target = _to_array(&targets)
    finally:
        PyMem_Free(parents.p)
        PyMem_Free(targets.p)
    return 0
