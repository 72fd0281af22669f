"""Reusable end-to-end harness: real docker-registry, containerd 1.6 and our daemon.

To use the pytest fixtures from another test directory, give that directory an
``__init__.py`` (so ``tests/`` is on ``sys.path``) and, in its ``conftest.py``::

    from harness.fixtures import containerd, e2e_host, registry, shared, stargz_daemon  # noqa: F401
"""

from .procs import (
    ApiRequest,
    BlobRequest,
    Containerd,
    HarnessError,
    MountEntry,
    Registry,
    StargzDaemon,
    TokenAuth,
    free_port,
    image_chain_id,
    make_tempdir,
    mounted_image,
    mounts_under,
    run,
    shared_dir,
    tree_listing,
    unmount_under,
)

__all__ = [
    "ApiRequest",
    "BlobRequest",
    "Containerd",
    "HarnessError",
    "MountEntry",
    "Registry",
    "StargzDaemon",
    "TokenAuth",
    "free_port",
    "image_chain_id",
    "make_tempdir",
    "mounted_image",
    "mounts_under",
    "run",
    "shared_dir",
    "tree_listing",
    "unmount_under",
]
