"""``stargz doctor`` against a real containerd 1.6 and our daemon, each started by the harness
with a config that is right, or wrong in one place; doctor runs as a user runs it (its own
process, exit status, ``--json`` and text). A broken setup must fail exactly the checks
about that problem, with a message naming it and a fix that says what to write.
"""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from harness.procs import REPO, Containerd, StargzDaemon, free_port, make_tempdir

from stargz.cli import doctor

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

#: A small disk cache bound: the cache-space check compares it with the free space of
#: the test's temp disk, which is smaller than the default 10 GiB on some machines.
DAEMON_CONFIG = "[directory_cache]\nmax_size_bytes = 1048576\n"
EVERY_CHECK = {
    "containerd-config",
    "proxy-plugin",
    "cri-snapshotter",
    "cri-annotations",
    "containerd-socket",
    "containerd-plugin",
    "containerd-cri",
    "daemon-config",
    "cri-keychain",
    "daemon-socket",
    "fuse-device",
    "overlayfs",
    "fuse-passthrough",
    "cache-space",
    "root-mode",
}


def run_doctor(
    sd: StargzDaemon, c: Containerd, *extra: str, text: bool = False, **paths: str
) -> tuple[int, dict | str]:
    argv = [
        sys.executable,
        "-m",
        "stargz.cli.main",
        "doctor",
        "--containerd-config",
        paths.get("containerd_config", str(c.config_path)),
        "--config",
        paths.get("config", str(sd.config_path)),
        "--address",
        paths.get("address", sd.address),
        "--root",
        paths.get("root", sd.root),
        "--min-free",
        "1M",
        *([] if text else ["--json"]),
        *extra,
    ]
    env = dict(os.environ, PYTHONPATH=f"{REPO / 'src'}:{os.environ.get('PYTHONPATH', '')}")
    p = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env)
    assert "Traceback" not in p.stderr, p.stderr
    return p.returncode, p.stdout if text else json.loads(p.stdout)


def by_name(doc: dict) -> dict[str, dict]:
    return {c["name"]: c for c in doc["checks"]}


def failing(doc: dict) -> set[str]:
    return {c["name"] for c in doc["checks"] if c["status"] == "fail"}


@pytest.fixture(scope="module")
def daemon(e2e_host) -> StargzDaemon:
    d = StargzDaemon.start(config_text=DAEMON_CONFIG, log_level="info")
    try:
        yield d
    finally:
        d.close()


def cri_containerd(sd: StargzDaemon, edit=None) -> Containerd:
    return Containerd.start(sd.address, cri_registry=f"127.0.0.1:{free_port()}", edit_config=edit)


def to_version_1(text: str) -> str:
    """The harness's version 2 config in containerd 1.x's version 1 layout: plugins by short
    ID (``[plugins."cri".containerd]``, ``disabled_plugins = ["aufs", ...]``)."""
    text = text.replace("version = 2", "version = 1", 1)
    return re.sub(r'"io\.containerd\.[a-z.]+?\.v\d+\.([\w-]+)"', r'"\1"', text)


# --- a correct node -------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["version-2", "version-1"])
def test_correct_node_passes_every_check(daemon, layout):
    edit = to_version_1 if layout == "version-1" else None
    with cri_containerd(daemon, edit) as c:
        if layout == "version-1":
            assert "version = 1" in c.config_path.read_text()
            assert '[plugins."cri".containerd]' in c.config_path.read_text()
        code, doc = run_doctor(daemon, c)
        checks = by_name(doc)
        assert set(checks) == EVERY_CHECK
        assert code == 0, doc
        assert doc["ok"] is True and doc["counts"]["fail"] == doc["counts"]["warn"] == 0
        # FUSE passthrough and the (unused) CRI keychain are information; the rest is ok
        infos = {"fuse-passthrough", "cri-keychain"}
        assert {n for n, c in checks.items() if c["status"] != "ok"} <= infos
        assert checks["fuse-passthrough"]["status"] == "info"
        assert "6.9" in checks["fuse-passthrough"]["message"]
        # what doctor read from the file is what containerd runs with (its CRI said so)
        assert "stargz snapshotter and annotations" in checks["containerd-cri"]["message"]
        assert daemon.address in checks["containerd-plugin"]["message"]
        assert "lazy pulling on" in checks["daemon-socket"]["message"]
        assert (
            f"version {1 if layout == 'version-1' else 2}" in checks["containerd-config"]["message"]
        )

        code, out = run_doctor(daemon, c, text=True)
        assert code == 0
        assert out.rstrip().endswith("no problems found")
        assert re.search(r"^ok +proxy-plugin ", out, re.MULTILINE), out


