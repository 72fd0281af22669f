"""TLS to registries: a private CA from the config, skip_verify, and clear handshake errors.

The registry is the real docker-registry behind a TLS-terminating proxy
(:class:`harness.faults.Proxy` with an SSL context) whose certificate the test makes with
the ``openssl`` CLI.
"""

from __future__ import annotations

import ssl

import pytest
from harness.faults import Proxy
from harness.registry_auth import issue_cert, make_ca

from stargz import config
from stargz.errors import RegistryError
from stargz.remote import RegistryClient, ResolverOptions, registry_hosts
from stargz.remote.manifest import Platform


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca = make_ca(d)
    good = issue_cert(ca, d, "good", san="IP:127.0.0.1")
    wrong = issue_cert(ca, d, "wrong", san="DNS:not-this.invalid")
    return ca, good, wrong


def _server_ctx(pair) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(pair.cert, pair.key)
    return ctx


def _resolver(host: str, **entry) -> ResolverOptions:
    table = {"host": {host: {"mirrors": [{"host": f"https://{host}", **entry}]}}}
    return ResolverOptions.from_config(config.parse({"resolver": table}).resolver)


def _client(resolver: ResolverOptions) -> RegistryClient:
    return RegistryClient(resolver=resolver, keychain=None, platform=Platform("linux", "amd64"))


def test_the_registry_itself_over_https_replaces_the_plain_http_default(pki):
    ca, _, _ = pki
    hosts = registry_hosts("127.0.0.1:5000", _resolver("127.0.0.1:5000", ca=str(ca.cert)))
    assert [(h.netloc, h.scheme, h.is_mirror, h.ca) for h in hosts] == [
        ("127.0.0.1:5000", "https", False, (str(ca.cert),))
    ]
    (h,) = registry_hosts("r.io:5000", _resolver("r.io:5000", skip_verify=True, ca=[]))
    assert (h.scheme, h.skip_verify, h.ca) == ("https", True, ())


def test_a_missing_ca_file_is_refused_when_the_config_is_read(tmp_path):
    """One line naming the key (the daemon exits 2 with it)."""
    with pytest.raises(config.ConfigError) as e:
        _resolver("r.io", ca=[str(tmp_path / "nope.pem")])
    assert e.value.key == 'resolver.host."r.io".mirrors[0].ca'
    assert str(e.value) == (
        f'key "resolver.host."r.io".mirrors[0].ca" names '
        f"'{tmp_path / 'nope.pem'}', which is not a file"
    )


def test_ca_from_the_config_verifies_the_registry(pki, images, run):
    ca, good, _ = pki

    async def main():
        async with Proxy(images.registry.url, ssl_context=_server_ctx(good)) as front:
            async with _client(_resolver(front.netloc, ca=[str(ca.cert)])) as c:
                b = await c.open_blob(f"{front.netloc}/blobs", images.blob_digest)
                assert b.url.startswith("https://")
                assert await b.read_at(10, 20) == images.blob[10:30]
            assert front.requests("GET", "/blobs/")

    run(main)


@pytest.mark.parametrize(
    "cert, entry, problem",
    [
        ("wrong", {"ca": "CA"}, "IP address mismatch"),
        ("good", {}, "unable to get local issuer certificate"),
    ],
    ids=["wrong-host", "unknown-ca"],
)
def test_a_certificate_that_does_not_verify_is_a_clear_final_error(
    cert, entry, problem, pki, images, run
):
    ca, good, wrong = pki
    entry = {k: str(ca.cert) if v == "CA" else v for k, v in entry.items()}

    async def main():
        pair = good if cert == "good" else wrong
        async with Proxy(images.registry.url, ssl_context=_server_ctx(pair)) as front:
            async with _client(_resolver(front.netloc, **entry)) as c:
                with pytest.raises(RegistryError) as e:
                    await c.open_blob(f"{front.netloc}/blobs", images.blob_digest)
                assert c.stats.retries == 0  # a handshake failure is not retried
            msg = str(e.value)
            assert f"TLS handshake with {front.netloc} failed: certificate verify failed" in msg
            assert problem in msg

    run(main)


def test_skip_verify_accepts_any_certificate(pki, images, run):
    _, _, wrong = pki

    async def main():
        async with Proxy(images.registry.url, ssl_context=_server_ctx(wrong)) as front:
            async with _client(_resolver(front.netloc, skip_verify=True)) as c:
                b = await c.open_blob(f"{front.netloc}/blobs", images.blob_digest)
                assert await b.read_at(0, 16) == images.blob[:16]

    run(main)


def test_plain_http_server_named_as_https_is_a_tls_error(images, run):
    """``https://`` for a server that speaks plain http: the error says TLS failed."""

    async def main():
        async with Proxy(images.registry.url) as plain:
            async with _client(_resolver(plain.netloc)) as c:
                with pytest.raises(RegistryError, match="TLS handshake with .* failed"):
                    await c.open_blob(f"{plain.netloc}/blobs", images.blob_digest)

    run(main)


def test_plain_http_to_a_tls_registry_says_it_speaks_https(pki, run):
    """A loopback registry is plain http by default; when it serves https only (a real
    docker-registry with ``http.tls``), the 400 it answers is named for what it is."""
    from harness.procs import Registry

    _, good, _ = pki
    reg = Registry.start(tls=(good.cert, good.key))
    try:

        async def main():
            async with _client(ResolverOptions()) as c:
                with pytest.raises(RegistryError, match="speaks https"):
                    await c.open_blob(f"{reg.host}/blobs", "sha256:" + "0" * 64)

        run(main)
    finally:
        reg.close()
