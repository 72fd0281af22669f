"""Three read-only questions to a running containerd, over its gRPC socket.

- ``Version/Version``: does it answer, and which version;
- ``Introspection/Plugins``: did it load the ``stargz`` snapshotter (a proxy plugin), and
  at which address;
- CRI ``RuntimeService/Status`` (verbose): the CRI config it runs with, as JSON.

containerd's API packages are not a dependency of this project, and these messages are a
few strings, so they are encoded and decoded by hand (protobuf wire format: field
numbers from containerd's ``api/services/{version,introspection}/v1`` and the CRI
``runtime/v1/api.proto``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from stargz.errors import Unavailable

VERSION = "/containerd.services.version.v1.Version/Version"
PLUGINS = "/containerd.services.introspection.v1.Introspection/Plugins"
CRI_STATUS = "/runtime.v1.RuntimeService/Status"


@dataclass(frozen=True)
class Plugin:
    type: str
    id: str
    exports: dict[str, str]
    #: The plugin's init error ("" when it loaded).
    init_error: str


# --- protobuf wire format (the few shapes these messages use) -------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _read_varint(data: bytes, i: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        if i >= len(data):
            raise ValueError("truncated varint")
        b = data[i]
        i += 1
        n |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return n, i


def _string(field: int, value: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(value)) + value


def fields(data: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) of each field: ints for varints, bytes for length-delimited."""
    i = 0
    while i < len(data):
        key, i = _read_varint(data, i)
        kind = key & 7
        if kind == 0:
            value, i = _read_varint(data, i)
            yield key >> 3, value
        elif kind == 2:
            n, i = _read_varint(data, i)
            if i + n > len(data):
                raise ValueError("truncated field")
            yield key >> 3, data[i : i + n]
            i += n
        elif kind == 1:
            i += 8
        elif kind == 5:
            i += 4
        else:
            raise ValueError(f"unsupported wire type {kind}")


def _text(v: int | bytes) -> str:
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)


def _map_entry(data: bytes) -> tuple[str, str]:
    got = dict(fields(data))
    return _text(got.get(1, b"")), _text(got.get(2, b""))


# --- the calls -----------------------------------------------------------------------------


def _call(address: str, method: str, request: bytes, timeout: float) -> bytes:
    import grpc  # (only when asked)

    with grpc.insecure_channel(f"unix:{address}") as channel:
        try:
            return channel.unary_unary(method)(request, timeout=timeout)
        except grpc.RpcError as e:
            code = e.code()  # type: ignore[attr-defined]
            details = " ".join(str(e.details() or "").split())  # type: ignore[attr-defined]
            raise Unavailable(f"{method.rsplit('/', 1)[-1]}: {code.name}: {details}") from None


def _decoded(method: str, decode: Any) -> Any:
    try:
        return decode()
    except ValueError as e:
        raise Unavailable(f"{method.rsplit('/', 1)[-1]}: not a protobuf answer ({e})") from None


def version(address: str, timeout: float) -> str:
    """containerd's version string (``1.6.20``...)."""
    resp = _call(address, VERSION, b"", timeout)
    return _decoded(VERSION, lambda: next((_text(v) for f, v in fields(resp) if f == 1), ""))


def plugins(address: str, timeout: float, filters: tuple[str, ...] = ()) -> list[Plugin]:
    """The plugins containerd loaded (``filters`` in containerd's syntax, OR-ed)."""
    req = b"".join(_string(1, f.encode()) for f in filters)
    resp = _call(address, PLUGINS, req, timeout)
    return _decoded(PLUGINS, lambda: _plugins(resp))


def _plugins(resp: bytes) -> list[Plugin]:
    out = []
    for f, raw in fields(resp):
        if f != 1 or not isinstance(raw, bytes):
            continue
        ptype = pid = err = ""
        exports: dict[str, str] = {}
        for g, v in fields(raw):
            if g == 1:
                ptype = _text(v)
            elif g == 2:
                pid = _text(v)
            elif g == 5 and isinstance(v, bytes):
                k, val = _map_entry(v)
                exports[k] = val
            elif g == 7 and isinstance(v, bytes):  # google.rpc.Status
                err = next((_text(m) for h, m in fields(v) if h == 2), "") or "init failed"
        out.append(Plugin(ptype, pid, exports, err))
    return out


def cri_config(address: str, timeout: float) -> dict[str, Any]:
    """The CRI plugin's running config (``Status`` with verbose = true, ``info["config"]``).
    Raises `Unavailable` when CRI does not answer (disabled, or not containerd)."""
    resp = _call(address, CRI_STATUS, _varint(1 << 3 | 0) + _varint(1), timeout)
    for f, v in _decoded(CRI_STATUS, lambda: list(fields(resp))):
        if f == 2 and isinstance(v, bytes):
            k, val = _map_entry(v)
            if k == "config":
                try:
                    doc = json.loads(val)
                except ValueError:
                    break
                if isinstance(doc, dict):
                    return doc
    raise Unavailable("CRI Status: the answer has no config")
