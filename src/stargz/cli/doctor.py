"""``stargz doctor``: is this node set up to pull images lazily? Each problem with its fix.

    stargz doctor [--containerd-config FILE] [--config FILE] [--address SOCK] [--root DIR]
                  [--min-free BYTES] [--timeout SEC] [--json]

It reads containerd's config (versions 1 and 2 of containerd 1.x, 3 of 2.x, with its
``imports``) and the daemon's, asks both daemons over their sockets what they actually
run with, and looks at the kernel and the daemon's directories. Every check ends as
``ok``, ``info`` (worth knowing, nothing to fix), ``warn`` (works, but may bite) or
``fail`` (lazy pulling does not work, or is not safe), with a message naming the problem
and the fix. Exit status: 1 when a check failed, else 0 (warnings included); ``--json``
prints the same as one JSON document. It changes nothing (the overlayfs probe mounts in a
temporary directory and unmounts), and needs root as the daemons' sockets do.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import shutil
import stat
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from stargz import config as daemon_config
from stargz.cli import containerd_api
from stargz.cli import containerd_config as ccfg
from stargz.cli.status import DEFAULT_ADDRESS, fetch_status
from stargz.errors import StargzError

#: The daemon's ``--root`` default (`stargz.cli.daemon.DEFAULT_ROOT`; a test keeps them
#: equal; not imported from there, which would load the registry client).
DEFAULT_ROOT = "/var/lib/containerd-stargz-grpc"
#: The name containerd knows the snapshotter by (``ctr-remote``'s default too).
SNAPSHOTTER = "stargz"
DEFAULT_MIN_FREE = 1 << 30
DEFAULT_TIMEOUT = 5.0
#: The first kernel with FUSE passthrough (``CONFIG_FUSE_PASSTHROUGH``).
PASSTHROUGH_KERNEL = (6, 9)

OK, INFO, WARN, FAIL = "ok", "info", "warn", "fail"


@dataclass(frozen=True)
class Check:
    """One finding: ``name`` is stable (scripts key on it), ``fix`` is what to do ("" if
    nothing)."""

    name: str
    status: str
    message: str
    fix: str = ""


@dataclass(frozen=True)
class Options:
    containerd_config: str = ccfg.DEFAULT_PATH
    config: str = daemon_config.DEFAULT_CONFIG_PATH
    address: str = DEFAULT_ADDRESS
    #: None: the root the running daemon reports, else `DEFAULT_ROOT`.
    root: str | None = None
    min_free: int = DEFAULT_MIN_FREE
    timeout: float = DEFAULT_TIMEOUT


# --- the command ----------------------------------------------------------------------------


def _size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(i?B?)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 500M, 2G, 1048576)")
    return int(m.group(1)) << (10 * " KMGT".index((m.group(2) or " ").upper()))


def add_parser(sub: Any) -> None:
    s = sub.add_parser(
        "doctor", help="check this node's containerd, daemon, kernel and directories"
    )
    s.add_argument(
        "--containerd-config",
        default=ccfg.DEFAULT_PATH,
        metavar="FILE",
        help=f"containerd's config file (default {ccfg.DEFAULT_PATH})",
    )
    s.add_argument(
        "--config",
        default=daemon_config.DEFAULT_CONFIG_PATH,
        metavar="FILE",
        help=f"the daemon's config file (default {daemon_config.DEFAULT_CONFIG_PATH})",
    )
    s.add_argument(
        "--address",
        default=DEFAULT_ADDRESS,
        help=f"the daemon's socket (default {DEFAULT_ADDRESS})",
    )
    s.add_argument(
        "--root",
        default=None,
        help=f"the daemon's root (default: the running daemon's, else {DEFAULT_ROOT})",
    )
    s.add_argument(
        "--min-free",
        type=_size,
        default=DEFAULT_MIN_FREE,
        metavar="BYTES",
        help="warn when the cache's disk has less free space (default 1G)",
    )
    s.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds to wait for each answer"
    )
    s.add_argument("--json", action="store_true", help="one JSON document, for scripts")
    s.set_defaults(func=cmd_doctor)


def cmd_doctor(args: argparse.Namespace) -> int:
    opts = Options(
        containerd_config=args.containerd_config,
        config=args.config,
        address=os.path.abspath(args.address),
        root=args.root,
        min_free=args.min_free,
        timeout=args.timeout,
    )
    checks = run_checks(opts)
    failed = any(c.status == FAIL for c in checks)
    if args.json:
        json.dump(report_dict(checks), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(render_text(checks))
    return 1 if failed else 0


def report_dict(checks: list[Check]) -> dict[str, Any]:
    """The ``--json`` document (its keys are the interface scripts rely on)."""
    counts = {s: sum(c.status == s for c in checks) for s in (OK, INFO, WARN, FAIL)}
    return {"ok": counts[FAIL] == 0, "counts": counts, "checks": [asdict(c) for c in checks]}


def render_text(checks: list[Check]) -> str:
    """One line per check; a failed or warned check's fix below it, indented."""
    width = max(len(c.name) for c in checks)
    lines = []
    for c in checks:
        tag = c.status.upper() if c.status in (WARN, FAIL) else c.status
        lines.append(f"{tag:5} {c.name:{width}}  {c.message}")
        if c.fix:
            pad = " " * (6 + width + 2)
            first, *rest = c.fix.splitlines()
            lines.append(f"{pad}fix: {first}")
            lines.extend(f"{pad}     {line}" for line in rest)
    fails = sum(c.status == FAIL for c in checks)
    warns = sum(c.status == WARN for c in checks)
    if fails or warns:
        lines.append(f"{fails} problem(s), {warns} warning(s)")
    else:
        lines.append("no problems found")
    return "\n".join(lines) + "\n"


