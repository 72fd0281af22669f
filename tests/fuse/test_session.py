"""`stargz.fuse.session` over a fake device: every opcode the session handles, the
answers a read-only mount gives everything else, malformed requests, INTERRUPT, handler
failures and close -- each request answered exactly once (`fakedev.served` checks)."""

from __future__ import annotations

import asyncio
import errno
import os
import stat
import struct

from stargz.fuse import FUSEError, Opcode
from stargz.fuse.protocol import NO_REPLY, WRITE_OPCODES, FileRanges

from .fakedev import served
from .memfs import HELLO, MTIME_NS, SLOW, MemFS

# layouts from include/uapi/linux/fuse.h, written out again
ATTR = struct.Struct("<QQQqqqIIIIIIIIII")  # fuse_attr (88)
ENTRY_OUT = struct.Struct("<QQQQII" + ATTR.format[1:])  # fuse_entry_out (128)
ATTR_OUT = struct.Struct("<QII" + ATTR.format[1:])  # fuse_attr_out (104)
OPEN_IN = struct.Struct("<II")
OPEN_OUT = struct.Struct("<QIi")
READ_IN = struct.Struct("<QQIIQII")
RELEASE_IN = struct.Struct("<QIIQ")
GETXATTR_IN = struct.Struct("<II")
GETXATTR_OUT = struct.Struct("<II")
STATFS_OUT = struct.Struct("<QQQQQIIII24x")
DIRENT = struct.Struct("<QQII")
INTERRUPT_IN = struct.Struct("<Q")
FOPEN_DIRECT_IO, FOPEN_KEEP_CACHE, FOPEN_CACHE_DIR, FOPEN_NOFLUSH = 1, 2, 8, 32
NO_OPENDIR_SUPPORT = 1 << 24  # INIT flag


def read_in(fh: int, off: int, size: int) -> bytes:
    return READ_IN.pack(fh, off, size, 0, 0, os.O_RDONLY, 0)


def check_attr(fields: tuple, ino: int, mode: int, size: int) -> None:
    sec, nsec = divmod(MTIME_NS, 1_000_000_000)
    assert fields == (
        ino, size, (size + 511) // 512, sec, sec, sec, nsec, nsec, nsec,
        mode, 2 if stat.S_ISDIR(mode) else 1, 1000, 1001, 0, 4096, 0,
    )  # fmt: skip


def test_lookup_getattr_readlink(run):
    async def main():
        async with served() as (k, s, errors):
            r = await k.call(Opcode.LOOKUP, 1, b"hello\0")
            assert r.error == 0 and len(r.body) == ENTRY_OUT.size
            f = ENTRY_OUT.unpack(r.body)
            # nodeid, generation, entry_valid 7.0 s, attr_valid 2.5 s
            assert f[:6] == (2, 0, 7, 2, 0, 500_000_000)
            check_attr(f[6:], 2, stat.S_IFREG | 0o644, len(HELLO))

            assert await k.error(Opcode.LOOKUP, 1, b"nope\0") == errno.ENOENT
            assert await k.error(Opcode.LOOKUP, 2, b"x\0") == errno.ENOTDIR

            r = await k.call(Opcode.GETATTR, 1, struct.pack("<IIQ", 0, 0, 0))
            f = ATTR_OUT.unpack(r.body)
            assert f[:3] == (2, 500_000_000, 0)
            check_attr(f[3:], 1, stat.S_IFDIR | 0o755, 0)
            assert await k.error(Opcode.GETATTR, 99) == errno.ENOENT

            r = await k.call(Opcode.READLINK, 3)
            assert (r.error, r.body) == (0, b"hello")
            assert await k.error(Opcode.READLINK, 2) == errno.EINVAL
            assert errors == []

    run(main)


