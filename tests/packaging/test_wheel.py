"""The released wheel works on a machine without ISA-L, libzstd or libcrypto.

The manylinux wheel from ``ci/wheel.sh`` (built here when dist/ has none, or an older one
than the sources) is installed into a fresh venv from a local wheelhouse only
(``--no-index``), and everything below runs in a private mount namespace where the
system's ``libisal.so*``, ``libzstd.so*`` and ``libcrypto.so*`` are covered by an empty
file: the native core must load from the wheel's own ``stargz.libs/``, or the backend
check fails (the selectors would quietly fall back to the pure-Python twins).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import stat
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from stargz import __version__

REPO = Path(__file__).resolve().parents[2]
DIST = REPO / "dist"
WHEELHOUSE = Path(os.environ.get("STARGZ_WHEELHOUSE", REPO / ".cache" / "wheelhouse"))
#: The libraries the native core links, by soname prefix.
BUNDLED = ("libisal.so", "libzstd.so", "libcrypto.so")
#: Where else the loader looks (ldconfig's cache is read too); not recursive: /usr/lib has
#: symlink cycles.
LIB_DIRS = (
    "/lib",
    "/lib64",
    "/lib/x86_64-linux-gnu",
    "/usr/lib",
    "/usr/lib64",
    "/usr/lib/x86_64-linux-gnu",
    "/usr/local/lib",
    "/usr/local/lib/x86_64-linux-gnu",
)
NATIVE_MODULES = ("codec", "tocindex", "tocbuild")
#: This interpreter's wheel tag: ci/wheel.sh may build wheels for other CPythons too.
TAG = f"cp{sys.version_info[0]}{sys.version_info[1]}"
# The sources a wheel is built from: a wheel older than any of them is rebuilt.
SOURCES = (
    "src/**/*.py",
    "src/**/*.pyx",
    "src/**/*.pxd",
    "setup.py",
    "pyproject.toml",
    "MANIFEST.in",
    "ci/wheel.sh",
    "ci/wheel_licenses.py",
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="masking libraries needs root")


def _run(cmd: Sequence[str], **kw) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert p.returncode == 0, f"{cmd} exited {p.returncode}\n{p.stdout}\n{p.stderr}"
    return p


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment without PYTHON*/STARGZ_*: a checkout on PYTHONPATH would count as
    installed (its src/stargz.egg-info) and be imported instead of the wheel."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "STARGZ_"))}
    return {**env, **extra}


def _newest_source() -> float:
    return max(
        os.stat(f).st_mtime for pat in SOURCES for f in glob.glob(str(REPO / pat), recursive=True)
    )


@pytest.fixture(scope="module")
def wheel() -> Path:
    """dist/'s manylinux wheel, built by ci/wheel.sh when missing or older than the sources."""
    pattern = f"stargz-*-{TAG}-{TAG}-manylinux_*.whl"
    found = sorted(DIST.glob(pattern))
    if (
        len(found) != 1
        or found[0].stat().st_mtime < _newest_source()
        or not any(WHEELHOUSE.glob("*.whl"))
    ):
        _run(["bash", str(REPO / "ci" / "wheel.sh")], timeout=900)
        found = sorted(DIST.glob(pattern))
    assert len(found) == 1, f"expected one {pattern} in {DIST}, found {found}"
    return found[0]


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory) -> Path:
    """A fresh venv with the wheel installed from the local wheelhouse only."""
    root = tmp_path_factory.mktemp("wheel-venv")
    _run([sys.executable, "-m", "venv", str(root)])
    # No pip configuration: nothing but dist/ and the wheelhouse may feed this install.
    env = _clean_env(PIP_CONFIG_FILE=os.devnull)
    _run(
        [str(root / "bin" / "pip"), "install", "-q", "--no-index", "--disable-pip-version-check"]
        + ["--find-links", str(DIST), "--find-links", str(WHEELHOUSE), str(wheel)],
        env=env,
        timeout=300,
    )
    return root


def _system_copies() -> list[str]:
    """Every file the loader could find for the bundled libraries (symlinks resolved)."""
    paths = set()
    ldconfig = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True).stdout
    for line in ldconfig.splitlines():
        if "=>" in line and line.split()[0].startswith(BUNDLED):
            paths.add(os.path.realpath(line.rsplit("=>", 1)[1].strip()))
    for d in LIB_DIRS:
        for name in BUNDLED:
            paths.update(os.path.realpath(p) for p in glob.glob(f"{d}/{name}*"))
    return sorted(p for p in paths if os.path.isfile(p))