# --- containerd's config, wrong in one place --------------------------------------------------

CRI_TABLE = '[plugins."io.containerd.grpc.v1.cri".containerd]'
BROKEN_CONTAINERD = {
    "no-proxy-plugin": (
        lambda t: t[: t.index("[proxy_plugins]")],
        # (CRI's plugin does not start either: it can't find its snapshotter)
        {"proxy-plugin", "containerd-plugin", "containerd-cri"},
        "proxy-plugin",
        "has no [proxy_plugins.stargz]",
        ['[proxy_plugins.stargz]\n  type = "snapshot"\n  address = "{address}"', "restart"],
    ),
    "proxy-wrong-address": (
        lambda t: re.sub(
            r'(\[proxy_plugins\.stargz\][^\[]*address = )"[^"]*"', r'\1"/run/x.sock"', t
        ),
        {"proxy-plugin", "containerd-plugin"},
        "proxy-plugin",
        'address = "/run/x.sock", but the daemon\'s socket is {address}',
        ['set address = "{address}"'],
    ),
    "annotations-disabled": (
        lambda t: t.replace(
            "disable_snapshot_annotations = false", "disable_snapshot_annotations = true"
        ),
        {"cri-annotations", "containerd-cri"},
        "cri-annotations",
        "disable_snapshot_annotations = true: CRI does not pass the image's layer annotations",
        [CRI_TABLE + "\n  disable_snapshot_annotations = false"],
    ),
    "annotations-unset": (
        lambda t: t.replace("disable_snapshot_annotations = false", ""),
        {"cri-annotations", "containerd-cri"},
        "cri-annotations",
        "disable_snapshot_annotations is not set (containerd 1.x defaults to true)",
        ["disable_snapshot_annotations = false"],
    ),
    "snapshotter-overlayfs": (
        lambda t: t.replace('snapshotter = "stargz"', 'snapshotter = "overlayfs"'),
        {"cri-snapshotter", "containerd-cri"},
        "cri-snapshotter",
        'snapshotter = "overlayfs": Kubernetes pods pull and run without the stargz snapshotter',
        [CRI_TABLE + '\n  snapshotter = "stargz"'],
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN_CONTAINERD))
def test_broken_containerd_config_fails_with_its_fix(daemon, case):
    edit, fails, name, message, fixes = BROKEN_CONTAINERD[case]
    with cri_containerd(daemon, edit) as c:
        code, doc = run_doctor(daemon, c)
        assert code == 1
        assert doc["ok"] is False
        assert failing(doc) == fails, doc
        check = by_name(doc)[name]
        assert message.format(address=daemon.address) in check["message"]
        for fix in fixes:
            assert fix.format(address=daemon.address) in check["fix"]
        assert str(c.config_path) in check["message"] + check["fix"]
        if case == "no-proxy-plugin":  # containerd's own reason, from its plugin list
            cri = by_name(doc)["containerd-cri"]
            assert 'failed to find snapshotter "stargz"' in cri["message"]
            assert "add the proxy plugin" in cri["fix"]

        code, out = run_doctor(daemon, c, text=True)
        assert code == 1
        assert re.search(rf"^FAIL +{name} ", out, re.MULTILINE), out
        assert "fix: " in out and out.rstrip().endswith(f"{len(fails)} problem(s), 0 warning(s)")