# --- all of them, in order ------------------------------------------------------------------


def run_checks(opts: Options) -> list[Check]:
    """Every check; later ones use what earlier ones found (the files, the daemon's root)."""
    out: list[Check] = []
    cc, check = containerd_config_check(opts.containerd_config)
    out.append(check)
    if cc is not None:
        out.append(proxy_plugin_check(cc, opts.address))
        out.extend(cri_checks(cc))
    out.extend(containerd_checks(cc, opts))
    cfg, check = daemon_config_check(opts.config)
    out.append(check)
    reported_root, check = daemon_socket_check(opts)
    out.append(check)
    root = os.path.abspath(opts.root or reported_root or DEFAULT_ROOT)
    cfg = cfg or daemon_config.Config()
    out.append(fuse_device_check())
    out.append(overlayfs_check())
    out.append(passthrough_check(cfg, root))
    out.append(cache_space_check(cfg, root, opts.min_free))
    out.append(root_mode_check(root))
    return out


# --- containerd's config file ---------------------------------------------------------------


def _restart_containerd(path: str) -> str:
    return f"then restart containerd (systemctl restart containerd) so it reads {path}"


def containerd_config_check(path: str) -> tuple[ccfg.ContainerdConfig | None, Check]:
    name = "containerd-config"
    try:
        cc = ccfg.load(path)
    except ccfg.ContainerdConfigError as e:
        if not os.path.exists(path):
            fix = (
                f"write {path} with the proxy plugin and CRI settings (see `containerd config "
                "default` and this project's packaging/containerd-config.toml), or pass "
                "--containerd-config FILE"
            )
        else:
            fix = f"correct {path} (containerd would not start with it either)"
        return None, Check(name, FAIL, str(e), fix)
    imports = f", with {len(cc.files) - 1} imported file(s)" if len(cc.files) > 1 else ""
    msg = f"{cc.path}: version {cc.version}{imports}; containerd's socket {cc.grpc_address}"
    return cc, Check(name, OK, msg)


def _proxy_snippet(address: str) -> str:
    return f'[proxy_plugins.{SNAPSHOTTER}]\n  type = "snapshot"\n  address = "{address}"'


