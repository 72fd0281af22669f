"""Lazy pulls from private registries: TLS with a private CA, basic auth (htpasswd) and
bearer tokens (``auth: token``), end to end.

Real docker-registry processes serve https (certificates made by the test with the
``openssl`` CLI) and check credentials themselves; real containerd and Go's ``ctr-remote i
rpull`` pull; our daemon mounts the layers lazily, with credentials from a docker config
file (``$DOCKER_CONFIG``) and CAs from its ``[resolver]`` config. The merged tree is
compared with the ground truth. The one fake is the token issuer in front of the
registry's ``auth: token`` (docker-registry checks tokens but does not issue them).

A problem the daemon can't get past (a certificate that does not match, refused
credentials) is logged naming it, and the layer is unpacked by containerd instead: the
image still pulls, with the same tree.
"""

from __future__ import annotations

import shutil
import ssl
import time
from pathlib import Path

import pytest
from harness import Containerd, Registry, StargzDaemon, make_tempdir, mounted_image, run
from harness.faults import ProxyThread
from harness.procs import TokenAuth, tree_listing
from harness.registry_auth import (
    KeyPair,
    TokenIssuer,
    docker_config,
    htpasswd_file,
    issue_cert,
    make_ca,
)

from .test_lazy import assert_lazily_mounted, ground_truth, layers_of, prepared_flags

pytestmark = [pytest.mark.e2e, pytest.mark.interop, pytest.mark.timeout(240)]

NS = "lazy"
TAG = "esgz"
USER, PASSWORD = "alice", "wonderland-7"
#: Test config: no background fetch (every byte read comes from an on-demand fetch), the
#: read path measured in the daemon (no passthrough), a short per-request timeout.
BASE_CONFIG = """no_background_fetch = true
[fuse]
passthrough = false
[resolver]
request_timeout_sec = 10
"""