class Masked:
    """Runs commands in a private mount namespace where the system's copies of the libraries
    are covered by an empty file (unshare and sh exec, so a PID is the command's own)."""

    SCRIPT = (
        'for f in "$@"; do [ "$f" = -- ] && shift && break; mount --bind "$E" "$f"; shift; done;'
        ' exec "$@"'
    )

    def __init__(self, venv: Path, empty: Path) -> None:
        self.masks = _system_copies()
        assert self.masks, "no system copy of ISA-L, libzstd or libcrypto found to hide"
        # Only the venv on PATH; no PYTHONPATH, so nothing is imported from the checkout.
        self.env = _clean_env(E=str(empty), PATH=f"{venv / 'bin'}:/usr/sbin:/usr/bin:/sbin:/bin")

    def argv(self, cmd: Sequence[str], hide: Sequence[str] = BUNDLED) -> list[str]:
        masks = [m for m in self.masks if Path(m).name.startswith(tuple(hide))]
        unshare = ["unshare", "--mount", "--propagation", "private"]
        return [*unshare, "sh", "-ec", self.SCRIPT, "sh", *masks, "--", *cmd]

    def __call__(
        self, cmd: Sequence[str], check: bool = True, **kw
    ) -> subprocess.CompletedProcess[str]:
        p = subprocess.run(self.argv(cmd), capture_output=True, text=True, env=self.env, **kw)
        if check:
            assert p.returncode == 0, f"{cmd} exited {p.returncode}\n{p.stdout}\n{p.stderr}"
        return p


@pytest.fixture(scope="module")
def masked(venv: Path, tmp_path_factory) -> Masked:
    empty = tmp_path_factory.mktemp("mask") / "empty"
    empty.write_bytes(b"")
    return Masked(venv, empty)


def test_wheel_is_manylinux_with_the_libraries_inside(wheel: Path):
    import zipfile

    assert re.fullmatch(
        rf"stargz-{re.escape(__version__)}-{TAG}-{TAG}-manylinux_2_\d+_x86_64\.whl", wheel.name
    ), wheel.name
    names = zipfile.ZipFile(wheel).namelist()
    for lib in BUNDLED:
        stem = lib.removesuffix(".so")
        assert any(re.fullmatch(rf"stargz\.libs/{stem}-[0-9a-f]{{8}}\.so[.\d]*", n) for n in names)
    for mod in NATIVE_MODULES:
        assert any(re.fullmatch(rf"stargz/estargz/_{mod}\.cpython-.*\.so", n) for n in names)
    # The bundled copies travel with their licenses (ci/wheel_licenses.py).
    for pkg in ("libisal2", "libzstd1", "libssl3"):
        assert f"stargz-{__version__}.dist-info/licenses/stargz.libs/{pkg}.copyright" in names
    assert sorted(DIST.glob(f"stargz-{__version__}.tar.gz")), "ci/wheel.sh makes the sdist too"


def test_wheel_record_matches_its_files(wheel: Path):
    """RECORD still lists every file with its hash after the wheel was rewritten."""
    import base64
    import zipfile

    with zipfile.ZipFile(wheel) as z:
        record = next(n for n in z.namelist() if n.endswith(".dist-info/RECORD"))
        listed = {}
        for line in z.read(record).decode().splitlines():
            name, digest, _size = line.rsplit(",", 2)
            listed[name] = digest
        assert sorted(listed) == sorted(n for n in z.namelist() if not n.endswith("/"))
        for name, digest in listed.items():
            if name != record:
                raw = hashlib.sha256(z.read(name)).digest()
                want = "sha256=" + base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
                assert digest == want, name


def test_the_mask_hides_the_system_libraries(masked):
    """The control: inside the namespace the loader cannot open the system copies."""
    probe = (
        "import ctypes\n"
        "for name in ('libisal.so.2', 'libzstd.so.1', 'libcrypto.so.3'):\n"
        "    try:\n"
        "        ctypes.CDLL(name)\n"
        "    except OSError as e:\n"
        "        print(name, 'hidden:', e)\n"
        "    else:\n"
        "        print(name, 'LOADED')\n"
    )
    out = masked(["python", "-c", probe]).stdout
    assert "LOADED" not in out and out.count("hidden:") == 3, out


def test_every_extension_resolves_inside_the_wheel(masked, venv: Path):
    """ldd in the namespace: the bundled libraries come from stargz.libs/, nothing is missing."""
    site = next((venv / "lib").glob("python3*/site-packages"))
    libs = site / "stargz.libs"
    extensions = sorted((site / "stargz" / "estargz").glob("_*.cpython-*.so"))
    assert len(extensions) == len(NATIVE_MODULES)
    for ext in extensions:
        ldd = masked(["ldd", str(ext)]).stdout
        assert "not found" not in ldd, ldd
        resolved = dict(
            line.strip().split(" (")[0].split(" => ") for line in ldd.splitlines() if "=>" in line
        )
        bundled = {
            k: v for k, v in resolved.items() if k.startswith(("libisal", "libzstd", "libcrypto"))
        }
        assert all(Path(v).resolve().parent == libs for v in bundled.values()), ldd
        if ext.name.startswith("_codec."):
            assert len(bundled) == len(BUNDLED), ldd