def proxy_plugin_check(cc: ccfg.ContainerdConfig, address: str) -> Check:
    name = "proxy-plugin"
    table = f"[proxy_plugins.{SNAPSHOTTER}]"
    plugin = cc.proxy_plugins.get(SNAPSHOTTER)
    add = f"add to {cc.path}:\n{_proxy_snippet(address)}\n{_restart_containerd(cc.path)}"
    if plugin is None:
        others = [
            n
            for n, p in cc.proxy_plugins.items()
            if os.path.normpath(str(p.get("address", ""))) == address
        ]
        also = (
            f" ([proxy_plugins.{others[0]}] points at the daemon's socket, under another name)"
            if others
            else ""
        )
        msg = f"{cc.path} has no {table}: containerd does not know the stargz snapshotter{also}"
        return Check(name, FAIL, msg, add)
    if plugin.get("type") != "snapshot":
        msg = f'{table} has type = {json.dumps(plugin.get("type"))}, not "snapshot"'
        return Check(
            name, FAIL, msg, f'set type = "snapshot" in {table}; ' + _restart_containerd(cc.path)
        )
    got = plugin.get("address")
    if not isinstance(got, str) or os.path.normpath(got) != address:
        msg = f"{table} has address = {json.dumps(got)}, but the daemon's socket is {address}"
        fix = (
            f'set address = "{address}" in {table} (or start the daemon with --address '
            f"{got}); " + _restart_containerd(cc.path)
        )
        return Check(name, FAIL, msg, fix)
    return Check(name, OK, f'{table}: type "snapshot", address {address}')


def cri_checks(cc: ccfg.ContainerdConfig) -> list[Check]:
    """``snapshotter`` and ``disable_snapshot_annotations`` where CRI reads them."""
    if not cc.cri_enabled:
        msg = (
            f"the CRI plugin is disabled in {cc.path}: Kubernetes cannot use this containerd "
            "(ctr-remote and nerdctl can)"
        )
        return [Check("cri-snapshotter", INFO, msg), Check("cri-annotations", INFO, msg)]
    out = []
    table = cc.cri_table
    if cc.cri_snapshotter == SNAPSHOTTER:
        out.append(Check("cri-snapshotter", OK, f'{table} snapshotter = "{SNAPSHOTTER}"'))
    else:
        how = (
            f"snapshotter = {json.dumps(cc.cri_snapshotter)}"
            if cc.cri_snapshotter is not None
            else f'snapshotter is not set (containerd uses "{ccfg.CRI_DEFAULT_SNAPSHOTTER}")'
        )
        msg = f"{table} {how}: Kubernetes pods pull and run without the stargz snapshotter"
        fix = (
            f'set in {cc.path}:\n{table}\n  snapshotter = "{SNAPSHOTTER}"\n'
            + _restart_containerd(cc.path)
        )
        out.append(Check("cri-snapshotter", FAIL, msg, fix))
    value = cc.cri_disable_snapshot_annotations
    if value is False:
        out.append(Check("cri-annotations", OK, f"{table} disable_snapshot_annotations = false"))
    else:
        how = (
            f"disable_snapshot_annotations = {json.dumps(value)}"
            if value is not None
            else "disable_snapshot_annotations is not set (containerd 1.x defaults to true)"
        )
        msg = (
            f"{table} {how}: CRI does not pass the image's layer annotations to the "
            "snapshotter, so every image is pulled in full"
        )
        fix = f"set in {cc.path}:\n{table}\n  disable_snapshot_annotations = false\n" + (
            _restart_containerd(cc.path)
        )
        out.append(Check("cri-annotations", FAIL, msg, fix))
    return out


# --- the running containerd -----------------------------------------------------------------


def _socket_problem(path: str) -> str | None:
    """Why nothing answers on unix socket ``path`` (None: something accepts connections)."""
    import socket

    try:
        st = os.stat(path)
    except FileNotFoundError:
        return f"{path} does not exist"
    except PermissionError:
        return f"{path}: permission denied (run as root)"
    if not stat.S_ISSOCK(st.st_mode):
        return f"{path} is not a socket"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        try:
            s.connect(path)
        except ConnectionRefusedError:
            return f"nothing listens on {path} (a stale socket: the process is gone)"
        except PermissionError:
            return f"{path}: permission denied (run as root)"
        except OSError as e:
            return f"{path}: {e.strerror or e}"
    return None