def test_open_read_release(run):
    async def main():
        fs = MemFS()
        async with served(fs) as (k, s, errors):
            r = await k.call(Opcode.OPEN, 2, OPEN_IN.pack(os.O_RDONLY, 0))
            assert OPEN_OUT.unpack(r.body) == (102, FOPEN_KEEP_CACHE | FOPEN_NOFLUSH, 0)
            wr = OPEN_IN.pack(os.O_WRONLY, 0)
            assert await k.error(Opcode.OPEN, 2, wr) == errno.EROFS

            r = await k.call(Opcode.READ, 2, read_in(102, 6, 100))
            assert (r.error, r.body) == (0, b"world\n")
            r = await k.call(Opcode.READ, 2, read_in(102, 100, 100))
            assert (r.error, r.body) == (0, b"")  # past the end: an empty answer
            assert await k.error(Opcode.READ, 2, read_in(999, 0, 1)) == errno.EBADF

            r = await k.call(Opcode.RELEASE, 2, RELEASE_IN.pack(102, 0, 0, 0))
            assert (r.error, r.body) == (0, b"")
            assert fs.released == [102]
            r = await k.call(Opcode.RELEASEDIR, 1, RELEASE_IN.pack(201, 0, 0, 0))
            assert (r.error, r.body) == (0, b"")
            # read-only: FLUSH is not needed, ENOSYS stops the kernel sending it
            body = RELEASE_IN.pack(102, 0, 0, 0)
            assert await k.error(Opcode.FLUSH, 2, body) == errno.ENOSYS
            r = await k.call(Opcode.ACCESS, 2, struct.pack("<II", os.R_OK, 0))
            assert (r.error, r.body) == (0, b"")

    run(main)


def test_waiting_read_answers_when_done(run):
    async def main():
        fs = MemFS()
        async with served(fs) as (k, s, errors):
            u = k.send(Opcode.READ, 5, read_in(105, 2, 100))
            await k.nothing()
            assert s.in_flight == 1
            # meanwhile, other requests are answered
            r = await k.call(Opcode.READ, 2, read_in(102, 0, 5))
            assert r.body == b"hello"
            fs.gates[2].set_result(None)
            r = await k.reply()
            assert (r.unique, r.error, r.body) == (u, 0, SLOW[2:])
            assert s.in_flight == 0

    run(main)


def test_statfs(run):
    async def main():
        async with served() as (k, s, errors):
            r = await k.call(Opcode.STATFS, 1)
            assert STATFS_OUT.unpack(r.body) == (1234, 0, 0, 7, 0, 4096, 255, 4096, 0)

    run(main)


def test_xattrs(run):
    async def main():
        async with served() as (k, s, errors):
            # size 0: the kernel asks how big the value is
            r = await k.call(Opcode.GETXATTR, 2, GETXATTR_IN.pack(0, 0) + b"user.k\0")
            assert GETXATTR_OUT.unpack(r.body) == (5, 0)
            r = await k.call(Opcode.GETXATTR, 2, GETXATTR_IN.pack(100, 0) + b"user.k\0")
            assert r.body == b"value"
            r = await k.call(Opcode.GETXATTR, 2, GETXATTR_IN.pack(5, 0) + b"user.k\0")
            assert r.body == b"value"
            body = GETXATTR_IN.pack(4, 0) + b"user.k\0"
            assert await k.error(Opcode.GETXATTR, 2, body) == errno.ERANGE
            body = GETXATTR_IN.pack(100, 0) + b"user.x\0"
            assert await k.error(Opcode.GETXATTR, 2, body) == errno.ENODATA

            names = b"user.k\0user.other\0"
            r = await k.call(Opcode.LISTXATTR, 2, GETXATTR_IN.pack(0, 0))
            assert GETXATTR_OUT.unpack(r.body) == (len(names), 0)
            r = await k.call(Opcode.LISTXATTR, 2, GETXATTR_IN.pack(len(names), 0))
            assert r.body == names
            body = GETXATTR_IN.pack(len(names) - 1, 0)
            assert await k.error(Opcode.LISTXATTR, 2, body) == errno.ERANGE
            r = await k.call(Opcode.LISTXATTR, 1, GETXATTR_IN.pack(0, 0))
            assert GETXATTR_OUT.unpack(r.body) == (0, 0)

    run(main)


