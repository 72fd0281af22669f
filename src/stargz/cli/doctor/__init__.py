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

The checks live by whose setup they look at: `containerd` (its config file, read by
`containerd_config`, and the running containerd, asked through `containerd_api`),
`daemon` (its config and socket) and `host` (kernel, directories); `check` holds what
they share.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from stargz import config as daemon_config
from stargz.cli.status import DEFAULT_ADDRESS

from . import containerd_config as ccfg
from .check import DEFAULT_MIN_FREE, DEFAULT_ROOT, DEFAULT_TIMEOUT, FAIL, INFO, OK, WARN, Check
from .check import Options as Options
from .containerd import containerd_checks, containerd_config_check, cri_checks, proxy_plugin_check
from .daemon import cri_keychain_check, daemon_config_check, daemon_socket_check
from .host import (
    cache_space_check,
    fuse_device_check,
    overlayfs_check,
    passthrough_check,
    root_mode_check,
)

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
    if cfg is not None:
        out.append(cri_keychain_check(cfg, cc))
    reported_root, check = daemon_socket_check(opts)
    out.append(check)
    root = os.path.abspath(opts.root or reported_root or DEFAULT_ROOT)
    cfg = cfg or daemon_config.Config()
    out.append(_guarded("fuse-device", fuse_device_check))
    out.append(_guarded("overlayfs", overlayfs_check))
    out.append(_guarded("fuse-passthrough", passthrough_check, cfg, root))
    out.append(_guarded("cache-space", cache_space_check, cfg, root, opts.min_free))
    out.append(_guarded("root-mode", root_mode_check, root))
    return out


def _guarded(name: str, check: Callable[..., Check], *args: Any) -> Check:
    """``check(*args)``; an OS error it did not foresee is its failure, not the command's."""
    try:
        return check(*args)
    except OSError as e:
        where = f" ({e.filename})" if e.filename else ""
        return Check(name, FAIL, f"could not check: {e.strerror or e}{where}", "run as root")