def containerd_checks(cc: ccfg.ContainerdConfig | None, opts: Options) -> list[Check]:
    """containerd answers; it loaded the stargz plugin; its CRI runs with what the file says."""
    address = cc.grpc_address if cc is not None else ccfg.DEFAULT_GRPC_ADDRESS
    problem = _socket_problem(address)
    if problem is None:
        try:
            version = containerd_api.version(address, opts.timeout)
        except StargzError as e:
            problem = f"{address} does not answer as containerd ({e})"
    if problem is not None:
        fix = (
            "start containerd (systemctl start containerd; journalctl -u containerd says why "
            "it stopped), or correct [grpc] address in its config"
        )
        return [Check("containerd-socket", FAIL, f"containerd is not running: {problem}", fix)]
    out = [Check("containerd-socket", OK, f"containerd {version} answers on {address}")]
    out.append(_running_plugin_check(address, cc, opts))
    if cc is not None and cc.cri_enabled:
        out.append(_running_cri_check(address, cc, opts))
    return out


def _running_plugin_check(address: str, cc: ccfg.ContainerdConfig | None, opts: Options) -> Check:
    name = "containerd-plugin"
    restart = "restart containerd (systemctl restart containerd) so it reads its config again"
    try:
        found = [
            p
            for p in containerd_api.plugins(address, opts.timeout, (f"id=={SNAPSHOTTER}",))
            if p.type == "io.containerd.snapshotter.v1" and p.id == SNAPSHOTTER
        ]
    except StargzError as e:
        return Check(name, FAIL, f"containerd did not list its plugins: {e}", restart)
    if not found:
        why = (
            f"its config file {cc.path} has no [proxy_plugins.{SNAPSHOTTER}] either"
            if cc is not None and SNAPSHOTTER not in cc.proxy_plugins
            else "it started before the config had it"
        )
        msg = f"the running containerd has no snapshotter named {SNAPSHOTTER} ({why})"
        return Check(name, FAIL, msg, f"add the proxy plugin (see proxy-plugin), then {restart}")
    plugin = found[0]
    if plugin.init_error:
        msg = f"containerd could not load the {SNAPSHOTTER} snapshotter: {plugin.init_error}"
        return Check(name, FAIL, msg, f"correct [proxy_plugins.{SNAPSHOTTER}], then {restart}")
    got = plugin.exports.get("address", "")
    if got and os.path.normpath(got) != opts.address:
        msg = f"the running containerd sends {SNAPSHOTTER} calls to {got}, not to {opts.address}"
        return Check(
            name, FAIL, msg, f"correct [proxy_plugins.{SNAPSHOTTER}] address, then {restart}"
        )
    return Check(
        name, OK, f"containerd loaded the {SNAPSHOTTER} snapshotter ({got or 'no address'})"
    )


def _running_cri_check(address: str, cc: ccfg.ContainerdConfig, opts: Options) -> Check:
    name = "containerd-cri"
    try:
        running = containerd_api.cri_config(address, opts.timeout).get("containerd", {})
    except StargzError as e:
        why = _plugin_error(address, "cri", opts.timeout) or str(e)
        msg = f"{cc.path} enables CRI, but containerd's CRI plugin did not start: {why}"
        fix = "journalctl -u containerd says why; correct its config, then restart containerd"
        if f'snapshotter "{SNAPSHOTTER}"' in why:
            fix = "add the proxy plugin (see proxy-plugin), then restart containerd"
        return Check(name, FAIL, msg, fix)
    snap = running.get("snapshotter")
    no_ann = running.get("disableSnapshotAnnotations")
    if (snap, no_ann) != (cc.snapshotter, cc.disable_snapshot_annotations):
        msg = (
            f'containerd\'s CRI runs with snapshotter = "{snap}", disable_snapshot_annotations = '
            f"{json.dumps(no_ann)}, not what {cc.path} says (it was changed since containerd "
            "started?)"
        )
        return Check(name, FAIL, msg, "restart containerd (systemctl restart containerd)")
    if snap != SNAPSHOTTER or no_ann is not False:
        msg = (
            f'containerd\'s CRI runs with snapshotter = "{snap}", disable_snapshot_annotations = '
            f"{json.dumps(no_ann)}, as its config says (see cri-snapshotter, cri-annotations)"
        )
        return Check(name, FAIL, msg, "correct the config as shown above, then restart containerd")
    return Check(
        name, OK, f"containerd's CRI runs with the {SNAPSHOTTER} snapshotter and annotations"
    )