def _dirents(body: bytes, plus: bool) -> list[tuple[bytes, int, int, int]]:
    """(name, ino, next offset, type) of each entry of a READDIR(PLUS) answer."""
    out, pos = [], 0
    while pos < len(body):
        if plus:
            nodeid = ENTRY_OUT.unpack_from(body, pos)[0]
            pos += ENTRY_OUT.size
        ino, off, namelen, typ = DIRENT.unpack_from(body, pos)
        name = body[pos + DIRENT.size : pos + DIRENT.size + namelen]
        if plus:
            assert nodeid == ino
        out.append((name, ino, off, typ))
        pos += (DIRENT.size + namelen + 7) & ~7
    assert pos == len(body)
    return out


def test_opendir_readdir_readdirplus(run):
    async def main():
        async with served() as (k, s, errors):
            r = await k.call(Opcode.OPENDIR, 1, OPEN_IN.pack(os.O_RDONLY, 0))
            assert OPEN_OUT.unpack(r.body) == (201, FOPEN_CACHE_DIR | FOPEN_KEEP_CACHE, 0)
            body = OPEN_IN.pack(os.O_RDONLY, 0)
            assert await k.error(Opcode.OPENDIR, 2, body) == errno.ENOTDIR
            want = [b".", b"..", b"hello", b"link", b"sub", b"slow", b"boom", b"slowboom"]
            for opcode, plus in ((Opcode.READDIR, False), (Opcode.READDIRPLUS, True)):
                r = await k.call(opcode, 1, read_in(201, 0, 4096))
                got = _dirents(r.body, plus)
                assert [g[0] for g in got] == want
                assert [g[2] for g in got] == list(range(1, len(want) + 1))
                assert got[2][1:] == (2, 3, stat.S_IFREG >> 12)
                assert got[4][1:] == (4, 5, stat.S_IFDIR >> 12)
                # a small buffer: a few entries per answer, continued from the offset
                names, off = [], 0
                while True:
                    r = await k.call(opcode, 1, read_in(201, off, 170 if plus else 40))
                    part = _dirents(r.body, plus)
                    if not part:
                        break
                    assert len(r.body) <= (170 if plus else 40)
                    names += [g[0] for g in part]
                    off = part[-1][2]
                assert names == want

    run(main)


class StatelessDirs(MemFS):
    """MemFS with directory handles that hold nothing: readdir gets the inode as fh."""

    def readdir(self, fh, start_id, out):
        return super().readdir(fh + 200, start_id, out)


def test_opendir_without_dir_handles(run):
    # the kernel offers NO_OPENDIR_SUPPORT: OPENDIR is answered ENOSYS (from then on the
    # kernel opens directories without asking, and sends fh 0), READDIR(PLUS) lists the
    # inode the request names
    async def main():
        async with served(StatelessDirs(), offered=NO_OPENDIR_SUPPORT, dir_handles=False) as (
            k,
            s,
            errors,
        ):
            assert not s.dir_handles
            assert await k.error(Opcode.OPENDIR, 1, OPEN_IN.pack(os.O_RDONLY, 0)) == errno.ENOSYS
            want = [b".", b"..", b"hello", b"link", b"sub", b"slow", b"boom", b"slowboom"]
            for opcode, plus in ((Opcode.READDIR, False), (Opcode.READDIRPLUS, True)):
                r = await k.call(opcode, 1, read_in(0, 0, 4096))
                assert [g[0] for g in _dirents(r.body, plus)] == want
                r = await k.call(opcode, 4, read_in(0, 0, 4096))
                assert [g[:2] for g in _dirents(r.body, plus)] == [(b".", 4), (b"..", 1)]
            assert not errors

    run(main)


def test_opendir_kept_where_the_kernel_needs_it(run):
    # a kernel that does not offer NO_OPENDIR_SUPPORT fails an open answered ENOSYS:
    # OPENDIR is served as usual, and READDIR uses the handle it gave
    async def main():
        async with served(dir_handles=False) as (k, s, errors):
            assert s.dir_handles
            r = await k.call(Opcode.OPENDIR, 1, OPEN_IN.pack(os.O_RDONLY, 0))
            assert OPEN_OUT.unpack(r.body) == (201, FOPEN_CACHE_DIR | FOPEN_KEEP_CACHE, 0)
            r = await k.call(Opcode.READDIRPLUS, 1, read_in(201, 0, 4096))
            assert len(_dirents(r.body, True)) == 8

    run(main)


