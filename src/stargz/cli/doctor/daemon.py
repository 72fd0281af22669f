"""The daemon's side: its config file loads (and its CRI keychain forwards to containerd),
and it answers on its socket."""

from __future__ import annotations

import os

from stargz import config as daemon_config
from stargz.cli.status import fetch_status
from stargz.errors import StargzError

from . import containerd_config as ccfg
from .check import FAIL, INFO, OK, Check, Options, socket_problem


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
    problem = socket_problem(opts.address)
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


def cri_keychain_check(cfg: daemon_config.Config, cc: ccfg.ContainerdConfig | None) -> Check:
    """``[cri_keychain]``: the kubelet's pull credentials reach the daemon only through it,
    and it forwards every CRI image call to ``image_service_path``: containerd's socket."""
    name = "cri-keychain"
    kc = cfg.cri_keychain
    if not kc.enable_keychain:
        msg = (
            "[cri_keychain] is off: the daemon does not see the kubelet's pull credentials "
            "(images it can't read with ~/.docker/config.json are pulled in full)"
        )
        return Check(name, INFO, msg)
    target = os.path.normpath(kc.image_service_path)
    if cc is not None and target != cc.grpc_address:
        msg = (
            f"[cri_keychain] image_service_path is {kc.image_service_path}, but containerd "
            f"serves on {cc.grpc_address}: every image call the kubelet makes would fail"
        )
        fix = f'set image_service_path = "{cc.grpc_address}" in [cri_keychain]'
        return Check(name, FAIL, msg, fix)
    listen = kc.listen_path or "the daemon's own socket"
    msg = f"[cri_keychain] on: served on {listen}, forwarded to {target}"
    return Check(name, OK, msg)
