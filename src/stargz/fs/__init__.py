"""The FUSE filesystem: lazily pulled eStargz layers, verified chunk by chunk.

- :class:`StargzFileSystem` implements `stargz.snapshot.FileSystem` (``mount``,
  ``check``, ``unmount``) with one FUSE mount per daemon (served from ``/dev/fuse``),
  each layer a subtree.
- :class:`LayerSource` / :class:`Blob` are the seam to where bytes come from:
  :class:`LocalLayerSource` (local files / OCI layouts) here, the registry in
  :mod:`stargz.fs.registry`.
- :class:`FsOptions` gathers the configuration (``FsOptions.from_config``).

Importing this package imports asyncio; `stargz.estargz` never does.
"""

from stargz.fs import mounts
from stargz.fs.filesystem import StargzFileSystem
from stargz.fs.layer import ChunkVerifyError, Layer, LayerClosed
from stargz.fs.metrics import FsMetrics, LayerMetrics
from stargz.fs.options import FsOptions
from stargz.fs.source import (
    Blob,
    FileBlob,
    LayerSource,
    LayerSpec,
    LocalLayerSource,
    layer_spec,
)

__all__ = [
    "Blob",
    "ChunkVerifyError",
    "FileBlob",
    "FsMetrics",
    "FsOptions",
    "Layer",
    "LayerClosed",
    "LayerMetrics",
    "LayerSource",
    "LayerSpec",
    "LocalLayerSource",
    "StargzFileSystem",
    "layer_spec",
    "mounts",
]