def test_unknown_opcodes_enosys_and_writes_erofs(run):
    async def main():
        async with served() as (k, s, errors):
            for opcode in (7, 19, Opcode.BMAP, Opcode.LSEEK, Opcode.STATX, 53, 4096, 1 << 31):
                assert await k.error(opcode, 1, b"\0" * 64) == errno.ENOSYS, opcode
            # INIT again, after the handshake: not served
            assert await k.error(Opcode.INIT, 0, b"\0" * 64) == errno.ENOSYS
            assert len(WRITE_OPCODES) == 16
            for opcode in WRITE_OPCODES:
                assert await k.error(opcode, 2, b"x\0" * 40) == errno.EROFS, opcode.name

    run(main)


def test_no_reply_opcodes(run):
    async def main():
        async with served() as (k, s, errors):
            k.send(Opcode.FORGET, 2, struct.pack("<Q", 1), reply=False)
            batch = struct.pack("<II", 2, 0) + struct.pack("<QQ", 2, 1) + struct.pack("<QQ", 3, 4)
            k.send(Opcode.BATCH_FORGET, 0, batch, reply=False)
            k.send(Opcode.NOTIFY_REPLY, 0, b"\0" * 16, reply=False)
            # an INTERRUPT for a request that is not in flight (answered, or never sent)
            k.send(Opcode.INTERRUPT, 0, INTERRUPT_IN.pack(12345), reply=False, unique=7)
            k.send(Opcode.FORGET, 2, b"", reply=False)  # even a truncated one
            assert set(NO_REPLY) == {
                Opcode.FORGET,
                Opcode.BATCH_FORGET,
                Opcode.NOTIFY_REPLY,
                Opcode.INTERRUPT,
            }
            # the session is still serving, and only this one is answered
            r = await k.call(Opcode.READLINK, 3)
            assert r.body == b"hello"

    run(main)


def test_malformed_and_short_requests(run):
    async def main():
        fs = MemFS()
        async with served(fs) as (k, s, errors):
            # shorter than any header: no unique to answer to, nothing is sent
            k.send_raw(b"\x07" * 10)
            # shorter than a header, but with len/opcode/unique: EINVAL
            u = k.next_unique()
            k.waiting.add(u)
            k.send_raw(struct.pack("<IIQ", 40, Opcode.GETATTR, u) + b"\0" * 8)
            r = await k.reply()
            assert (r.unique, r.error, r.body) == (u, errno.EINVAL, b"")
            # the len field says more (or less) than what was read
            assert await k.error(Opcode.GETATTR, 1, length=100) == errno.EINVAL
            assert await k.error(Opcode.READLINK, 3, b"\0" * 8, length=40) == errno.EINVAL
            # each opcode's struct cut short by one byte
            for opcode, body in (
                (Opcode.OPEN, OPEN_IN.pack(0, 0)),
                (Opcode.OPENDIR, OPEN_IN.pack(0, 0)),
                (Opcode.READ, read_in(102, 0, 5)),
                (Opcode.READDIR, read_in(201, 0, 4096)),
                (Opcode.READDIRPLUS, read_in(201, 0, 4096)),
                (Opcode.RELEASE, RELEASE_IN.pack(102, 0, 0, 0)),
                (Opcode.GETXATTR, GETXATTR_IN.pack(0, 0) + b"\0"),
                (Opcode.LISTXATTR, GETXATTR_IN.pack(0, 0)),
                (Opcode.LOOKUP, b"\0"),
            ):
                assert await k.error(opcode, 2, body[:-1]) == errno.EINVAL, opcode.name
            # a name without its NUL
            assert await k.error(Opcode.LOOKUP, 1, b"hello") == errno.EINVAL
            body = GETXATTR_IN.pack(100, 0) + b"user.k"
            assert await k.error(Opcode.GETXATTR, 2, body) == errno.EINVAL
            # a short read after a long one must not see the long one's bytes: the
            # buffer still holds a full READ_IN from here on
            r = await k.call(Opcode.READ, 2, read_in(102, 0, 5))
            assert r.body == b"hello"
            assert await k.error(Opcode.READ, 2, b"\0" * 8) == errno.EINVAL
            assert fs.released == [] and errors == []
            # and the session still serves
            assert (await k.call(Opcode.READLINK, 3)).body == b"hello"

    run(main)


