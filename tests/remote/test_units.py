"""The pure parts of stargz.remote: references, options, hosts, ranges, challenges, keychains."""

from __future__ import annotations

import base64
import os
import random
import stat

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stargz.errors import AuthError, InvalidReference, RegistryProtocolError
from stargz.remote import (
    BlobOptions,
    Credentials,
    DockerConfigKeychain,
    Platform,
    ResolverOptions,
    is_localhost,
    parse_reference,
    parse_www_authenticate,
    registry_hosts,
)
from stargz.remote.manifest import select_platform
from stargz.remote.multipart import (
    Part,
    coalesce,
    extract,
    multipart_boundary,
    parse_byteranges,
    parse_content_range,
    range_header,
)

# --- references ---------------------------------------------------------------------------


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


# --- options ---------------------------------------------------------------------------


def test_blob_options_defaults_are_upstream():
    o = BlobOptions()
    assert (o.valid_interval, o.check_always, o.chunk_size, o.fetching_timeout_sec) == (
        60,
        False,
        50000,
        300,
    )
    assert (o.force_single_range_mode, o.prefetch_chunk_size) == (False, 0)
    assert (o.max_retries, o.min_wait_msec, o.max_wait_msec) == (5, 30, 300000)
    assert o.check_interval == 60


def test_blob_options_zero_means_default():
    from stargz import config

    cfg = config.loads(
        "[blob]\nmax_retries = 0\nchunk_size = 0\ncheck_always = true\nmin_wait_msec = 5\n"
    )
    o = BlobOptions.from_config(cfg.blob)
    assert o.max_retries == 5 and o.chunk_size == 50000 and o.min_wait_msec == 5
    assert o.check_interval == 0
    assert BlobOptions.from_config(None) == BlobOptions()
    assert BlobOptions(valid_interval=0).valid_interval == 60


def test_options_from_the_config_loader():
    from stargz import config

    cfg = config.loads(
        """
        [blob]
        chunk_size = 1234
        force_single_range_mode = true
        [resolver]
        request_timeout_sec = 7
        [[resolver.host."docker.io".mirrors]]
        host = "mirror.example.com"
        insecure = true
        header = { "x-one" = "1", "x-many" = ["a", "b"] }
        [[resolver.host."docker.io".mirrors]]
        host = "second.example.com:5000"
        request_timeout_sec = -1
        """
    )
    blob = BlobOptions.from_config(cfg.blob)
    assert blob.chunk_size == 1234 and blob.force_single_range_mode
    res = ResolverOptions.from_config(cfg.resolver)
    hosts = registry_hosts("docker.io", res)
    assert [(h.netloc, h.scheme, h.timeout, h.namespace) for h in hosts] == [
        ("mirror.example.com", "http", 7.0, "docker.io"),
        ("second.example.com:5000", "https", None, "docker.io"),
        ("registry-1.docker.io", "https", 7.0, None),
    ]
    assert hosts[0].headers == (("x-one", "1"), ("x-many", "a"), ("x-many", "b"))
    assert hosts[2].headers == ()  # the registry never gets a mirror's headers
    assert hosts[0].url("library/x/blobs/sha256:1") == (
        "http://mirror.example.com/v2/library/x/blobs/sha256:1?ns=docker.io"
    )


def test_resolver_options_from_config():
    from stargz import config

    res = ResolverOptions.from_config(
        config.parse(
            {
                "resolver": {
                    "host": {"ghcr.io": {"mirrors": [{"host": "m", "header": {"a": ["x", "y"]}}]}}
                }
            }
        ).resolver
    )
    assert res.request_timeout_sec == 30
    assert res.host["ghcr.io"].mirrors[0].header == (("a", ("x", "y")),)
    assert ResolverOptions.from_config(None) == ResolverOptions()


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


# --- platforms ---------------------------------------------------------------------------


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


# --- ranges and multipart -------------------------------------------------------------------


def test_content_range():
    assert parse_content_range("bytes 0-9/100") == (0, 10, 100)
    assert parse_content_range(b"bytes 5-5/*") == (5, 6, None)
    for bad in ("bytes 9-0/100", "bytes 0-100/100", "bits 0-1/2", "", None, "bytes */100"):
        with pytest.raises(RegistryProtocolError):
            parse_content_range(bad)


