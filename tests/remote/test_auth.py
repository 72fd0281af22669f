"""Authentication: WWW-Authenticate challenges and the docker config keychain."""

from __future__ import annotations

import base64
import os
import stat

import pytest

from stargz.errors import AuthError
from stargz.remote import (
    Credentials,
    DockerConfigKeychain,
    parse_www_authenticate,
)


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
