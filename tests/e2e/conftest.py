"""End-to-end tests: real containerd 1.6, runc and docker-registry, run as root.

The fixtures come from the shared harness (``tests/harness``); see its docstring to reuse
them elsewhere.
"""

from harness.fixtures import containerd, e2e_host, registry, shared, stargz_daemon  # noqa: F401
