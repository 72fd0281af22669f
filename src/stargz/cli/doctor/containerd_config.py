"""What a containerd config file says about the stargz snapshotter, read as containerd reads it.

containerd 1.x knows two layouts: version 1 (no ``version`` key) names plugins by their
short ID (``[plugins.cri.containerd]``, ``disabled_plugins = ["cri"]``), version 2 by
their full URI (``[plugins."io.containerd.grpc.v1.cri".containerd]``). containerd 2.x's
version 3 moved the CRI image settings to ``[plugins."io.containerd.cri.v1.images"]``.
``imports`` (paths relative to the file, globs allowed) are read after the file, each
replacing whole ``[plugins.X]`` and ``[proxy_plugins.X]`` tables, as containerd's
``LoadConfig`` merges them.

When unset, containerd 1.6's CRI plugin uses ``snapshotter = "overlayfs"`` and
``disable_snapshot_annotations = true`` (no layer annotations reach the snapshotter, so
nothing can be pulled lazily).
"""

from __future__ import annotations

import glob
import os
import tomllib
from dataclasses import dataclass, field
from typing import Any

from stargz.errors import InvalidArgument

DEFAULT_PATH = "/etc/containerd/config.toml"
DEFAULT_GRPC_ADDRESS = "/run/containerd/containerd.sock"
#: containerd 1.6's CRI defaults for the two keys a lazy pull needs.
CRI_DEFAULT_SNAPSHOTTER = "overlayfs"
CRI_DEFAULT_DISABLE_ANNOTATIONS = True

#: version -> (the CRI plugin's name in ``disabled_plugins``, the table holding the CRI
#: image keys as a path below ``plugins``, how that table is written in TOML).
_CRI = {
    1: (("cri",), ("cri", "containerd"), "[plugins.cri.containerd]"),
    2: (
        ("io.containerd.grpc.v1.cri",),
        ("io.containerd.grpc.v1.cri", "containerd"),
        '[plugins."io.containerd.grpc.v1.cri".containerd]',
    ),
    3: (
        ("io.containerd.grpc.v1.cri", "io.containerd.cri.v1.images"),
        ("io.containerd.cri.v1.images",),
        "[plugins.'io.containerd.cri.v1.images']",
    ),
}


class ContainerdConfigError(InvalidArgument):
    """The file cannot be read or is not a containerd config (one line)."""


@dataclass(frozen=True)
class ContainerdConfig:
    path: str
    version: int
    #: Every file read: the config, then its imports in the order they were merged.
    files: list[str]
    grpc_address: str
    #: ``[proxy_plugins.<name>]`` tables.
    proxy_plugins: dict[str, dict[str, Any]]
    cri_enabled: bool
    #: Where the CRI image keys live in this version, as TOML (for messages).
    cri_table: str
    #: The CRI keys as written (None: unset, containerd's default applies).
    cri_snapshotter: str | None = None
    cri_disable_snapshot_annotations: Any = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def snapshotter(self) -> str:
        """The snapshotter CRI pulls and runs with."""
        return self.cri_snapshotter if self.cri_snapshotter is not None else CRI_DEFAULT_SNAPSHOTTER

    @property
    def disable_snapshot_annotations(self) -> Any:
        v = self.cri_disable_snapshot_annotations
        return CRI_DEFAULT_DISABLE_ANNOTATIONS if v is None else v


def _read(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ContainerdConfigError(f"{path}: no such file") from None
    except OSError as e:
        raise ContainerdConfigError(f"{path}: {e.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ContainerdConfigError(f"{path}: invalid TOML: {e}") from None


def _imports(path: str, doc: dict[str, Any]) -> list[str]:
    out: list[str] = []
    listed = doc.get("imports", [])
    if not isinstance(listed, list) or not all(isinstance(p, str) for p in listed):
        raise ContainerdConfigError(f"{path}: imports must be an array of strings")
    for p in listed:
        if not os.path.isabs(p):
            p = os.path.join(os.path.dirname(path), p)
        if glob.has_magic(p):
            out.extend(sorted(glob.glob(p)))
        else:
            out.append(p)
    return out


#: Top-level keys whose type containerd checks before it starts (a wrong one: it refuses).
_TABLES = ("plugins", "proxy_plugins", "grpc")
_ARRAYS = ("disabled_plugins", "required_plugins")


def _check_types(path: str, doc: dict[str, Any]) -> None:
    for key in _TABLES:
        if key in doc and not isinstance(doc[key], dict):
            raise ContainerdConfigError(f"{path}: {key} must be a table")
    for key in _ARRAYS:
        if key in doc and not (
            isinstance(doc[key], list) and all(isinstance(x, str) for x in doc[key])
        ):
            raise ContainerdConfigError(f"{path}: {key} must be an array of strings")
    if not isinstance(doc.get("version", 1), int) or isinstance(doc.get("version"), bool):
        raise ContainerdConfigError(f"{path}: version must be an integer")


def _merge(into: dict[str, Any], doc: dict[str, Any]) -> None:
    """containerd's mergeConfig: later files win; plugin tables are replaced whole."""
    for k, v in doc.items():
        if k in ("plugins", "proxy_plugins", "stream_processors") and isinstance(v, dict):
            into.setdefault(k, {}).update(v)
        elif k in ("disabled_plugins", "required_plugins", "imports") and isinstance(v, list):
            into[k] = [*into.get(k, []), *v]
        elif isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v


def _table(doc: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    node: Any = doc.get("plugins", {})
    for part in path:
        node = node.get(part) if isinstance(node, dict) else None
    return node if isinstance(node, dict) else {}


def load(path: str = DEFAULT_PATH) -> ContainerdConfig:
    """Read ``path`` and its imports. Raises `ContainerdConfigError` (one line)."""
    path = os.path.abspath(path)
    first = _read(path)
    _check_types(path, first)
    version = first.get("version", 1)
    if version not in _CRI:
        raise ContainerdConfigError(f"{path}: unknown config version {version!r} (1, 2 or 3)")
    merged: dict[str, Any] = {}
    files: list[str] = []
    pending = [path]
    while pending:
        p, pending = pending[0], pending[1:]
        if p in files:
            continue
        doc = first if p == path else _read(p)
        _check_types(p, doc)
        _merge(merged, doc)
        files.append(p)
        pending.extend(_imports(p, doc))
    disabled_names, where, cri_table = _CRI[version]
    disabled = merged.get("disabled_plugins", [])
    cri = _table(merged, where)
    grpc = merged.get("grpc", {})
    address = grpc.get("address") if isinstance(grpc, dict) else None
    proxies = merged.get("proxy_plugins", {})
    return ContainerdConfig(
        path=path,
        version=version,
        files=files,
        grpc_address=address or DEFAULT_GRPC_ADDRESS,
        proxy_plugins={k: v for k, v in proxies.items() if isinstance(v, dict)},
        cri_enabled=not any(name in disabled for name in disabled_names),
        cri_table=cri_table,
        cri_snapshotter=cri.get("snapshotter"),
        cri_disable_snapshot_annotations=cri.get("disable_snapshot_annotations"),
        raw=merged,
    )