def test_interrupt_of_a_waiting_read(run):
    async def main():
        fs = MemFS()
        async with served(fs) as (k, s, errors):
            u1 = k.send(Opcode.READ, 5, read_in(105, 0, 100))
            u2 = k.send(Opcode.READ, 5, read_in(105, 1, 100))
            await k.nothing()
            assert s.in_flight == 2
            k.send(Opcode.INTERRUPT, 0, INTERRUPT_IN.pack(u1), reply=False, unique=u1 | 1)
            r = await k.reply()
            assert (r.unique, r.error, r.body) == (u1, errno.EINTR, b"")
            assert fs.outcomes == {0: "cancelled"}
            assert fs.gates[0].cancelled()
            # a second INTERRUPT of it (answered now) is ignored; the other read goes on
            k.send(Opcode.INTERRUPT, 0, INTERRUPT_IN.pack(u1), reply=False, unique=u1 | 1)
            await k.nothing()
            fs.gates[1].set_result(None)
            r = await k.reply()
            assert (r.unique, r.error, r.body) == (u2, 0, SLOW[1:])
            # an INTERRUPT after the answer is ignored too
            k.send(Opcode.INTERRUPT, 0, INTERRUPT_IN.pack(u2), reply=False, unique=u2 | 1)
            assert errors == []

    run(main)


def test_interrupt_read_in_the_same_batch_as_its_request(run):
    """The kernel queues INTERRUPT ahead of other requests, so the session may read it in
    the same wake-up as the request it names, before that request's task ever ran."""

    async def main():
        fs = MemFS()
        async with served(fs) as (k, s, errors):
            u = k.send(Opcode.READ, 5, read_in(105, 0, 100))
            k.send(Opcode.INTERRUPT, 0, INTERRUPT_IN.pack(u), reply=False, unique=u | 1)
            r = await k.reply()
            assert (r.unique, r.error, r.body) == (u, errno.EINTR, b"")
            assert fs.outcomes == {0: "cancelled"} and fs.gates[0].cancelled()
            assert s.in_flight == 0 and errors == []

    run(main)


def test_interrupt_a_handler_survives(run):
    """A handler may catch the cancellation and still answer: one answer, its own."""

    class Stubborn(MemFS):
        async def _slow(self, ino, offset, size):
            try:
                await asyncio.get_running_loop().create_future()
            except asyncio.CancelledError:
                return b"late but whole"
            return b""

    async def main():
        async with served(Stubborn()) as (k, s, errors):
            u = k.send(Opcode.READ, 5, read_in(105, 0, 100))
            await k.nothing()
            k.send(Opcode.INTERRUPT, 0, INTERRUPT_IN.pack(u), reply=False, unique=u | 1)
            r = await k.reply()
            assert (r.unique, r.error, r.body) == (u, 0, b"late but whole")

    run(main)


def test_handler_exceptions_are_eio_and_reported(run):
    class Odd(MemFS):
        def readlink(self, inode):
            return "a str, not bytes"

        def statfs(self):
            raise FUSEError(errno.EACCES)

    async def main():
        fs = Odd()
        async with served(fs) as (k, s, errors):
            assert await k.error(Opcode.READ, 6, read_in(106, 0, 10)) == errno.EIO
            assert errors == [Opcode.READ]
            assert await k.error(Opcode.READLINK, 3) == errno.EIO
            assert errors == [Opcode.READ, Opcode.READLINK]
            assert await k.error(Opcode.STATFS, 1) == errno.EACCES  # FUSEError: no report
            # a handler that fails after waiting
            k.send(Opcode.READ, 7, read_in(107, 3, 10))
            await k.nothing()
            fs.gates[3].set_result(None)
            r = await k.reply()
            assert r.error == errno.EIO and errors == [Opcode.READ, Opcode.READLINK, Opcode.READ]
            # a handler whose own wait was cancelled by its owner (no INTERRUPT): EIO
            k.send(Opcode.READ, 5, read_in(105, 4, 10))
            await k.nothing()
            fs.gates[4].cancel()
            r = await k.reply()
            assert r.error == errno.EIO and errors[-1] == Opcode.READ and len(errors) == 4

    run(main)


