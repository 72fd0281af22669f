"""The INIT handshake (`stargz.fuse.connection.handshake`) over a fake device: what we
accept of the kernel's offer, with and without passthrough, old and new kernels."""

from __future__ import annotations

import errno
import struct

import pytest

from stargz.fuse import Opcode, handshake

from .fakedev import FakeKernel

INIT_IN = struct.Struct("<IIIII44x")  # fuse_init_in 7.36+: ..., flags2, unused[11] (64)
INIT_IN_OLD = struct.Struct("<IIII")  # before 7.36 (16)
INIT_OUT = struct.Struct("<IIIIHHIIHHII24x")  # fuse_init_out (64)

ASYNC_READ, POSIX_LOCKS, BIG_WRITES, DO_READDIRPLUS = 1 << 0, 1 << 1, 1 << 5, 1 << 13
READDIRPLUS_AUTO, WRITEBACK_CACHE, PARALLEL_DIROPS = 1 << 14, 1 << 16, 1 << 18
MAX_PAGES, CACHE_SYMLINKS, INIT_EXT = 1 << 22, 1 << 23, 1 << 30
PASSTHROUGH2 = 1 << (37 - 32)  # in flags2
NO_OPENDIR_SUPPORT = 1 << 24
# READDIRPLUS always (never READDIRPLUS_AUTO: a large directory's entries past its first
# answer would each cost a LOOKUP)
WANTED = (
    ASYNC_READ | BIG_WRITES | DO_READDIRPLUS | PARALLEL_DIROPS | MAX_PAGES | CACHE_SYMLINKS
)  # fmt: skip
# what a 6.x kernel offers
OFFERED = WANTED | READDIRPLUS_AUTO | NO_OPENDIR_SUPPORT | POSIX_LOCKS | WRITEBACK_CACHE | INIT_EXT


@pytest.fixture
def kern():
    k = FakeKernel()
    k.sock.setblocking(True)
    k.sock.settimeout(5)
    yield k
    k.close()


def _init(kern, body: bytes, opcode: int = Opcode.INIT) -> int:
    kern.sock.send(struct.pack("<IIQQIIIHH", 40 + len(body), opcode, 2, 0, 0, 0, 0, 0, 0) + body)
    return 2


def _reply(kern) -> tuple[int, int, bytes]:
    data = kern.sock.recv(4096)
    length, error, unique = struct.unpack_from("<IiQ", data)
    assert length == len(data)
    return unique, -error, data[16:]


@pytest.mark.parametrize("want_passthrough", [True, False])
def test_init_with_passthrough_offered(kern, want_passthrough):
    _init(kern, INIT_IN.pack(7, 40, 1 << 17, OFFERED, PASSTHROUGH2 | 1))
    conn = handshake(kern.fd, passthrough=want_passthrough)
    unique, err, body = _reply(kern)
    assert (unique, err, len(body)) == (2, 0, INIT_OUT.size)
    major, minor, readahead, flags, bg, cong, max_write, gran, pages, _, flags2, depth = (
        INIT_OUT.unpack(body)
    )
    assert (major, minor, readahead, max_write, gran, pages) == (7, 40, 1 << 17, 4096, 1, 256)
    assert (bg, cong) == (16, 12)
    if want_passthrough:
        assert flags == WANTED | INIT_EXT and flags2 == PASSTHROUGH2 and depth == 1
    else:
        assert flags == WANTED and flags2 == 0 and depth == 0
    assert conn.passthrough is want_passthrough
    assert (conn.fd, conn.proto_minor, conn.mountpoint) == (kern.fd, 40, None)
    assert conn.offered == OFFERED | (PASSTHROUGH2 | 1) << 32


def test_init_of_a_kernel_without_passthrough(kern):
    _init(kern, INIT_IN.pack(7, 38, 1 << 17, OFFERED, 0))
    conn = handshake(kern.fd, passthrough=True)
    _, err, body = _reply(kern)
    f = INIT_OUT.unpack(body)
    assert err == 0 and f[1] == 38 and f[3] == WANTED | INIT_EXT and f[10] == 0 and f[11] == 0
    assert not conn.passthrough and conn.proto_minor == 38


def test_init_of_an_old_kernel(kern):
    # before 7.36: a 16-byte fuse_init_in, no INIT_EXT, no flags2
    _init(kern, INIT_IN_OLD.pack(7, 31, 1 << 16, WANTED | POSIX_LOCKS))
    conn = handshake(kern.fd, passthrough=True)
    _, err, body = _reply(kern)
    f = INIT_OUT.unpack(body)
    assert err == 0 and f[:4] == (7, 31, 1 << 16, WANTED) and f[10] == 0
    assert not conn.passthrough
    # a newer kernel than we know: we answer with our minor
    k2 = FakeKernel()
    try:
        k2.sock.setblocking(True)
        _init(k2, INIT_IN.pack(7, 99, 0, OFFERED, 0))
        assert handshake(k2.fd, passthrough=False).proto_minor == 40
        assert INIT_OUT.unpack(_reply(k2)[2])[1] == 40
    finally:
        k2.close()


def test_init_refuses_other_majors_and_other_first_requests(kern):
    _init(kern, INIT_IN.pack(8, 0, 0, OFFERED, 0))
    with pytest.raises(OSError) as e:
        handshake(kern.fd, passthrough=True)
    assert e.value.errno == errno.EPROTO
    assert _reply(kern) == (2, errno.EPROTO, b"")

    _init(kern, b"hello\0", opcode=Opcode.LOOKUP)
    with pytest.raises(OSError) as e:
        handshake(kern.fd, passthrough=True)
    assert e.value.errno == errno.EPROTO and _reply(kern) == (2, errno.EPROTO, b"")

    _init(kern, b"\0" * 8)  # an INIT too short for fuse_init_in
    with pytest.raises(OSError):
        handshake(kern.fd, passthrough=True)
    assert _reply(kern) == (2, errno.EPROTO, b"")

    kern.sock.send(b"\1" * 12)  # not even a header: nothing to answer
    with pytest.raises(OSError):
        handshake(kern.fd, passthrough=True)
    kern.sock.settimeout(0.05)
    with pytest.raises(TimeoutError):
        kern.sock.recv(4096)
