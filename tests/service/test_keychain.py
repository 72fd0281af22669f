"""The CRI keychain store: ``AuthConfig`` read as containerd reads it, credentials keyed by
registry host, kept across restarts in a 0600 file that goes away with the last host."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import stat

import pytest

from stargz.errors import InvalidArgument
from stargz.remote.auth import Credentials
from stargz.service.keychain import FILE_NAME, CRIKeychain, image_host, parse_auth

HOST = "127.0.0.1:5000"


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@pytest.mark.parametrize(
    ("fields", "want"),
    [
        ({"username": "u", "password": "p"}, Credentials("u", "p")),
        ({"auth": b64("u:p:with:colons")}, Credentials("u", "p:with:colons")),
        ({"auth": b64("u:p\0\0")}, Credentials("u", "p")),  # NUL padding trimmed, as Go
        ({"username": "u", "password": "p", "auth": b64("x:y")}, Credentials("u", "p")),
        ({"identity_token": "refresh"}, Credentials(identity_token="refresh")),
        ({"registry_token": "bearer"}, Credentials(registry_token="bearer")),
        ({"username": "u", "password": "p", "server_address": HOST}, Credentials("u", "p")),
        ({"username": "u", "server_address": f"https://{HOST}/v1/"}, Credentials("u")),
        ({"username": "u", "password": "p", "server_address": "other:5000"}, None),
        ({}, None),
    ],
)
def test_auth_config_is_read_as_containerd_reads_it(fields, want):
    assert parse_auth(host=HOST, **fields) == want


@pytest.mark.parametrize(
    ("auth", "message"),
    [("%%%not base64", "not base64"), (b64("no-colon"), "user:password"), ("/w==", "base64")],
)
def test_malformed_auth_is_an_invalid_argument_naming_the_field(auth, message):
    with pytest.raises(InvalidArgument, match=message) as e:
        parse_auth(host=HOST, auth=auth)
    assert "auth.auth" in str(e.value)


def test_image_host_normalizes_docker_hub():
    assert image_host("busybox") == "docker.io"
    assert image_host("index.docker.io/library/busybox:1") == "docker.io"
    assert image_host(f"{HOST}/a/b:c") == HOST
    with pytest.raises(InvalidArgument):
        image_host("Not A Reference!")


def test_credentials_persist_0600_and_are_found_by_any_alias(tmp_path):
    kc = CRIKeychain.open(str(tmp_path))
    assert kc.learn(HOST, Credentials("u", "secret"))
    assert not kc.learn(HOST, Credentials("u", "secret"))  # unchanged: not rewritten
    kc.learn("index.docker.io", Credentials(identity_token="tok"))
    path = tmp_path / FILE_NAME
    st = path.stat()
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.geteuid()
    again = CRIKeychain.open(str(tmp_path))  # a restarted daemon
    assert asyncio.run(again.credentials(HOST)) == Credentials("u", "secret")
    for alias in ("docker.io", "registry-1.docker.io", "INDEX.docker.io"):
        assert asyncio.run(again.credentials(alias)) == Credentials(identity_token="tok")
    assert asyncio.run(again.credentials("other:1")) is None
    assert not list(tmp_path.glob("*.tmp"))


def test_prune_drops_hosts_without_images_and_the_file_with_the_last(tmp_path):
    kc = CRIKeychain.open(str(tmp_path))
    kc.learn(HOST, Credentials("u", "p"))
    kc.learn("docker.io", Credentials("v", "q"))
    assert kc.prune([f"{HOST}", "registry-1.docker.io"]) == []
    assert kc.prune([HOST]) == ["docker.io"]
    assert CRIKeychain.open(str(tmp_path)).hosts() == {HOST}
    assert kc.prune([]) == [HOST]
    assert not (tmp_path / FILE_NAME).exists()


def test_restore_undoes_a_failed_pulls_credentials(tmp_path):
    kc = CRIKeychain.open(str(tmp_path))
    good, bad = Credentials("u", "good"), Credentials("u", "typo")
    kc.learn(HOST, good)
    kc.learn(HOST, bad)
    kc.restore(HOST, bad, good)
    assert CRIKeychain.open(str(tmp_path)).hosts() == {HOST}
    assert asyncio.run(kc.credentials(HOST)) == good
    kc.learn("new:1", bad)
    kc.restore("new:1", bad, None)
    assert kc.hosts() == {HOST}


def test_a_wide_or_damaged_file_is_narrowed_or_ignored(tmp_path, caplog):
    path = tmp_path / FILE_NAME
    doc = {"version": 1, "hosts": {HOST: {"username": "u", "password": "p"}}}
    path.write_text(json.dumps(doc))
    path.chmod(0o644)
    kc = CRIKeychain.open(str(tmp_path))
    assert kc.hosts() == {HOST}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    path.write_text('{"version": 1, "hosts": {"h": "secret-value-here"')
    kc = CRIKeychain.open(str(tmp_path))
    assert kc.hosts() == set()
    assert "damaged" in caplog.text and "secret-value-here" not in caplog.text
    path.write_text(json.dumps({**doc, "version": 99}))
    assert CRIKeychain.open(str(tmp_path)).hosts() == set()