def test_config_edited_but_containerd_not_restarted(daemon):
    """The file is right, the running containerd still has the old one: restart it."""
    broken = BROKEN_CONTAINERD["annotations-disabled"][0]
    with cri_containerd(daemon, broken) as c:
        text = c.config_path.read_text()
        c.config_path.write_text(
            text.replace(
                "disable_snapshot_annotations = true", "disable_snapshot_annotations = false"
            )
        )
        code, doc = run_doctor(daemon, c)
        assert code == 1 and failing(doc) == {"containerd-cri"}
        check = by_name(doc)["containerd-cri"]
        assert "disable_snapshot_annotations = true, not what" in check["message"]
        assert "restart containerd" in check["fix"]

        c.restart()
        code, doc = run_doctor(daemon, c)
        assert code == 0 and failing(doc) == set(), doc


def test_cri_disabled_is_information(daemon):
    with Containerd.start(daemon.address) as c:  # (the harness's default: CRI off)
        code, doc = run_doctor(daemon, c)
        checks = by_name(doc)
        assert code == 0, doc
        assert checks["cri-snapshotter"]["status"] == "info"
        assert "CRI plugin is disabled" in checks["cri-snapshotter"]["message"]
        assert "containerd-cri" not in checks


# --- the daemon -------------------------------------------------------------------------------


def test_bad_daemon_config_key_fails_as_the_daemon_does(daemon, tmp_path):
    bad = tmp_path / "config.toml"
    bad.write_text("[blob]\nchunk_sise = 1\n")
    with cri_containerd(daemon) as c:
        code, doc = run_doctor(daemon, c, config=str(bad))
    assert code == 1 and failing(doc) == {"daemon-config"}, doc
    assert "cri-keychain" not in by_name(doc)  # (nothing to read it from)
    check = by_name(doc)["daemon-config"]
    assert f'{bad}: unknown key "blob.chunk_sise"' in check["message"]
    assert 'correct or remove key "blob.chunk_sise"' in check["fix"]
    # and the daemon indeed refuses that file
    p = subprocess.run(
        [sys.executable, "-m", "stargz.cli.daemon", "--config", str(bad), "--root",
         str(tmp_path / "root"), "--address", str(tmp_path / "s.sock")],
        capture_output=True, text=True, timeout=60,
        env=dict(os.environ, PYTHONPATH=str(REPO / "src")),
    )  # fmt: skip
    assert p.returncode == 2 and "blob.chunk_sise" in p.stderr


def test_cri_keychain_must_forward_to_containerd(daemon, tmp_path):
    cfg = tmp_path / "config.toml"
    with cri_containerd(daemon) as c:
        cfg.write_text(
            '[cri_keychain]\nenable_keychain = true\nimage_service_path = "/run/x.sock"\n'
        )
        code, doc = run_doctor(daemon, c, config=str(cfg))
        assert code == 1 and failing(doc) == {"cri-keychain"}, doc
        check = by_name(doc)["cri-keychain"]
        assert (
            f"image_service_path is /run/x.sock, but containerd serves on {c.address}"
            in (check["message"])
        )
        assert check["fix"] == f'set image_service_path = "{c.address}" in [cri_keychain]'

        cfg.write_text(
            f'[cri_keychain]\nenable_keychain = true\nimage_service_path = "{c.address}"\n'
        )
        code, doc = run_doctor(daemon, c, config=str(cfg))
        assert code == 0 and by_name(doc)["cri-keychain"]["status"] == "ok", doc


def test_daemon_not_running(e2e_host):
    """Killed (a stale socket is left), then gone (no socket): the daemon-socket check says
    which, and that is the only failure."""
    sd = StargzDaemon.start(config_text=DAEMON_CONFIG, log_level="info")
    try:
        with cri_containerd(sd) as c:
            sd.kill9()
            code, doc = run_doctor(sd, c)
            assert code == 1 and failing(doc) == {"daemon-socket"}, doc
            check = by_name(doc)["daemon-socket"]
            assert f"not running: nothing listens on {sd.address}" in check["message"]
            assert "systemctl enable --now containerd-stargz-grpc" in check["fix"]

            os.unlink(sd.address)
            code, doc = run_doctor(sd, c)
            assert code == 1 and failing(doc) == {"daemon-socket"}, doc
            check = by_name(doc)["daemon-socket"]
            assert f"not running: {sd.address} does not exist" in check["message"]
    finally:
        sd.close()


