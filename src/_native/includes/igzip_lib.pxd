# ISA-L inflate (Debian libisal-dev 2.30, <isa-l/igzip_lib.h>). Only what _codec uses.
from libc.stdint cimport uint8_t, uint32_t, uint64_t, int32_t


cdef extern from "isa-l/igzip_lib.h" nogil:
    # Inflate wrapper flags (state.crc_flag).
    enum:
        ISAL_DEFLATE
        ISAL_GZIP
        ISAL_GZIP_NO_HDR
        ISAL_ZLIB

    # Return codes of isal_inflate().
    enum:
        ISAL_DECOMP_OK
        ISAL_END_INPUT
        ISAL_OUT_OVERFLOW
        ISAL_NAME_OVERFLOW
        ISAL_COMMENT_OVERFLOW
        ISAL_EXTRA_OVERFLOW
        ISAL_NEED_DICT
        ISAL_INVALID_BLOCK
        ISAL_INVALID_SYMBOL
        ISAL_INVALID_LOOKBACK
        ISAL_INVALID_WRAPPER
        ISAL_UNSUPPORTED_METHOD
        ISAL_INCORRECT_CHECKSUM

    enum isal_block_state:
        ISAL_BLOCK_NEW_HDR
        ISAL_BLOCK_HDR
        ISAL_BLOCK_TYPE0
        ISAL_BLOCK_CODED
        ISAL_BLOCK_INPUT_DONE
        ISAL_BLOCK_FINISH

    # Opaque beyond these fields; sizeof() comes from the header (~90 KiB, so heap it).
    struct inflate_state:
        uint8_t *next_out
        uint32_t avail_out
        uint32_t total_out
        uint8_t *next_in
        uint64_t read_in
        uint32_t avail_in
        int32_t read_in_length
        isal_block_state block_state
        uint32_t crc_flag
        uint32_t crc
        uint32_t hist_bits

    void isal_inflate_init(inflate_state *state)
    void isal_inflate_reset(inflate_state *state)
    int isal_inflate(inflate_state *state)
