"""The daemon's services over real processes; fixtures from the shared harness."""

from harness.fixtures import e2e_host, registry  # noqa: F401
