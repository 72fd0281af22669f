"""``stargz status``: what the running daemon is doing, from its ``stargz.v1.Status`` service.

    stargz status [--address SOCK] [--json] [--timeout SEC]

One line per layer: every layer mounted lazily (digest, image, snapshots it backs, size,
fetched %, cache hits and misses, verification failures, last error), then every layer
the daemon recently refused to mount lazily, with the reason. ``--json`` prints the same
as one JSON document for scripts (full digests, times as Unix seconds).

It asks the daemon over its own socket (root only, like containerd's access to it) and
never opens the snapshot database. A daemon it cannot reach is one line on stderr and
exit status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from stargz.errors import Unavailable
from stargz.unixsock import probe

#: The daemon's ``--address`` default (`stargz.cli.daemon.DEFAULT_ADDRESS`; a test keeps
#: them equal). Not imported from there: the daemon module loads the registry client, and
#: that would double this command's start time.
DEFAULT_ADDRESS = "/run/containerd-stargz-grpc/containerd-stargz-grpc.sock"

#: Seconds to wait for the answer (the daemon answers from memory).
DEFAULT_TIMEOUT = 10.0
#: Text mode cuts error messages here (``--json`` has them whole).
TEXT_ERROR_WIDTH = 100


def add_parser(sub: Any) -> None:
    s = sub.add_parser("status", help="show the layers the running daemon mounted or refused")
    s.add_argument(
        "--address",
        default=DEFAULT_ADDRESS,
        help=f"the daemon's gRPC socket (default {DEFAULT_ADDRESS})",
    )
    s.add_argument("--json", action="store_true", help="one JSON document, for scripts")
    s.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds to wait")
    s.set_defaults(func=cmd_status)


def cmd_status(args: argparse.Namespace) -> int:
    doc = status_dict(fetch_status(args.address, args.timeout))
    if args.json:
        json.dump(doc, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(render_text(doc))
    return 0


# --- talking to the daemon ---------------------------------------------------------------


def _unreachable(address: str, why: str) -> Unavailable:
    return Unavailable(f"cannot reach the stargz daemon at {address}: {why}")


def fetch_status(address: str, timeout: float = DEFAULT_TIMEOUT) -> Any:
    """The daemon's `GetStatusResponse`; `Unavailable` (one sentence) if it cannot answer."""
    address = os.path.abspath(address)
    probe(
        address,
        "the stargz daemon",
        stale="nothing listens on it (a stale socket: the daemon is not running)",
    )

    import grpc  # (only this command needs it)

    from stargz.service.proto.stargz.v1 import status_pb2 as pb
    from stargz.service.proto.stargz.v1 import status_pb2_grpc as pb_grpc

    with grpc.insecure_channel(f"unix:{address}") as channel:
        try:
            return pb_grpc.StatusStub(channel).Get(pb.GetStatusRequest(), timeout=timeout)
        except grpc.RpcError as e:
            code = e.code()  # type: ignore[attr-defined]
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise _unreachable(address, f"no answer within {timeout:g} s") from None
            if code == grpc.StatusCode.UNIMPLEMENTED:
                raise _unreachable(
                    address, "it does not serve stargz.v1.Status (a daemon older than this tool?)"
                ) from None
            details = " ".join(str(e.details() or "").split())  # type: ignore[attr-defined]
            raise _unreachable(address, f"{code.name}: {details}") from None


# --- the answer as data ------------------------------------------------------------------


def status_dict(resp: Any) -> dict[str, Any]:
    """The JSON document of ``--json`` (its keys are the interface scripts rely on)."""
    d = resp.daemon
    return {
        "daemon": {
            "version": d.version,
            "pid": d.pid,
            "root": d.root,
            "lazy": d.lazy,
            "uptime_seconds": round(d.uptime_seconds, 3),
            "fallbacks": dict(sorted(d.fallbacks.items())),
        },
        "layers": [
            {
                "digest": x.digest,
                "ref": x.ref,
                "repository": x.repository,
                "snapshots": [{"name": s.name, "mountpoint": s.mountpoint} for s in x.snapshots],
                "size": x.size,
                "fetched_size": x.fetched_size,
                "fetched_percent": round(x.fetched_percent, 2),
                "cache_hits": x.cache_hits,
                "cache_misses": x.cache_misses,
                "verification_failures": x.verification_failures,
                "read_errors": x.read_errors,
                "fetch_requests": x.fetch_requests,
                "fetched_bytes": x.fetched_bytes,
                "prefetch_done": x.prefetch_done,
                "last_error": x.last_error or None,
                "last_error_time": x.last_error_time or None,
            }
            for x in resp.layers
        ],
        "refused": [
            {
                "digest": r.digest,
                "ref": r.ref,
                "snapshot": r.snapshot,
                "key": r.key,
                "reason": r.reason,
                "reason_text": r.reason_text,
                "error": r.error or None,
                "time": r.time,
                "count": r.count,
            }
            for r in resp.refused
        ],
    }


# --- the answer for people ---------------------------------------------------------------


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def human_age(seconds: float) -> str:
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s // 60 % 60:02d}m"
    return f"{s // 86400}d{s // 3600 % 24:02d}h"


def short_digest(digest: str) -> str:
    algo, _, hexpart = digest.partition(":")
    return f"{algo}:{hexpart[:12]}" if hexpart else digest or "-"


def _one_line(text: str, width: int = TEXT_ERROR_WIDTH) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 3] + "..."


HEADER = ("LAYER", "REF", "SNAPSHOTS", "SIZE", "FETCHED", "HITS", "MISSES", "VERIFY-FAIL", "STATE")


def render_text(doc: dict[str, Any], now: float | None = None) -> str:
    """A summary line, a header, then exactly one line per layer (mounted, then refused)."""
    now = time.time() if now is None else now
    d = doc["daemon"]
    up = human_age(d["uptime_seconds"])
    lines = [
        f"containerd-stargz-grpc {d['version']}, pid {d['pid']}, up {up}"
        f", lazy pulling {'on' if d['lazy'] else 'off'}; {len(doc['layers'])} layer(s) mounted"
        f" lazily, {len(doc['refused'])} refused recently"
    ]
    rows: list[tuple[str, ...]] = [HEADER]
    for x in doc["layers"]:
        state = "lazy" if x["prefetch_done"] else "lazy, prefetching"
        if x["last_error"]:
            age = human_age(now - x["last_error_time"]) if x["last_error_time"] else "?"
            # (the row names the layer: its digest inside the message is noise)
            error = x["last_error"].replace(f"layer {x['digest']} ", "the layer ")
            state += f"; last error {age} ago: {_one_line(error)}"
        rows.append(
            (
                short_digest(x["digest"]),
                x["ref"] or "-",
                str(len(x["snapshots"])),
                human_bytes(x["size"]),
                f"{x['fetched_percent']:.1f}%",
                str(x["cache_hits"]),
                str(x["cache_misses"]),
                str(x["verification_failures"]),
                state,
            )
        )
    for r in doc["refused"]:
        state = f"unpacked: {r['reason_text']}"
        if r["error"]:
            state += f" ({_one_line(r['error'])})"
        rows.append((short_digest(r["digest"]), r["ref"] or "-", *("-",) * 6, state))
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER) - 1)]
    for row in rows:
        cells = [c.ljust(w) for c, w in zip(row, widths, strict=False)]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    return "\n".join(lines) + "\n"