def test_close_answers_waiting_reads_once(run):
    async def main():
        fs = MemFS()
        async with served(fs) as (k, s, errors):
            waiting = {k.send(Opcode.READ, 5, read_in(105, off, 10)) for off in range(3)}
            await k.nothing()
            assert s.in_flight == len(waiting) == 3
            s.close()
            got = [await k.reply() for _ in waiting]
            assert {r.unique for r in got} == waiting
            assert {(r.error, r.body) for r in got} == {(errno.EIO, b"")}
            assert k.closed_by_session()  # the answers came before the fd was closed
            await asyncio.sleep(0.01)  # the cancelled handlers run their except blocks
            assert fs.outcomes == {0: "cancelled", 1: "cancelled", 2: "cancelled"}
            await s.wait()  # the session is over
            s.close()  # and closing again is harmless

    run(main)


def test_close_keeping_the_mount_leaves_waiting_reads_to_the_next_server(run):
    async def main():
        fs = MemFS()
        async with served(fs) as (k, s, errors):
            waiting = {k.send(Opcode.READ, 5, read_in(105, off, 10)) for off in range(2)}
            await k.nothing()
            s.close(keep_mount=True)
            await asyncio.sleep(0.01)
            assert k.closed_by_session() and s.fd == -1
            assert fs.outcomes == {0: "cancelled", 1: "cancelled"}
            k.waiting -= waiting  # unanswered on purpose: the kernel resends them

    run(main)


def test_resend_only_when_the_kernel_offers_it(run):
    has_resend = 1 << 39

    async def main():
        async with served(flags=0) as (k, s, errors):
            assert s.resend() is False
            s.conn.offered = has_resend
            assert s.resend() is True
            # a notification: unique 0, the code in the error field, no body
            assert k.sock.recv(100) == struct.pack("<IiQ", 16, 7, 0)

    run(main)


def test_the_device_closing_ends_the_session(run):
    async def main():
        async with served() as (k, s, errors):
            k.sock.close()
            await asyncio.wait_for(s.wait(), 5)

    run(main)