def _plugin_error(address: str, plugin_id: str, timeout: float) -> str:
    """The init error containerd recorded for plugin ``plugin_id`` ("" if none or unknown)."""
    try:
        found = containerd_api.plugins(address, timeout, (f"id=={plugin_id}",))
    except StargzError:
        return ""
    return next((p.init_error for p in found if p.id == plugin_id and p.init_error), "")


# --- the daemon -----------------------------------------------------------------------------


def daemon_config_check(path: str) -> tuple[daemon_config.Config | None, Check]:
    name = "daemon-config"
    try:
        cfg = daemon_config.load(path)
    except daemon_config.ConfigError as e:
        if e.key:
            fix = (
                f'correct or remove key "{e.key}" in {path} (docs/snapshotter.md lists every '
                "key); the daemon refuses to start with this file (exit 2)"
            )
        else:
            fix = f"correct {path}, or pass --config FILE (a missing default file means defaults)"
        return None, Check(name, FAIL, str(e), fix)
    if not os.path.exists(path):
        return cfg, Check(name, OK, f"{path} does not exist: the daemon runs with defaults")
    return cfg, Check(name, OK, f"{path} is valid")


def daemon_socket_check(opts: Options) -> tuple[str | None, Check]:
    """(the root the daemon reports, the check)."""
    name = "daemon-socket"
    start = (
        "start the daemon (systemctl enable --now containerd-stargz-grpc; journalctl -u "
        "containerd-stargz-grpc says why it stopped), or pass its --address"
    )
    problem = _socket_problem(opts.address)
    if problem is not None:
        return None, Check(name, FAIL, f"the stargz daemon is not running: {problem}", start)
    try:
        n = _list_snapshots(opts.address, opts.timeout)
        status = fetch_status(opts.address, opts.timeout)
    except StargzError as e:
        return None, Check(name, FAIL, f"the stargz daemon does not answer: {e}", start)
    d = status.daemon
    msg = (
        f"containerd-stargz-grpc {d.version} (pid {d.pid}) answers on {opts.address}: "
        f"{n} snapshot(s), {len(status.layers)} layer(s) mounted lazily"
    )
    if not d.lazy:
        msg += "; but lazy pulling is OFF: containerd unpacks every layer"
        fix = (
            "make /dev/fuse usable (see fuse-device) and restart the daemon without --no-lazy "
            "(systemctl restart containerd-stargz-grpc)"
        )
        return d.root, Check(name, FAIL, msg, fix)
    return d.root, Check(name, OK, msg + ", lazy pulling on")


def _list_snapshots(address: str, timeout: float) -> int:
    import grpc

    from stargz.errors import Unavailable
    from stargz.service.proto.containerd.services.snapshots.v1 import snapshots_pb2 as pb
    from stargz.service.proto.containerd.services.snapshots.v1 import snapshots_pb2_grpc

    with grpc.insecure_channel(f"unix:{address}") as channel:
        stub = snapshots_pb2_grpc.SnapshotsStub(channel)
        try:
            return sum(len(r.info) for r in stub.List(pb.ListSnapshotsRequest(), timeout=timeout))
        except grpc.RpcError as e:
            code = e.code()  # type: ignore[attr-defined]
            details = " ".join(str(e.details() or "").split())  # type: ignore[attr-defined]
            raise Unavailable(f"Snapshots/List: {code.name}: {details}") from None


# --- the kernel -----------------------------------------------------------------------------


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
            return os.strerror(ctypes.get_errno())
        libc.umount2(dirs["merged"].encode(), 0)
        return None
    finally:
        shutil.rmtree(base, ignore_errors=True)


def overlayfs_check(probe: Callable[[], str | None] = _test_overlay_mount) -> Check:
    name = "overlayfs"
    if "overlay" in _filesystems():
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
