# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Native chunk decode for eStargz / zstd:chunked: ISA-L inflate, libzstd, OpenSSL sha256.

The contract (arguments, errors, bounds) is documented once, in the pure-Python twin
``stargz.estargz._codec_py``; both backends must behave identically and
``tests/estargz/test_codec.py`` holds them to it. This file only says why it does things the
way it does.

All decompression and hashing for one call happens inside a single ``nogil`` block, so a
pool of threads can decode chunks in parallel while the event loop keeps running. The
output is written straight into the ``bytes`` object that is returned (no second copy),
and the sha256 is computed in slices as the output is produced, while it is still in cache.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcmp
from libc.threads cimport tss_create, tss_get, tss_set, tss_t, thrd_success

cimport evp
cimport igzip_lib as isal
cimport zstd

from stargz.errors import ChunkError, DecompressionBombError, DigestMismatch

__all__ = ["COMPRESSIONS", "DEFAULT_MAX_TRAILING", "decode_chunk", "sha256"]

COMPRESSIONS = ("gzip", "zstd")

# See _codec_py.DEFAULT_MAX_TRAILING for why a member may legitimately inflate past its
# chunk (tar padding and the headers of the entries that follow it).
DEFAULT_MAX_TRAILING = 16 << 20

cdef enum:
    # Below this many bytes, releasing and re-taking the GIL costs more than hashing.
    NOGIL_HASH_MIN = 16384
    # Discard buffer for the bytes before inner_offset and after the chunk (exclusive mode).
    SCRATCH = 65536
    # The sha256 of the chunk is updated after each slice of output of at most this size.
    HASH_SLICE = 262144
    # isal's avail_in/avail_out are 32-bit: feed input in pieces of at most this.
    MAX_PIECE = 1073741824

cdef enum Status:
    ST_OK = 0
    ST_SHORT = 1        # the member/frame ended before inner_offset + size bytes
    ST_TRUNCATED = 2    # the compressed input ended inside the member/frame
    ST_CORRUPT = 3      # the codec rejected the data (err holds its code)
    ST_BOMB = 4         # more than max_trailing bytes follow the chunk (exclusive mode)
    ST_NOMEM = 5
    ST_HASH = 6         # OpenSSL failed (should not happen)

cdef struct Result:
    int status
    int64_t err         # isal return code or zstd error code
    uint64_t produced   # output bytes produced when decoding stopped

# ---------------------------------------------------------------------------------------
# sha256 through EVP, with the SHA256 implementation fetched once (OpenSSL 3 otherwise
# does a provider lookup on every EVP_sha256()/EVP_Digest call).

cdef const evp.EVP_MD *_SHA256 = evp.EVP_MD_fetch(NULL, b"SHA256", NULL)
if _SHA256 == NULL:
    _SHA256 = evp.EVP_sha256()


cdef inline bint _hash_update(evp.EVP_MD_CTX *md, const uint8_t *p, size_t n) noexcept nogil:
    if md == NULL or n == 0:
        return True
    return evp.EVP_DigestUpdate(md, p, n) == 1


# ---------------------------------------------------------------------------------------
# gzip: one member, ISA-L with crc_flag=ISAL_GZIP. Checked on isa-l 2.30 (see the tests):
# it parses the gzip header itself (FEXTRA/FNAME/FCOMMENT/FHCRC are skipped, so the eStargz
# footer member with its 'SG' extra field inflates), stops at the end of the first member
# with block_state == ISAL_BLOCK_FINISH, and checks both trailer fields, CRC32 and ISIZE
# (ISAL_INCORRECT_CHECKSUM), when the member is inflated to its end.

cdef inline void _isal_feed(isal.inflate_state *st, const uint8_t *src, size_t srclen,
                            size_t *fed) noexcept nogil:
    cdef size_t piece
    if st.avail_in == 0 and fed[0] < srclen:
        piece = srclen - fed[0]
        if piece > MAX_PIECE:
            piece = MAX_PIECE
        st.next_in = <uint8_t *>(src + fed[0])
        st.avail_in = <uint32_t>piece
        fed[0] += piece


