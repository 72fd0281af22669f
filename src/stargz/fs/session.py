"""One FUSE connection served on an asyncio event loop, straight from ``/dev/fuse``.

Why not libfuse (pyfuse3): its asyncio bridge registers and unregisters the device with
the loop and starts a task for every request, which was most of a warm 4 KiB read's
time; and libfuse 3.14 can't negotiate FUSE passthrough, the only way a FUSE file is
read as fast as a local one. Here the device stays registered, a batch of requests is
read per wake-up, and handlers are plain functions: a request that can be answered
from memory is answered before the next one is read, with no task and no coroutine.
Only a handler that must wait (a read whose chunk is being fetched) returns an
awaitable, which runs as a task and answers when it is done.

The handler object (`stargz.fs.ops.Operations`) raises `FUSEError` for an errno answer;
anything else it raises is logged and answered with EIO, so no request ever stays
unanswered and no handler bug stops the mount.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import fcntl
import logging
import os
from collections.abc import Coroutine, Iterable
from typing import Any

from stargz.fs import kernel as k
from stargz.fs.kernel import FUSEError

log = logging.getLogger("stargz.fs")

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MNT_DETACH = 2
#: Largest READ the kernel may send (max_pages x 4 KiB).
MAX_PAGES = 256
#: Requests read per loop wake-up before other callbacks get a turn.
BATCH = 64
#: Read buffer: larger than any request a read-only filesystem gets (the kernel wants
#: at least 8 KiB; a LOOKUP carries at most a 255-byte name, GETXATTR a 255-byte name).
BUFFER_SIZE = 64 << 10

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


class Session:
    """A mounted FUSE filesystem whose requests go to ``ops``.

    ``start`` mounts and begins serving on the running loop; ``wait`` returns when the
    kernel ends the connection (unmount); ``close`` unmounts and closes the device.
    """

    def __init__(
        self,
        ops: Any,
        mountpoint: str,
        *,
        fsname: str = "stargz",
        subtype: str = "stargz",
        allow_other: bool = True,
        passthrough: bool = True,
    ) -> None:
        self.ops = ops
        self.mountpoint = mountpoint
        self.fsname = fsname
        self.subtype = subtype
        self.allow_other = allow_other
        self.want_passthrough = passthrough
        #: True once the kernel agreed to FUSE passthrough (INIT).
        self.passthrough = False
        self.fd = -1
        self.proto_minor = 0
        #: INIT flags the kernel offered (kept for a daemon that takes the fd over).
        self.offered = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._done: asyncio.Future[None] | None = None
        self._buf = bytearray(BUFFER_SIZE)
        self._tasks: set[asyncio.Task[None]] = set()
        self._handlers = {
            k.LOOKUP: self._lookup,
            k.GETATTR: self._getattr,
            k.READLINK: self._readlink,
            k.OPEN: self._open,
            k.READ: self._read,
            k.STATFS: self._statfs,
            k.RELEASE: self._release,
            k.RELEASEDIR: self._empty,
            k.GETXATTR: self._getxattr,
            k.LISTXATTR: self._listxattr,
            k.FLUSH: self._flush,
            k.OPENDIR: self._opendir,
            k.READDIR: self._readdir,
            k.READDIRPLUS: self._readdirplus,
            k.ACCESS: self._empty,
            k.DESTROY: self._empty,
        }

    # --- lifecycle --------------------------------------------------------------------------

    def mount(self) -> None:
        """Open /dev/fuse, mount it and do the INIT handshake (blocks briefly)."""
        fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        try:
            opts = f"fd={fd},rootmode=40000,user_id=0,group_id=0,default_permissions"
            if self.allow_other:
                opts += ",allow_other"
            if (
                _libc.mount(
                    self.fsname.encode(),
                    os.fsencode(self.mountpoint),
                    f"fuse.{self.subtype}".encode(),
                    MS_RDONLY | MS_NOSUID | MS_NODEV,
                    opts.encode(),
                )
                != 0
            ):
                err = ctypes.get_errno()
                raise OSError(err, f"mount FUSE on {self.mountpoint}: {os.strerror(err)}")
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        try:
            self._handshake()
        except BaseException:
            self._unmount()
            raise

    def _handshake(self) -> None:
        n = os.readv(self.fd, [self._buf])
        length, opcode, unique, _, _, _, _, _, _ = k.IN_HEADER.unpack_from(self._buf)
        if opcode != k.INIT or n < k.IN_HEADER.size + 16:
            raise OSError(errno.EPROTO, f"FUSE: expected INIT, got opcode {opcode}")
        major, minor, max_readahead, flags = k.INIT_IN.unpack_from(self._buf, k.IN_HEADER.size)[:4]
        flags2 = 0
        if flags & k.INIT_EXT and n >= k.IN_HEADER.size + k.INIT_IN.size:
            flags2 = k.INIT_IN.unpack_from(self._buf, k.IN_HEADER.size)[4]
        offered = flags | (flags2 << 32)
        self.offered = offered
        if major != k.KERNEL_MAJOR:
            self._reply_error(unique, errno.EPROTO)
            raise OSError(errno.EPROTO, f"FUSE: kernel protocol {major}.{minor} is not 7.x")
        want = (
            k.ASYNC_READ
            | k.BIG_WRITES
            | k.DO_READDIRPLUS
            | k.READDIRPLUS_AUTO
            | k.PARALLEL_DIROPS
            | k.MAX_PAGES
            | k.CACHE_SYMLINKS
        )
        if self.want_passthrough:
            want |= k.INIT_EXT | k.PASSTHROUGH
        got = offered & want
        self.passthrough = bool(got & k.PASSTHROUGH)
        self.proto_minor = min(minor, k.KERNEL_MINOR)
        body = k.INIT_OUT.pack(
            k.KERNEL_MAJOR,
            self.proto_minor,
            max_readahead,
            got & 0xFFFFFFFF,
            16,  # max_background
            12,  # congestion_threshold
            4096,  # max_write (read-only; the read buffer must hold max_write + headers)
            1,  # time_gran (ns)
            MAX_PAGES,
            0,
            got >> 32,
            1 if self.passthrough else 0,  # max_stack_depth: backing files are not stacked
        )
        self._reply(unique, body)
        log.debug(
            "FUSE connection",
            extra={"protocol": f"7.{self.proto_minor}", "passthrough": self.passthrough},
        )

    def state(self) -> dict[str, int | bool]:
        """What INIT negotiated: a daemon that takes this connection over needs it (the
        kernel sends INIT once per connection)."""
        return {
            "proto_minor": self.proto_minor,
            "passthrough": self.passthrough,
            "offered": self.offered,
        }

    def adopt(self, fd: int, state: dict[str, Any]) -> None:
        """Serve a connection another process mounted and initialised (``fd`` is ours now)."""
        self.fd = fd
        self.proto_minor = int(state["proto_minor"])
        self.passthrough = bool(state["passthrough"])
        self.offered = int(state["offered"])

    def resend(self) -> bool:
        """Ask the kernel to queue again every request read but not answered on this
        connection (by a daemon that died). False when the kernel can't (before 6.9)."""
        if not self.offered & k.HAS_RESEND:
            return False
        try:
            os.write(self.fd, k.OUT_HEADER.pack(16, k.NOTIFY_RESEND, 0))
        except OSError as e:
            log.warning("FUSE resend notification failed: %s", e)
            return False
        return True

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Serve requests from ``loop`` (the device becomes non-blocking)."""
        os.set_blocking(self.fd, False)
        self._loop = loop
        self._done = loop.create_future()
        loop.add_reader(self.fd, self._on_readable)

    async def wait(self) -> None:
        """Until the connection ends (unmounted, or `close`)."""
        assert self._done is not None
        await asyncio.shield(self._done)

    def close(self, *, keep_mount: bool = False) -> None:
        """Stop serving, unmount (lazily) and close the device.

        ``keep_mount``: close only our descriptor, leaving the mount to the process that
        keeps a duplicate of it (see `stargz.fuse.handover`); requests being answered are
        left unanswered, for the next daemon to have them resent.
        """
        self._stop()
        if keep_mount and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1  # (so the cancelled tasks below write nothing)
        for t in list(self._tasks):
            t.cancel()
        self._unmount()

    def _stop(self) -> None:
        if self._loop is not None and self.fd >= 0:
            try:
                self._loop.remove_reader(self.fd)
            except (ValueError, OSError, RuntimeError):
                pass
        if self._done is not None and not self._done.done():
            self._done.set_result(None)

    def _unmount(self) -> None:
        if self.fd < 0:
            return
        _libc.umount2(os.fsencode(self.mountpoint), MNT_DETACH)
        os.close(self.fd)
        self.fd = -1

    # --- the request loop -------------------------------------------------------------------

    def _on_readable(self) -> None:
        buf, fd, readv = self._buf, self.fd, os.readv
        handlers = self._handlers
        unpack = k.IN_HEADER.unpack_from
        for _ in range(BATCH):
            try:
                n = readv(fd, [buf])
            except BlockingIOError:
                return
            except InterruptedError:
                continue
            except OSError as e:
                if e.errno == errno.ENOENT:  # interrupted before we read it
                    continue
                if e.errno == errno.ENODEV:  # unmounted
                    self._stop()
                else:
                    # never leave a mount nobody answers (every access would hang):
                    # closing the device aborts the connection (ENOTCONN from then on)
                    log.critical("reading /dev/fuse failed; unmounting: %s", e)
                    self.close()
                return
            if n == 0:
                self._stop()
                return
            length, opcode, unique, nodeid, _uid, _gid, _pid, _, _ = unpack(buf)
            handler = handlers.get(opcode)
            if handler is None:
                if opcode in k.NO_REPLY:
                    continue
                self._reply_error(
                    unique, errno.EROFS if opcode in k.WRITE_OPCODES else errno.ENOSYS
                )
                continue
            try:
                out = handler(nodeid, n)
                if out is not None and out.__class__ is not bytes and hasattr(out, "send"):
                    # a coroutine: run it here until it finishes or has to wait
                    try:
                        waiting_on = out.send(None)
                    except StopIteration as stop:
                        out = stop.value
                    else:
                        self._spawn(unique, _resume(out, waiting_on))
                        continue
            except FUSEError as e:
                self._reply_error(unique, e.errno)
                continue
            except Exception:
                log.exception("FUSE request %d on inode %d failed", opcode, nodeid)
                self._count_error()
                self._reply_error(unique, errno.EIO)
                continue
            self._reply(unique, out)

    def _count_error(self) -> None:
        metrics = getattr(self.ops, "metrics", None)
        if metrics is not None:
            metrics.handler_errors += 1

    def _spawn(self, unique: int, aw: Coroutine[Any, Any, bytes]) -> None:
        assert self._loop is not None
        t = self._loop.create_task(self._finish(unique, aw))
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    async def _finish(self, unique: int, aw: Coroutine[Any, Any, bytes]) -> None:
        try:
            out = await aw
        except FUSEError as e:
            self._reply_error(unique, e.errno)
        except asyncio.CancelledError:
            self._reply_error(unique, errno.EINTR)
            raise
        except Exception:
            log.exception("FUSE request %d failed", unique)
            self._count_error()
            self._reply_error(unique, errno.EIO)
        else:
            self._reply(unique, out)

    # --- replies ----------------------------------------------------------------------------

    def _write(self, parts: list[bytes]) -> None:
        if self.fd < 0:
            return
        try:
            os.writev(self.fd, parts)
        except OSError as e:
            # ENOENT: the request was interrupted meanwhile; ENODEV: unmounted
            if e.errno not in (errno.ENOENT, errno.ENODEV, errno.EBADF):
                log.warning("writing to /dev/fuse failed: %s", e)

    def _reply(self, unique: int, body: bytes | None) -> None:
        if not body:
            self._write([k.OUT_HEADER.pack(16, 0, unique)])
        else:
            self._write([k.OUT_HEADER.pack(16 + len(body), 0, unique), body])

    def _reply_error(self, unique: int, err: int) -> None:
        self._write([k.OUT_HEADER.pack(16, -err, unique)])

    # --- notifications and passthrough ------------------------------------------------------

    def notify_store(self, inode: int, offset: int, data: bytes) -> None:
        """Put ``data`` into the kernel's page cache of ``inode`` at ``offset``."""
        body = k.NOTIFY_STORE_OUT.pack(inode, offset, len(data), 0)
        os.writev(
            self.fd,
            [k.OUT_HEADER.pack(16 + len(body) + len(data), k.NOTIFY_STORE, 0), body, data],
        )

    def invalidate_entry(self, parent: int, name: bytes) -> None:
        """Forget the kernel's cached entry ``name`` in ``parent``.

        Blocks until the kernel is done and the kernel may need the daemon for that: call
        it from a worker thread, never from the thread that serves requests.
        """
        if self.fd < 0:
            return
        body = k.NOTIFY_INVAL_ENTRY_OUT.pack(parent, len(name), 0) + name + b"\0"
        try:
            os.write(self.fd, k.OUT_HEADER.pack(16 + len(body), k.NOTIFY_INVAL_ENTRY, 0) + body)
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ENODEV, errno.EBADF):
                raise

    def backing_open(self, fd: int) -> int:
        """Register ``fd`` as a passthrough backing file; returns its backing id."""
        arg = bytearray(k.BACKING_MAP.pack(fd, 0, 0))
        # (mutate_flag True: ioctl returns the call's result, the backing id)
        return fcntl.ioctl(self.fd, k.DEV_IOC_BACKING_OPEN, arg, True)

    def backing_close(self, backing_id: int) -> None:
        if self.fd < 0:
            return
        arg = bytearray(backing_id.to_bytes(4, "little"))
        try:
            fcntl.ioctl(self.fd, k.DEV_IOC_BACKING_CLOSE, arg, True)
        except OSError as e:
            log.debug("closing backing id %d failed: %s", backing_id, e)

    # --- request decoding -------------------------------------------------------------------

    def _name(self, n: int, start: int = 40) -> bytes:
        end = self._buf.index(0, start, n)
        return bytes(self._buf[start:end])

    def _lookup(self, nodeid: int, n: int) -> bytes:
        return self.ops.lookup(nodeid, self._name(n)).entry_out()

    def _getattr(self, nodeid: int, n: int) -> bytes:
        return self.ops.getattr(nodeid).attr_out()

    def _readlink(self, nodeid: int, n: int) -> bytes:
        return self.ops.readlink(nodeid)

    def _open(self, nodeid: int, n: int) -> bytes:
        flags = k.OPEN_IN.unpack_from(self._buf, 40)[0]
        return self.ops.open(nodeid, flags).open_out()

    def _release(self, nodeid: int, n: int) -> None:
        self.ops.release(k.FH.unpack_from(self._buf, 40)[0])

    def _opendir(self, nodeid: int, n: int) -> bytes:
        fh = self.ops.opendir(nodeid)
        # the layers never change: let the kernel cache listings and their pages
        return k.OPEN_OUT.pack(fh, k.FOPEN_CACHE_DIR | k.FOPEN_KEEP_CACHE, 0)

    def _read(self, nodeid: int, n: int) -> Any:
        fh, off, size = k.READ_IN.unpack_from(self._buf, 40)[:3]
        return self.ops.read(fh, off, size)

    def _readdir(self, nodeid: int, n: int, plus: bool = False) -> bytes:
        fh, off, size = k.READ_IN.unpack_from(self._buf, 40)[:3]
        out = k.DirBuffer(plus, size)
        self.ops.readdir(fh, off, out)
        return out.body()

    def _readdirplus(self, nodeid: int, n: int) -> bytes:
        return self._readdir(nodeid, n, True)

    def _statfs(self, nodeid: int, n: int) -> bytes:
        return self.ops.statfs().statfs_out()

    def _xattr_answer(self, value: bytes, size: int) -> bytes:
        if size == 0:
            return k.GETXATTR_OUT.pack(len(value), 0)
        if len(value) > size:
            raise FUSEError(errno.ERANGE)
        return value

    def _getxattr(self, nodeid: int, n: int) -> bytes:
        size = k.GETXATTR_IN.unpack_from(self._buf, 40)[0]
        name = self._name(n, 40 + k.GETXATTR_IN.size)
        return self._xattr_answer(self.ops.getxattr(nodeid, name), size)

    def _listxattr(self, nodeid: int, n: int) -> bytes:
        size = k.GETXATTR_IN.unpack_from(self._buf, 40)[0]
        names: Iterable[bytes] = self.ops.listxattr(nodeid)
        return self._xattr_answer(b"".join(x + b"\0" for x in names), size)

    def _flush(self, nodeid: int, n: int) -> bytes:
        # read-only: nothing to flush; ENOSYS makes the kernel stop sending FLUSH
        raise FUSEError(errno.ENOSYS)

    def _empty(self, nodeid: int, n: int) -> None:
        return None


async def _resume(coro: Coroutine[Any, Any, Any], waiting_on: Any) -> Any:
    """Go on with ``coro``, which was stepped by hand and now waits for ``waiting_on``.

    asyncio's protocol: a coroutine suspends by yielding the future it waits for (or None
    to just yield the loop); whoever drives it resumes it with ``send(None)`` once that
    future is done. This is what a Task does; doing the first step ourselves saves a task
    for every request that never waits.
    """
    try:
        while True:
            if waiting_on is None:
                await asyncio.sleep(0)
            else:
                waiting_on._asyncio_future_blocking = False
                await asyncio.wait((waiting_on,))
            waiting_on = coro.send(None)
    except StopIteration as stop:
        return stop.value
    except asyncio.CancelledError:
        coro.close()
        raise
