"""Run a workload in an OCI bundle with ``runc``, and stop it after a period.

``runc create`` sets the container up (mounts, the image's ``/etc/passwd`` lookups) and
leaves its init waiting; only then does the caller start recording, and ``runc start``
runs the workload: what runc itself opens while it prepares is not the workload's, as in
Go's optimizer (its fanotify starts after the task is created). This process becomes a
child subreaper, so the container's init (runc's grandchild) is reparented to it and its
exit status is ours to wait for. Stopping is SIGTERM, a grace period, then SIGKILL; the
container is always deleted. runc keeps its state under a private ``--root``.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import termios
import threading
import time
import tty
from collections.abc import Callable
from typing import Any

from stargz.errors import FailedPrecondition, InvalidArgument

log = logging.getLogger("stargz.optimize")

PR_SET_CHILD_SUBREAPER = 36
#: Seconds between SIGTERM and SIGKILL when the period is over.
STOP_GRACE = 3.0


def find_runc(path: str | None = None) -> str:
    found = shutil.which("runc", path=path)
    if found is None:
        raise FailedPrecondition("runc is not installed (not found on PATH): install runc")
    return found


def _become_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


class Container:
    """One runc container of a bundle; `delete` it when done (also after errors)."""

    def __init__(self, runc: str, state_root: str, bundle: str, cid: str) -> None:
        self.runc, self.state_root, self.bundle, self.id = runc, state_root, bundle, cid
        self.pid: int | None = None
        self.status: int | None = None  # exit code, or -signal
        self._console: int | None = None  # pty master of a terminal workload
        self._saved_tty: list[Any] | None = None
        self._pumps: list[threading.Thread] = []

    def _cmd(self, *args: str) -> list[str]:
        log_file = os.path.join(self.bundle, "runc.log")
        return [
            self.runc,
            "--root",
            self.state_root,
            "--log",
            log_file,
            "--log-format",
            "json",
            *args,
        ]

    def _error(self, stderr: str = "") -> str:
        """runc's last error message (from its JSON log), else the last stderr line."""
        msg = ""
        with contextlib.suppress(OSError):
            with open(os.path.join(self.bundle, "runc.log"), encoding="utf-8") as f:
                for line in f:
                    with contextlib.suppress(ValueError):
                        doc = json.loads(line)
                        if doc.get("level") in ("error", "fatal"):
                            msg = str(doc.get("msg", ""))
        return msg or _last_line(stderr)

    def create(self, spec: dict[str, Any], *, stdin: int | None = None) -> None:
        """Write ``config.json`` and ``runc create`` (the workload waits for `start`).

        The container's stdio are this process's (stdin: ``stdin`` or /dev/null), so
        runc's own stderr is too: its error is read back from its log file."""
        with open(os.path.join(self.bundle, "config.json"), "w") as f:
            json.dump(spec, f, indent=1)
        _become_subreaper()
        pidfile = os.path.join(self.bundle, "init.pid")
        extra: list[str] = []
        receiver = None
        if spec["process"].get("terminal"):
            receiver = _ConsoleReceiver(os.path.join(self.bundle, "console.sock"))
            extra = ["--console-socket", receiver.path]
        devnull = None
        if stdin is None:
            devnull = os.open(os.devnull, os.O_RDONLY)
            stdin = devnull
        try:
            proc = subprocess.run(
                self._cmd(
                    "create", "--bundle", self.bundle, "--pid-file", pidfile, *extra, self.id
                ),
                stdin=stdin,
                timeout=120,
            )
        except subprocess.TimeoutExpired:
            raise FailedPrecondition("runc create did not finish in 120 s") from None
        finally:
            if devnull is not None:
                os.close(devnull)
            if receiver is not None:
                self._console = receiver.close()
        if proc.returncode != 0:
            raise InvalidArgument(f"cannot create the workload's container: {self._error()}")
        with open(pidfile) as f:
            self.pid = int(f.read().strip())
        if receiver is not None:
            if self._console is None:
                raise FailedPrecondition("runc did not hand over the workload's terminal")
            self._attach()

    def _attach(self) -> None:
        """Connect this process's stdin/stdout to the workload's terminal (raw mode)."""
        assert self._console is not None
        if os.isatty(0):
            self._saved_tty = termios.tcgetattr(0)
            tty.setraw(0)
        master = self._console
        out = threading.Thread(target=_pump, args=(master, sys.stdout.fileno()), daemon=True)
        inp = threading.Thread(target=_pump, args=(0, master), daemon=True)
        out.start()
        inp.start()
        self._pumps = [out]

    def start(self) -> None:
        proc = subprocess.run(
            self._cmd("start", self.id), capture_output=True, text=True, timeout=60
        )
        if proc.returncode != 0:
            # an entrypoint that can't be executed fails here ("exec: ...: not found")
            raise InvalidArgument(f"cannot start the workload: {self._error(proc.stderr)}")

    def wait(self, timeout: float | None, interrupted: Callable[[], bool] = lambda: False) -> bool:
        """Wait until the workload exits (True) or ``timeout`` seconds pass (False)."""
        assert self.pid is not None
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._reap():
                return True
            if interrupted() or (deadline is not None and time.monotonic() >= deadline):
                return False
            time.sleep(0.05)

    def _reap(self) -> bool:
        assert self.pid is not None
        if self.status is not None:
            return True
        try:
            pid, st = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            # not our child (no subreaper effect): ask runc
            if self._runc_status() in ("stopped", None):
                self.status = -1
                return True
            return False
        if pid == 0:
            return False
        self.status = os.waitstatus_to_exitcode(st)
        return True

    def _runc_status(self) -> str | None:
        proc = subprocess.run(self._cmd("state", self.id), capture_output=True, text=True)
        if proc.returncode != 0:
            return None
        return json.loads(proc.stdout).get("status")

    def kill(self, sig: int) -> None:
        subprocess.run(self._cmd("kill", self.id, str(int(sig))), capture_output=True, timeout=30)

    def stop(self, grace: float = STOP_GRACE) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds; waits for the exit."""
        if self.pid is None or self._reap():
            return
        self.kill(signal.SIGTERM)
        if self.wait(grace):
            return
        log.warning("workload ignored SIGTERM for %.0fs: killing it", grace)
        self.kill(signal.SIGKILL)
        self.wait(30)

    def delete(self) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            subprocess.run(self._cmd("delete", "--force", self.id), capture_output=True, timeout=60)
        for t in self._pumps:
            t.join(5)  # the rest of the terminal's output
        if self._saved_tty is not None:
            termios.tcsetattr(0, termios.TCSADRAIN, self._saved_tty)
            self._saved_tty = None
        if self._console is not None:
            with contextlib.suppress(OSError):
                os.close(self._console)
            self._console = None
        if self.pid is not None and self.status is None:
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(self.pid, os.WNOHANG)


class _ConsoleReceiver:
    """The ``--console-socket`` runc sends a terminal workload's pty master to."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._srv.bind(path)
        self._srv.listen(1)
        self._srv.settimeout(120)
        self.fd: int | None = None
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            conn, _ = self._srv.accept()
            with conn:
                _, fds, _, _ = socket.recv_fds(conn, 4096, 1)
                if fds:
                    self.fd = fds[0]

    def close(self) -> int | None:
        """The received master fd (None if runc sent none); stops listening."""
        self._srv.close()
        self._thread.join(5)
        return self.fd


def _pump(src: int, dst: int) -> None:
    """Copy ``src`` to ``dst`` until either end closes (a pty master says EIO)."""
    with contextlib.suppress(OSError):
        while True:
            data = os.read(src, 65536)
            if not data:
                return
            while data:
                data = data[os.write(dst, data) :]


def _last_line(text: str) -> str:
    lines = [ln for ln in (text or "").strip().splitlines() if ln.strip()]
    if not lines:
        return "(no message)"
    line = lines[-1]
    # runc logs logfmt: keep the msg= part
    if "msg=" in line:
        line = line.split("msg=", 1)[1].strip().strip('"')
    return line.replace('\\"', '"')
