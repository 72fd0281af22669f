"""Credential sources outside the registry client (the daemon's CRI keychain) join every
authorizer that has a keychain, after it, and a change they announce is seen at once."""

from __future__ import annotations

import time

import pytest
from harness.faults import BearerAuth, Proxy

from stargz.remote import Credentials, StaticKeychain
from stargz.remote.auth import (
    Authorizer,
    add_credential_source,
    credentials_changed,
    remove_credential_source,
)

from .test_faults import client


@pytest.fixture
def source():
    """A registered source, unregistered after the test."""
    src = StaticKeychain()
    add_credential_source(src)
    yield src
    remove_credential_source(src)


async def _no_token(*args):
    raise AssertionError("no token fetch expected")


def test_a_source_is_asked_after_the_keychain_and_changes_are_seen_at_once(source, run):
    async def main():
        own = StaticKeychain({"a.test": Credentials("own", "1")})
        authz = Authorizer(own, _no_token)
        source.set("a.test", Credentials("cri", "2"))
        source.set("b.test", Credentials("cri", "3"))
        assert (await authz.credentials("a.test")).username == "own"  # the keychain first
        assert (await authz.credentials("b.test")).password == "3"
        assert await authz.credentials("c.test") is None  # cached as "none" for a while...
        source.set("c.test", Credentials("late", "4"))
        credentials_changed()  # ... until a source says it learned something
        assert (await authz.credentials("c.test")).username == "late"
        # an anonymous-only authorizer stays anonymous
        assert await Authorizer(None, _no_token).credentials("b.test") is None

    run(main)


def test_a_registry_token_is_sent_as_the_bearer_token_without_a_token_fetch(images, run, source):
    """CRI ``registry_token``: the registry's own bearer token, used as is."""
    auth = BearerAuth(user="bob", password="pw")
    token = "registry-token-for-test"
    auth.tokens[token] = time.monotonic() + 3600

    async def main():
        async with Proxy(images.registry.url, auth) as reg:
            source.set(reg.netloc, Credentials(registry_token=token))
            async with client(keychain=StaticKeychain()) as c:
                blob = await c.open_blob(f"{reg.netloc}/blobs", images.blob_digest)
                assert blob.size > 0
            assert auth.token_requests == []  # never asked the token endpoint
            assert auth.challenges >= 1
            sent = [r.headers.get("Authorization") for r in reg.requests("GET", "^/v2/.+")]
            assert f"Bearer {token}" in sent

    run(main)