cdef int _isal_run(isal.inflate_state *st, const uint8_t *src, size_t srclen, size_t *fed,
                   uint8_t *out, uint64_t want, bint keep, evp.EVP_MD_CTX *md,
                   Result *res) noexcept nogil:
    """Inflate until `want` more bytes are produced or the member ends.

    With keep, the bytes go to out[0:want] (and into the hash); otherwise `out` is a
    SCRATCH-sized discard buffer. Returns 1 if the member ended, 0 if `want` was reached,
    -1 on error (res.status set).
    """
    cdef uint64_t got = 0
    cdef uint32_t step, wrote, avail_in
    cdef uint8_t *dst
    cdef int ret
    while True:
        if st.block_state == isal.ISAL_BLOCK_FINISH:
            return 1
        if got >= want:
            return 0
        _isal_feed(st, src, srclen, fed)
        if keep:
            dst = out + got
            step = <uint32_t>(want - got if want - got < HASH_SLICE else HASH_SLICE)
        else:
            dst = out
            step = <uint32_t>(want - got if want - got < SCRATCH else SCRATCH)
        st.next_out = dst
        st.avail_out = step
        avail_in = st.avail_in
        ret = isal.isal_inflate(st)
        if ret < 0 or ret == isal.ISAL_NEED_DICT:
            res.status = ST_CORRUPT
            res.err = ret
            return -1
        wrote = step - st.avail_out
        got += wrote
        res.produced += wrote
        if keep and not _hash_update(md, dst, wrote):
            res.status = ST_HASH
            return -1
        if wrote == 0 and st.block_state != isal.ISAL_BLOCK_FINISH:
            # No output and not finished: isal wants more input. If there is none left,
            # the member is cut short; if it took none of what it had, it is stuck.
            if st.avail_in == 0 and fed[0] >= srclen:
                res.status = ST_TRUNCATED
                return -1
            if st.avail_in == avail_in and avail_in > 0:
                res.status = ST_CORRUPT
                res.err = isal.ISAL_INVALID_BLOCK
                return -1


cdef void _decode_gzip(const uint8_t *src, size_t srclen, uint64_t inner, uint8_t *out,
                       uint64_t size, bint exclusive, uint64_t max_trailing,
                       evp.EVP_MD_CTX *md, Result *res) noexcept nogil:
    cdef isal.inflate_state *st = <isal.inflate_state *>malloc(sizeof(isal.inflate_state))
    cdef uint8_t *scratch = <uint8_t *>malloc(SCRATCH)
    cdef size_t fed = 0
    cdef int r
    if st == NULL or scratch == NULL:
        res.status = ST_NOMEM
        free(st)
        free(scratch)
        return
    isal.isal_inflate_init(st)
    st.crc_flag = isal.ISAL_GZIP
    st.avail_in = 0
    if srclen >= 4 and (src[3] & 0xE0) != 0:
        # RFC 1952 reserved FLG bits must be zero; ISA-L ignores them, zlib refuses them.
        res.status = ST_CORRUPT
        res.err = isal.ISAL_INVALID_BLOCK
        free(st)
        free(scratch)
        return
    try:
        r = _isal_run(st, src, srclen, &fed, scratch, inner, False, NULL, res)
        if r < 0:
            return
        if r == 1 and res.produced < inner + size:
            res.status = ST_SHORT
            return
        r = _isal_run(st, src, srclen, &fed, out, size, True, md, res)
        if r < 0:
            return
        if r == 1 and res.produced < inner + size:
            res.status = ST_SHORT
            return
        if not exclusive:
            res.status = ST_OK
            return
        r = _isal_run(st, src, srclen, &fed, scratch, max_trailing + 1, False, NULL, res)
        if r < 0:
            return
        res.status = ST_BOMB if res.produced - (inner + size) > max_trailing else ST_OK
    finally:
        free(st)
        free(scratch)


