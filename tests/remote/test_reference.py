"""References: normalization, string forms, what is refused."""

from __future__ import annotations

import pytest

from stargz.errors import InvalidReference
from stargz.remote import (
    parse_reference,
)


@pytest.mark.parametrize(
    "text, host, repo, tag, digest",
    [
        ("ubuntu", "docker.io", "library/ubuntu", "latest", None),
        ("ubuntu:22.04", "docker.io", "library/ubuntu", "22.04", None),
        ("docker.io/ubuntu", "docker.io", "library/ubuntu", "latest", None),
        ("index.docker.io/library/ubuntu", "docker.io", "library/ubuntu", "latest", None),
        ("user/app", "docker.io", "user/app", "latest", None),
        ("ghcr.io/a/b/c:v1", "ghcr.io", "a/b/c", "v1", None),
        ("localhost/app", "localhost", "app", "latest", None),
        ("localhost:5000/app:x", "localhost:5000", "app", "x", None),
        ("127.0.0.1:5000/app", "127.0.0.1:5000", "app", "latest", None),
        ("[::1]:5000/app", "[::1]:5000", "app", "latest", None),
        ("Registry/app", "Registry", "app", "latest", None),
        ("a.b/c@sha256:" + "a" * 64, "a.b", "c", None, "sha256:" + "a" * 64),
        ("a.b/c:t@sha256:" + "b" * 64, "a.b", "c", "t", "sha256:" + "b" * 64),
        ("my_app-x/the__name", "docker.io", "my_app-x/the__name", "latest", None),
    ],
)
def test_reference_normalization(text, host, repo, tag, digest):
    ref = parse_reference(text)
    assert (ref.host, ref.repository, ref.tag, ref.digest) == (host, repo, tag, digest)
    assert parse_reference(str(ref)) == ref
    assert ref.object == (digest or tag)


def test_reference_string_forms():
    assert str(parse_reference("ubuntu")) == "docker.io/library/ubuntu:latest"
    ref = parse_reference("ubuntu@sha256:" + "c" * 64)
    assert str(ref) == "docker.io/library/ubuntu@sha256:" + "c" * 64
    assert ref.locator == "docker.io/library/ubuntu"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "UPPER",
        "docker.io/Upper/x",
        "a/b:",
        "a@sha256:abc",
        "a@sha256:" + "A" * 64,
        "a:b:c",
        "https://ghcr.io/x",
        "a//b",
        "-a",
        "a:" + "t" * 129,
        "x.io/" + "a" * 300,
    ],
)
def test_reference_rejects(text):
    with pytest.raises(InvalidReference):
        parse_reference(text)
