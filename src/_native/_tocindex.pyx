# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Native TOC index: compact arrays and bisection, no Python object per TOC entry.

The contract is documented in the pure-Python twin ``stargz.estargz._tocindex_py``; both
backends must behave identically (same results, same errors with the same messages) and
``tests/estargz/test_tocindex.py`` holds them to it.

Layout. ``ChunkTable``: five int64 columns (file id, chunk offset, compressed offset, inner
offset, size), the caller's digest bytes kept by reference (32 per row), a sorted array of
the distinct compressed offsets (member ends) and one "shared member" flag byte per row.
``NameTable``: all names packed into one bytes object with int64 offsets; the child rows
sorted by (parent, name), each with the first 8 bytes of its name as a big-endian integer,
so most comparisons are one integer compare and a memcmp only breaks ties.

Both tables find an id's rows through a CSR index (``start[id] .. start[id + 1]``) when the
ids are dense (at most 4 per row, plus 1024: node ids are), which turns the outer bisection
into one load; with sparse ids they bisect the sorted id column instead. The lookups are
``nogil`` C functions; they are called with the GIL held because they take well under a
microsecond (less than the cost of releasing it).
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from libc.stdint cimport INT64_MAX, int64_t, uint8_t, uint64_t
from libc.stdlib cimport qsort
from libc.string cimport memchr, memcmp, memcpy

from stargz.errors import ChunkError, TOCError, UnsafePathError

__all__ = ["ChunkTable", "NameTable"]


cdef int64_t *_alloc_i64(Py_ssize_t n) except NULL:
    cdef int64_t *p = <int64_t *>PyMem_Malloc((n if n > 0 else 1) * sizeof(int64_t))
    if p == NULL:
        raise MemoryError()
    return p


cdef int64_t *_load_column(object values, str name, Py_ssize_t n,
                           Py_ssize_t *out_n) except NULL:
    """Copy an int sequence into a new int64 array (memcpy for array('q'), numpy int64).

    With n >= 0 the length must be n (else ChunkError); the length is stored in out_n.
    """
    cdef const int64_t[::1] view
    cdef int64_t *p
    cdef Py_ssize_t i = 0
    cdef Py_ssize_t m
    try:
        view = values
    except (TypeError, ValueError, BufferError):
        view = None
    m = view.shape[0] if view is not None else len(values)
    if n >= 0 and m != n:
        raise ChunkError(f"chunk table columns differ in length: {name} has {m}, want {n}")
    out_n[0] = m
    p = _alloc_i64(m)
    if view is not None:
        if m:
            memcpy(p, &view[0], m * sizeof(int64_t))
        return p
    try:
        for v in values:
            if i >= m:
                raise ChunkError(f"chunk table column {name} changed length while read")
            p[i] = v
            i += 1
    except BaseException:
        PyMem_Free(p)
        raise
    return p


cdef int _cmp_i64(const void *a, const void *b) noexcept nogil:
    cdef int64_t x = (<const int64_t *>a)[0]
    cdef int64_t y = (<const int64_t *>b)[0]
    return (x > y) - (x < y)


cdef Py_ssize_t _bisect_right(const int64_t *a, Py_ssize_t lo, Py_ssize_t hi,
                              int64_t x) noexcept nogil:
    cdef Py_ssize_t mid
    while lo < hi:
        mid = (lo + hi) >> 1
        if x < a[mid]:
            hi = mid
        else:
            lo = mid + 1
    return lo


cdef Py_ssize_t _bisect_left(const int64_t *a, Py_ssize_t lo, Py_ssize_t hi,
                             int64_t x) noexcept nogil:
    cdef Py_ssize_t mid
    while lo < hi:
        mid = (lo + hi) >> 1
        if a[mid] < x:
            lo = mid + 1
        else:
            hi = mid
    return lo


cdef struct IdIndex:
    int64_t *start   # CSR: rows of id k are [start[k], start[k + 1]); NULL when ids are sparse
    int64_t nids
    const int64_t *keys  # the sorted id column (used when start is NULL)
    Py_ssize_t n


cdef int _index_ids(IdIndex *ix, const int64_t *keys, Py_ssize_t n) except -1:
    """Index a sorted column of ids >= 0."""
    cdef int64_t nids = keys[n - 1] + 1 if n > 0 else 0
    cdef Py_ssize_t j = 0
    cdef int64_t k
    ix.keys = keys
    ix.n = n
    ix.nids = nids
    ix.start = NULL
    if nids > 4 * n + 1024:
        return 0
    ix.start = _alloc_i64(nids + 1)
    for k in range(nids):
        ix.start[k] = j
        while j < n and keys[j] == k:
            j += 1
    ix.start[nids] = n
    return 0


