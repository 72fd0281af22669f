"""The OCI runtime spec (``config.json``) a container runtime would build from an image.

What containerd's ``oci.WithDefaultSpec`` + ``WithImageConfig`` + ``WithProcessArgs`` give
for a plain ``ctr run`` (and so what Go's ``ctr-remote i optimize`` runs): the image's
user, environment (PATH defaulted), working dir and entrypoint + cmd; ``--entrypoint``
replaces the entrypoint and ``--args`` the cmd (each as a JSON array, as Go takes them).
The container gets its own pid, mount, ipc, uts and network namespaces (``net_host``
shares the host's network and its ``/etc/hosts`` and ``/etc/resolv.conf``), ``/proc``,
a tmpfs ``/dev`` and a read-only ``/sys``. No user namespace: the workload runs as the
image's user on the host kernel, as it will in production.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from stargz.errors import InvalidArgument, NotFound

DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: containerd's default capabilities (``oci.defaultUnixCaps``).
DEFAULT_CAPS = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
]
MASKED = [
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/sys/firmware",
    "/proc/scsi",
]
READONLY = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]


@dataclass
class WorkloadOptions:
    """What the command line overrides of the image config (None: keep the image's)."""

    entrypoint: list[str] | None = None
    args: list[str] | None = None
    env: list[str] = field(default_factory=list)
    cwd: str | None = None
    user: str | None = None
    terminal: bool = False
    net_host: bool = False


def process_args(image_config: dict[str, Any], opts: WorkloadOptions) -> list[str]:
    """Entrypoint + cmd, each overridden by its flag (Go ``withEntrypointArgs``)."""
    cfg = image_config.get("config") or {}
    entrypoint = opts.entrypoint if opts.entrypoint else list(cfg.get("Entrypoint") or [])
    args = opts.args if opts.args else list(cfg.get("Cmd") or [])
    argv = [*entrypoint, *args]
    if not argv:
        raise InvalidArgument(
            "the image has no entrypoint or cmd: give the workload with --entrypoint/--args"
        )
    return argv


def merge_env(base: Sequence[str], extra: Sequence[str]) -> list[str]:
    """``extra`` replaces variables of ``base`` by name, or is appended (containerd's
    ``replaceOrAppendEnvValues``)."""
    out = list(base)
    index = {e.partition("=")[0]: i for i, e in enumerate(out)}
    for e in extra:
        name = e.partition("=")[0]
        if name in index:
            out[index[name]] = e
        else:
            index[name] = len(out)
            out.append(e)
    return out


def resolve_user(rootfs: str, user: str) -> tuple[int, int]:
    """``user[:group]`` (names or numbers) to (uid, gid), with the image's own
    ``/etc/passwd`` and ``/etc/group`` (containerd ``WithUser``)."""
    if not user:
        return 0, 0
    name, _, group = user.partition(":")
    passwd = _table(rootfs, "etc/passwd")
    if name.isdigit():
        uid = int(name)
        gid = next((int(r[3]) for r in passwd if len(r) > 3 and r[2] == name), 0)
    else:
        row = next((r for r in passwd if r and r[0] == name and len(r) > 3), None)
        if row is None:
            raise NotFound(f"user {name!r} is not in the image's /etc/passwd")
        uid, gid = int(row[2]), int(row[3])
    if group:
        if group.isdigit():
            gid = int(group)
        else:
            grow = next((r for r in _table(rootfs, "etc/group") if r and r[0] == group), None)
            if grow is None or len(grow) < 3:
                raise NotFound(f"group {group!r} is not in the image's /etc/group")
            gid = int(grow[2])
    return uid, gid


def _table(rootfs: str, rel: str) -> list[list[str]]:
    try:
        with open(os.path.join(rootfs, rel), encoding="utf-8", errors="replace") as f:
            return [line.rstrip("\n").split(":") for line in f if line.strip()]
    except (FileNotFoundError, NotADirectoryError):
        return []


def build_spec(
    image_config: dict[str, Any], opts: WorkloadOptions, rootfs: str, uid: int, gid: int
) -> dict[str, Any]:
    """The runtime spec of the workload, its root at ``rootfs`` (writable)."""
    cfg = image_config.get("config") or {}
    env = merge_env([DEFAULT_PATH], list(cfg.get("Env") or []))
    env = merge_env(env, opts.env)
    if opts.terminal:
        env = merge_env(env, ["TERM=xterm"])
    cwd = opts.cwd or cfg.get("WorkingDir") or "/"
    if not cwd.startswith("/"):
        raise InvalidArgument(f"working dir {cwd!r} is not absolute")
    namespaces = ["pid", "ipc", "uts", "mount"] + ([] if opts.net_host else ["network"])
    mounts: list[dict[str, Any]] = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {
            "destination": "/dev",
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
        },
        {
            "destination": "/dev/pts",
            "type": "devpts",
            "source": "devpts",
            "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"],
        },
        {
            "destination": "/dev/shm",
            "type": "tmpfs",
            "source": "shm",
            "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        },
        {
            "destination": "/dev/mqueue",
            "type": "mqueue",
            "source": "mqueue",
            "options": ["nosuid", "noexec", "nodev"],
        },
        {
            "destination": "/sys",
            "type": "sysfs",
            "source": "sysfs",
            "options": ["nosuid", "noexec", "nodev", "ro"],
        },
    ]
    if opts.net_host:
        for f in ("/etc/hosts", "/etc/resolv.conf"):
            if os.path.exists(f):
                mounts.append(
                    {"destination": f, "type": "bind", "source": f, "options": ["rbind", "ro"]}
                )
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": opts.terminal,
            "user": {"uid": uid, "gid": gid},
            "args": process_args(image_config, opts),
            "env": env,
            "cwd": cwd,
            "capabilities": {k: list(DEFAULT_CAPS) for k in ("bounding", "effective", "permitted")},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": True,
        },
        "root": {"path": rootfs, "readonly": False},
        "hostname": "stargz-optimize",
        "mounts": mounts,
        "linux": {
            "resources": {"devices": [{"allow": False, "access": "rwm"}]},
            "namespaces": [{"type": t} for t in namespaces],
            "maskedPaths": list(MASKED),
            "readonlyPaths": list(READONLY),
        },
    }
