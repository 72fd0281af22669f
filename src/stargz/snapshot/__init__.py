"""containerd snapshot semantics: SQLite metadata, overlay mounts, and the FileSystem seam.

See :mod:`stargz.snapshot.types` for the contract (kinds, keys and names, the one key
space, remote snapshots) and :mod:`stargz.snapshot.snapshotter` for the crash-safety rules.
"""

from .snapshotter import Snapshotter
from .types import (
    REMOTE_LABEL,
    REMOTE_LABEL_VALUE,
    REMOTE_SNAPSHOT_LOG_KEY,
    TARGET_SNAPSHOT_LABEL,
    FileSystem,
    Info,
    Kind,
    Mount,
    Usage,
)

__all__ = [
    "REMOTE_LABEL",
    "REMOTE_LABEL_VALUE",
    "REMOTE_SNAPSHOT_LOG_KEY",
    "TARGET_SNAPSHOT_LABEL",
    "FileSystem",
    "Info",
    "Kind",
    "Mount",
    "Snapshotter",
    "Usage",
]
