"""Which inode slot each mounted layer has, kept on disk so a restarted daemon can serve
the FUSE connection it took over (`stargz.fuse.handover`) with the same inode numbers.

Inode numbers are ``(slot << 32) | local`` (`stargz.fs.ops`): ``local`` follows from the
layer's TOC (deterministic), the slot only from the order layers were mounted in. The
kernel caches inode numbers (dentries, open files, overlayfs lower inodes), so after a
take-over each layer must come back in its old slot, and no slot may ever be given to
another layer while the connection lives.

The file, ``<root>/fuse-layers.json`` (0600): ``{"format": 1, "next_slot": n, "layers": {key:
{"slot": s, "name": ..., "labels": {...}}}}``, where ``key`` is ``"<source> <digest>"``
(layers are opened per source repository) and ``name`` the layer's directory in the FUSE
root (the digest's hex, suffixed when another source has the same digest: which one got
the plain name depends on the order they were mounted in, so it is recorded too). It is
rewritten (temp file + rename) before a layer becomes visible in the FUSE root and after
it left it. No fsync: a machine crash ends the
FUSE connection too, and then the table starts over.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

log = logging.getLogger("stargz.fs")

#: Version of the file's layout. A daemon reads the versions it knows (a file without one is
#: version 1) and treats a newer one as unreadable, so an upgrade that changes the layout
#: must keep reading the old one.
FORMAT = 1


@dataclass(frozen=True)
class SlotRecord:
    slot: int
    name: str
    labels: Mapping[str, str]


class SlotTable:
    """Layer key -> slot, name (and the labels to open the layer again), persisted."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.next_slot = 1
        self.layers: dict[str, SlotRecord] = {}

    def reset(self) -> None:
        """A new FUSE connection: no inode of the old one survives, start from slot 1."""
        self.next_slot = 1
        self.layers.clear()
        self._save()

    def load(self) -> None:
        """Read the table a previous daemon left (a missing or damaged file: empty)."""
        try:
            with open(self.path, "rb") as f:
                doc = json.loads(f.read())
            if int(doc.get("format", 1)) > FORMAT:
                raise ValueError(f"format {doc['format']} is newer than this daemon's {FORMAT}")
            layers = {
                str(key): SlotRecord(
                    int(r["slot"]),
                    str(r["name"]),
                    {str(k): str(v) for k, v in r["labels"].items()},
                )
                for key, r in doc["layers"].items()
            }
            next_slot = int(doc["next_slot"])
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            log.warning("the layer slot table is unreadable; starting empty: %s", e)
            return
        top = max((r.slot for r in layers.values()), default=0)
        self.layers = layers
        self.next_slot = max(next_slot, top + 1)

    def get(self, key: str) -> SlotRecord | None:
        return self.layers.get(key)

    def has_name(self, name: str) -> bool:
        return any(r.name == name for r in self.layers.values())

    def add(self, key: str, name: str, labels: Mapping[str, str]) -> SlotRecord:
        """Record a layer shown for the first time on this connection, in a new slot."""
        rec = SlotRecord(self.next_slot, name, dict(labels))
        self.next_slot += 1
        self.layers[key] = rec
        self._save()
        return rec

    def remove(self, key: str) -> None:
        if self.layers.pop(key, None) is not None:
            self._save()

    def _save(self) -> None:
        doc = {
            "format": FORMAT,
            "next_slot": self.next_slot,
            "layers": {
                key: {"slot": r.slot, "name": r.name, "labels": dict(r.labels)}
                for key, r in self.layers.items()
            },
        }
        tmp = f"{self.path}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with open(fd, "wb") as f:
            f.write(json.dumps(doc, separators=(",", ":")).encode())
        os.rename(tmp, self.path)