# ---------------------------------------------------------------------------------------
# zstd: one frame, ZSTD_decompressStream into bounded output buffers. The ZSTD_DCtx is kept
# per thread (C11 tss, freed at thread exit): creating one per call costs a ~100 KiB
# allocation plus the window buffer on first use (see benchmarks/README.md).

cdef tss_t _dctx_key
cdef bint _dctx_key_ok = False


cdef void _free_dctx(void *p) noexcept nogil:
    zstd.ZSTD_freeDCtx(<zstd.ZSTD_DCtx *>p)


if tss_create(&_dctx_key, _free_dctx) == thrd_success:
    _dctx_key_ok = True


cdef zstd.ZSTD_DCtx *_thread_dctx(bint *owned) noexcept nogil:
    cdef zstd.ZSTD_DCtx *d = NULL
    owned[0] = False
    if _dctx_key_ok:
        d = <zstd.ZSTD_DCtx *>tss_get(_dctx_key)
        if d != NULL:
            zstd.ZSTD_DCtx_reset(d, zstd.ZSTD_reset_session_only)
            return d
    d = zstd.ZSTD_createDCtx()
    if d == NULL:
        return NULL
    if not _dctx_key_ok or tss_set(_dctx_key, d) != thrd_success:
        owned[0] = True
    return d


cdef int _zstd_run(zstd.ZSTD_DCtx *d, zstd.ZSTD_inBuffer *inb, uint8_t *out, uint64_t want,
                   bint keep, evp.EVP_MD_CTX *md, bint *ended, unsigned long long fcs,
                   Result *res) noexcept nogil:
    """Same contract as _isal_run; `ended` carries "the frame is complete" across calls.

    `fcs` is the content size the frame header declares (or ZSTD_CONTENTSIZE_UNKNOWN). It
    is checked here when the frame ends because libzstd checks it only on some paths (not
    when streaming a frame whose last block is empty).
    """
    cdef uint64_t got = 0
    cdef zstd.ZSTD_outBuffer ob
    cdef size_t ret, step, in_pos
    while True:
        if ended[0]:
            return 1
        if got >= want:
            return 0
        if keep:
            ob.dst = out + got
            step = <size_t>(want - got if want - got < HASH_SLICE else HASH_SLICE)
        else:
            ob.dst = out
            step = <size_t>(want - got if want - got < SCRATCH else SCRATCH)
        ob.size = step
        ob.pos = 0
        in_pos = inb.pos
        ret = zstd.ZSTD_decompressStream(d, &ob, inb)
        if zstd.ZSTD_isError(ret):
            res.status = ST_CORRUPT
            res.err = <int64_t>ret
            return -1
        got += ob.pos
        res.produced += ob.pos
        if keep and not _hash_update(md, <uint8_t *>ob.dst, ob.pos):
            res.status = ST_HASH
            return -1
        if ret == 0:
            ended[0] = True
            if fcs != zstd.ZSTD_CONTENTSIZE_UNKNOWN and fcs != res.produced:
                res.status = ST_CORRUPT
                res.err = -20  # ZSTD_error_corruption_detected: "Data corruption detected"
                return -1
        elif ob.pos < ob.size and inb.pos >= inb.size:
            # Output room left, frame not done, input exhausted: the frame is cut short.
            res.status = ST_TRUNCATED
            return -1
        elif ob.pos == 0 and inb.pos == in_pos:
            res.status = ST_CORRUPT  # no progress at all (libzstd guarantees some)
            res.err = -1
            return -1


