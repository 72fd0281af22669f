"""A fake ``/dev/fuse`` for driving a `Session` without root: one end of a
``SOCK_SEQPACKET`` socketpair is the session's fd, the test plays the kernel on the other.

Like the device, each message is one whole request or one whole reply. Requests are
built here from the layouts in ``include/uapi/linux/fuse.h`` written out again (not
taken from `stargz.fuse.protocol`), so a wrong struct in the library shows up.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from stargz.fuse import Connection, Session

IN_HEADER = struct.Struct("<IIQQIIIHH")  # fuse_in_header (40 bytes)
OUT_HEADER = struct.Struct("<IiQ")  # fuse_out_header (16 bytes)


@dataclass(frozen=True)
class Reply:
    unique: int
    error: int  # a positive errno, 0 for success
    body: bytes


class FakeKernel:
    """The kernel's side of a fake FUSE device."""

    def __init__(self) -> None:
        self.sock, dev = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.setblocking(False)
        #: The session's end (the session owns and closes it).
        self.fd = dev.detach()
        self._unique = 0
        #: uniques of the requests sent that want an answer, not yet answered
        self.waiting: set[int] = set()

    def next_unique(self) -> int:
        self._unique += 2  # the kernel's step; bit 0 marks INTERRUPT requests
        return self._unique

    def send_raw(self, data: bytes) -> None:
        self.sock.send(data)

    def send(
        self,
        opcode: int,
        nodeid: int = 0,
        body: bytes = b"",
        *,
        reply: bool = True,
        unique: int | None = None,
        length: int | None = None,
    ) -> int:
        """Send one request; returns its unique. ``reply``: whether one is expected."""
        if unique is None:
            unique = self.next_unique()
        if length is None:
            length = IN_HEADER.size + len(body)
        head = IN_HEADER.pack(length, opcode, unique, nodeid, 0, 0, 1, 0, 0)
        self.sock.send(head + body)
        if reply:
            self.waiting.add(unique)
        return unique

    async def reply(self, timeout: float = 5.0) -> Reply:
        """The next message the session wrote (fails after ``timeout``)."""
        loop = asyncio.get_running_loop()
        data = await asyncio.wait_for(loop.sock_recv(self.sock, 1 << 20), timeout)
        assert len(data) >= OUT_HEADER.size, f"a {len(data)}-byte reply"
        length, error, unique = OUT_HEADER.unpack_from(data)
        assert length == len(data), f"reply len field {length}, message {len(data)} bytes"
        assert error <= 0 and (error == 0 or -error < 4096), error
        assert unique in self.waiting, f"reply to {unique}, which wants none (or had one)"
        self.waiting.discard(unique)
        return Reply(unique, -error, data[OUT_HEADER.size :])

    async def call(self, opcode: int, nodeid: int = 0, body: bytes = b"", **kw: int) -> Reply:
        """One request and its reply."""
        unique = self.send(opcode, nodeid, body, **kw)
        r = await self.reply()
        assert r.unique == unique
        return r

    async def error(self, opcode: int, nodeid: int = 0, body: bytes = b"", **kw: int) -> int:
        r = await self.call(opcode, nodeid, body, **kw)
        assert r.body == b"", f"an error reply has no body: {r}"
        return r.error

    async def nothing(self, wait: float = 0.05) -> None:
        """No message comes within ``wait`` seconds (or the session closed its end)."""
        if self.sock.fileno() < 0:
            return
        loop = asyncio.get_running_loop()
        try:
            data = await asyncio.wait_for(loop.sock_recv(self.sock, 1 << 20), wait)
        except TimeoutError:
            return
        assert data == b"", f"unexpected message {data!r}"

    def closed_by_session(self) -> bool:
        """Whether the session closed its end (reading gives EOF, not EAGAIN)."""
        try:
            return self.sock.recv(1) == b""
        except BlockingIOError:
            return False

    def close(self) -> None:
        self.sock.close()
        try:
            os.close(self.fd)
        except OSError as e:
            assert e.errno == errno.EBADF


def name(s: bytes) -> bytes:
    """A name as requests carry it: NUL-terminated."""
    return s + b"\0"


@contextlib.asynccontextmanager
async def served(
    ops: Any = None,
    *,
    flags: int = 0,
    offered: int = 0,
    dir_handles: bool = True,
    splice: bool = False,
    busy_poll_us: int = 0,
) -> AsyncIterator[tuple[FakeKernel, Session, list[int]]]:
    """A `Session` serving ``ops`` (a fresh `MemFS` by default) over a fake device, on
    the running loop; yields (kernel side, session, opcodes reported as handler errors).
    ``flags``/``offered``: the INIT flags agreed / offered by the fake kernel.

    On a normal exit: nothing more arrives, and every request that wanted an answer got
    exactly one (`FakeKernel.reply` refuses a second one or one to a no-reply request).
    """
    from .memfs import MemFS

    kern = FakeKernel()
    errors: list[int] = []
    session = Session(
        MemFS() if ops is None else ops,
        Connection(kern.fd, 40, flags, offered=offered),
        on_handler_error=errors.append,
        dir_handles=dir_handles,
        splice=splice,
        busy_poll_us=busy_poll_us,
    )
    session.start(asyncio.get_running_loop())
    try:
        yield kern, session, errors
        await kern.nothing(0.02)
        assert not kern.waiting, f"requests never answered: {sorted(kern.waiting)}"
    finally:
        session.close()
        kern.close()
