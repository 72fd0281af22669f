"""One FUSE connection served on an asyncio event loop, straight from its device fd.

Why not libfuse (pyfuse3): its asyncio bridge registers and unregisters the device with
the loop and starts a task for every request, which was most of a warm 4 KiB read's
time; and libfuse 3.14 can't negotiate FUSE passthrough, the only way a FUSE file is
read as fast as a local one. Here the device stays registered, a batch of requests is
read per wake-up, and handlers (`stargz.fuse.operations.Operations`) are plain
functions: a request that can be answered from memory is answered before the next one
is read, with no task and no coroutine.

A `Session` serves an fd whose INIT is done (a `stargz.fuse.connection.Connection`); it
does not care who opened it (`stargz.fuse.connection.mount`, a test's socketpair, a process
that held the fd across a restart).

Rules a handler lives by:

- **One read buffer.** Every request is read into the same buffer, reused for the next
  request as soon as this one's handler returns or first suspends. Whatever reads the
  buffer (the session's decoders, or a handler ever given a view of it) must copy what it
  keeps before returning or awaiting. The decoders do: handlers get ints and fresh
  ``bytes`` names, and a waiting request keeps only its ``unique``.
- **First step inline.** A handler that returns a coroutine has it stepped once, at
  once, in the reading callback. If it finishes there, it is answered like a plain
  return. Only if it must wait (yields a future) does it become a task
  (`stargz.fuse.stepping.finish` drives it from there as a Task would). During the first
  step there is no current task (see `stargz.fuse.stepping` for what that rules out).
- **Exactly one answer per request that wants one.** ``FUSEError(e)`` answers ``-e``;
  any other exception is logged, reported to ``on_handler_error`` and answered with EIO;
  a malformed request (shorter than the header or than the struct its opcode carries,
  a ``len`` that is not what was read, a name without its NUL) gets EINVAL; unknown
  opcodes ENOSYS; write opcodes EROFS (the mount is read-only); FORGET, BATCH_FORGET,
  NOTIFY_REPLY and INTERRUPT nothing (the kernel expects nothing).

INTERRUPT (the kernel's rules, Documentation/filesystems/fuse.rst): when a process
waiting on a request gets a signal, the kernel sends INTERRUPT naming that request's
``unique``, always after the request itself has been read (INTERRUPTs then jump the
queue). A server may ignore it or answer the original request with EINTR; a reply for a
request the kernel already ended is dropped (the write fails with ENOENT). If the server
cannot find the request it may answer the INTERRUPT itself with EAGAIN to have it sent
again -- that is for servers with several reader threads, where an INTERRUPT can overtake
its request. Here one callback reads everything in order, so a request named by an
INTERRUPT has been read already: if it is still waiting (a task), the task is cancelled
and the request answered EINTR once; otherwise it was answered already, and the
INTERRUPT is ignored. A SIGKILLed reader ends its wait the same way, so a killed reader
no longer waits for a fetch timeout.

`close` answers the requests still waiting (EIO: the server is going away) before it
closes the fd, so none is left to the connection's abort.

Splice (``splice=True``): a READ handler may answer with `stargz.fuse.protocol.FileRanges`
(ranges of open files). The session then writes the 16-byte ``fuse_out_header`` into a
pipe, splices each range from its file into the pipe (the pipe takes references to the
file's page-cache pages), and splices the whole pipe into the device in one call, which
the kernel (``fuse_dev_splice_write``) reads exactly as a written reply: header first,
``len`` bytes in all. The bytes are copied once, by the kernel, from the file's pages into
the reader's, instead of twice and through a Python object. One pipe serves the session:
every answer is written from the loop thread. Any failure leaves the pipe replaced and
the request answered the usual way (``fallback()``); an error that says splicing cannot
work here (EINVAL and the like) turns it off for the session, logged once.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import functools
import logging
import os
import time
from collections.abc import Callable, Coroutine
from typing import Any

from stargz.fuse import protocol as p
from stargz.fuse.connection import PAGE_SIZE, Connection, splice_pipe, unmount
from stargz.fuse.operations import Operations
from stargz.fuse.protocol import FileRanges, FUSEError, Opcode
from stargz.fuse.stepping import finish

log = logging.getLogger("stargz.fuse")

#: Requests read per loop wake-up before other callbacks get a turn.
BATCH = 64
#: Read buffer: larger than any request a read-only filesystem gets (the kernel wants
#: at least 8 KiB; max_write is 4 KiB; a LOOKUP or GETXATTR carries a name < 256 bytes).
BUFFER_SIZE = 64 << 10

#: Handlers offer `FileRanges` for answers of at least this size only: splicing costs two
#: more syscalls than a copy, and pays only past ~128 KiB
#: (bench_fs.py, page cache warm: 4 KiB 17.8 vs 15.6 us, 64 KiB 33.1 vs 31.7, 128 KiB
#: 50.0 vs 52.4, 512 KiB 159 vs 178).
SPLICE_MIN = 128 << 10
_PAGE = PAGE_SIZE
#: splice(2) errors that mean splicing cannot work on this file or device at all.
_SPLICE_UNSUPPORTED = frozenset({errno.EINVAL, errno.ESPIPE, errno.EOPNOTSUPP, errno.ENOSYS})
_monotonic_ns = time.monotonic_ns
_HDR = p.IN_HEADER.size
_OUT = p.OUT_HEADER.size
_pack_out = p.OUT_HEADER.pack


class Session:
    """Requests from ``conn`` answered by ``ops``.

    ``start`` begins serving on a loop; ``wait`` returns when the kernel ends the
    connection (unmount); ``close`` answers what is in flight, unmounts (if ``conn`` was
    mounted by us) and closes the fd. ``on_handler_error(opcode)`` is called for every
    request a handler failed with something other than `FUSEError` (it is answered EIO).

    ``dir_handles=False`` is for a filesystem whose directory handles hold nothing (its
    ``opendir`` returns the inode and its directories never change): OPENDIR is answered
    with ENOSYS, after which the kernel opens directories without asking (no OPENDIR, no
    RELEASEDIR: half the requests of a cold walk) and keeps their listings cached;
    READDIR(PLUS) then passes the directory's inode to ``readdir`` as its ``fh``. Where
    the kernel did not offer `NO_OPENDIR_SUPPORT` (before 5.1: ENOSYS would fail the
    open), OPENDIR is served as usual.

    ``splice=True``: `FileRanges` answers are spliced into the device (see the module
    docstring); False: they are answered with their ``fallback()``.

    ``busy_poll_us``: when the device has no request left, keep reading it for up to that
    long before going back to the loop, but only while requests have been arriving within
    that time of the session going idle (a reader that waits for each answer before asking
    again: the next request comes some 10-80 us after the answer). Waking up from the
    loop's epoll_wait on an idle VM costs more than the request (measured, bench_fs.py:
    4 KiB ``O_DIRECT`` reads from cached chunk files 57 -> 27 us p50, cold 103 -> 84 us);
    a poll that finds nothing turns polling off until requests come quickly again, so a
    sparse load costs no polling. 0: never poll.
    """

    def __init__(
        self,
        ops: Operations,
        conn: Connection,
        *,
        on_handler_error: Callable[[int], None] | None = None,
        dir_handles: bool = True,
        splice: bool = False,
        busy_poll_us: int = 0,
    ) -> None:
        self.ops = ops
        self.conn = conn
        self.fd = conn.fd
        #: True when the kernel agreed to FUSE passthrough (INIT).
        self.passthrough = conn.passthrough
        self.proto_minor = conn.proto_minor
        self.on_handler_error = on_handler_error
        #: False: directories are opened without OPENDIR (see `Session`), where the
        #: kernel can (it offered `NO_OPENDIR_SUPPORT`).
        self.dir_handles = dir_handles or not conn.offered & p.NO_OPENDIR_SUPPORT
        self._loop: asyncio.AbstractEventLoop | None = None
        self._done: asyncio.Future[None] | None = None
        self._buf = bytearray(BUFFER_SIZE)
        #: Whether `FileRanges` answers are spliced (off for good after a failure that
        #: says splicing cannot work here).
        self.splice = splice
        #: Answers spliced, and answers that fell back to a copy after a splice failed.
        self.spliced = 0
        self.splice_fallbacks = 0
        self._pipe: tuple[int, int] | None = None
        #: Busy polling (see `Session`): for how long, whether the next idle moment polls,
        #: and when the session last went idle.
        self.busy_poll_ns = max(0, busy_poll_us) * 1000
        self._poll = False
        self._idle_since = 0
        #: Polls started, and requests they read.
        self.polls = 0
        self.polled = 0
        #: Pipe bytes one spliced answer's ranges may take (set when the pipe is made).
        self._splice_room = 0
        #: Requests whose handler is waiting, by unique (the only per-request state).
        self._inflight: dict[int, asyncio.Task[None]] = {}
        # (handler, the least request length its decoding reads)
        self._handlers: dict[int, tuple[Callable[[int, int], Any], int]] = {
            Opcode.LOOKUP: (self._lookup, _HDR + 1),
            Opcode.GETATTR: (self._getattr, _HDR),
            Opcode.READLINK: (self._readlink, _HDR),
            Opcode.OPEN: (self._open, _HDR + p.OPEN_IN.size),
            Opcode.READ: (self._read, _HDR + p.READ_IN.size),
            Opcode.STATFS: (self._statfs, _HDR),
            Opcode.RELEASE: (self._release, _HDR + p.RELEASE_IN.size),
            Opcode.RELEASEDIR: (self._empty, _HDR),
            Opcode.GETXATTR: (self._getxattr, _HDR + p.GETXATTR_IN.size + 1),
            Opcode.LISTXATTR: (self._listxattr, _HDR + p.GETXATTR_IN.size),
            Opcode.FLUSH: (self._flush, _HDR),
            Opcode.OPENDIR: (self._opendir, _HDR + p.OPEN_IN.size),
            Opcode.READDIR: (self._readdir, _HDR + p.READ_IN.size),
            Opcode.READDIRPLUS: (self._readdirplus, _HDR + p.READ_IN.size),
            Opcode.ACCESS: (self._empty, _HDR),
            Opcode.DESTROY: (self._empty, _HDR),
        }

    @property
    def in_flight(self) -> int:
        """Requests whose handler is waiting (not answered yet)."""
        return len(self._inflight)

    # --- lifecycle --------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Serve requests from ``loop`` (the fd becomes non-blocking)."""
        os.set_blocking(self.fd, False)
        self._loop = loop
        self._done = loop.create_future()
        loop.add_reader(self.fd, self._on_readable)

    async def wait(self) -> None:
        """Until the connection ends (unmounted, or `close`)."""
        assert self._done is not None
        await asyncio.shield(self._done)

    def close(self, *, keep_mount: bool = False) -> None:
        """Stop serving, answer the requests still waiting (EIO), unmount (lazily, if we
        mounted it) and close the fd.

        ``keep_mount``: another process keeps a duplicate of the fd to hand the connection
        to the next server; leave the mount, and leave the waiting requests unanswered for
        that server to have them sent again (`resend`). Only our fd is closed.
        """
        self._stop()
        self._close_pipe()
        inflight, self._inflight = self._inflight, {}
        for unique, task in inflight.items():
            if not keep_mount:
                self._reply_error(unique, errno.EIO)
            task.cancel()
        if self.fd < 0:
            return
        if self.conn.mountpoint is not None and not keep_mount:
            unmount(self.conn.mountpoint)
        os.close(self.fd)
        self.fd = -1

    def _stop(self) -> None:
        if self._loop is not None and self.fd >= 0:
            try:
                self._loop.remove_reader(self.fd)
            except (ValueError, OSError, RuntimeError):
                pass
        if self._done is not None and not self._done.done():
            self._done.set_result(None)

    # --- the request loop -------------------------------------------------------------------

    def _on_readable(self) -> None:
        buf, fd, readv = self._buf, self.fd, os.readv
        handlers = self._handlers
        unpack = p.IN_HEADER.unpack_from
        if self.busy_poll_ns:
            # woken by the loop: had we polled, would we have caught this request?
            self._poll = _monotonic_ns() - self._idle_since <= self.busy_poll_ns
        for _ in range(BATCH):
            try:
                n = readv(fd, [buf])
            except BlockingIOError:
                n = self._poll_read(fd, buf) if self._poll else -1
                if n < 0:
                    if self.busy_poll_ns:
                        self._idle_since = _monotonic_ns()
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
                    log.critical("reading the FUSE device failed; unmounting: %s", e)
                    self.close()
                return
            if n < _HDR:
                if n == 0:
                    self._stop()
                    return
                self._malformed(n)
                continue
            length, opcode, unique, nodeid, _uid, _gid, _pid, _, _ = unpack(buf)
            h = handlers.get(opcode)
            if h is None or n < h[1] or length != n:
                self._unhandled(opcode, unique, n, length)
                continue
            try:
                out = h[0](nodeid, n)
                if out.__class__ is FileRanges:
                    if self._splice(unique, out):
                        continue
                    out = out.fallback()
                if out is not None and out.__class__ is not bytes and hasattr(out, "send"):
                    # a coroutine: run it here until it finishes or has to wait
                    try:
                        waiting_on = out.send(None)
                    except StopIteration as stop:
                        out = stop.value
                    else:
                        self._spawn(opcode, unique, out, waiting_on)
                        continue
                self._reply(unique, out)
            except FUSEError as e:
                self._reply_error(unique, e.errno)
            except Exception:
                log.exception("FUSE request %s on inode %d failed", _name_of(opcode), nodeid)
                self._handler_failed(opcode)
                self._reply_error(unique, errno.EIO)
        # (a full batch: other callbacks get their turn, and the loop calls again at once)
        self._idle_since = _monotonic_ns()

    def _poll_read(self, fd: int, buf: bytearray) -> int:
        """The next request read by polling the device for up to ``busy_poll_ns``, or -1."""
        readv = os.readv
        self.polls += 1
        deadline = _monotonic_ns() + self.busy_poll_ns
        while _monotonic_ns() < deadline:
            try:
                n = readv(fd, [buf])
                self.polled += 1
                return n
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                return -1  # (ENODEV, ENOENT...: the next wake-up reads it again)
        return -1

    def _unhandled(self, opcode: int, unique: int, n: int, length: int) -> None:
        """A request no handler takes, or one too short for its handler (the slow path)."""
        if length != n or (opcode in self._handlers and n < self._handlers[opcode][1]):
            log.warning(
                "malformed FUSE request",
                extra={"opcode": opcode, "length": length, "read": n},
            )
            if opcode not in p.NO_REPLY:
                self._reply_error(unique, errno.EINVAL)
        elif opcode == Opcode.INTERRUPT:
            if n >= _HDR + p.INTERRUPT_IN.size:
                self._interrupt(p.INTERRUPT_IN.unpack_from(self._buf, _HDR)[0])
        elif opcode in p.NO_REPLY:
            pass
        elif opcode in p.WRITE_OPCODES:
            self._reply_error(unique, errno.EROFS)
        else:
            self._reply_error(unique, errno.ENOSYS)

    def _malformed(self, n: int) -> None:
        # shorter than a header: answered if at least its unique is there
        log.warning("malformed FUSE request", extra={"read": n})
        if n >= p.IN_HEADER_PREFIX.size:
            _, opcode, unique = p.IN_HEADER_PREFIX.unpack_from(self._buf)
            if opcode not in p.NO_REPLY:
                self._reply_error(unique, errno.EINVAL)

    def _interrupt(self, unique: int) -> None:
        task = self._inflight.get(unique)
        if task is not None and self._loop is not None:
            # after the task's first step, which is already scheduled: the request may
            # have been read in this same batch, and a task cancelled before it ever ran
            # never drives its handler (which then would not see the cancellation)
            self._loop.call_soon(task.cancel)

    def _handler_failed(self, opcode: int) -> None:
        if self.on_handler_error is not None:
            try:
                self.on_handler_error(opcode)
            except Exception:
                log.exception("the FUSE handler error hook failed")

    def _spawn(
        self, opcode: int, unique: int, coro: Coroutine[Any, Any, Any], waiting_on: Any
    ) -> None:
        assert self._loop is not None
        task = self._loop.create_task(self._finish(opcode, unique, coro, waiting_on))
        self._inflight[unique] = task
        task.add_done_callback(functools.partial(self._finished, unique))

    def _finished(self, unique: int, task: asyncio.Task[None]) -> None:
        # a request still in flight when its task ended was cancelled (INTERRUPT, or the
        # loop shutting down) and not answered by its handler: EINTR
        if self._inflight.pop(unique, None) is not None:
            self._reply_error(unique, errno.EINTR)

    async def _finish(
        self, opcode: int, unique: int, coro: Coroutine[Any, Any, Any], waiting_on: Any
    ) -> None:
        try:
            out = await finish(coro, waiting_on)
            if out.__class__ is FileRanges:
                if unique in self._inflight and self._splice(unique, out):
                    self._inflight.pop(unique, None)
                    return
                out = out.fallback()
                if hasattr(out, "__await__"):
                    out = await out
        except FUSEError as e:
            if self._inflight.pop(unique, None) is not None:
                self._reply_error(unique, e.errno)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # INTERRUPT (or close): answered by `_finished` (or close)
            if self._inflight.pop(unique, None) is not None:
                # the handler let out a CancelledError nobody asked for
                log.error("FUSE request %s was cancelled by its handler", _name_of(opcode))
                self._handler_failed(opcode)
                self._reply_error(unique, errno.EIO)
        except Exception:
            if self._inflight.pop(unique, None) is not None:
                log.exception("FUSE request %s failed", _name_of(opcode))
                self._handler_failed(opcode)
                self._reply_error(unique, errno.EIO)
        else:
            if self._inflight.pop(unique, None) is not None:
                try:
                    self._reply(unique, out)
                except Exception:
                    log.exception("FUSE request %s answered with a bad value", _name_of(opcode))
                    self._handler_failed(opcode)
                    self._reply_error(unique, errno.EIO)

    # --- replies ----------------------------------------------------------------------------

    def _write(self, parts: list[Any]) -> None:
        if self.fd < 0:
            return
        try:
            os.writev(self.fd, parts)
        except OSError as e:
            # ENOENT: the request was interrupted meanwhile; ENODEV: unmounted
            if e.errno not in (errno.ENOENT, errno.ENODEV, errno.EBADF):
                log.warning("writing to the FUSE device failed: %s", e)

    def _reply(self, unique: int, body: bytes | None) -> None:
        if not body:
            self._write([_pack_out(_OUT, 0, unique)])
        else:
            self._write([_pack_out(_OUT + len(body), 0, unique), body])

    def _reply_error(self, unique: int, err: int) -> None:
        self._write([_pack_out(_OUT, -err, unique)])

    # --- spliced answers -------------------------------------------------------------------

    def _splice(self, unique: int, out: FileRanges) -> bool:
        """Answer ``out`` by splicing its ranges into the device; False when it was not
        answered (splice off, too big for the pipe, or a failure: see the module doc)."""
        # (each range may start mid-page: one pipe buffer more than its pages)
        if not self.splice or self.fd < 0:
            return False
        pipe = self._pipe or self._open_pipe()
        if pipe is None or out.size + _PAGE * len(out.parts) > self._splice_room:
            return False
        r, w = pipe
        total = _OUT + out.size
        splice = os.splice
        try:
            os.write(w, _pack_out(total, 0, unique))
            for fd, off, n in out.parts:
                while n:
                    got = splice(fd, w, n, off)
                    if not got:  # the file is shorter than its range
                        self._close_pipe()
                        self.splice_fallbacks += 1
                        return False
                    off += got
                    n -= got
        except OSError as e:
            self._close_pipe()
            self._splice_failed(e)
            return False
        # counted first: the reader may look at the count as soon as its answer is in
        self.spliced += 1
        try:
            sent = splice(r, self.fd, total)
        except OSError as e:
            self._close_pipe()
            if e.errno in (errno.ENOENT, errno.ENODEV):
                return True  # interrupted meanwhile, or unmounted: nothing to answer
            self.spliced -= 1
            self._splice_failed(e)
            return False
        if sent != total:  # (the device takes a whole answer or none)
            self.spliced -= 1
            self._close_pipe()
            self._splice_failed(OSError(errno.EIO, f"spliced {sent} of {total} bytes"))
            return False
        return True

    def _open_pipe(self) -> tuple[int, int] | None:
        try:
            r, w, size = splice_pipe()
        except OSError as e:
            self._splice_failed(e)
            return None
        # (less the header's pipe buffer)
        self._splice_room = (size // _PAGE - 1) * _PAGE
        self._pipe = (r, w)
        return self._pipe

    def _close_pipe(self) -> None:
        pipe, self._pipe = self._pipe, None
        if pipe is not None:
            for fd in pipe:
                os.close(fd)

    def _splice_failed(self, e: OSError) -> None:
        self.splice_fallbacks += 1
        if e.errno in _SPLICE_UNSUPPORTED and self.splice:
            self.splice = False
            log.warning(
                "splicing READ answers into the FUSE device failed; copying them instead",
                extra={"error": str(e)},
            )
        else:
            log.debug("splicing a READ answer failed: %s", e)

    # --- notifications and passthrough ------------------------------------------------------

    def resend(self) -> bool:
        """Have the kernel queue again every request read on this connection and never
        answered (by a server that died or handed the connection over). False when the
        kernel can't (it did not offer `HAS_RESEND`: before 6.9) or the write failed."""
        if not self.conn.offered & p.HAS_RESEND:
            return False
        try:
            os.write(self.fd, _pack_out(_OUT, p.NOTIFY_RESEND, 0))
        except OSError as e:
            log.warning("FUSE resend notification failed: %s", e)
            return False
        return True

    def notify_store(self, inode: int, offset: int, data: bytes) -> None:
        """Put ``data`` into the kernel's page cache of ``inode`` at ``offset``."""
        body = p.NOTIFY_STORE_OUT.pack(inode, offset, len(data), 0)
        os.writev(self.fd, [_pack_out(_OUT + len(body) + len(data), p.NOTIFY_STORE, 0), body, data])

    def invalidate_entry(self, parent: int, name: bytes) -> None:
        """Forget the kernel's cached entry ``name`` in ``parent``.

        Blocks until the kernel is done and the kernel may need the daemon for that: call
        it from a worker thread, never from the thread that serves requests.
        """
        if self.fd < 0:
            return
        body = p.NOTIFY_INVAL_ENTRY_OUT.pack(parent, len(name), 0) + name + b"\0"
        try:
            os.write(self.fd, _pack_out(_OUT + len(body), p.NOTIFY_INVAL_ENTRY, 0) + body)
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ENODEV, errno.EBADF):
                raise

    def invalidate_inode(self, inode: int) -> None:
        """Drop what the kernel cached of ``inode``: attributes and pages (for a
        directory: its cached listing). Call it from a worker thread, like
        `invalidate_entry`."""
        if self.fd < 0:
            return
        body = p.NOTIFY_INVAL_INODE_OUT.pack(inode, 0, 0)
        try:
            os.write(self.fd, _pack_out(_OUT + len(body), p.NOTIFY_INVAL_INODE, 0) + body)
        except OSError as e:
            # ENOENT: the kernel has nothing cached of it
            if e.errno not in (errno.ENOENT, errno.ENODEV, errno.EBADF):
                raise

    def backing_open(self, fd: int) -> int:
        """Register ``fd`` as a passthrough backing file; returns its backing id."""
        arg = bytearray(p.BACKING_MAP.pack(fd, 0, 0))
        # (mutate_flag True: ioctl returns the call's result, the backing id)
        return fcntl.ioctl(self.fd, p.DEV_IOC_BACKING_OPEN, arg, True)

    def backing_close(self, backing_id: int) -> None:
        if self.fd < 0:
            return
        arg = bytearray(p.BACKING_ID.pack(backing_id))
        try:
            fcntl.ioctl(self.fd, p.DEV_IOC_BACKING_CLOSE, arg, True)
        except OSError as e:
            log.debug("closing backing id %d failed: %s", backing_id, e)

    # --- request decoding (``n``: the request's length, checked against the table) ---------

    def _name(self, n: int, start: int = _HDR) -> bytes:
        try:
            end = self._buf.index(0, start, n)
        except ValueError:
            raise FUSEError(errno.EINVAL) from None  # a name without its NUL
        return bytes(self._buf[start:end])

    def _lookup(self, nodeid: int, n: int) -> bytes:
        return self.ops.lookup(nodeid, self._name(n)).entry_out()

    def _getattr(self, nodeid: int, n: int) -> bytes:
        return self.ops.getattr(nodeid).attr_out()

    def _readlink(self, nodeid: int, n: int) -> bytes:
        return self.ops.readlink(nodeid)

    def _open(self, nodeid: int, n: int) -> bytes:
        flags = p.OPEN_IN.unpack_from(self._buf, _HDR)[0]
        return self.ops.open(nodeid, flags).open_out()

    def _release(self, nodeid: int, n: int) -> None:
        self.ops.release(p.RELEASE_IN.unpack_from(self._buf, _HDR)[0])

    def _opendir(self, nodeid: int, n: int) -> bytes:
        if not self.dir_handles:
            raise FUSEError(errno.ENOSYS)
        fh = self.ops.opendir(nodeid)
        # the layers never change: let the kernel cache listings and their pages
        return p.OPEN_OUT.pack(fh, p.FOPEN_CACHE_DIR | p.FOPEN_KEEP_CACHE, 0)

    def _read(self, nodeid: int, n: int) -> Any:
        fh, off, size = p.READ_IN.unpack_from(self._buf, _HDR)[:3]
        return self.ops.read(fh, off, size)

    def _readdir(self, nodeid: int, n: int, plus: bool = False) -> bytes:
        fh, off, size = p.READ_IN.unpack_from(self._buf, _HDR)[:3]
        out = p.DirBuffer(plus, size)
        # (the kernel sends fh 0 for a directory it opened without OPENDIR)
        self.ops.readdir(fh if self.dir_handles else nodeid, off, out)
        return out.body()

    def _readdirplus(self, nodeid: int, n: int) -> bytes:
        return self._readdir(nodeid, n, True)

    def _statfs(self, nodeid: int, n: int) -> bytes:
        return self.ops.statfs().statfs_out()

    def _xattr_answer(self, value: bytes, size: int) -> bytes:
        if size == 0:
            return p.GETXATTR_OUT.pack(len(value), 0)
        if len(value) > size:
            raise FUSEError(errno.ERANGE)
        return value

    def _getxattr(self, nodeid: int, n: int) -> bytes:
        size = p.GETXATTR_IN.unpack_from(self._buf, _HDR)[0]
        name = self._name(n, _HDR + p.GETXATTR_IN.size)
        return self._xattr_answer(self.ops.getxattr(nodeid, name), size)

    def _listxattr(self, nodeid: int, n: int) -> bytes:
        size = p.GETXATTR_IN.unpack_from(self._buf, _HDR)[0]
        names = self.ops.listxattr(nodeid)
        return self._xattr_answer(b"".join(x + b"\0" for x in names), size)

    def _flush(self, nodeid: int, n: int) -> bytes:
        # read-only: nothing to flush; ENOSYS makes the kernel stop sending FLUSH
        raise FUSEError(errno.ENOSYS)

    def _empty(self, nodeid: int, n: int) -> None:
        return None


def _name_of(opcode: int) -> str:
    try:
        return Opcode(opcode).name
    except ValueError:
        return str(opcode)