def test_root_dir_0755_fails(daemon):
    with cri_containerd(daemon) as c:
        os.chmod(daemon.root, 0o755)
        try:
            code, doc = run_doctor(daemon, c)
        finally:
            os.chmod(daemon.root, 0o700)
        assert code == 1 and failing(doc) == {"root-mode"}, doc
        check = by_name(doc)["root-mode"]
        assert f"{daemon.root} has mode 0755, not 0700" in check["message"]
        assert check["fix"].startswith(f"chmod 0700 {daemon.root}")

        code, doc = run_doctor(daemon, c)
        assert code == 0 and by_name(doc)["root-mode"]["status"] == "ok"


def test_little_free_space_warns_without_failing(daemon):
    """A root on a 4 MiB tmpfs: below --min-free, and the 10 GiB default bound can't fit."""
    root = make_tempdir("sgz-doc-")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(root)],
                   check=True)  # fmt: skip
    try:
        default_cfg = root / "daemon.toml"
        default_cfg.write_text("")
        with cri_containerd(daemon) as c:
            code, doc = run_doctor(daemon, c, "--min-free", "1G", root=str(root))
            check = by_name(doc)["cache-space"]
            assert code == 0, doc  # a warning is not a failure
            assert check["status"] == "warn" and "less than 1.0 GiB free" in check["message"]
            assert "max_size_bytes" in check["fix"]

            code, doc = run_doctor(daemon, c, root=str(root), config=str(default_cfg))
            check = by_name(doc)["cache-space"]
            assert code == 0 and check["status"] == "warn", doc
            assert "the disk fills before the cache reaches its bound" in check["message"]
            assert "of at most 10.0 GiB" in check["message"]
    finally:
        subprocess.run(["umount", str(root)], check=False)
        os.rmdir(root)


# --- pieces without daemons -------------------------------------------------------------------


def test_defaults_are_the_daemons():
    from stargz.cli import daemon as daemon_cli

    assert doctor.DEFAULT_ROOT == daemon_cli.DEFAULT_ROOT
    assert doctor.DEFAULT_ADDRESS == daemon_cli.DEFAULT_ADDRESS


def test_passthrough_on_an_old_kernel_is_information():
    from stargz.config import Config, loads

    check = doctor.passthrough_check(Config(), "/nonexistent", release="6.1.0-28-amd64")
    assert check.status == "info" and "older than 6.9" in check.message
    assert "judged by the kernel version" in check.message
    off = doctor.passthrough_check(loads("[fuse]\npassthrough = false\n"), "/nonexistent")
    assert off.status == "info" and "passthrough = false" in off.message


def test_size_option():
    assert doctor._size("1M") == 1 << 20 and doctor._size("2G") == 2 << 30
    assert doctor._size("512") == 512 and doctor._size("3GiB") == 3 << 30
    with pytest.raises(Exception, match="not a size"):
        doctor._size("lots")


def test_unreadable_containerd_config_is_one_failure(tmp_path):
    bad = tmp_path / "config.toml"
    bad.write_text("version = 2\n[proxy_plugins\n")
    cc, check = doctor.containerd_config_check(str(bad))
    assert cc is None and check.status == "fail" and "invalid TOML" in check.message
    cc, check = doctor.containerd_config_check(str(tmp_path / "missing.toml"))
    assert cc is None and "no such file" in check.message and "--containerd-config" in check.fix
    (tmp_path / "proxy.toml").write_text("version = 2\nproxy_plugins = 5\n")
    cc, check = doctor.containerd_config_check(str(tmp_path / "proxy.toml"))
    assert cc is None and "proxy_plugins must be a table" in check.message
    (tmp_path / "v9.toml").write_text("version = 9\n")
    cc, check = doctor.containerd_config_check(str(tmp_path / "v9.toml"))
    assert cc is None and "unknown config version 9" in check.message


