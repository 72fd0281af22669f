"""``containerd-stargz-grpc``: the snapshotter daemon containerd talks to as a proxy plugin.

    containerd-stargz-grpc [--address SOCK] [--root DIR] [--config FILE] [--log-level L]

Exit codes: 0 after a clean shutdown (SIGTERM or SIGINT), 1 when the daemon cannot start
or fails, 2 for a bad command line or configuration (one line on stderr naming the key).

Logs are JSON lines on stderr (``--log-format text`` gives ``key=value`` lines), with the
fields of the Go daemon where it has them: ``time``, ``level``, ``msg``, plus structured
fields such as ``key``, ``parent`` and ``remote-snapshot-prepared``.

Under systemd (``Type=notify``), READY=1 is sent once the socket serves.

With ``[cri_keychain] enable_keychain``, the CRI ``ImageService`` kubelet pulls through is
served too (on this socket, or on ``listen_path``), forwarded to containerd's, and the
registry credentials it learns are kept under the root (`stargz.service.cri_proxy`,
`stargz.service.keychain`).

With ``metrics_address`` set (and not ``no_prometheus``), Prometheus metrics are served at
``http://<metrics_address>/metrics`` (`stargz.service.metrics`); an address it cannot
listen on stops the start (exit 1, an error naming the key).

Signals: SIGTERM and SIGINT both stop accepting calls, let in-flight calls finish, and
exit 0. SIGINT additionally unmounts remote snapshots and ends the FUSE connection (the Go
daemon's "cleanup" signal); SIGTERM leaves them for the next start. Snapshot data is never
deleted on shutdown.

Restarts: the ``/dev/fuse`` descriptor is kept outside the daemon (``--fuse-handover``:
systemd's fd store when the unit has one, else a holder process under the root), so after
SIGTERM, ``kill -9`` or a crash the next start takes the live connection over and running
containers only see their reads wait (`stargz.fuse.handover`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from typing import Any

from stargz import config
from stargz.cli.version import VersionAction
from stargz.errors import StargzError
from stargz.remote.redact import redact_text

DEFAULT_ADDRESS = "/run/containerd-stargz-grpc/containerd-stargz-grpc.sock"
DEFAULT_ROOT = "/var/lib/containerd-stargz-grpc"
#: How long in-flight calls may run after a stop signal.
SHUTDOWN_GRACE_SEC = 30.0

PROG = "containerd-stargz-grpc"
log = logging.getLogger("stargz.daemon")

_LEVELS = {
    "trace": logging.DEBUG,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "fatal": logging.CRITICAL,
    "panic": logging.CRITICAL,
}
_RESERVED = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}

#: Keys the daemon validates but whose feature is not built yet; setting them is warned about.
_NOT_YET = (
    ("debug_address", ""),
    ("ipfs", False),
    ("fuse_manager.enable", False),
    ("kubeconfig_keychain.enable_keychain", False),
)


def _level_name(record: logging.LogRecord) -> str:
    return "fatal" if record.levelno >= logging.CRITICAL else record.levelname.lower()


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    out = {k: v for k, v in record.__dict__.items() if k not in _RESERVED}
    if record.exc_info and record.exc_info[1] is not None:
        out.setdefault("error", record.exc_info[1])
    return out


def _value(v: Any) -> Any:
    if v is None or isinstance(v, bool | int | float | str):
        return v
    if isinstance(v, list | tuple):
        return [_value(x) for x in v]
    return str(v)


class JSONFormatter(logging.Formatter):
    """One JSON object per line: time (RFC 3339, UTC), level, msg, then the fields."""

    def format(self, record: logging.LogRecord) -> str:
        t = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        doc: dict[str, Any] = {
            "time": t.isoformat(timespec="microseconds").replace("+00:00", "Z"),
            "level": _level_name(record),
            "msg": record.getMessage(),
        }
        for k, v in _fields(record).items():
            doc[k if k not in doc else f"fields.{k}"] = _value(v)
        if record.exc_info and record.levelno >= logging.ERROR:
            doc["stack"] = self.formatException(record.exc_info)
        return redact_text(json.dumps(doc, ensure_ascii=False))


class TextFormatter(logging.Formatter):
    """logrus-style ``time=... level=... msg="..." key=value`` lines."""

    def format(self, record: logging.LogRecord) -> str:
        t = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        parts = [
            f"time={t.isoformat(timespec='microseconds').replace('+00:00', 'Z')}",
            f"level={_level_name(record)}",
            f"msg={json.dumps(record.getMessage(), ensure_ascii=False)}",
        ]
        for k, v in _fields(record).items():
            text = json.dumps(_value(v), ensure_ascii=False)
            parts.append(f"{k}={text}")
        return redact_text(" ".join(parts))


def setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(_LEVELS[level])
    # grpc's own debug lines (one per call) drown ours; keep them at info and up.
    logging.getLogger("grpc").setLevel(max(_LEVELS[level], logging.INFO))
    logging.captureWarnings(True)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description="eStargz snapshotter daemon for containerd (proxy plugin)"
    )
    p.add_argument("--address", default=DEFAULT_ADDRESS, help="unix socket to serve gRPC on")
    p.add_argument("--root", default=DEFAULT_ROOT, help="directory for snapshots and metadata")
    p.add_argument(
        "--config",
        default=config.DEFAULT_CONFIG_PATH,
        help="TOML config file (a missing default file means defaults)",
    )
    p.add_argument("--log-level", default="info", choices=sorted(_LEVELS), type=str.lower)
    p.add_argument("--log-format", default="json", choices=("json", "text"))
    p.add_argument(
        "--no-lazy",
        action="store_true",
        help="never mount layers from the registry; containerd unpacks every layer",
    )
    p.add_argument(
        "--fuse-handover",
        default="auto",
        choices=("auto", "holder", "systemd", "off"),
        help="who keeps the FUSE connection across a restart (auto: systemd's fd store "
        "when the unit has FileDescriptorStoreMax, a holder process outside systemd; "
        "off: the mount ends with the daemon)",
    )
    p.add_argument("--version", action=VersionAction)
    return p


def _warn_unbuilt(cfg: config.Config) -> None:
    for dotted, default in _NOT_YET:
        value: Any = cfg
        for part in dotted.split("."):
            value = getattr(value, part)
        if value != default:
            log.warning("config key is accepted but not implemented yet", extra={"key": dotted})


def sd_notify(state: str) -> None:
    """Tell systemd (``Type=notify`` units) about ``state``; a no-op outside systemd."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]  # abstract socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(state.encode(), path)
    except OSError as e:
        log.warning("cannot notify systemd", extra={"error": e})


