"""Fuzz: random and mutated requests into a `Session` over the fake device.

Hypothesis writes a batch of requests: well-formed ones for every opcode the session
handles (and others, known or not), built from the layouts in ``fuse.h`` (`fakedev`),
then damaged: bodies cut or padded, bytes flipped, the ``len`` field wrong, names
without their NUL, INTERRUPTs for requests in the batch (waiting or not), and raw bytes
(shorter than a header too). Each request gets a fresh ``unique`` (INTERRUPTs an odd
one, as the kernel does). After the batch, a sentinel request, the slow reads' gates
opened, another sentinel, then `Session.close`.

Every request that wants an answer (16 bytes or more, so its ``unique`` is there, and
not FORGET, BATCH_FORGET, NOTIFY_REPLY or INTERRUPT) gets exactly one, well formed: its
``len`` is the message's, the error a negative errno or 0, an error has no body and a
success the body its opcode's struct says. No exception reaches the event loop, the only
handler errors are the toy filesystem's deliberate ones, and the session keeps serving.
Runs on asyncio and uvloop.
"""

from __future__ import annotations

import asyncio
import errno
import struct

import pytest
import uvloop
from fuzzing import fuzz_settings, fuzz_timeout
from hypothesis import event, given
from hypothesis import strategies as st

from stargz.fuse import Connection, Opcode, Session
from stargz.fuse.protocol import NO_REPLY

from .fakedev import IN_HEADER, OUT_HEADER, FakeKernel
from .memfs import MemFS
from .test_session import GETXATTR_IN, INTERRUPT_IN, OPEN_IN, RELEASE_IN, read_in

pytestmark = [pytest.mark.fuzz, fuzz_timeout(90)]

PREFIX = 16  # len, opcode, unique: enough to be answered
#: success body sizes (None: any length up to the request's size field; "empty": none)
ENTRY_OUT, ATTR_OUT, OPEN_OUT, STATFS_OUT, XATTR_SIZE = 128, 104, 16, 80, 8


class CountingFS(MemFS):
    """`MemFS`, counting the handler bugs it raises on purpose ("boom", "slowboom")."""

    def __init__(self) -> None:
        super().__init__()
        self.raised = 0

    def read(self, fh: int, offset: int, size: int):
        if fh == 106:
            self.raised += 1
        return super().read(fh, offset, size)

    async def _slow(self, ino: int, offset: int, size: int) -> bytes:
        try:
            return await super()._slow(ino, offset, size)
        except RuntimeError:
            self.raised += 1
            raise


NODES = st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 99, (1 << 64) - 1])
FHS = st.sampled_from([102, 103, 105, 106, 107, 201, 204, 0, (1 << 64) - 1])
OFFSETS = st.sampled_from([0, 1, 5, 12, 1 << 40, (1 << 64) - 1])
# (the toy's xattr value is 5 bytes, its name list 18: sizes either side of both)
SIZES = st.sampled_from([0, 1, 4, 5, 6, 17, 18, 4096, 1 << 17, (1 << 32) - 1])
NAMES = st.sampled_from([b"hello", b"link", b"sub", b"slow", b"boom", b"", b"user.k",
                         b"x" * 300, b"\xff\xfe"])  # fmt: skip
HANDLED = [
    Opcode.LOOKUP, Opcode.GETATTR, Opcode.READLINK, Opcode.OPEN, Opcode.READ,
    Opcode.STATFS, Opcode.RELEASE, Opcode.RELEASEDIR, Opcode.GETXATTR, Opcode.LISTXATTR,
    Opcode.FLUSH, Opcode.OPENDIR, Opcode.READDIR, Opcode.READDIRPLUS, Opcode.ACCESS,
]  # fmt: skip
OPCODES = st.one_of(
    st.sampled_from(HANDLED),
    st.sampled_from(sorted(NO_REPLY)),
    st.sampled_from(list(Opcode)),
    st.integers(0, 60),
    st.sampled_from([(1 << 32) - 1, 4096]),
)


