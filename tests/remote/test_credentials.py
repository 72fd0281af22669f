"""Credentials stay with the origin they are for, and URLs in logs and errors carry none.

Real sockets throughout: the registry behind the fault proxy on 127.0.0.1, and a second
listener on 127.0.0.2 (another host as far as origins go) that records every request it
gets, headers and body.
"""

from __future__ import annotations

import base64
import json
import logging
import ssl
import subprocess

import aiohttp
import pytest
from harness.faults import BearerAuth, Proxy, RedirectBlobs, RedirectToken, Storage, chain

from stargz.cli.daemon import JSONFormatter, TextFormatter
from stargz.errors import AuthError, RegistryError
from stargz.remote import Credentials, RegistryClient, StaticKeychain
from stargz.remote.redact import redact_text, redact_url

from .test_faults import FAST, client

OTHER_HOST = "127.0.0.2"
BASIC = "Basic " + base64.b64encode(b"bob:pw").decode()


def test_basic_credentials_do_not_follow_a_token_redirect_to_another_host(images, run):
    """The token endpoint on 127.0.0.1 answers 302 to 127.0.0.2: the second host gets the
    token request without ``Authorization: Basic`` (so it refuses, and the client says so)."""
    auth = BearerAuth(user="bob", password="pw")

    async def main():
        async with Proxy(images.registry.url, auth, host=OTHER_HOST) as other:
            redirect = RedirectToken(other)
            async with Proxy(images.registry.url, chain(redirect, auth)) as reg:
                kc = StaticKeychain({reg.netloc: Credentials("bob", "pw")})
                async with client(keychain=kc) as c:
                    with pytest.raises(AuthError, match="token request"):
                        await c.open_blob(f"{reg.netloc}/blobs", images.blob_digest)
                (first,) = reg.requests("GET", "^/token$")
                assert first.headers["Authorization"] == BASIC  # the realm's own origin
            assert redirect.redirects == 1
            assert other.seen, "the redirect was not followed"
            assert all("Authorization" not in s.headers for s in other.seen)

    run(main)


def test_basic_credentials_follow_a_token_redirect_on_the_same_origin(images, run):
    auth = BearerAuth(user="bob", password="pw")

    async def main():
        async with Proxy(images.registry.url) as reg:
            redirect = RedirectToken(reg)
            reg.hook = chain(redirect, auth)
            kc = StaticKeychain({reg.netloc: Credentials("bob", "pw")})
            async with client(keychain=kc) as c:
                b = await c.open_blob(f"{reg.netloc}/blobs", images.blob_digest)
                assert await b.read_at(5, 10) == images.blob[5:15]
            assert redirect.redirects == 1
            hops = [s for s in reg.requests("GET", "^/token$") if s.query.get("hop")]
            assert hops and hops[0].headers["Authorization"] == BASIC

    run(main)