cdef inline void _id_range(const IdIndex *ix, int64_t key, Py_ssize_t *lo,
                           Py_ssize_t *hi) noexcept nogil:
    """[lo, hi) rows of key; for a missing key, lo == hi == its insertion point."""
    if ix.start != NULL:
        if key < 0:
            lo[0] = hi[0] = 0
        elif key >= ix.nids:
            lo[0] = hi[0] = ix.n
        else:
            lo[0] = ix.start[key]
            hi[0] = ix.start[key + 1]
        return
    lo[0] = _bisect_left(ix.keys, 0, ix.n, key)
    hi[0] = _bisect_right(ix.keys, lo[0], ix.n, key)


cdef class ChunkTable:
    """Chunks of every file of a layer, sorted by ``(file_id, chunk_offset)``."""

    cdef Py_ssize_t n
    cdef int64_t *fid
    cdef int64_t *coff
    cdef int64_t *comp
    cdef int64_t *inner
    cdef int64_t *size
    cdef bytes digests
    cdef const uint8_t *dig
    cdef int64_t *uniq
    cdef Py_ssize_t nuniq
    cdef uint8_t *shared
    cdef IdIndex files

    def __cinit__(self):
        self.n = 0
        self.files.start = NULL

    def __dealloc__(self):
        self._release()

    cdef void _release(self) noexcept:
        PyMem_Free(self.fid)
        PyMem_Free(self.coff)
        PyMem_Free(self.comp)
        PyMem_Free(self.inner)
        PyMem_Free(self.size)
        PyMem_Free(self.uniq)
        PyMem_Free(self.shared)
        PyMem_Free(self.files.start)
        self.fid = self.coff = self.comp = self.inner = self.size = self.uniq = NULL
        self.shared = NULL
        self.files.start = NULL
        self.n = self.nuniq = 0

    def __init__(self, file_ids, chunk_offsets, comp_offsets, inner_offsets, sizes, digests):
        cdef Py_ssize_t n, m, i, j, k
        cdef int64_t f, o, prev_f, prev_end
        cdef int64_t *cols[5]
        cdef uint8_t *seen
        self._release()  # __init__ called again: rebuild
        self.fid = _load_column(file_ids, "file_ids", -1, &n)
        self.coff = _load_column(chunk_offsets, "chunk_offsets", n, &m)
        self.comp = _load_column(comp_offsets, "comp_offsets", n, &m)
        self.inner = _load_column(inner_offsets, "inner_offsets", n, &m)
        self.size = _load_column(sizes, "sizes", n, &m)
        self.digests = digests if type(digests) is bytes else bytes(digests)
        if PyBytes_GET_SIZE(self.digests) != 32 * n:
            raise ChunkError(
                f"chunk digests are {PyBytes_GET_SIZE(self.digests)} bytes, want 32 * {n} rows"
            )
        self.dig = <const uint8_t *>PyBytes_AS_STRING(self.digests)
        cols[0] = self.fid
        cols[1] = self.coff
        cols[2] = self.comp
        cols[3] = self.inner
        cols[4] = self.size
        for k, name in enumerate(("file_id", "chunk_offset", "comp_offset", "inner_offset",
                                  "size")):
            for i in range(n):
                if cols[k][i] < 0:
                    raise ChunkError(f"chunk row {i}: negative {name} {cols[k][i]}")
        prev_f = -1
        prev_end = 0
        for i in range(n):
            f = self.fid[i]
            o = self.coff[i]
            if f != prev_f:
                if f < prev_f:
                    raise ChunkError(
                        f"chunk row {i}: rows are not sorted by (file_id, chunk_offset): "
                        f"file {f} after file {prev_f}"
                    )
                if o != 0:
                    raise ChunkError(f"chunk row {i}: file {f} starts at offset {o}, not 0")
            elif o != prev_end:
                what = "overlap" if o < prev_end else "leave a gap"
                raise ChunkError(
                    f"chunk row {i}: chunks of file {f} {what}: chunk offset {o}, "
                    f"previous chunk ends at {prev_end}"
                )
            if self.size[i] > INT64_MAX - o:
                raise ChunkError(
                    f"chunk row {i}: chunk offset {o} + size {self.size[i]} overflows"
                )
            prev_f = f
            prev_end = o + self.size[i]
        # Distinct compressed offsets, sorted: the ends of members.
        self.uniq = _alloc_i64(n)
        if n:
            memcpy(self.uniq, self.comp, n * sizeof(int64_t))
            qsort(self.uniq, n, sizeof(int64_t), _cmp_i64)
        j = 0
        for i in range(n):
            if j == 0 or self.uniq[i] != self.uniq[j - 1]:
                self.uniq[j] = self.uniq[i]
                j += 1
        self.nuniq = j
        # Shared flags: a member is shared if its offset occurs more than once.
        self.shared = <uint8_t *>PyMem_Malloc(n if n > 0 else 1)
        if self.shared == NULL:
            raise MemoryError()
        seen = <uint8_t *>PyMem_Malloc(self.nuniq if self.nuniq > 0 else 1)
        if seen == NULL:
            raise MemoryError()
        try:
            for j in range(self.nuniq):
                seen[j] = 0
            for i in range(n):
                j = _bisect_left(self.uniq, 0, self.nuniq, self.comp[i])
                if seen[j] < 2:
                    seen[j] += 1
            for i in range(n):
                j = _bisect_left(self.uniq, 0, self.nuniq, self.comp[i])
                self.shared[i] = 1 if seen[j] > 1 else 0
        finally:
            PyMem_Free(seen)
        _index_ids(&self.files, self.fid, n)
        self.n = n

    def __len__(self):
        return self.n

    cdef inline Py_ssize_t _find(self, int64_t f, int64_t off) noexcept nogil:
        cdef Py_ssize_t lo, hi, i
        _id_range(&self.files, f, &lo, &hi)
        if lo == hi or off < 0:
            return -1
        i = _bisect_right(self.coff, lo, hi, off) - 1
        if i < lo or off >= self.coff[i] + self.size[i]:
            return -1
        return i

    def find(self, int64_t file_id, int64_t offset) -> int:
        """Row of ``file_id``'s chunk that contains file offset ``offset``, or -1."""
        return self._find(file_id, offset)

    def span(self, int64_t file_id) -> tuple:
        """``[start, end)`` rows of ``file_id`` (empty, ``start == end``, if it has none)."""
        cdef Py_ssize_t lo, hi
        _id_range(&self.files, file_id, &lo, &hi)
        return lo, hi

    def cover(self, int64_t file_id, int64_t offset, int64_t length) -> tuple:
        """``[start, end)`` rows of ``file_id`` that overlap ``[offset, offset + length)``."""
        cdef Py_ssize_t lo, hi, first, last
        cdef int64_t end
        _id_range(&self.files, file_id, &lo, &hi)
        if lo == hi or length <= 0:
            return lo, lo
        end = INT64_MAX if offset > INT64_MAX - length else offset + length
        if offset < 0:
            offset = 0
        if end <= offset:
            return lo, lo
        first = _bisect_right(self.coff, lo, hi, offset) - 1
        if first < lo:
            first = lo
        if offset >= self.coff[first] + self.size[first]:
            first += 1
        last = _bisect_left(self.coff, first, hi, end)
        while last > first and self.size[last - 1] == 0:  # empty rows overlap nothing
            last -= 1
        if first < last:
            return first, last
        return lo, lo

    cdef inline int _check(self, Py_ssize_t i) except -1:
        if i < 0 or i >= self.n:
            raise IndexError(f"chunk row {i} out of range [0, {self.n})")
        return 0

    def row(self, Py_ssize_t i) -> tuple:
        """``(chunk_offset, comp_offset, inner_offset, size, digest32)`` of row ``i``."""
        self._check(i)
        return (self.coff[i], self.comp[i], self.inner[i], self.size[i],
                <bytes>(<const char *>self.dig)[32 * i:32 * i + 32])

    def file_id(self, Py_ssize_t i) -> int:
        """File id of row ``i``."""
        self._check(i)
        return self.fid[i]

    def next_comp_offset(self, Py_ssize_t i, int64_t blob_end) -> int:
        """End of row ``i``'s member: the next larger ``comp_offset`` of any row, else
        ``blob_end``."""
        self._check(i)
        cdef Py_ssize_t j = _bisect_right(self.uniq, 0, self.nuniq, self.comp[i])
        return self.uniq[j] if j < self.nuniq else blob_end

    def shares_member(self, Py_ssize_t i) -> bool:
        """True if another row has the same ``comp_offset`` (the member is not exclusive)."""
        self._check(i)
        return self.shared[i] != 0

    @property
    def nbytes(self) -> int:
        """Bytes held by the table's arrays (including the digests)."""
        cdef Py_ssize_t dig = PyBytes_GET_SIZE(self.digests) if self.digests is not None else 0
        cdef Py_ssize_t csr = self.files.nids + 1 if self.files.start != NULL else 0
        return (5 * self.n + self.nuniq + csr) * sizeof(int64_t) + self.n + dig



