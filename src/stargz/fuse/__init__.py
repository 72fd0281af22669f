"""The FUSE kernel protocol, spoken straight over ``/dev/fuse`` (a leaf: stdlib only).

- `stargz.fuse.protocol`: opcodes, flags, structs, and the reply values handlers return;
- `stargz.fuse.connection`: opening the device, mount(2) and the INIT handshake;
- `stargz.fuse.session`: serving a connection's requests on an asyncio loop;
- `stargz.fuse.operations`: the handler object a filesystem implements;
- `stargz.fuse.stepping`: running a handler's coroutine after its inline first step;
- `stargz.fuse.handover`: keeping a connection's fd across a restart of the server (a
  holder process, `stargz.fuse.holder`, or systemd's fd store, `stargz.fuse.fdstore`).

`stargz.fs` builds the lazily pulled filesystem on it; nothing here knows about layers.
"""

from stargz.fuse.connection import Connection, handshake, mount, unmount
from stargz.fuse.operations import Operations
from stargz.fuse.protocol import (
    ROOT_INODE,
    DirBuffer,
    Entry,
    EntryAttributes,
    FileInfo,
    FUSEError,
    Opcode,
    PackedEntry,
    StatvfsData,
    pack_entry,
)
from stargz.fuse.session import Session

__all__ = [
    "ROOT_INODE",
    "Connection",
    "DirBuffer",
    "Entry",
    "EntryAttributes",
    "FUSEError",
    "FileInfo",
    "Opcode",
    "Operations",
    "PackedEntry",
    "Session",
    "StatvfsData",
    "handshake",
    "mount",
    "pack_entry",
    "unmount",
]