def test_boundary():
    assert multipart_boundary("multipart/byteranges; boundary=abc") == "abc"
    assert multipart_boundary('Multipart/ByteRanges;boundary="a \\"b"') == 'a "b'
    assert multipart_boundary("application/octet-stream") is None
    assert multipart_boundary(None) is None
    with pytest.raises(RegistryProtocolError):
        multipart_boundary("multipart/byteranges")


def test_coalesce_and_header():
    assert coalesce([(10, 20), (0, 5), (5, 7), (15, 30), (40, 40)]) == [(0, 7), (10, 30)]
    assert coalesce([(0, 5), (8, 10), (30, 31)], gap=3) == [(0, 10), (30, 31)]
    assert range_header([(0, 7), (10, 30)]) == "bytes=0-6,10-29"


def _multipart(blob: bytes, spans, boundary: str, nl: bytes, rnd: random.Random) -> bytes:
    out = []
    if rnd.random() < 0.5:
        out.append(b"preamble to ignore" + nl)
    for s, e in spans:
        out.append(b"--" + boundary.encode() + nl)
        out.append(b"Content-Type: application/octet-stream" + nl)
        if rnd.random() < 0.3:
            out.append(b"X-Extra: yes" + nl)
        out.append(f"Content-Range: bytes {s}-{e - 1}/{len(blob)}".encode() + nl + nl)
        out.append(blob[s:e] + nl)
    out.append(b"--" + boundary.encode() + b"--" + nl)
    if rnd.random() < 0.5:
        out.append(b"epilogue")
    return b"".join(out)


@settings(max_examples=150, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    n=st.integers(1, 12),
    crlf=st.booleans(),
)
def test_multipart_roundtrip(seed, n, crlf):
    rnd = random.Random(seed)
    boundary = "b" + rnd.randbytes(8).hex()
    # the blob holds the boundary itself: the parser must go by lengths, not by search
    blob = rnd.randbytes(2000) + (b"\r\n--" + boundary.encode()) * 3 + rnd.randbytes(500)
    spans = []
    for _ in range(n):
        s = rnd.randrange(len(blob))
        spans.append((s, rnd.randrange(s + 1, min(len(blob), s + 400) + 1)))
    regions = coalesce(spans)
    order = list(regions)
    rnd.shuffle(order)  # servers may reorder parts
    body = _multipart(blob, order, boundary, b"\r\n" if crlf else b"\n", rnd)
    parts = parse_byteranges(body, boundary)
    assert sorted((p.start, bytes(p.data)) for p in parts) == [(s, blob[s:e]) for s, e in regions]
    found, missing = extract(parts, spans)
    assert not missing
    assert all(found[(s, e)] == blob[s:e] for s, e in spans)


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"no boundary at all",
        b"--XYZ\r\nContent-Type: a\r\n\r\nabc\r\n--XYZ--\r\n",  # no Content-Range
        b"--XYZ\r\nContent-Range: bytes 0-9/100\r\n\r\nshort\r\n--XYZ--\r\n",  # truncated
        b"--XYZ\r\nContent-Range: bytes 0-1/100\r\n\r\nlonger than two\r\n--XYZ--\r\n",
        b"--XYZ\r\nContent-Range bytes 0-1/100\r\n\r\nab\r\n--XYZ--\r\n",  # bad header line
        b"--XYZ--\r\n",  # no parts
    ],
)
def test_multipart_rejects(body):
    with pytest.raises(RegistryProtocolError):
        parse_byteranges(body, "XYZ")


def test_extract_reports_missing():
    parts = [Part(0, memoryview(b"abcdef")), Part(10, memoryview(b"klmn"))]
    found, missing = extract(parts, [(1, 3), (4, 8), (11, 14)])
    assert found == {(1, 3): b"bc", (11, 14): b"lmn"}
    assert missing == [(4, 8)]


# --- challenges and keychains ----------------------------------------------------------------


def test_parse_www_authenticate():
    (ch,) = parse_www_authenticate(
        [
            'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
            'scope="repository:library/ubuntu:pull"'
        ]
    )
    assert ch.scheme == "bearer"
    assert ch.params == {
        "realm": "https://auth.docker.io/token",
        "service": "registry.docker.io",
        "scope": "repository:library/ubuntu:pull",
    }
    chs = parse_www_authenticate(['Basic realm="r", Bearer realm="x",error="insufficient_scope"'])
    assert [c.scheme for c in chs] == ["basic", "bearer"]
    assert chs[1].params["error"] == "insufficient_scope"
    assert parse_www_authenticate(['Bearer realm=plain, scope="a b"'])[0].scopes == {"a", "b"}
    assert parse_www_authenticate([""]) == []


