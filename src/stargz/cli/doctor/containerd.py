"""containerd's side: its config file says what a lazy pull needs, and the running
containerd agrees (it loaded the stargz snapshotter; its CRI runs with those settings)."""

from __future__ import annotations

import json
import os

from stargz.errors import StargzError

from . import containerd_api
from . import containerd_config as ccfg
from .check import FAIL, INFO, OK, SNAPSHOTTER, Check, Options, socket_problem


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


def containerd_checks(cc: ccfg.ContainerdConfig | None, opts: Options) -> list[Check]:
    """containerd answers; it loaded the stargz plugin; its CRI runs with what the file says."""
    address = cc.grpc_address if cc is not None else ccfg.DEFAULT_GRPC_ADDRESS
    problem = socket_problem(address)
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