class PKI:
    """A CA, a certificate for 127.0.0.1 from it, one for another host name from it, and
    one for 127.0.0.1 from a CA nobody trusts."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.ca = make_ca(workdir / "ca")
        self.server = issue_cert(self.ca, workdir / "ca", "server", san="IP:127.0.0.1")
        self.wrong_host = issue_cert(self.ca, workdir / "ca", "wrong", san="DNS:not-this.invalid")
        self.other_ca = make_ca(workdir / "other", "other-ca")
        self.untrusted = issue_cert(self.other_ca, workdir / "other", "server", san="IP:127.0.0.1")


@pytest.fixture(scope="module")
def pki(e2e_host: None) -> PKI:
    d = make_tempdir("sgz-pki-")
    yield PKI(d)
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def registries(e2e_host: None):
    """``start(**Registry.start options)``: registries stopped at teardown."""
    started: list[Registry] = []

    def start(**kw: object) -> Registry:
        reg = Registry.start(access_log=True, **kw)  # type: ignore[arg-type]
        started.append(reg)
        return reg

    yield start
    for reg in started:
        reg.close()


def tls_config(host: str, ca: Path, *extra: str) -> str:
    """The registry ``host`` over https with ``ca`` trusted (an entry naming the registry
    itself: it replaces the plain-http default a loopback address gets)."""
    lines = "\n".join(extra)
    return (
        BASE_CONFIG + f'[[resolver.host."{host}".mirrors]]\nhost = "https://{host}"\n'
        f'ca = ["{ca}"]\n{lines}\n'
    )


def tls_flags(c: Containerd, reg: Registry, *, ca: Path | None = None) -> list[str]:
    """``rpull`` flags to reach ``reg`` over https: containerd, like us, talks plain http
    to a loopback address unless a ``hosts.toml`` names an https server (with ``ca``, else
    without verification)."""
    d = Path(c.workdir) / "hosts.d"
    (d / reg.host).mkdir(parents=True, exist_ok=True)
    trust = f'ca = "{ca}"' if ca else "skip_verify = true"
    (d / reg.host / "hosts.toml").write_text(
        f'server = "https://{reg.host}"\n[host."https://{reg.host}"]\n'
        f'  capabilities = ["pull", "resolve"]\n  {trust}\n'
    )
    return ["--hosts-dir", str(d)]


def rpull(c: Containerd, ref: str, *flags: str) -> float:
    """``ctr-remote i rpull`` with ``flags`` (TLS, credentials); returns its seconds."""
    t0 = time.monotonic()
    run(["ctr-remote", "-a", c.address, "-n", NS, "images", "rpull", *flags, ref], timeout=180)
    return time.monotonic() - t0


def our_requests(reg: Registry, digest: str) -> list:
    return [r for r in reg.blob_requests(digest) if r.agent.startswith(OUR_AGENT)]


OUR_AGENT = "stargz-snapshotter-py"
#: Files of an eStargz layer that a lazy mount hides and a plain unpack shows.
ESTARGZ_ONLY = {".no.prefetch.landmark", ".prefetch.landmark", "stargz.index.json"}


def unpacked_listing(root: Path) -> dict:
    """The tree as containerd unpacked it, without the eStargz bookkeeping files."""
    got = tree_listing(root)
    got["entries"] = {k: v for k, v in got["entries"].items() if k not in ESTARGZ_ONLY}
    return got


def assert_lazy_pull_reads_ground_truth(
    sd: StargzDaemon, c: Containerd, reg: Registry, ref: str, shared: Path
) -> None:
    """Every layer FUSE-mounted by our daemon (none unpacked), our daemon fetched them from
    ``reg`` (its access log), and the merged tree, read through FUSE, is the ground truth."""
    layers = layers_of(shared / "fixtures" / "oci-corners", TAG)
    assert_lazily_mounted(sd, c, layers)
    with mounted_image(c, ref, NS) as root:
        assert tree_listing(root) == ground_truth(shared)
    for d in layers:  # (a 401 is the challenge that asks for credentials)
        got = our_requests(reg, d["digest"])
        assert any(r.status == 206 for r in got), got
        assert all(r.status in (200, 206, 401) for r in got), got


def refusals(sd: StargzDaemon) -> list[str]:
    """The errors of the layers the daemon refused to mount (containerd unpacks them)."""
    return [
        str(r.get("error"))
        for r in sd.log_records()
        if r.get("remote-snapshot-prepared") == "false"
    ]


def assert_unpacked_instead(sd: StargzDaemon, c: Containerd, ref: str, shared: Path) -> None:
    """Nothing mounted lazily, containerd has the layer blobs (it unpacked them), and the
    tree is still the ground truth."""
    layers = layers_of(shared / "fixtures" / "oci-corners", TAG)
    assert prepared_flags(sd) == ["false"] * len(layers), sd.log_text()[-3000:]
    content = set(c.ctr("content", "ls", "-q", ns=NS).stdout.split())
    assert {d["digest"] for d in layers} <= content
    with mounted_image(c, ref, NS) as root:
        assert unpacked_listing(root) == ground_truth(shared)
    assert sd.alive()


# --- TLS ------------------------------------------------------------------------------------


def test_tls_registry_with_the_ca_configured_is_pulled_lazily(
    pki, registries, lazy_stack, shared, tmp_path
):
    """docker-registry serving https with a certificate for 127.0.0.1 from the test's CA;
    the daemon's config names the registry as ``https://`` with ``ca = [<the CA>]``: every
    layer is mounted lazily, our daemon's range GETs reached the registry over TLS, and the
    tree read through FUSE equals the ground truth."""
    reg = registries(tls=(pki.server.cert, pki.server.key))
    ref = reg.push_oci(shared / "fixtures" / "oci-corners", TAG, f"corners:{TAG}")
    sd, c = lazy_stack(tls_config(reg.host, pki.ca.cert))
    rpull(c, ref, *tls_flags(c, reg, ca=pki.ca.cert))
    assert_lazy_pull_reads_ground_truth(sd, c, reg, ref, shared)


@pytest.mark.parametrize(
    "cert, problem",
    [
        ("wrong_host", "IP address mismatch"),
        ("untrusted", "unable to get local issuer certificate"),
    ],
)
def test_tls_certificate_that_does_not_verify_is_named_and_unpacked_instead(
    cert, problem, pki, registries, lazy_stack, shared, tmp_path
):
    """The registry's certificate is for another host name (from the trusted CA), or for
    127.0.0.1 from a CA the daemon was not told about: each layer's refusal names the TLS
    handshake and the verification failure, containerd downloads and unpacks the layers
    (its ``hosts.toml`` skips verification), the tree is the ground truth, and the pull takes
    seconds, not a timeout."""
    pair: KeyPair = getattr(pki, cert)
    reg = registries(tls=(pair.cert, pair.key))
    ref = reg.push_oci(shared / "fixtures" / "oci-corners", TAG, f"corners:{TAG}")
    sd, c = lazy_stack(tls_config(reg.host, pki.ca.cert))
    took = rpull(c, ref, *tls_flags(c, reg))
    errors = refusals(sd)
    assert errors and all("TLS handshake" in e and problem in e for e in errors), errors
    assert all("certificate verify failed" in e for e in errors), errors
    assert took < 60, took
    assert_unpacked_instead(sd, c, ref, shared)


def test_skip_verify_accepts_a_certificate_for_another_host(
    pki, registries, lazy_stack, shared, tmp_path
):
    """``skip_verify = true`` on the entry: the certificate for another host name is
    accepted and the layers are mounted lazily (the chunk digests still guard every byte:
    the tree is the ground truth)."""
    reg = registries(tls=(pki.wrong_host.cert, pki.wrong_host.key))
    ref = reg.push_oci(shared / "fixtures" / "oci-corners", TAG, f"corners:{TAG}")
    sd, c = lazy_stack(
        BASE_CONFIG + f'[[resolver.host."{reg.host}".mirrors]]\nhost = "https://{reg.host}"\n'
        "skip_verify = true\n"
    )
    rpull(c, ref, *tls_flags(c, reg))
    assert_lazy_pull_reads_ground_truth(sd, c, reg, ref, shared)


# --- basic auth ---------------------------------------------------------------------------


def _htpasswd_registry(pki: PKI, registries, tls: bool) -> Registry:
    hp = htpasswd_file(pki.workdir / "htpasswd", {USER: PASSWORD})
    reg = registries(tls=(pki.server.cert, pki.server.key) if tls else None, htpasswd=hp)
    reg.credentials = (USER, PASSWORD)
    return reg


@pytest.mark.parametrize("tls", [True, False], ids=["https", "http"])
def test_basic_auth_credentials_from_the_docker_config(
    tls, pki, registries, lazy_stack, shared, tmp_path
):
    """An htpasswd-protected registry (over https, and over plain http); the daemon reads
    the user's password from ``$DOCKER_CONFIG/config.json`` (``auths``, as ``docker
    login`` writes it): every layer mounted lazily, the tree is the ground truth."""
    reg = _htpasswd_registry(pki, registries, tls)
    ref = reg.push_oci(shared / "fixtures" / "oci-corners", TAG, f"corners:{TAG}")
    cfg_dir = docker_config(tmp_path / "docker", reg.host, USER, PASSWORD)
    config = tls_config(reg.host, pki.ca.cert) if tls else BASE_CONFIG
    sd, c = lazy_stack(config, env={"DOCKER_CONFIG": str(cfg_dir)})
    flags = tls_flags(c, reg, ca=pki.ca.cert) if tls else ["--plain-http"]
    rpull(c, ref, *flags, "--user", f"{USER}:{PASSWORD}")
    assert_lazy_pull_reads_ground_truth(sd, c, reg, ref, shared)


@pytest.mark.parametrize("tls", [True, False], ids=["https", "http"])
def test_wrong_credentials_are_named_and_unpacked_instead(
    tls, pki, registries, lazy_stack, shared, tmp_path
):
    """The docker config holds a wrong password: each refusal names the registry's 401,
    containerd (``rpull --user`` with the right one) unpacks the layers, the tree is the
    ground truth, and nothing hangs."""
    reg = _htpasswd_registry(pki, registries, tls)
    ref = reg.push_oci(shared / "fixtures" / "oci-corners", TAG, f"corners:{TAG}")
    cfg_dir = docker_config(tmp_path / "docker", reg.host, USER, "not-the-password")
    config = tls_config(reg.host, pki.ca.cert) if tls else BASE_CONFIG
    sd, c = lazy_stack(config, env={"DOCKER_CONFIG": str(cfg_dir)})
    flags = tls_flags(c, reg, ca=pki.ca.cert) if tls else ["--plain-http"]
    took = rpull(c, ref, *flags, "--user", f"{USER}:{PASSWORD}")
    errors = refusals(sd)
    assert errors and all("401" in e for e in errors), errors
    assert took < 60, took
    assert_unpacked_instead(sd, c, ref, shared)


# --- bearer tokens ------------------------------------------------------------------------


@pytest.fixture(params=[False, True], ids=["http", "https"])
def token_registry(request, pki, registries):
    """A registry with ``auth: token`` whose tokens come from a :class:`TokenIssuer` that
    wants USER:PASSWORD; both over plain http, or both over https with certificates from
    the test's CA (the realm on a port of its own); yields (registry, issuer)."""
    tls = request.param
    server_tls = None
    if tls:
        server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_tls.load_cert_chain(pki.server.cert, pki.server.key)
    with ProxyThread() as pt:
        issuer = TokenIssuer.create(pki.workdir / "token", {USER: PASSWORD})
        # answers /token itself (the upstream is never asked)
        realm = pt.start("http://127.0.0.1:9", issuer, ssl_context=server_tls)
        reg = registries(
            tls=(pki.server.cert, pki.server.key) if tls else None,
            token=TokenAuth(f"{realm.url}/token", issuer.service, issuer.issuer, issuer.cert),
        )
        yield reg, issuer


