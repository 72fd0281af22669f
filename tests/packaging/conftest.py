"""Packaging checks; fixtures from the shared harness."""

from harness.fixtures import e2e_host  # noqa: F401
