"""``stargz rpull`` made by the running daemon (``stargz.v1.Pull``), end to end: real
containerd 1.6, docker-registry and our daemon. The pulls themselves (lazy, unpacked, Go's
image record) run over both paths in tests/e2e/test_rpull.py; here: what is particular to
asking the daemon. Its fallback to the in-process pull (no socket; a server that does not
serve the service), bad input answered as one line with no image record left, and
``--user`` credentials that serve one pull and are not kept by the daemon, and the
daemon's one registry client shared by the pull and the layer mounts that follow, and a
client killed mid-pull stopping the daemon's pull.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest
from aiohttp import web
from harness import (
    Containerd,
    Registry,
    StargzDaemon,
    free_port,
    mounted_image,
    run,
    tree_listing,
)
from harness.faults import BasicAuth, Body, Proxy, ProxyThread
from harness.oci import index_image
from harness.procs import REPO, TokenAuth
from harness.registry_auth import TokenIssuer, docker_config

from e2e.test_lazy import NO_BACKGROUND, assert_quiet_log, ground_truth, layers_of
from e2e.test_rpull import (
    NS,
    SNAP,
    assert_remote_snapshots,
    daemon_pulls,
    images,
    layer_lines,
    one_line_error,
    snapshots,
    stargz_rpull,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]


def rpull_at(c: Containerd, daemon_address: str, ref: str, *flags: str, check: bool = True):
    """``stargz rpull`` told to ask the daemon at ``daemon_address`` (which may be absent)."""
    return stargz_rpull(c.address, ref, *flags, daemon=daemon_address, check=check)


def no_leftovers(c: Containerd) -> None:
    """A failed pull leaves no image record and no lease."""
    assert images(c) == []
    assert c.ctr("leases", "ls", "-q", ns=NS).stdout.split() == []


# --- falling back to the in-process pull ---------------------------------------------


def test_no_daemon_socket_falls_back_to_the_in_process_pull(registry, lazy_stack, shared, tmp_path):
    """Nothing at ``--daemon-address``: one line on stderr says so, the pull runs in the
    command's own process (the daemon logs no pull of its own) and is complete: both
    ``oci-corners`` eStargz layers remote snapshots, the merged tree the ground truth.
    With ``-q`` the note is not printed either."""
    sd, c = lazy_stack(NO_BACKGROUND)
    layout = shared / "fixtures" / "oci-corners"
    ref = registry.push_oci(layout, "esgz", "fallback:esgz")
    absent = tmp_path / "no-daemon.sock"
    p = rpull_at(c, str(absent), ref)
    assert p.stderr.splitlines() == [
        f"stargz: cannot reach the stargz daemon at {absent}: no such socket "
        "(is the stargz daemon running?); pulling in this process"
    ], p.stderr
    assert layer_lines(p.stdout) == ["remote snapshot (lazy)"] * 2, p.stdout
    assert daemon_pulls(sd) == []
    assert_remote_snapshots(sd, c, layers_of(layout, "esgz"))
    with mounted_image(c, ref, NS) as root:
        assert tree_listing(root) == ground_truth(shared)
    quiet = rpull_at(c, str(absent), ref, "-q")
    assert quiet.stdout == "" and quiet.stderr == "", quiet
    assert_quiet_log(sd)


def test_a_server_without_the_pull_service_falls_back(registry, lazy_stack, shared):
    """A gRPC server at ``--daemon-address`` that does not serve ``stargz.v1.Pull``
    (containerd's own socket: it answers UNIMPLEMENTED, as a daemon older than the
    command would): the command says so and pulls in its own process."""
    sd, c = lazy_stack(NO_BACKGROUND)
    ref = registry.push_oci(shared / "fixtures" / "oci-busybox", "esgz", "older:esgz")
    p = rpull_at(c, c.address, ref)
    assert p.stderr.splitlines() == [
        f"stargz: the stargz daemon at {c.address} does not serve stargz.v1.Pull "
        "(a daemon older than this tool?); pulling in this process"
    ], p.stderr
    assert layer_lines(p.stdout) == ["remote snapshot (lazy)"], p.stdout
    assert daemon_pulls(sd) == []
    out = c.ctr("run", "--rm", *SNAP, ref, "older", "cat", "/etc/greeting", ns=NS).stdout
    assert out == "hi\n"


# --- bad input through the daemon ------------------------------------------------------


def test_bad_input_through_the_daemon_is_one_line_and_leaves_nothing(
    stargz_daemon, containerd, registry, shared, tmp_path
):
    """Each failure the daemon meets is the command's one line on stderr and exit status
    1 (the daemon's status message, without gRPC's wrapping), leaves no image record and
    no lease, and does not disturb the daemon: a good pull through it works afterwards."""
    sd, c = stargz_daemon, containerd
    layout = index_image(
        tmp_path / "multi",
        "1",
        [
            (shared / "fixtures" / "oci-corners", "orig", "linux/amd64"),
            (shared / "fixtures" / "oci-busybox", "1", "linux/arm64"),
        ],
    )
    multi = registry.push_oci(layout, "1", "bad-multi:1", all_platforms=True)
    port = free_port()  # nothing listens there
    gone = tmp_path / "containerd.sock"
    cases = [
        # (what, argv after the flags, what the line must say)
        (
            "unreachable registry",
            [f"127.0.0.1:{port}/app:1"],
            [f"127.0.0.1:{port}", "retries"],
        ),
        (
            "no containerd socket",
            ["-a", str(gone), multi],
            [f"cannot reach containerd at {gone}: no such socket (is containerd running?)"],
        ),
        (
            "platform not in the index",
            ["--platform", "linux/s390x", multi],
            ["no manifest for platform linux/s390x", "linux/amd64, linux/arm64"],
        ),
        ("malformed platform", ["--platform", "linux", multi], ["want os/arch"]),
        ("unknown tag", [registry.ref("bad-multi:nope")], ["404", "MANIFEST_UNKNOWN"]),
        ("bad reference", ["reg:5000/Upper:1"], ["must be lowercase"]),
    ]
    for what, argv, wants in cases:
        p = subprocess.run(
            [*_argv(c, sd), *argv],
            capture_output=True,
            text=True,
            timeout=120,
            env=_env(),
        )
        msg = one_line_error(p)
        for want in wants:
            assert want in msg, (what, msg)
        assert not msg.endswith((": unavailable", ": not found", ": invalid argument")), msg
        no_leftovers(c)
    assert daemon_pulls(sd) == []
    stargz_rpull(c.address, multi, daemon=sd)
    assert len(images(c)) == 1 and len(daemon_pulls(sd)) == 1


def _argv(c: Containerd, sd: StargzDaemon) -> list[str]:
    return [
        *(sys.executable, "-m", "stargz.cli.main", "rpull"),
        *("-a", c.address, "-n", NS, "--daemon-address", sd.address),
    ]


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO / "src"))


# --- credentials ------------------------------------------------------------------------


@pytest.mark.parametrize("lazy", [False, True], ids=["no-lazy", "lazy"])
def test_user_credentials_serve_one_pull_and_are_not_kept(lazy, lazy_stack, registry, shared):
    """A registry behind HTTP basic auth (a proxy in front of the real one), and a daemon
    with no credentials of its own: through the daemon, no ``--user`` is one line naming
    the 401; ``--user USER:PASSWORD`` pulls (the daemon used them; with lazy pulling on,
    in a registry client made for the pull beside the one of the layer mounts, which has
    no credentials: the layer is refused there and unpacked); the same pull without
    ``--user`` right after is refused again: the daemon kept nothing."""
    sd, c = lazy_stack(NO_BACKGROUND) if lazy else lazy_stack(extra_args=("--no-lazy",))
    registry.push_oci(shared / "fixtures" / "oci-busybox", "1", "private-d:1")
    with ProxyThread() as pt:
        proxy = pt.start(f"http://{registry.host}", BasicAuth("alice", "s3cret"))
        gated = f"{proxy.netloc}/private-d:1"
        assert "401" in one_line_error(stargz_rpull(c.address, gated, daemon=sd, check=False))
        p = stargz_rpull(c.address, gated, "--user", "alice:s3cret", daemon=sd)
        assert layer_lines(p.stdout) == [
            f"unpacked ({layers_of(shared / 'fixtures' / 'oci-busybox', '1')[0]['size']} "
            "bytes fetched)"
        ]
        again = stargz_rpull(c.address, gated, daemon=sd, check=False)
        assert "401" in one_line_error(again)
    assert len(daemon_pulls(sd)) == 1
    out = c.ctr("run", "--rm", *SNAP, gated, "auth-d", "cat", "/etc/greeting", ns=NS)
    assert out.stdout == "hi\n"
    assert "s3cret" not in sd.log_text()


# --- one registry client for the pull and the mounts ---------------------------------------


@pytest.mark.parametrize("path", ["daemon", "in-process"])
def test_the_pull_and_the_layer_mounts_share_one_token(path, lazy_stack, shared, tmp_path):
    """A registry with ``auth: token`` (docker-registry checks tokens; a token issuer in
    front answers ``/token``), credentials in the docker config of both the daemon and the
    command. Pulled by the daemon, the manifest and config fetch and both layer mounts
    use the daemon's registry client: one token is issued for the whole pull. Pulled in
    the command's process, that process gets a token of its own, then the daemon another."""
    user, password = "alice", "wonderland-7"
    with ProxyThread() as pt:
        issuer = TokenIssuer.create(tmp_path / "token", {user: password})
        realm = pt.start("http://127.0.0.1:9", issuer)  # answers /token itself
        reg = Registry.start(
            token=TokenAuth(f"{realm.url}/token", issuer.service, issuer.issuer, issuer.cert)
        )
        try:
            reg.credentials = (user, password)  # skopeo's push
            layout = shared / "fixtures" / "oci-corners"
            ref = reg.push_oci(layout, "esgz", "tokens:esgz")
            pushed = len(issuer.issued)
            cfg = docker_config(tmp_path / "docker", reg.host, user, password)
            sd, c = lazy_stack(NO_BACKGROUND, env={"DOCKER_CONFIG": str(cfg)})
            daemon = sd if path == "daemon" else None
            p = run(
                [
                    *(sys.executable, "-m", "stargz.cli.main", "rpull", "-a", c.address),
                    *("-n", NS, *(["--daemon-address", sd.address] if daemon else [])),
                    *([] if daemon else ["--in-process"]),
                    ref,
                ],
                env=dict(_env(), DOCKER_CONFIG=str(cfg)),
                timeout=120,
            )
            assert layer_lines(p.stdout) == ["remote snapshot (lazy)"] * 2, p.stdout
            assert_remote_snapshots(sd, c, layers_of(layout, "esgz"))
            with mounted_image(c, ref, NS) as root:
                assert tree_listing(root) == ground_truth(shared)
            ours = [a for a, _ in issuer.issued[pushed:]]
            assert len(ours) == (1 if daemon else 2), issuer.issued[pushed:]
            # the daemon's pull opened the first layer before containerd asked for it
            assert ("layer opened ahead of its mount" in sd.log_text()) == bool(daemon)
            assert issuer.refused == []
        finally:
            reg.close()