def test_not_containerd_on_the_socket_is_a_failure(daemon, tmp_path):
    """Our daemon's socket given as containerd's: it answers gRPC, but not containerd's."""
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'version = 2\n[grpc]\n  address = "{daemon.address}"\n')
    checks = doctor.containerd_checks(doctor.ccfg.load(str(cfg)), doctor.Options())
    assert [c.name for c in checks] == ["containerd-socket"]
    assert checks[0].status == "fail" and "does not answer as containerd" in checks[0].message
    assert "UNIMPLEMENTED" in checks[0].message


def test_imports_replace_whole_plugin_tables(tmp_path: Path):
    """As containerd merges ``imports``: later files win, a plugin table is replaced whole."""
    from stargz.cli.doctor import containerd_config

    (tmp_path / "conf.d").mkdir()
    (tmp_path / "config.toml").write_text(
        'version = 2\nimports = ["conf.d/*.toml"]\n'
        '[plugins."io.containerd.grpc.v1.cri".containerd]\n'
        '  snapshotter = "stargz"\n  disable_snapshot_annotations = false\n'
    )
    (tmp_path / "conf.d" / "10-stargz.toml").write_text(
        'version = 2\n[proxy_plugins.stargz]\n  type = "snapshot"\n  address = "/run/s.sock"\n'
    )
    (tmp_path / "conf.d" / "20-cri.toml").write_text(
        'version = 2\n[plugins."io.containerd.grpc.v1.cri".containerd]\n  snapshotter = "stargz"\n'
    )
    cc = containerd_config.load(str(tmp_path / "config.toml"))
    assert [Path(f).name for f in cc.files] == ["config.toml", "10-stargz.toml", "20-cri.toml"]
    assert cc.proxy_plugins["stargz"]["address"] == "/run/s.sock"
    assert cc.cri_snapshotter == "stargz"
    # 20-cri.toml replaced the whole CRI table: the annotations key is gone (default: true)
    assert cc.cri_disable_snapshot_annotations is None and cc.disable_snapshot_annotations is True


def test_version_3_reads_the_cri_image_table(tmp_path):
    from stargz.cli.doctor import containerd_config

    (tmp_path / "c.toml").write_text(
        "version = 3\n[plugins.'io.containerd.cri.v1.images']\n"
        "  snapshotter = 'stargz'\n  disable_snapshot_annotations = false\n"
    )
    cc = containerd_config.load(str(tmp_path / "c.toml"))
    assert (cc.version, cc.cri_snapshotter, cc.cri_disable_snapshot_annotations) == (
        3,
        "stargz",
        False,
    )
    assert [c.status for c in doctor.cri_checks(cc)] == ["ok", "ok"]


def test_overlay_test_mount_mounts_and_cleans_up(e2e_host):
    """The fallback when /proc/filesystems has no overlay (its module not loaded yet): a
    real overlay mount in a temp dir, unmounted and removed."""
    from stargz import mountinfo
    from stargz.cli.doctor import host

    def leftovers() -> list[str]:  # (other mounts may come and go meanwhile: not ours)
        mine = [p for p in mountinfo.mount_points() if "/stargz-doctor-" in p]
        return mine + glob.glob(os.path.join(tempfile.gettempdir(), "stargz-doctor-*"))

    before = leftovers()
    assert host._test_overlay_mount() is None
    assert leftovers() == before
    # overlay not listed (its module not loaded yet): the real test mount decides
    check = host.overlayfs_check(filesystems=set)
    assert check.status == "ok" and "test overlay mount works" in check.message
    # (a kernel without overlayfs can't be had here: the mount's error is given instead)
    check = host.overlayfs_check(probe=lambda: "No such device", filesystems=set)
    assert check.status == "fail" and "a test mount failed: No such device" in check.message
    assert check.fix.startswith("modprobe overlay")