async def _serve(args: argparse.Namespace, cfg: config.Config) -> int:
    loop = asyncio.get_running_loop()
    stopped: asyncio.Future[signal.Signals] = loop.create_future()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(
            sig, lambda s=sig: stopped.done() or stopped.set_result(signal.Signals(s))
        )
    # before the filesystem: restored layers of private images read with these credentials
    keychain = _open_keychain(args, cfg)
    fs = await _start_filesystem(args, cfg)
    sig: signal.Signals | None = None
    metrics = None
    cri = None
    try:
        # grpc is imported only when serving, and after the filesystem started: a restart
        # that took the FUSE connection over serves it ~0.4 s sooner
        from stargz.service.server import Server

        metrics = await _start_metrics(cfg, fs)
        cri = _cri_proxy(cfg, keychain)
        own_socket = cri is not None and bool(cfg.cri_keychain.listen_path)
        server = await Server.start(
            args.address,
            args.root,
            fs,
            allow_invalid_mounts_on_restart=cfg.snapshotter.allow_invalid_mounts_on_restart,
            extra_handlers=[cri.handler()] if cri is not None and not own_socket else (),
        )
        if metrics is not None:
            metrics.add_refusals(server.snapshotter.refusals)
        cri_server = None
        if cri is not None:
            cri_server = await _serve_cri(cfg, cri, args.address, own_socket)
        sd_notify("READY=1")
        if fs is not None and cfg.preload_registry_client:
            _preload_registry_client()
        sig = await stopped
        sd_notify("STOPPING=1")
        log.info("shutting down", extra={"signal": sig.name})
        if cri_server is not None:
            await cri_server.stop(SHUTDOWN_GRACE_SEC)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(cfg.cri_keychain.listen_path)
        await server.stop(SHUTDOWN_GRACE_SEC, unmount_remote=sig == signal.SIGINT)
    finally:
        if cri is not None:
            await cri.close()
        if keychain is not None:
            from stargz.remote.auth import remove_credential_source

            remove_credential_source(keychain)
        if metrics is not None:
            await metrics.stop()
        if fs is not None:
            # SIGINT unbinds the snapshot mounts and ends the FUSE connection (Go's
            # "graceful cleanup"); other signals leave both to the next start, which takes
            # the connection over from its keeper (or, without one, mounts anew).
            await fs.close(unmount=sig == signal.SIGINT)
    log.info("stopped")
    return 0