cdef void _decode_zstd(const uint8_t *src, size_t srclen, uint64_t inner, uint8_t *out,
                       uint64_t size, bint exclusive, uint64_t max_trailing,
                       evp.EVP_MD_CTX *md, Result *res) noexcept nogil:
    cdef bint owned = False
    cdef bint ended = False
    cdef zstd.ZSTD_DCtx *d = _thread_dctx(&owned)
    cdef uint8_t *scratch = <uint8_t *>malloc(SCRATCH)
    cdef zstd.ZSTD_inBuffer inb
    cdef int r
    cdef unsigned long long fcs = zstd.ZSTD_getFrameContentSize(src, srclen)
    if fcs == zstd.ZSTD_CONTENTSIZE_ERROR:  # not a frame, or header cut short
        fcs = zstd.ZSTD_CONTENTSIZE_UNKNOWN  # (libzstd itself reports those)
    if d == NULL or scratch == NULL:
        res.status = ST_NOMEM
        if owned:
            zstd.ZSTD_freeDCtx(d)
        free(scratch)
        return
    inb.src = src
    inb.size = srclen
    inb.pos = 0
    try:
        r = _zstd_run(d, &inb, scratch, inner, False, NULL, &ended, fcs, res)
        if r < 0:
            return
        if r == 1 and res.produced < inner + size:
            res.status = ST_SHORT
            return
        r = _zstd_run(d, &inb, out, size, True, md, &ended, fcs, res)
        if r < 0:
            return
        if r == 1 and res.produced < inner + size:
            res.status = ST_SHORT
            return
        if not exclusive:
            res.status = ST_OK
            return
        r = _zstd_run(d, &inb, scratch, max_trailing + 1, False, NULL, &ended, fcs, res)
        if r < 0:
            return
        res.status = ST_BOMB if res.produced - (inner + size) > max_trailing else ST_OK
    finally:
        if owned:
            zstd.ZSTD_freeDCtx(d)
        else:
            # Drop references into `src`/`out` and any half-decoded frame state.
            zstd.ZSTD_DCtx_reset(d, zstd.ZSTD_reset_session_only)
        free(scratch)


# ---------------------------------------------------------------------------------------
# Python API


_ISAL_ERRORS = {
    isal.ISAL_INVALID_BLOCK: "invalid deflate block",
    isal.ISAL_INVALID_SYMBOL: "invalid deflate symbol",
    isal.ISAL_INVALID_LOOKBACK: "invalid lookback distance",
    isal.ISAL_INVALID_WRAPPER: "invalid gzip header",
    isal.ISAL_UNSUPPORTED_METHOD: "unsupported compression method",
    isal.ISAL_INCORRECT_CHECKSUM: "gzip trailer CRC32/ISIZE mismatch",
    isal.ISAL_NEED_DICT: "needs a preset dictionary",
}


def sha256(data) -> bytes:
    """sha256 of a bytes-like object, as 32 raw bytes (GIL released for large inputs)."""
    cdef Py_buffer view
    cdef unsigned char md[32]
    cdef unsigned int mdlen = 0
    cdef int ok
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        if view.len >= NOGIL_HASH_MIN:
            with nogil:
                ok = evp.EVP_Digest(view.buf, <size_t>view.len, md, &mdlen, _SHA256, NULL)
        else:
            ok = evp.EVP_Digest(view.buf, <size_t>view.len, md, &mdlen, _SHA256, NULL)
    finally:
        PyBuffer_Release(&view)
    if ok != 1 or mdlen != 32:
        raise RuntimeError("OpenSSL sha256 failed")
    return <bytes>md[:32]


