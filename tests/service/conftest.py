"""The daemon's services over real processes; fixtures from the shared harness."""

from harness.fixtures import (  # noqa: F401
    e2e_host,
    lazy_stack,
    logged_registry,
    registry,
    shared,
    snapshot_daemon,
)
