"""The daemon's services over real processes; fixtures from the shared harness."""

from harness.fixtures import e2e_host, registry, snapshot_daemon  # noqa: F401