def _preload_registry_client() -> None:
    """Import the registry client in a thread of its own: the first lazy mount then finds
    it loaded. A mount that comes first waits on the same imports, as it would anyway."""
    from stargz.fs.registry import preload_client

    def run() -> None:
        t0 = time.monotonic()
        try:
            preload_client()
            import stargz.containerd.pull  # noqa: F401  (`stargz rpull` asks us: +14 ms)
        except Exception as e:  # the first mount imports again and reports it
            log.warning("could not preload the registry client", extra={"error": str(e)})
            return
        log.debug("registry client preloaded", extra={"seconds": round(time.monotonic() - t0, 3)})

    threading.Thread(target=run, name="preload-registry", daemon=True).start()


def _open_keychain(args: argparse.Namespace, cfg: config.Config):
    """The CRI keychain (credentials kubelet sent with its pulls, kept under the root), as
    a credential source of the registry client; None unless ``[cri_keychain]`` is on."""
    if not cfg.cri_keychain.enable_keychain:
        return None
    from stargz.private import private_dir
    from stargz.remote.auth import add_credential_source
    from stargz.service.keychain import CRIKeychain

    root = os.path.abspath(args.root)
    private_dir(root)
    keychain = CRIKeychain.open(root)
    add_credential_source(keychain)
    return keychain


def _cri_proxy(cfg: config.Config, keychain: Any):
    """The CRI image service that forwards to containerd's (None without the keychain)."""
    if keychain is None:
        return None
    from stargz.service.cri_proxy import CRIImageProxy

    return CRIImageProxy(cfg.cri_keychain.image_service_path, keychain)


async def _serve_cri(cfg: config.Config, cri: Any, address: str, own_socket: bool):
    """Serve the CRI image service on ``listen_path`` (its own server, returned), or say
    that it is served on the snapshotter's socket (None)."""
    listen = os.path.abspath(cfg.cri_keychain.listen_path if own_socket else address)
    server = None
    if own_socket:
        from stargz.service.server import serve_unix

        server = await serve_unix(listen, [cri.handler()])
    log.info(
        "serving the CRI image service",
        extra={"address": listen, "backend": cfg.cri_keychain.image_service_path},
    )
    return server


async def _start_metrics(cfg: config.Config, fs: Any):
    """The Prometheus endpoint at ``metrics_address``, or None (unset, or ``no_prometheus``)."""
    if not cfg.metrics_address:
        return None
    if cfg.no_prometheus:
        log.info(
            "no_prometheus is set: metrics_address is not served", extra={"key": "metrics_address"}
        )
        return None
    from stargz.service.metrics import MetricsServer  # prometheus-client only when serving

    return await MetricsServer.start(cfg.metrics_address, fs)


async def _start_filesystem(args: argparse.Namespace, cfg: config.Config):
    """The lazy FUSE filesystem, or None (every layer is then unpacked by containerd)."""
    if args.no_lazy:
        log.info("lazy pulling disabled by --no-lazy")
        return None
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        log.warning("lazy pulling disabled: /dev/fuse is not usable", extra={"path": "/dev/fuse"})
        return None
    from stargz.fs.filesystem import StargzFileSystem

    fs = StargzFileSystem.from_config(args.root, cfg, handover=_handover(args))
    await fs.start()
    return fs


def _handover(args: argparse.Namespace):
    """Who keeps the FUSE descriptor across a restart (`stargz.fuse.handover`), or None."""
    from stargz.fuse import handover

    root = os.path.abspath(args.root)
    if args.fuse_handover == "off":
        return None
    if args.fuse_handover == "holder":
        return handover.HolderHandover(os.path.join(root, "holder"))
    if args.fuse_handover == "systemd":
        return handover.SystemdHandover(os.path.join(root, "fuse-handover.json"))
    chosen = handover.choose(root)
    if chosen is None:
        log.warning(
            "running under systemd without a file-descriptor store: a restart ends the FUSE "
            "mounts of running containers (set FileDescriptorStoreMax=1 in the unit)"
        )
    return chosen


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        cfg = config.load(args.config)
    except config.ConfigError as e:
        print(f"{PROG}: config: {e}", file=sys.stderr)
        return 2
    setup_logging(args.log_level, args.log_format)
    _warn_unbuilt(cfg)
    try:
        import uvloop

        return uvloop.run(_serve(args, cfg))
    except (StargzError, OSError) as e:
        log.error("daemon failed", extra={"error": e})
        return 1


if __name__ == "__main__":
    sys.exit(main())
