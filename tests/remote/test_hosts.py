"""Registry hosts: localhost is plain http, mirrors come before the registry."""

from __future__ import annotations

import pytest

from stargz.remote import (
    ResolverOptions,
    is_localhost,
    registry_hosts,
)


@pytest.mark.parametrize(
    "netloc, local",
    [
        ("localhost", True),
        ("localhost:5000", True),
        ("127.0.0.1", True),
        ("127.0.0.1:5000", True),
        ("127.1.2.3:80", True),
        ("::1", True),
        ("[::1]:5000", True),
        ("10.0.0.1:5000", False),
        ("localhost.example.com", False),
        ("ghcr.io", False),
    ],
)
def test_is_localhost(netloc, local):
    assert is_localhost(netloc) is local


def test_hosts_for_localhost_and_plain_registry():
    assert [(h.netloc, h.scheme) for h in registry_hosts("localhost:5000")] == [
        ("localhost:5000", "http")
    ]
    (h,) = registry_hosts("ghcr.io", ResolverOptions(request_timeout_sec=0))
    assert (h.scheme, h.timeout, h.is_mirror) == ("https", 30.0, False)
    assert h.url("a/manifests/latest") == "https://ghcr.io/v2/a/manifests/latest"
