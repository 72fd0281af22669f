"""The record of a workload's file accesses, as Go's ``ctr-remote`` writes and reads it.

JSON lines, one per file in first-access order: ``{"path": ..., "manifestDigest": ...,
"layerIndex": N}`` (Go ``recorder.Entry``; ``path`` has no leading slash, ``layerIndex``
counts the manifest's layers from the bottom, 0 first). ``ctr-remote i optimize
--record-out`` writes it; ``stargz convert --record-in`` reads it: an entry with a layer
index goes to that layer, one without goes to every layer that has the path (Go's
``convert --estargz-record-in`` applies every path to every layer).
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterable
from dataclasses import dataclass

from stargz.errors import InvalidArgument


@dataclass(frozen=True)
class Entry:
    path: str
    manifest_digest: str = ""
    layer_index: int | None = None

    def to_json(self) -> str:
        doc: dict[str, object] = {"path": self.path}
        if self.manifest_digest:
            doc["manifestDigest"] = self.manifest_digest
        if self.layer_index is not None:
            doc["layerIndex"] = self.layer_index
        return json.dumps(doc, separators=(",", ":"))


def clean(path: str) -> str:
    """Go's ``cleanEntryName``: no leading slash, no ``.``/``..`` parts."""
    return posixpath.normpath("/" + path).lstrip("/")


def write(path: str, entries: Iterable[Entry]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for e in entries:
            f.write(e.to_json() + "\n")


def read(path: str) -> list[Entry]:
    out: list[Entry] = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except ValueError as e:
                raise InvalidArgument(f"{path}:{n}: not JSON: {e}") from None
            if not isinstance(doc, dict) or not isinstance(doc.get("path"), str):
                raise InvalidArgument(f'{path}:{n}: not a record entry (needs a "path" string)')
            idx = doc.get("layerIndex")
            if idx is not None and (not isinstance(idx, int) or isinstance(idx, bool) or idx < 0):
                raise InvalidArgument(f"{path}:{n}: layerIndex {idx!r} is not a layer index")
            out.append(Entry(clean(doc["path"]), str(doc.get("manifestDigest") or ""), idx))
    return out


def layer_files(entries: Iterable[Entry], n_layers: int) -> dict[int, list[str]]:
    """Per layer index: its paths in record order (an entry without an index goes to
    every layer; `stargz.estargz.writer` skips paths a layer does not have)."""
    out: dict[int, list[str]] = {}
    for e in entries:
        if e.layer_index is not None and e.layer_index >= n_layers:
            raise InvalidArgument(
                f"record entry {e.path!r}: layer {e.layer_index} but the image has {n_layers}"
            )
        for i in [e.layer_index] if e.layer_index is not None else range(n_layers):
            files = out.setdefault(i, [])
            if e.path not in files:
                files.append(e.path)
    return out