def test_a_pull_into_another_snapshotter_opens_nothing_ahead(registry, lazy_stack, shared):
    """The daemon makes a pull into containerd's overlayfs snapshotter: no layer of it is
    opened here ahead of a mount that will never come (its prefetch would be downloaded
    for nothing); the layers are unpacked by containerd as usual. The same image pulled
    into our snapshotter is opened ahead."""
    sd, c = lazy_stack(NO_BACKGROUND)
    layout = shared / "fixtures" / "oci-corners"
    ref = registry.push_oci(layout, "esgz", "elsewhere:esgz")
    p = rpull_at(c, sd.address, ref, "--snapshotter", "overlayfs")
    assert [line.split(" (")[0] for line in layer_lines(p.stdout)] == ["unpacked"] * 2, p.stdout
    assert "opened ahead of its mount" not in sd.log_text()
    assert "cannot open a layer ahead" not in sd.log_text()
    rpull_at(c, sd.address, ref)
    assert "layer opened ahead of its mount" in sd.log_text()


# --- a client that goes away ------------------------------------------------------------


@dataclass
class StallFirstGet:
    """The first GET of blob ``digest``: half its body, then ``seconds`` of silence."""

    digest: str
    seconds: float
    stalled: int = 0

    async def __call__(self, proxy: Proxy, request: web.Request) -> web.StreamResponse | None:
        if request.method == "GET" and request.path.endswith(self.digest) and not self.stalled:
            self.stalled += 1
            return await Body("stall", self.seconds)(proxy, request)
        return None