@st.composite
def body_for(draw, opcode: int, earlier: list[int]) -> tuple[bytes, int]:
    """(body, the inode it most likely goes to: one where the toy has something)."""
    if opcode in (Opcode.LOOKUP,):
        return draw(NAMES) + b"\0", 1
    if opcode in (Opcode.OPEN, Opcode.OPENDIR):
        return OPEN_IN.pack(draw(st.sampled_from([0, 1, 2, 0o100000])), 0), 2
    if opcode in (Opcode.READ, Opcode.READDIR, Opcode.READDIRPLUS):
        fh = draw(st.one_of(st.just(102 if opcode == Opcode.READ else 201), FHS))
        return read_in(fh, draw(OFFSETS), draw(SIZES)), 2
    if opcode == Opcode.RELEASE:
        return RELEASE_IN.pack(draw(FHS), 0, 0, 0), 2
    if opcode in (Opcode.GETXATTR, Opcode.LISTXATTR):
        head = GETXATTR_IN.pack(draw(SIZES), 0)
        name = draw(st.one_of(st.just(b"user.k"), NAMES)) + b"\0"
        return head + (name if opcode == Opcode.GETXATTR else b""), 2
    if opcode == Opcode.INTERRUPT:
        target = draw(st.sampled_from(earlier)) if earlier else draw(st.integers(0, 99))
        return INTERRUPT_IN.pack(target), 0
    if opcode == Opcode.GETATTR:
        return struct.pack("<IIQ", 0, 0, 0), 1
    return draw(st.binary(max_size=64)), 1


@st.composite
def batches(draw) -> list[tuple[int, int, int, bytes]]:
    """[(opcode, unique, size field for READ-like replies, message bytes)]."""
    out = []
    uniques: list[int] = []
    for i in range(draw(st.integers(1, 24))):
        unique = 2 * (i + 1)
        if draw(st.integers(0, 9)) == 0:  # raw bytes, maybe shorter than a header
            raw = bytearray(draw(st.binary(min_size=1, max_size=80)))
            if len(raw) >= PREFIX:
                raw[8:16] = struct.pack("<Q", unique)
            opcode = struct.unpack_from("<I", raw, 4)[0] if len(raw) >= 8 else -1
            out.append((opcode, unique, 0, bytes(raw)))
            continue
        if draw(st.integers(0, 7)) == 0:  # a read that waits (for an INTERRUPT to end)
            fh = draw(st.sampled_from([105, 107]))
            msg = IN_HEADER.pack(80, Opcode.READ, unique, fh - 100, 0, 0, 1, 0, 0)
            out.append((Opcode.READ, unique, 100, msg + read_in(fh, i, 100)))
            uniques.append(unique)
            if draw(st.booleans()):  # interrupted at once (an odd unique of its own)
                msg = IN_HEADER.pack(48, Opcode.INTERRUPT, unique | 1, 0, 0, 0, 1, 0, 0)
                out.append((Opcode.INTERRUPT, unique | 1, 0, msg + INTERRUPT_IN.pack(unique)))
            continue
        opcode = draw(OPCODES)
        raw_body, likely_node = draw(body_for(opcode, uniques))
        body = bytearray(raw_body)
        if opcode == Opcode.INTERRUPT:
            unique |= 1
        length = None
        for _ in range(draw(st.integers(0, 2))):
            op = draw(st.sampled_from(["cut", "pad", "flip", "len", "nul"]))
            if op == "cut" and body:
                del body[draw(st.integers(0, len(body) - 1)) :]
            elif op == "pad":
                body += draw(st.binary(min_size=1, max_size=16))
            elif op == "flip" and body:
                body[draw(st.integers(0, len(body) - 1))] ^= draw(st.integers(1, 255))
            elif op == "len":
                length = draw(st.sampled_from([0, 1, 39, 40, 41, 1 << 20, (1 << 32) - 1]))
            elif op == "nul" and body.endswith(b"\0"):
                body[-1:] = b"x"
        # the size the answer must fit (as the session reads it, after the damage)
        size = struct.unpack_from("<I", body, 16)[0] if len(body) >= 24 else 0
        if opcode in (Opcode.GETXATTR, Opcode.LISTXATTR) and len(body) >= 8:
            size = struct.unpack_from("<I", body)[0]
        n = IN_HEADER.size + len(body)
        node = draw(st.one_of(st.just(likely_node), NODES))
        head = IN_HEADER.pack(n if length is None else length, opcode % (1 << 32), unique,
                              node, 0, 0, 1, 0, 0)  # fmt: skip
        msg = head + bytes(body)
        if draw(st.integers(0, 9)) == 0:  # cut inside the header
            msg = msg[: draw(st.integers(1, IN_HEADER.size - 1))]
        out.append((opcode, unique, size, msg))
        uniques.append(unique)
    return out


def wants_reply(opcode: int, msg: bytes) -> bool:
    return len(msg) >= PREFIX and opcode not in NO_REPLY