# ---------------------------------------------------------------------------------------

cdef struct Kid:
    int64_t parent
    uint64_t prefix
    const char *name
    int64_t length
    int64_t row


cdef inline uint64_t _prefix(const char *s, int64_t n) noexcept nogil:
    # First 8 bytes, big-endian, zero-padded: compares like memcmp because a child's name
    # has no NUL byte (so padding sorts a shorter name first, as memcmp+length does).
    cdef uint64_t v = 0
    cdef int64_t i
    for i in range(8):
        v <<= 8
        if i < n:
            v |= <uint8_t>s[i]
    return v


cdef inline int _cmp_name(uint64_t apre, const char *a, int64_t alen,
                          uint64_t bpre, const char *b, int64_t blen) noexcept nogil:
    cdef int64_t m
    cdef int c
    if apre != bpre:
        return -1 if apre < bpre else 1
    if alen > 8 and blen > 8:
        m = alen if alen < blen else blen
        c = memcmp(a + 8, b + 8, <size_t>(m - 8))
        if c != 0:
            return c
    return (alen > blen) - (alen < blen)


cdef int _cmp_kid(const void *a, const void *b) noexcept nogil:
    cdef const Kid *x = <const Kid *>a
    cdef const Kid *y = <const Kid *>b
    cdef int c
    if x.parent != y.parent:
        return -1 if x.parent < y.parent else 1
    c = _cmp_name(x.prefix, x.name, x.length, y.prefix, y.name, y.length)
    if c != 0:
        return c
    return (x.row > y.row) - (x.row < y.row)