class SplicedFS(MemFS):
    """READs of file 2 answered as ranges of ``path`` (``fallback`` answers them copied)."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.fd = os.open(path, os.O_RDONLY)
        self.copied: list[tuple[int, int]] = []

    def read(self, fh, offset, size):
        if fh != 102:
            return super().read(fh, offset, size)
        end = min(offset + size, 40_000)  # the file's size as the filesystem knows it
        half = (offset + end) // 2
        parts = ((self.fd, offset, half - offset), (self.fd, half, end - half))

        def fallback():
            self.copied.append((offset, end))
            return os.pread(self.fd, end - offset, offset)

        return FileRanges(parts, end - offset, fallback)


def _spliced_fs(tmp_path, size: int = 40_000) -> tuple[SplicedFS, bytes]:
    data = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    (tmp_path / "f").write_bytes(data)
    return SplicedFS(str(tmp_path / "f")), data


def test_file_ranges_are_spliced_into_the_device(run, tmp_path):
    fs, data = _spliced_fs(tmp_path)

    async def main():
        async with served(fs, splice=True) as (k, s, errors):
            for off, size in ((0, 4096), (1000, 30_000), (39_000, 4096), (40_000, 10)):
                r = await k.call(Opcode.READ, 2, read_in(102, off, size))
                assert (r.error, r.body) == (0, data[off : off + size])
            assert (s.spliced, s.splice_fallbacks, fs.copied) == (4, 0, [])
            # other answers are written as before
            r = await k.call(Opcode.READ, 2, read_in(103, 0, 5))
            assert r.error == errno.EBADF

    run(main)


def test_file_ranges_without_splice_are_copied(run, tmp_path):
    fs, data = _spliced_fs(tmp_path)

    async def main():
        async with served(fs, splice=False) as (k, s, errors):
            r = await k.call(Opcode.READ, 2, read_in(102, 100, 8000))
            assert (r.error, r.body) == (0, data[100:8100])
            assert (s.spliced, fs.copied) == (0, [(100, 8100)])

    run(main)


def test_a_short_file_falls_back_and_splicing_stays_on(run, tmp_path):
    fs, data = _spliced_fs(tmp_path, 20_000)  # shorter than the 40000 it claims

    async def main():
        async with served(fs, splice=True) as (k, s, errors):
            r = await k.call(Opcode.READ, 2, read_in(102, 10_000, 20_000))
            # the fallback's answer (here: what pread found), never a reply with a hole
            assert (r.error, r.body) == (0, data[10_000:])
            assert (s.splice, s.spliced, s.splice_fallbacks) == (True, 0, 1)
            r = await k.call(Opcode.READ, 2, read_in(102, 0, 4096))
            assert (r.error, r.body, s.spliced) == (0, data[:4096], 1)

    run(main)


def test_a_refused_splice_turns_it_off_once(run, tmp_path, monkeypatch, caplog):
    fs, data = _spliced_fs(tmp_path)
    calls = []

    def refused(*args, **kwargs):
        calls.append(args)
        raise OSError(errno.EINVAL, "injected")

    monkeypatch.setattr(os, "splice", refused)

    async def main():
        async with served(fs, splice=True) as (k, s, errors):
            for off in (0, 8192):
                r = await k.call(Opcode.READ, 2, read_in(102, off, 4096))
                assert (r.error, r.body) == (0, data[off : off + 4096])
            assert (s.splice, s.spliced, s.splice_fallbacks, len(calls)) == (False, 0, 1, 1)
            assert errors == []

    with caplog.at_level("WARNING", logger="stargz.fuse"):
        run(main)
    assert sum("splicing READ answers" in r.getMessage() for r in caplog.records) == 1


def test_a_fallback_error_is_the_answer(run, tmp_path):
    fs, _ = _spliced_fs(tmp_path)

    def failing():
        raise FUSEError(errno.EIO)

    async def main():
        async with served(fs, splice=False) as (k, s, errors):
            real = fs.read
            fs.read = lambda fh, off, size: FileRanges(real(fh, off, size).parts, size, failing)
            assert await k.error(Opcode.READ, 2, read_in(102, 0, 100)) == errno.EIO
            assert errors == []

    run(main)


def test_busy_poll_reads_quick_requests_and_stops_for_sparse_ones(run):
    import threading
    import time

    async def main():
        async with served(busy_poll_us=200_000) as (k, s, errors):
            r = await k.call(Opcode.READ, 2, read_in(102, 0, 5))
            assert r.body == b"hello" and s.polls == 0  # the first request: no history
            # a request right after an answer: the session polls after answering it, and
            # reads the next one (sent meanwhile from another thread) without sleeping
            u2 = k.send(Opcode.READ, 2, read_in(102, 0, 5))
            u3 = k.next_unique()
            late = threading.Timer(
                0.05, lambda: k.send(Opcode.READ, 2, read_in(102, 6, 5), unique=u3)
            )
            late.start()
            got = {(await k.reply()).unique, (await k.reply()).unique}
            late.join()
            assert got == {u2, u3}
            assert s.polled == 1 and s.polls >= 2  # the second poll found nothing
            # a request long after the last poll gave up: answered, and no poll after it
            polls = s.polls
            time.sleep(0.3)  # (the loop, blocked too, cannot read it earlier)
            r = await k.call(Opcode.READ, 2, read_in(102, 0, 5))
            assert r.body == b"hello" and s.polls == polls and errors == []

    run(main)