def _wait(what: str, cond, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_a_client_killed_mid_pull_stops_the_daemons_pull(
    sig, stargz_daemon, containerd, registry, shared
):
    """``stargz rpull`` killed (SIGKILL), or interrupted (SIGINT, Ctrl-C: exit status 130
    at once), while the daemon downloads a plain layer (the registry stalls it): the
    daemon's pull is cancelled, and cleans up as a failed pull does: no lease, no
    extraction snapshot, no image record. The daemon keeps serving: the same pull made
    again completes and the image runs."""
    sd, c = stargz_daemon, containerd
    registry.push_oci(shared / "fixtures" / "oci-busybox", "1", "killed:1")
    (layer,) = layers_of(shared / "fixtures" / "oci-busybox", "1")
    hook = StallFirstGet(layer["digest"], seconds=30)
    with ProxyThread() as pt:
        proxy = pt.start(f"http://{registry.host}", hook)
        stalled = f"{proxy.netloc}/killed:1"
        client = subprocess.Popen(
            [*_argv(c, sd), stalled],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=_env(),
        )
        try:
            _wait("the layer download", lambda: hook.stalled == 1)
            assert c.ctr("leases", "ls", "-q", ns=NS).stdout.split() != []  # the pull's
            client.send_signal(sig)
            code = client.wait(10)
            assert code == (130 if sig == signal.SIGINT else -signal.SIGKILL), code
        finally:
            client.kill()
            client.wait(30)
        _wait("the lease to go", lambda: c.ctr("leases", "ls", "-q", ns=NS).stdout.split() == [])
        _wait("the extraction snapshot to go", lambda: snapshots(c) == [])
        assert images(c) == []
        assert daemon_pulls(sd) == []
        out = stargz_rpull(c.address, stalled, daemon=sd).stdout
        assert layer_lines(out) == [f"unpacked ({layer['size']} bytes fetched)"], out
    run_out = c.ctr("run", "--rm", *SNAP, stalled, "killed", "cat", "/etc/greeting", ns=NS)
    assert run_out.stdout == "hi\n"
    assert_quiet_log(sd)  # a cancelled pull is no error of the daemon's


def test_a_daemon_killed_mid_pull_is_one_line_naming_it(
    stargz_daemon, containerd, registry, shared
):
    """The daemon dies (SIGKILL) while it downloads a plain layer for ``stargz rpull``: the
    command ends with exit status 1 and one line saying it lost the daemon (gRPC's own
    words for the broken connection after it), with no traceback and no hang."""
    sd, c = stargz_daemon, containerd
    registry.push_oci(shared / "fixtures" / "oci-busybox", "1", "lost:1")
    (layer,) = layers_of(shared / "fixtures" / "oci-busybox", "1")
    hook = StallFirstGet(layer["digest"], seconds=30)
    with ProxyThread() as pt:
        proxy = pt.start(f"http://{registry.host}", hook)
        with subprocess.Popen(
            [*_argv(c, sd), f"{proxy.netloc}/lost:1"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
        ) as client:
            _wait("the layer download", lambda: hook.stalled == 1)
            sd.kill9()
            out, err = client.communicate(timeout=30)
    p = subprocess.CompletedProcess(client.args, client.returncode, out, err)
    msg = one_line_error(p)
    assert msg.startswith(f"stargz: error: the stargz daemon at {sd.address}: UNAVAILABLE"), msg