def _token_setup(reg: Registry, pki: PKI, c: Containerd | None = None) -> str | list[str]:
    """The daemon config for ``reg`` (c None), or ``rpull``'s flags to reach it."""
    https = reg.scheme == "https"
    if c is None:
        return tls_config(reg.host, pki.ca.cert) if https else BASE_CONFIG
    return tls_flags(c, reg, ca=pki.ca.cert) if https else ["--plain-http"]


def _push_with_token(reg: Registry, shared: Path) -> str:
    # skopeo gets its push token from the same issuer: give it push rights too
    reg.credentials = (USER, PASSWORD)
    return reg.push_oci(shared / "fixtures" / "oci-corners", TAG, f"corners:{TAG}")


def test_bearer_token_expiring_mid_run_is_refreshed(
    token_registry, pki, lazy_stack, shared, tmp_path
):
    """``auth: token``: the daemon gets a token from the realm with the docker config's
    credentials and mounts every layer lazily (over https, the realm is trusted through
    the CA configured for the registry). The issuer says tokens live 300 s but they
    die after 8: the tree read after that (every file's bytes fetched then, no background
    fetch) gets 401s, and the daemon fetches a new token and reads on: the tree is the
    ground truth, more tokens were issued to our daemon after the first died, and no read
    failed."""
    reg, issuer = token_registry
    ref = _push_with_token(reg, shared)
    issuer.lifetime, issuer.expires_in = 8, 300
    cfg_dir = docker_config(tmp_path / "docker", reg.host, USER, PASSWORD)
    sd, c = lazy_stack(_token_setup(reg, pki), env={"DOCKER_CONFIG": str(cfg_dir)})

    def ours() -> int:
        return sum(agent.startswith(OUR_AGENT) for agent, _ in issuer.issued)

    rpull(c, ref, *_token_setup(reg, pki, c), "--user", f"{USER}:{PASSWORD}")
    layers = layers_of(shared / "fixtures" / "oci-corners", TAG)
    assert_lazily_mounted(sd, c, layers)
    at_pull = ours()
    assert at_pull >= 1

    def refused_ours() -> int:  # 401s the registry answered our daemon
        return sum(r.status == 401 for d in layers for r in our_requests(reg, d["digest"]))

    refused_at_pull = refused_ours()
    time.sleep(issuer.lifetime + 1)
    with mounted_image(c, ref, NS) as root:
        assert tree_listing(root) == ground_truth(shared)
    assert ours() > at_pull, issuer.issued
    assert not [a for a in issuer.refused if a.startswith(OUR_AGENT)], issuer.refused
    # the registry refused the dead token to our daemon, which then got a new one
    assert refused_ours() > refused_at_pull, "the token never expired mid-run"
    bad = [r for r in sd.log_records() if r["level"] in ("error", "critical")]
    assert not bad, bad


def test_bearer_token_refused_credentials_are_named_and_unpacked_instead(
    token_registry, pki, lazy_stack, shared, tmp_path
):
    """The docker config's password is wrong: the token realm answers 401, each refusal
    names it, containerd unpacks the layers, the tree is the ground truth."""
    reg, issuer = token_registry
    ref = _push_with_token(reg, shared)
    cfg_dir = docker_config(tmp_path / "docker", reg.host, USER, "not-the-password")
    sd, c = lazy_stack(_token_setup(reg, pki), env={"DOCKER_CONFIG": str(cfg_dir)})
    rpull(c, ref, *_token_setup(reg, pki, c), "--user", f"{USER}:{PASSWORD}")
    errors = refusals(sd)
    assert errors and all("401" in e and "token" in e for e in errors), errors
    assert [a for a in issuer.refused if a.startswith(OUR_AGENT)]
    assert_unpacked_instead(sd, c, ref, shared)
