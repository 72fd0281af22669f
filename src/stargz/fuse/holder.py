"""A tiny process that keeps the daemon's ``/dev/fuse`` descriptor across a daemon restart.

Why: a FUSE connection lives as long as some process holds its device file open. When
the daemon is killed (``kill -9``, an upgrade, a crash) and it held the only descriptor,
the kernel aborts the connection and every mounted layer answers ENOTCONN, breaking the
containers that run on them. The holder keeps a duplicate of the descriptor (the same
open file, received with SCM_RIGHTS), so the connection survives, and hands it to the
next daemon, which serves the very same mount.

The holder never reads the device: requests that arrive while no daemon runs stay queued
in the kernel. It runs in its own session (``start_new_session``), so a signal sent to
the daemon's process group does not reach it, and exits by itself once the connection is
gone (the device reports POLLERR after an unmount or an abort) or when told to ``drop``.

Files, in a directory of its own under the daemon root (mode 0700):

- ``holder.sock``: a SOCK_SEQPACKET unix socket, mode 0600; only peers with the holder's
  uid are answered (SO_PEERCRED);
- ``holder.pid``: the holder's pid (for operators and test harnesses).

Protocol (one request per message, one answer each):

- ``PUT`` + state, with one descriptor: keep that descriptor and the opaque ``state``
  bytes (the daemon's negotiated INIT parameters), replacing what was kept; answer ``OK``.
- ``GET``: answer ``FD`` + state with a duplicate of the kept descriptor (the holder keeps
  its own), or ``NONE``.
- ``DROP``: close the kept descriptor, answer ``OK`` and exit.
- ``PING``: answer ``OK``.

Run as ``python -I -S .../stargz/fuse/holder.py --listen-fd N --pidfile P`` (what `spawn`
does). Standard library only and nothing else of the project: it starts in milliseconds,
stays small (~13 MB RSS), and never shares a bug with the daemon it outlives. A holder
outlives upgrades too, so its protocol must stay what it is (new requests may be added;
an old holder answers them ``ERR``).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time

SOCKET_NAME = "holder.sock"
PID_NAME = "holder.pid"
#: Largest message: a command plus the daemon's state (a few hundred bytes of JSON).
MAX_MESSAGE = 64 << 10
#: How long a client waits for an answer before it gives up on a holder.
TIMEOUT_SEC = 5.0
_UCRED = struct.Struct("iII")


class HolderError(OSError):
    """The holder cannot be reached or answered something unexpected."""


# --- the holder process --------------------------------------------------------------------


class _Holder:
    def __init__(self, listener: socket.socket) -> None:
        self.listener = listener
        self.fd = -1
        self.state = b""

    def run(self) -> None:
        poller = select.poll()
        poller.register(self.listener, select.POLLIN)
        while True:
            if self.fd >= 0:
                # events 0: woken only by POLLERR/POLLHUP, i.e. the connection ended
                # (queued requests make the device readable, which must not wake us)
                poller.register(self.fd, 0)
            for fd, ev in poller.poll():
                if fd == self.fd and ev & (select.POLLERR | select.POLLHUP | select.POLLNVAL):
                    return  # unmounted or aborted: nothing left to keep
                if fd == self.listener.fileno():
                    if not self._serve_one():
                        return

    def _serve_one(self) -> bool:
        """Answer one client; False when told to exit."""
        try:
            conn, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return True
        with conn:
            conn.settimeout(TIMEOUT_SEC)
            try:
                if not _same_user(conn):
                    return True
                msg, fds, _, _ = socket.recv_fds(conn, MAX_MESSAGE, 1, socket.MSG_CMSG_CLOEXEC)
                return self._answer(conn, msg, fds)
            except OSError:
                return True  # a client that went away mid-request: keep holding

    def _answer(self, conn: socket.socket, msg: bytes, fds: list[int]) -> bool:
        if msg.startswith(b"PUT") and len(fds) == 1:
            self._keep(fds[0], msg[3:])
            conn.sendall(b"OK")
            return True
        for fd in fds:
            os.close(fd)
        if msg == b"GET":
            if self.fd < 0:
                conn.sendall(b"NONE")
            else:
                socket.send_fds(conn, [b"FD" + self.state], [self.fd])
            return True
        if msg == b"PING":
            conn.sendall(b"OK")
            return True
        if msg == b"DROP":
            self._keep(-1, b"")
            conn.sendall(b"OK")
            return False
        conn.sendall(b"ERR unknown request")
        return True

    def _keep(self, fd: int, state: bytes) -> None:
        if self.fd >= 0:
            os.close(self.fd)
        self.fd, self.state = fd, state


def _same_user(conn: socket.socket) -> bool:
    cred = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    _pid, uid, _gid = _UCRED.unpack(cred)
    return uid == os.geteuid()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="stargz-fuse-holder")
    p.add_argument("--listen-fd", type=int, required=True, help="a bound, listening socket")
    p.add_argument("--pidfile", required=True)
    args = p.parse_args(argv)
    # a restart of the daemon's service must not stop the holder with it; only SIGKILL
    # (or DROP, or the end of the connection) does
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)
    listener = socket.socket(fileno=args.listen_fd)
    listener.setblocking(False)
    try:
        _Holder(listener).run()
    finally:
        with contextlib.suppress(OSError):
            if _read_pid(args.pidfile) == os.getpid():
                os.unlink(args.pidfile)
        listener.close()
    return 0


# --- the daemon's side -----------------------------------------------------------------------


class HolderClient:
    """The daemon's handle on the holder whose files live in ``directory``."""

    def __init__(self, directory: str) -> None:
        self.dir = os.path.abspath(directory)
        self.socket_path = os.path.join(self.dir, SOCKET_NAME)
        self.pid_path = os.path.join(self.dir, PID_NAME)

    # --- requests ---

    def _call(self, msg: bytes, fds: list[int] | None = None) -> tuple[bytes, list[int]]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
            s.settimeout(TIMEOUT_SEC)
            try:
                s.connect(self.socket_path)
                if fds:
                    socket.send_fds(s, [msg], fds)
                else:
                    s.sendall(msg)
                answer, got, _, _ = socket.recv_fds(s, MAX_MESSAGE, 1, socket.MSG_CMSG_CLOEXEC)
            except OSError as e:
                raise HolderError(e.errno or errno.EIO, f"FUSE holder {self.dir}: {e}") from e
        return answer, got

    def alive(self) -> bool:
        """Whether a holder answers on the socket."""
        try:
            self._call(b"PING")
        except HolderError:
            return False
        return True

    def put(self, fd: int, state: bytes) -> None:
        """Have the holder keep a duplicate of ``fd`` (and ``state``) from now on."""
        answer, got = self._call(b"PUT" + state, [fd])
        for x in got:
            os.close(x)
        if answer != b"OK":
            raise HolderError(errno.EPROTO, f"FUSE holder {self.dir} answered {answer[:80]!r}")

    def get(self) -> tuple[int, bytes] | None:
        """A duplicate of the kept descriptor and its state, or None (none kept, or no
        holder)."""
        try:
            answer, got = self._call(b"GET")
        except HolderError:
            return None
        if answer.startswith(b"FD") and len(got) == 1:
            return got[0], answer[2:]
        for x in got:
            os.close(x)
        return None

    def drop(self) -> None:
        """Tell the holder to close its descriptor and exit (no holder: nothing to do)."""
        with contextlib.suppress(HolderError):
            self._call(b"DROP")
        pid = self.pid()
        if pid is not None:
            _wait_gone(pid, TIMEOUT_SEC)

    def pid(self) -> int | None:
        """The pid the holder wrote, if that process still lives."""
        pid = _read_pid(self.pid_path)
        if pid is None:
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return pid

    # --- starting one ---

    def spawn(self) -> int:
        """Start a holder unless one answers already; returns its pid.

        The socket is bound and listening before the holder starts (it inherits it), so
        a request sent right after this returns is never refused.
        """
        if self.alive():
            pid = self.pid()
            if pid is not None:
                return pid
        os.makedirs(self.dir, 0o700, exist_ok=True)
        os.chmod(self.dir, 0o700)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)  # left by a holder that died
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            old = os.umask(0o177)
            try:
                listener.bind(self.socket_path)
            finally:
                os.umask(old)
            os.chmod(self.socket_path, 0o600)
            listener.listen(8)
            proc = subprocess.Popen(
                [
                    # this file, run by path in isolated mode without site: nothing but the
                    # standard library is imported (not even this package's __init__)
                    sys.executable,
                    "-I",
                    "-S",
                    os.path.abspath(__file__),
                    "--listen-fd",
                    str(listener.fileno()),
                    "--pidfile",
                    self.pid_path,
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                pass_fds=(listener.fileno(),),
                start_new_session=True,
                cwd="/",
            )
        finally:
            listener.close()
        tmp = f"{self.pid_path}.tmp"
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            f.write(f"{proc.pid}\n")
        os.rename(tmp, self.pid_path)
        # the holder outlives us by design: do not let Popen's finalizer reap/track it
        proc.returncode = 0
        # answered once its signal dispositions are set (a few ms)
        deadline = time.monotonic() + TIMEOUT_SEC
        while not self.alive():
            if time.monotonic() > deadline:
                raise HolderError(errno.ETIMEDOUT, f"FUSE holder {self.dir} did not start")
            time.sleep(0.005)
        return proc.pid


def _read_pid(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def _wait_gone(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        # (a child of ours that exited is a zombie until reaped)
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        time.sleep(0.01)


if __name__ == "__main__":
    sys.exit(main())