def test_native_backend_loads_from_the_wheel(masked, venv: Path):
    probe = (
        "import json, stargz\n"
        "from stargz.cli.version import backends\n"
        "print(json.dumps({'file': stargz.__file__, 'backends': backends()}))\n"
    )
    got = json.loads(masked(["python", "-c", probe], cwd="/").stdout)
    assert got["file"].startswith(str(venv)), got["file"]
    assert got["backends"] == {m: ["native", None] for m in NATIVE_MODULES}, got["backends"]


@pytest.mark.parametrize("prog", ["stargz", "containerd-stargz-grpc"])
def test_version_names_the_native_backend(masked, prog: str):
    out = masked([prog, "--version"]).stdout
    assert out == f"{prog} {__version__} (native backend: {', '.join(NATIVE_MODULES)})\n"


def _dir_tree(root: Path) -> dict[str, tuple]:
    """{path: (type, permission bits, sha256 or link target)} and inode groups of a tree."""
    out: dict[str, tuple] = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            st = p.lstat()
            key = str(p.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                out[key] = ("symlink", None, os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[key] = ("dir", stat.S_IMODE(st.st_mode), None)
            else:
                digest = hashlib.sha256(p.read_bytes()).hexdigest()
                out[key] = ("reg", stat.S_IMODE(st.st_mode), digest)
    return out


def _tar_projection(tree: dict[str, dict]) -> dict[str, tuple]:
    out: dict[str, tuple] = {}
    for path, r in tree.items():
        if not path or r.get("implicit"):
            continue
        if r["type"] == "symlink":
            out[path] = ("symlink", None, r["link"])
        else:
            out[path] = (r["type"], r["mode"], r.get("sha256"))
    return out


@pytest.mark.parametrize(
    ("zstd", "flags"),
    [(False, []), (False, ["--compression-level", "5"]), (True, ["--zstdchunked"])],
    ids=["estargz", "estargz-libdeflate", "zstdchunked"],
)
def test_convert_and_extract_with_the_wheel(
    masked, busybox, trees, tmp_path: Path, zstd: bool, flags: list[str]
):
    """Convert (writer: ISA-L, libdeflate from the wheelhouse's `deflate`, zstd) and extract
    (native decode + sha256 of every chunk) the busybox image."""
    out = tmp_path / "out"
    cmd = ["stargz", "convert", "-q", f"oci:{busybox.root}:1", f"oci:{out}:conv"]
    masked(cmd + flags)
    converted = type(busybox)(out)
    (orig,) = busybox.layers("1")
    (layer,) = converted.layers("conv")
    assert masked(["stargz", "get-toc-digest", str(layer.path)]).stdout.strip() == (
        layer.toc_digest
    )
    info = json.loads(masked(["stargz", "inspect", "--json", str(layer.path)]).stdout)
    assert info["format"] == ("zstd:chunked" if zstd else "estargz")
    dest = tmp_path / "rootfs"
    masked(["stargz", "extract", str(layer.path), str(dest)])
    got = _dir_tree(dest)
    assert got.pop(".no.prefetch.landmark")[0] == "reg"  # the converter adds it, as Go's does
    assert got == _tar_projection(trees.tar(orig.path))


def test_daemon_serves_from_the_wheel(masked: Masked, venv: Path):
    """The wheel's daemon answers containerd's List with ISA-L and libzstd hidden, and the
    process maps the wheel's copies. libcrypto stays visible here: the interpreter's own
    ``ssl`` module (which uvloop imports) links it; the tests above hide it too."""
    from harness.procs import StargzDaemon

    class WheelDaemon(StargzDaemon):
        def argv(self) -> list[str]:
            flags = super().argv()[3:]  # after: python -m stargz.cli.daemon
            daemon = str(venv / "bin" / "containerd-stargz-grpc")
            return masked.argv([daemon, *flags], hide=("libisal.so", "libzstd.so"))

        def restart(self) -> None:
            if self.alive():
                self.stop()
            self._spawn(self.argv(), env=masked.env)
            self.wait_ready(self._answers)

    d = WheelDaemon.start()
    try:
        maps = Path(f"/proc/{d.pid}/maps").read_text()
        libs = {line.split()[-1] for line in maps.splitlines() if "lib" in line}
        exe = os.readlink(f"/proc/{d.pid}/exe")
        assert not any(re.search(r"/lib(isal|zstd)\.so", p) for p in libs), sorted(libs)
        for lib in ("libisal-", "libzstd-", "libcrypto-"):
            assert any(f"/stargz.libs/{lib}" in p for p in libs), (lib, exe, sorted(libs))
        levels = {r.get("level") for r in d.log_records()}
        assert levels <= {"debug", "info"}, d.log_text()
    finally:
        d.close()