@pytest.fixture(scope="module")
def tls_127(tmp_path_factory) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server, client) TLS contexts for a self-signed certificate of IP 127.0.0.1."""
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
        + ["-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1"]
        + ["-addext", "subjectAltName=IP:127.0.0.1"],
        check=True,
        capture_output=True,
    )
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert, key)
    return server, ssl.create_default_context(cafile=str(cert))


def test_basic_credentials_do_not_follow_a_token_redirect_from_https_to_http(images, run, tls_127):
    """The realm is https://127.0.0.1:T/token; it redirects to http://127.0.0.1:H/token (same
    host, another scheme and port): the plain-http listener gets no ``Authorization``."""
    server_tls, client_tls = tls_127
    auth = BearerAuth(user="bob", password="pw")

    async def main():
        async with Proxy(images.registry.url, auth) as plain:
            redirect = RedirectToken(plain)
            async with Proxy(images.registry.url, redirect, ssl_context=server_tls) as tls:
                auth.realm = f"{tls.url}/token"
                async with Proxy(images.registry.url, auth) as reg:
                    kc = StaticKeychain({reg.netloc: Credentials("bob", "pw")})
                    session = aiohttp.ClientSession(
                        connector=aiohttp.TCPConnector(ssl=client_tls), auto_decompress=False
                    )
                    async with session, client(keychain=kc, session=session) as c:
                        with pytest.raises(AuthError, match="token request"):
                            await c.open_blob(f"{reg.netloc}/blobs", images.blob_digest)
                (first,) = tls.requests("GET", "^/token$")
                assert first.headers["Authorization"] == BASIC  # over https, to the realm
            assert redirect.redirects == 1
            tokens = plain.requests("GET", "^/token$")
            assert tokens and all("Authorization" not in s.headers for s in tokens)

    run(main)


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_refresh_token_is_never_sent_to_another_host(images, run, docker_config, status):
    """A refresh-token POST redirected to 127.0.0.2: a 301/302/303 becomes a GET without
    the form, a 307/308 (which would re-send it) is refused with AuthError."""
    auth = BearerAuth(refresh_token="rt-secret-123")

    async def main():
        async with Proxy(images.registry.url, auth, host=OTHER_HOST) as other:
            async with Proxy(images.registry.url, chain(RedirectToken(other, status), auth)) as reg:
                docker_config({"auths": {reg.netloc: {"identitytoken": "rt-secret-123"}}})
                async with RegistryClient(blob=FAST) as c:
                    if status in (307, 308):
                        with pytest.raises(AuthError, match="not sent to another origin"):
                            await c.open_blob(f"{reg.netloc}/blobs", images.blob_digest)
                    else:  # the other host hands out an anonymous token: that may work
                        b = await c.open_blob(f"{reg.netloc}/blobs", images.blob_digest)
                        assert await b.read_at(0, 3) == images.blob[:3]
                (post,) = reg.requests("POST", "^/token$")
                assert b"rt-secret-123" in post.body
            for s in other.seen:
                assert s.method == "GET" and s.body == b"", (s.method, s.body)
                assert "rt-secret-123" not in json.dumps(s.query)
            assert bool(other.seen) == (status not in (307, 308))

    run(main)


def test_a_failing_pre_signed_storage_url_is_logged_without_its_signature(images, run, caplog):
    """The registry redirects blob reads to storage with ``?sig=...``; storage then goes
    away. The error (message and ``url``), the client's log lines and the daemon's
    formatted log lines (traceback included) show the storage URL without its query."""
    caplog.set_level(logging.DEBUG)

    async def main():
        storage = Proxy(images.registry.url, Storage())
        await storage.__aenter__()
        try:
            redirect = RedirectBlobs(storage)
            async with Proxy(images.registry.url, redirect) as reg:
                async with client(redirect_ttl=3600) as c:
                    b = await c.open_blob(f"{reg.netloc}/blobs", images.blob_digest)
                    sig = b.url.rpartition("sig=")[2]
                    assert len(sig) == 8 and b.url.startswith(storage.url)
                    await storage.__aexit__(None, None, None)
                    storage = None
                    with pytest.raises(RegistryError) as info:
                        await b.read_at(0, 100)
                    with pytest.raises(RegistryError):  # logs, then asks the registry again
                        await b.check()
                    return sig, info.value
        finally:
            if storage is not None:
                await storage.__aexit__(None, None, None)

    sig, err = run(main)
    assert "/store/" in str(err) or "/store/" in (err.url or ""), err
    assert sig not in str(err) and sig not in (err.url or "")
    assert "?REDACTED" in str(err)
    logged = caplog.text + "".join(str(r.args) for r in caplog.records)
    assert "check on" in logged
    assert sig not in logged
    rec = logging.getLogger("stargz.test").makeRecord(
        "stargz.test", logging.ERROR, __file__, 1, "read failed: %s", (err,), None
    )
    rec.exc_info = (type(err), err, err.__traceback__)
    for fmt in (JSONFormatter(), TextFormatter()):
        line = fmt.format(rec)
        assert sig not in line, line
    json.loads(JSONFormatter().format(rec))  # still one valid JSON object


def test_redact_url_and_text():
    url = "https://user:pw@storage.example:8443/b/o?X-Amz-Signature=abc&X-Amz-Credential=k#frag"
    assert redact_url(url) == "https://storage.example:8443/b/o?REDACTED"
    assert redact_url("http://h/p") == "http://h/p"
    text = f'GET {url}: Connection timeout to host {url} ("{url}")'
    out = redact_text(text)
    assert "abc" not in out and "pw" not in out and "Credential" not in out
    assert out.startswith("GET https://storage.example:8443/b/o?REDACTED: Connection")
    assert redact_text(json.dumps({"m": text})) == json.dumps({"m": out})