def decode_chunk(src, str compression, int64_t inner_offset, int64_t size, digest=None,
                 bint exclusive=True, *, int64_t max_trailing=DEFAULT_MAX_TRAILING) -> bytes:
    """Decode bytes [inner_offset, inner_offset + size) of the member at src[0]; see _codec_py."""
    cdef bint is_gzip
    cdef Py_buffer view
    cdef Result res
    cdef bytes out
    cdef uint8_t *dst
    cdef evp.EVP_MD_CTX *md = NULL
    cdef unsigned char got[32]
    cdef unsigned int mdlen = 0
    cdef const uint8_t *want_digest = NULL
    if compression == "gzip":
        is_gzip = True
    elif compression == "zstd":
        is_gzip = False
    else:
        raise ValueError(f"unknown chunk compression {compression!r} (want 'gzip' or 'zstd')")
    if inner_offset < 0 or size < 0 or max_trailing < 0:
        raise ValueError(
            f"negative inner_offset/size/max_trailing: {inner_offset}/{size}/{max_trailing}"
        )
    if digest is not None:
        if not isinstance(digest, bytes) or len(<bytes>digest) != 32:
            raise ValueError("digest must be 32 raw bytes (a sha256) or None")
        want_digest = <const uint8_t *>PyBytes_AS_STRING(<bytes>digest)
    out = PyBytes_FromStringAndSize(NULL, size)
    res.status = ST_OK
    res.err = 0
    res.produced = 0
    if want_digest != NULL:
        md = evp.EVP_MD_CTX_new()
        if md == NULL or evp.EVP_DigestInit_ex(md, _SHA256, NULL) != 1:
            evp.EVP_MD_CTX_free(md)
            raise MemoryError("cannot allocate an OpenSSL digest context")
    dst = <uint8_t *>PyBytes_AS_STRING(out)
    PyObject_GetBuffer(src, &view, PyBUF_SIMPLE)
    try:
        with nogil:
            if is_gzip:
                _decode_gzip(<const uint8_t *>view.buf, <size_t>view.len,
                             <uint64_t>inner_offset, dst, <uint64_t>size, exclusive,
                             <uint64_t>max_trailing, md, &res)
            else:
                _decode_zstd(<const uint8_t *>view.buf, <size_t>view.len,
                             <uint64_t>inner_offset, dst, <uint64_t>size, exclusive,
                             <uint64_t>max_trailing, md, &res)
            if res.status == ST_OK and md != NULL:
                if evp.EVP_DigestFinal_ex(md, got, &mdlen) != 1 or mdlen != 32:
                    res.status = ST_HASH
        if res.status != ST_OK:
            _raise(res, compression, inner_offset, size, max_trailing, view.len)
    finally:
        PyBuffer_Release(&view)
        evp.EVP_MD_CTX_free(md)
    if want_digest != NULL and memcmp(got, want_digest, 32) != 0:
        raise DigestMismatch(
            f"sha256 mismatch: want sha256:{(<bytes>digest).hex()}, "
            f"got sha256:{(<bytes>got[:32]).hex()}"
        )
    return out


cdef _raise(Result res, str compression, int64_t inner_offset, int64_t size,
            int64_t max_trailing, Py_ssize_t srclen):
    # Messages match _codec_py word for word except for the codec's own error text.
    cdef int64_t end = inner_offset + size
    cdef str unit = "gzip member" if compression == "gzip" else "zstd frame"
    if res.status == ST_SHORT:
        raise ChunkError(
            f"chunk is short: the {unit} ends after {res.produced} bytes, "
            f"want {end} (inner offset {inner_offset} + size {size})"
        )
    if res.status == ST_TRUNCATED:
        raise ChunkError(
            f"chunk is truncated: the compressed input ({srclen} bytes) ends inside the "
            f"{unit} after {res.produced} output bytes"
        )
    if res.status == ST_BOMB:
        raise DecompressionBombError(
            f"chunk inflates past its declared size {size}: its {unit} has more than "
            f"{max_trailing} bytes after inner offset {inner_offset} + size {size}"
        )
    if res.status == ST_CORRUPT:
        if compression == "gzip":
            why = _ISAL_ERRORS.get(res.err, f"isa-l error {res.err}")
        else:
            why = zstd.ZSTD_getErrorName(<size_t>res.err).decode("ascii", "replace")
        raise ChunkError(f"corrupt {unit}: {why}")
    if res.status == ST_NOMEM:
        raise MemoryError("cannot allocate decompression state")
    raise RuntimeError("OpenSSL sha256 failed")
