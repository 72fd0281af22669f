"""``stargz rpull`` made by the running daemon (``stargz.v1.Pull``), end to end: real
containerd 1.6, docker-registry and our daemon. The pulls themselves (lazy, unpacked, Go's
image record) run over both paths in tests/e2e/test_rpull.py; here: what is particular to
asking the daemon. Its fallback to the in-process pull (no socket; a server that does not
serve the service), bad input answered as one line with no image record left, and
``--user`` credentials that serve one pull and are not kept by the daemon.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from harness import Containerd, StargzDaemon, free_port, mounted_image, tree_listing
from harness.faults import BasicAuth, ProxyThread
from harness.oci import index_image
from harness.procs import REPO

from e2e.test_lazy import NO_BACKGROUND, assert_quiet_log, ground_truth, layers_of
from e2e.test_rpull import (
    NS,
    SNAP,
    assert_remote_snapshots,
    daemon_pulls,
    images,
    layer_lines,
    one_line_error,
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


def test_user_credentials_serve_one_pull_and_are_not_kept(
    stargz_daemon, containerd, registry, shared
):
    """A registry behind HTTP basic auth (a proxy in front of the real one), and a daemon
    with no credentials of its own: through the daemon, no ``--user`` is one line naming
    the 401; ``--user USER:PASSWORD`` pulls (the daemon used them); the same pull without
    ``--user`` right after is refused again: the daemon kept nothing."""
    sd, c = stargz_daemon, containerd
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
