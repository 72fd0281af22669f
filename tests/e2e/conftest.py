"""End-to-end tests: real containerd 1.6, runc and docker-registry, run as root.

The fixtures come from the shared harness (``tests/harness``); see its docstring to reuse
them elsewhere.
"""

from harness.fixtures import (  # noqa: F401
    containerd,
    e2e_host,
    lazy_stack,
    logged_registry,
    registry,
    shared,
    stargz_daemon,
)