cdef class NameTable:
    """Directory entries: ``(parent, name) -> row``, and each parent's rows sorted by name."""

    cdef Py_ssize_t n
    cdef int64_t *parents
    cdef int64_t *name_off    # n + 1 offsets into blob
    cdef bytes blob
    cdef const char *names
    cdef Py_ssize_t nkids
    cdef int64_t *kid_parent  # sorted by (parent, name)
    cdef uint64_t *kid_prefix
    cdef int64_t *kid_row
    cdef IdIndex by_parent

    def __cinit__(self):
        self.n = 0
        self.by_parent.start = NULL

    def __dealloc__(self):
        self._release()

    cdef void _release(self) noexcept:
        PyMem_Free(self.parents)
        PyMem_Free(self.name_off)
        PyMem_Free(self.kid_parent)
        PyMem_Free(self.kid_prefix)
        PyMem_Free(self.kid_row)
        PyMem_Free(self.by_parent.start)
        self.parents = self.name_off = self.kid_parent = self.kid_row = NULL
        self.kid_prefix = NULL
        self.by_parent.start = NULL
        self.n = self.nkids = 0

    def __init__(self, parents, names):
        cdef Py_ssize_t n, i, k, best, first
        cdef int64_t off = 0
        cdef int64_t p, ln
        cdef const char *s
        cdef Kid *kids
        cdef object name
        self._release()  # __init__ called again: rebuild
        n = len(parents)
        if len(names) != n:
            raise TOCError(
                f"name table columns differ in length: {n} parents, {len(names)} names"
            )
        self.parents = _load_column(parents, "parents", n, &i)
        self.name_off = _alloc_i64(n + 1)
        for i in range(n):
            name = names[i]
            if type(name) is not bytes:
                raise TOCError(
                    f"name table row {i}: name must be bytes, not {type(name).__name__}"
                )
            self.name_off[i] = off
            off += PyBytes_GET_SIZE(name)
        self.name_off[n] = off
        self.blob = b"".join(names)
        self.names = PyBytes_AS_STRING(self.blob)
        k = 0
        for i in range(n):
            p = self.parents[i]
            if p < -1:
                raise TOCError(f"name table row {i}: parent {p} is not an id or -1")
            if p == -1:
                continue
            k += 1
            s = self.names + self.name_off[i]
            ln = self.name_off[i + 1] - self.name_off[i]
            if ln == 0:
                raise TOCError(f"name table row {i}: empty name")
            if ((ln == 1 and s[0] == b'.') or (ln == 2 and s[0] == b'.' and s[1] == b'.')
                    or memchr(s, b'/', <size_t>ln) != NULL
                    or memchr(s, 0, <size_t>ln) != NULL):
                raise UnsafePathError(
                    f"name table row {i}: {names[i]!r} is not a plain file name"
                )
        self.nkids = k
        self.kid_parent = _alloc_i64(k)
        self.kid_row = _alloc_i64(k)
        self.kid_prefix = <uint64_t *>_alloc_i64(k)
        kids = <Kid *>PyMem_Malloc((k if k > 0 else 1) * sizeof(Kid))
        if kids == NULL:
            raise MemoryError()
        try:
            k = 0
            for i in range(n):
                if self.parents[i] == -1:
                    continue
                kids[k].parent = self.parents[i]
                kids[k].name = self.names + self.name_off[i]
                kids[k].length = self.name_off[i + 1] - self.name_off[i]
                kids[k].prefix = _prefix(kids[k].name, kids[k].length)
                kids[k].row = i
                k += 1
            with nogil:
                qsort(kids, <size_t>k, sizeof(Kid), _cmp_kid)
            # Report the duplicate the twin reports: the lowest row that repeats an earlier
            # one (equal keys are sorted by row); its partner is the first of its group.
            best = -1
            for i in range(1, k):
                if (kids[i].parent == kids[i - 1].parent
                        and _cmp_name(kids[i].prefix, kids[i].name, kids[i].length,
                                      kids[i - 1].prefix, kids[i - 1].name,
                                      kids[i - 1].length) == 0):
                    if best < 0 or kids[i].row < kids[best].row:
                        best = i
            if best >= 0:
                first = best
                while (first > 0 and kids[first - 1].parent == kids[best].parent
                       and _cmp_name(kids[first - 1].prefix, kids[first - 1].name,
                                     kids[first - 1].length, kids[best].prefix,
                                     kids[best].name, kids[best].length) == 0):
                    first -= 1
                raise TOCError(
                    f"name table row {kids[best].row}: duplicate entry "
                    f"{names[kids[best].row]!r} in parent {kids[best].parent} "
                    f"(also row {kids[first].row})"
                )
            for i in range(k):
                self.kid_parent[i] = kids[i].parent
                self.kid_prefix[i] = kids[i].prefix
                self.kid_row[i] = kids[i].row
        finally:
            PyMem_Free(kids)
        _index_ids(&self.by_parent, self.kid_parent, self.nkids)
        if self.by_parent.start != NULL:  # the CSR index replaces the parent column
            PyMem_Free(self.kid_parent)
            self.kid_parent = NULL
            self.by_parent.keys = NULL
        self.n = n

    def __len__(self):
        return self.n

    cdef inline Py_ssize_t _child(self, int64_t parent, const char *name,
                                  int64_t length) noexcept nogil:
        cdef Py_ssize_t lo, hi, mid
        cdef int64_t r
        cdef int c
        cdef uint64_t pre = _prefix(name, length)
        _id_range(&self.by_parent, parent, &lo, &hi)
        while lo < hi:
            mid = (lo + hi) >> 1
            if self.kid_prefix[mid] != pre:  # the common case: no need to touch the names
                c = -1 if self.kid_prefix[mid] < pre else 1
            else:
                r = self.kid_row[mid]
                c = _cmp_name(pre, self.names + self.name_off[r],
                              self.name_off[r + 1] - self.name_off[r], pre, name, length)
            if c == 0:
                return self.kid_row[mid]
            if c < 0:
                lo = mid + 1
            else:
                hi = mid
        return -1

    def child(self, int64_t parent, name) -> int:
        """Row of ``name`` in ``parent``, or -1."""
        if type(name) is not bytes:
            raise TypeError(f"name must be bytes, not {type(name).__name__}")
        return self._child(parent, PyBytes_AS_STRING(name), PyBytes_GET_SIZE(name))

    def children(self, int64_t parent) -> list:
        """Rows whose parent is ``parent``, sorted by name (bytewise)."""
        cdef Py_ssize_t lo, hi
        _id_range(&self.by_parent, parent, &lo, &hi)
        return [self.kid_row[i] for i in range(lo, hi)]

    def parent(self, Py_ssize_t i) -> int:
        """Parent id of row ``i``."""
        if i < 0 or i >= self.n:
            raise IndexError(f"name row {i} out of range [0, {self.n})")
        return self.parents[i]

    def name(self, Py_ssize_t i) -> bytes:
        """Name of row ``i``."""
        if i < 0 or i >= self.n:
            raise IndexError(f"name row {i} out of range [0, {self.n})")
        return self.names[self.name_off[i]:self.name_off[i + 1]]

    @property
    def nbytes(self) -> int:
        """Bytes held by the table: the packed names and the int arrays."""
        cdef Py_ssize_t words = 2 * self.n + 1 + 2 * self.nkids
        if self.kid_parent != NULL:
            words += self.nkids
        if self.by_parent.start != NULL:
            words += self.by_parent.nids + 1
        return (PyBytes_GET_SIZE(self.blob) if self.blob is not None else 0) + words * 8
