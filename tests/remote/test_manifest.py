"""Manifests: picking a platform out of an index."""

from __future__ import annotations

import pytest

from stargz.remote import (
    Platform,
)
from stargz.remote.manifest import select_platform


def test_select_platform():
    index = {
        "manifests": [
            {"digest": "sha256:1", "size": 1, "platform": {"os": "linux", "architecture": "arm64"}},
            {
                "digest": "sha256:2",
                "size": 1,
                "platform": {"os": "linux", "architecture": "arm", "variant": "v7"},
            },
            {"digest": "sha256:3", "size": 1, "platform": {"os": "linux", "architecture": "amd64"}},
        ]
    }
    assert select_platform(index, Platform.parse("linux/amd64"), "x").digest == "sha256:3"
    assert select_platform(index, Platform.parse("linux/arm/v7"), "x").digest == "sha256:2"
    assert select_platform(index, Platform.parse("linux/arm64/v8"), "x").digest == "sha256:1"
    with pytest.raises(Exception, match="linux/s390x.*linux/arm64"):
        select_platform(index, Platform.parse("linux/s390x"), "x")