def check_body(opcode: int, size: int, body: bytes) -> None:
    """A success answer's body is what its opcode's struct says."""
    fixed = {
        Opcode.LOOKUP: ENTRY_OUT,
        Opcode.GETATTR: ATTR_OUT,
        Opcode.OPEN: OPEN_OUT,
        Opcode.OPENDIR: OPEN_OUT,
        Opcode.STATFS: STATFS_OUT,
    }
    if opcode in fixed:
        assert len(body) == fixed[opcode], (opcode, body)
    elif opcode in (Opcode.READ, Opcode.READDIR, Opcode.READDIRPLUS):
        assert len(body) <= size, (opcode, size, len(body))
    elif opcode in (Opcode.GETXATTR, Opcode.LISTXATTR):
        assert len(body) == XATTR_SIZE if size == 0 else len(body) <= size, (size, body)
    elif opcode != Opcode.READLINK:
        assert body == b"", (opcode, body)


async def _serve(batch: list[tuple[int, int, int, bytes]]) -> tuple[set[int], int]:
    loop = asyncio.get_running_loop()
    loop_errors: list[dict] = []
    loop.set_exception_handler(lambda _loop, ctx: loop_errors.append(ctx))
    kern = FakeKernel()
    fs = CountingFS()
    handler_errors: list[int] = []
    session = Session(fs, Connection(kern.fd, 40, 0), on_handler_error=handler_errors.append)
    session.start(loop)
    want = {u: (op, size) for op, u, size, msg in batch if wants_reply(op, msg)}
    got: dict[int, int] = {}

    async def until(unique: int) -> None:
        while True:
            data = await asyncio.wait_for(loop.sock_recv(kern.sock, 1 << 20), 5)
            if take(data) == unique:
                return

    def take(data: bytes) -> int:
        assert len(data) >= OUT_HEADER.size, data
        length, error, unique = OUT_HEADER.unpack_from(data)
        assert length == len(data), (length, len(data))
        assert -4096 < error <= 0, error
        if unique in (1 << 62, (1 << 62) + 2):  # the sentinels
            assert error == 0
            return unique
        assert unique in want, f"an answer to {unique}, which wants none"
        assert unique not in got, f"a second answer to {unique}"
        got[unique] = -error
        body = data[OUT_HEADER.size :]
        if error:
            assert body == b""
        else:
            check_body(*want[unique], body)
        return unique

    try:
        for _, _, _, msg in batch:
            kern.send_raw(msg)
        # everything before it has been read (answered, or waiting as a task)
        kern.send(Opcode.GETATTR, 1, struct.pack("<IIQ", 0, 0, 0), unique=1 << 62)
        await until(1 << 62)
        for gate in list(fs.gates.values()):
            if not gate.done():
                gate.set_result(None)
        for _ in range(3):
            await asyncio.sleep(0)
        kern.send(Opcode.GETATTR, 1, struct.pack("<IIQ", 0, 0, 0), unique=(1 << 62) + 2)
        await until((1 << 62) + 2)  # still serving
        in_flight = session.in_flight
    finally:
        session.close()
    try:
        while data := await asyncio.wait_for(loop.sock_recv(kern.sock, 1 << 20), 5):
            take(data)  # (close answers what still waits: EIO)
    finally:
        kern.close()
    assert sorted(got) == sorted(want), f"unanswered: {sorted(set(want) - set(got))}"
    assert loop_errors == []
    assert len(handler_errors) == fs.raised, (handler_errors, fs.raised)
    return set(got.values()), in_flight


@fuzz_settings(400, deadline_s=10)
@given(batch=batches(), kind=st.sampled_from(["asyncio", "uvloop"]))
def test_every_request_gets_one_well_formed_answer(batch, kind) -> None:
    factory = asyncio.new_event_loop if kind == "asyncio" else uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as r:
        answers, in_flight = r.run(asyncio.wait_for(_serve(batch), 30))
    for e in answers:
        event(f"answered {errno.errorcode.get(e, 'OK')}")
    event(f"{'some' if in_flight else 'none'} waiting at close")


def test_wants_reply_model() -> None:
    """Control: the model agrees with the protocol on the edge cases."""
    assert not wants_reply(Opcode.GETATTR, b"x" * 15)
    assert wants_reply(Opcode.GETATTR, b"x" * 16)
    assert not wants_reply(Opcode.FORGET, b"x" * 48)