def _kc_run(coro):
    import asyncio

    return asyncio.run(coro)


def test_docker_config_auths(docker_config):
    enc = base64.b64encode(b"alice:s3cr:et").decode()
    docker_config(
        {
            "auths": {
                "https://index.docker.io/v1/": {"auth": base64.b64encode(b"hub:pw").decode()},
                "127.0.0.1:5000": {"auth": enc},
                "http://reg.example:8080/v2/": {"username": "bob", "password": "pw2"},
                "tok.example": {"identitytoken": "refresh-me"},
            }
        }
    )
    kc = DockerConfigKeychain()
    assert kc.path == os.path.join(os.environ["DOCKER_CONFIG"], "config.json")
    assert _kc_run(kc.credentials("127.0.0.1:5000")) == Credentials("alice", "s3cr:et")
    assert _kc_run(kc.credentials("reg.example:8080")) == Credentials("bob", "pw2")
    assert _kc_run(kc.credentials("registry-1.docker.io")) == Credentials("hub", "pw")
    assert _kc_run(kc.credentials("tok.example")).identity_token == "refresh-me"
    assert _kc_run(kc.credentials("other.example")) is None
    assert "s3cr" not in repr(Credentials("alice", "s3cr"))


def test_docker_config_missing_and_broken(docker_config, tmp_path):
    kc = DockerConfigKeychain(str(tmp_path / "nope.json"))
    assert _kc_run(kc.credentials("x")) is None
    path = docker_config({"auths": {"x": {"auth": "bm9jb2xvbg=="}}})  # "nocolon"
    with pytest.raises(AuthError, match="user:password"):
        _kc_run(DockerConfigKeychain().credentials("x"))
    path.write_text("{not json")
    with pytest.raises(AuthError, match="cannot read"):
        _kc_run(DockerConfigKeychain().credentials("x"))


def test_docker_config_credential_helper(docker_config, tmp_path, monkeypatch):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    helper = bindir / "docker-credential-fake"
    helper.write_text(
        "#!/bin/sh\n"
        "read server\n"
        'case "$server" in\n'
        '  helped.example) echo \'{"Username":"carol","Secret":"hpw"}\' ;;\n'
        '  https://index.docker.io/v1/) echo \'{"Username":"<token>","Secret":"idt"}\' ;;\n'
        '  *) echo "credentials not found in native keychain"; exit 1 ;;\n'
        "esac\n"
    )
    helper.chmod(helper.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    docker_config(
        {
            "credHelpers": {"helped.example": "fake", "docker.io": "fake"},
            "auths": {"plain.example": {"auth": base64.b64encode(b"dave:pw").decode()}},
        }
    )
    kc = DockerConfigKeychain()
    assert _kc_run(kc.credentials("helped.example")) == Credentials("carol", "hpw")
    assert _kc_run(kc.credentials("registry-1.docker.io")) == Credentials(identity_token="idt")
    assert _kc_run(kc.credentials("plain.example")) == Credentials("dave", "pw")
    docker_config({"credsStore": "fake"})
    assert _kc_run(DockerConfigKeychain().credentials("unknown.example")) is None
    docker_config({"credsStore": "missing-helper"})
    with pytest.raises(AuthError, match="not found"):
        _kc_run(DockerConfigKeychain().credentials("x.example"))


def test_remote_imports_no_fuse_or_grpc():
    """stargz.remote may use stargz.estargz (and the config's dataclasses, which it builds
    its options from), never FUSE, gRPC or the layers above it."""
    import json
    import subprocess
    import sys

    probe = "import json, sys, stargz.remote; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    mods = json.loads(out.stdout)
    bad = [
        m
        for m in mods
        if m.split(".")[0] in ("pyfuse3", "grpc", "trio")
        or m.startswith(("google.protobuf", "stargz.fs", "stargz.fuse", "stargz.snapshot"))
        or m.startswith("stargz.service")
        or m.startswith("stargz.cli")
    ]
    assert bad == []
    assert "stargz.estargz" in mods and "aiohttp" in mods
