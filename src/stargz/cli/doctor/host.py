"""The node's side: the kernel (FUSE, overlayfs, FUSE passthrough) and the daemon's
directories (free space for the cache, the root's mode)."""

from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable

from stargz import config as daemon_config

from .check import FAIL, INFO, OK, PASSTHROUGH_KERNEL, WARN, Check


def fuse_device_check(path: str = "/dev/fuse") -> Check:
    name = "fuse-device"
    fix = "modprobe fuse (in a container: run it with --device /dev/fuse and CAP_SYS_ADMIN)"
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return Check(name, FAIL, f"{path} does not exist: no lazy pulling", fix)
    if not stat.S_ISCHR(st.st_mode):
        return Check(name, FAIL, f"{path} is not a character device", fix)
    try:
        os.close(os.open(path, os.O_RDWR | os.O_CLOEXEC))
    except OSError as e:
        return Check(name, FAIL, f"{path} cannot be opened: {e.strerror}", "run as root; " + fix)
    return Check(name, OK, f"{path} opens read-write")


def _filesystems() -> set[str]:
    try:
        with open("/proc/filesystems") as f:
            return {line.split()[-1] for line in f if line.strip()}
    except OSError:
        return set()


def _test_overlay_mount() -> str | None:
    """Mount a one-directory overlay in a temp dir and unmount it; None if that worked."""
    libc = ctypes.CDLL(None, use_errno=True)
    base = tempfile.mkdtemp(prefix="stargz-doctor-")
    try:
        dirs = {d: os.path.join(base, d) for d in ("lower", "upper", "work", "merged")}
        for d in dirs.values():
            os.mkdir(d)
        data = f"lowerdir={dirs['lower']},upperdir={dirs['upper']},workdir={dirs['work']}"
        if libc.mount(b"overlay", dirs["merged"].encode(), b"overlay", 0, data.encode()) != 0:
            err = ctypes.get_errno()
            return os.strerror(err) + (" (run as root to test)" if err == errno.EPERM else "")
        libc.umount2(dirs["merged"].encode(), 0)
        return None
    finally:
        shutil.rmtree(base, ignore_errors=True)


def overlayfs_check(
    probe: Callable[[], str | None] = _test_overlay_mount,
    filesystems: Callable[[], set[str]] = _filesystems,
) -> Check:
    name = "overlayfs"
    if "overlay" in filesystems():
        return Check(name, OK, "overlay is in /proc/filesystems")
    error = probe()
    if error is None:
        return Check(name, OK, "a test overlay mount works (the module loads on demand)")
    msg = f"overlayfs is not available (a test mount failed: {error}): no container can start"
    return Check(name, FAIL, msg, "modprobe overlay (and add it to /etc/modules-load.d/)")


def _kernel_version(release: str) -> tuple[int, int] | None:
    m = re.match(r"(\d+)\.(\d+)", release)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _kernel_config(release: str, key: str) -> tuple[str | None, str | None]:
    """(value of ``key`` in the kernel's build config, where it was read), or Nones."""
    import gzip

    for path, opener in (
        (f"/boot/config-{release}", open),
        ("/proc/config.gz", gzip.open),
    ):
        try:
            with opener(path, "rt") as f:  # type: ignore[operator]
                for line in f:
                    if line.startswith(f"{key}="):
                        return line.strip().split("=", 1)[1], path
                return "n", path
        except OSError:
            continue
    return None, None


def passthrough_check(cfg: daemon_config.Config, root: str, release: str | None = None) -> Check:
    """Kernel FUSE passthrough, as info: without it, cached reads go through the daemon.

    Judged from the kernel's version and build config: the definite probe registers a
    backing file on a live FUSE connection, which the daemon does at start (its log says
    "FUSE passthrough on" or why not)."""
    name = "fuse-passthrough"
    release = release or os.uname().release
    mode = cfg.fuse.passthrough
    if mode is False:
        return Check(name, INFO, "[fuse] passthrough = false: every read goes through the daemon")
    version = _kernel_version(release)
    value, where = _kernel_config(release, "CONFIG_FUSE_PASSTHROUGH")
    if version is None or version < PASSTHROUGH_KERNEL:
        msg = (
            f"kernel {release} is older than 6.9: no FUSE passthrough (judged by the kernel "
            "version); reads of cached files go through the daemon (correct, slower)"
        )
        return Check(name, INFO, msg, "a kernel >= 6.9 with CONFIG_FUSE_PASSTHROUGH=y")
    if value is not None and value != "y":
        msg = f"kernel {release} is built without CONFIG_FUSE_PASSTHROUGH ({where})"
        return Check(name, INFO, msg, "a kernel built with CONFIG_FUSE_PASSTHROUGH=y")
    from stargz.fs.passthrough import init_refusal

    refused = init_refusal(mode, _existing(os.path.join(root, "cache")))
    if refused is not None:
        return Check(name, INFO, f"FUSE passthrough stays off: {refused}")
    built = f"CONFIG_FUSE_PASSTHROUGH=y in {where}" if where else "build config not readable"
    msg = (
        f"kernel {release} >= 6.9 ({built}): judged by the kernel version, FUSE passthrough "
        "is available; the daemon confirms at start (log line 'FUSE passthrough on')"
    )
    return Check(name, INFO, msg)


# --- the daemon's directories ---------------------------------------------------------------


def _existing(path: str) -> str:
    """``path``, or its nearest existing parent."""
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _usage(path: str) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total


def cache_space_check(cfg: daemon_config.Config, root: str, min_free: int) -> Check:
    name = "cache-space"
    cache = os.path.join(root, "cache")
    where = _existing(cache)
    st = os.statvfs(where)
    free = st.f_bavail * st.f_frsize
    bound = cfg.directory_cache.max_size_bytes
    used = _usage(cache) if os.path.isdir(cache) else 0
    msg = f"{_human(free)} free on the disk of {cache}; the cache holds {_human(used)}"
    msg += f" of at most {_human(bound)}" if bound else " (no bound)"
    if free < min_free:
        fix = (
            f"free space on that disk, or lower [directory_cache] max_size_bytes in the daemon's "
            f"config (the daemon evicts down to it); warned below {_human(min_free)} (--min-free)"
        )
        return Check(name, WARN, f"{msg}: less than {_human(min_free)} free", fix)
    if bound and free + used < bound:
        fix = (
            f"set [directory_cache] max_size_bytes below {free + used} (what the cache can "
            "get), or give the root a bigger disk"
        )
        return Check(name, WARN, f"{msg}: the disk fills before the cache reaches its bound", fix)
    return Check(name, OK, msg)


def root_mode_check(root: str) -> Check:
    """The root is 0700: the FUSE mount below it is ``allow_other`` (for containers)."""
    name = "root-mode"
    try:
        st = os.stat(root)
    except FileNotFoundError:
        return Check(name, INFO, f"{root} does not exist yet (the daemon makes it 0700)")
    except OSError as e:
        return Check(name, FAIL, f"{root}: {e.strerror}", "run as root")
    mode = stat.S_IMODE(st.st_mode)
    if mode != 0o700:
        msg = (
            f"{root} has mode {mode:04o}, not 0700: host users can read every lazily "
            "mounted image through it"
        )
        fix = f"chmod 0700 {root} (the daemon also narrows it at its next start)"
        return Check(name, FAIL, msg, fix)
    return Check(name, OK, f"{root} is 0700")
