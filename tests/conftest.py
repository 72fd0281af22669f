"""Shared test fixtures: where the reference data lives, OCI layouts, tree listings.

The reference images and tools live in the project's ``shared/`` folder (a sibling of the
repository). It is looked up in ``$STARGZ_SHARED``, then ``<repo>/../shared``, then
``/work/shared``; a missing folder is a failure, not a skip, because CI always has it and a
silently skipped interop suite proves nothing.

Tree listings (`tar_tree`, `reader_tree`) turn a plain tar and an opened eStargz layer into
the same ``{path: record}`` form, so tests compare whole layers with one ``==``.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import math
import os
import shutil
import subprocess
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import pytest

REPO = Path(__file__).resolve().parent.parent
TOC_DIGEST_ANNOTATION = "containerd.io/snapshot/stargz/toc.digest"
UNCOMPRESSED_SIZE_ANNOTATION = "io.containers.estargz.uncompressed-size"
LANDMARKS = (".prefetch.landmark", ".no.prefetch.landmark")

# Types as the TOC spells them, by tarfile type byte.
_TAR_TYPES = {
    tarfile.REGTYPE: "reg",
    tarfile.AREGTYPE: "reg",
    tarfile.CONTTYPE: "reg",
    tarfile.LNKTYPE: "hardlink",
    tarfile.SYMTYPE: "symlink",
    tarfile.DIRTYPE: "dir",
    tarfile.CHRTYPE: "char",
    tarfile.BLKTYPE: "block",
    tarfile.FIFOTYPE: "fifo",
}


# --- hypothesis: random locally, a fixed seed in CI (ci/test.sh sets the profile) ----------

from hypothesis import settings as _hyp_settings  # noqa: E402

# ci: the same examples on every run and no example database (a failure reproduces from
# the command line alone); ci/fuzz.sh explores with random seeds instead
_hyp_settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
if os.environ.get("STARGZ_HYPOTHESIS_PROFILE"):
    _hyp_settings.load_profile(os.environ["STARGZ_HYPOTHESIS_PROFILE"])


# --- native / pure-Python twins (STYLE item 8) ----------------------------------------------

NO_EXTENSIONS = os.environ.get("STARGZ_NO_EXTENSIONS") == "1"


def backend_of(selector: Any, name: str) -> Any:
    """The ``name`` ("native" or "python") module behind a selector (codec, tocindex).

    A missing native build fails the test; ``STARGZ_NO_EXTENSIONS=1`` skips native cases.
    """
    if name == "python":
        return selector.python
    if NO_EXTENSIONS:
        pytest.skip("STARGZ_NO_EXTENSIONS=1: the native backend is disabled on purpose")
    if selector.native is None:
        pytest.fail(f"native module is not built: {selector.native_error}", pytrace=False)
    return selector.native


def backends_of(selector: Any) -> list[Any]:
    """Every backend there should be: [native, python], or [python] with the twin forced."""
    if NO_EXTENSIONS:
        return [selector.python]
    return [backend_of(selector, "native"), selector.python]


# --- where shared/ is ----------------------------------------------------------------


def find_shared() -> Path:
    """The shared/ folder, or pytest.fail naming every place that was tried."""
    candidates = [os.environ.get("STARGZ_SHARED"), REPO.parent / "shared", "/work/shared"]
    tried = []
    for c in candidates:
        if not c:
            continue
        tried.append(str(c))
        if (Path(c) / "fixtures").is_dir():
            return Path(c)
    pytest.fail(
        "shared/ reference data (fixtures/, tools/) not found; set STARGZ_SHARED or put it "
        "beside the repo; tried: " + ", ".join(tried),
        pytrace=False,
    )


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return find_shared()


@pytest.fixture(scope="session")
def fixtures_dir(shared_dir: Path) -> Path:
    return shared_dir / "fixtures"


# --- OCI layouts -------------------------------------------------------------------------


@dataclass(frozen=True)
class Layer:
    """One layer descriptor of a manifest, with the path of its blob."""

    tag: str
    index: int
    digest: str
    media_type: str
    size: int
    annotations: dict[str, str]
    path: Path

    @property
    def toc_digest(self) -> str | None:
        return self.annotations.get(TOC_DIGEST_ANNOTATION)

    @property
    def id(self) -> str:
        return f"{self.tag}-{self.index}"


class OCILayout:
    """A read-only OCI image layout: tags, manifests, configs and layer blobs."""

    def __init__(self, root: Path) -> None:
        self.root = root
        index = json.loads((root / "index.json").read_text())
        self.manifests: dict[str, dict[str, Any]] = {}
        for desc in index["manifests"]:
            tag = desc.get("annotations", {}).get("org.opencontainers.image.ref.name")
            if tag:
                self.manifests[tag] = self.read_json(desc["digest"])

    def blob_path(self, digest: str) -> Path:
        algo, _, hexd = digest.partition(":")
        return self.root / "blobs" / algo / hexd

    def read_json(self, digest: str) -> Any:
        return json.loads(self.blob_path(digest).read_bytes())

    @property
    def tags(self) -> list[str]:
        return list(self.manifests)

    def config(self, tag: str) -> dict[str, Any]:
        return self.read_json(self.manifests[tag]["config"]["digest"])

    def layers(self, tag: str) -> list[Layer]:
        return [
            Layer(
                tag=tag,
                index=i,
                digest=d["digest"],
                media_type=d["mediaType"],
                size=d["size"],
                annotations=dict(d.get("annotations", {})),
                path=self.blob_path(d["digest"]),
            )
            for i, d in enumerate(self.manifests[tag]["layers"])
        ]


@pytest.fixture(scope="session")
def oci_layout(fixtures_dir: Path) -> Callable[[str], OCILayout]:
    """``oci_layout("oci-corners")`` -> OCILayout (fails if the layout is missing)."""
    cache: dict[str, OCILayout] = {}

    def get(name: str) -> OCILayout:
        if name not in cache:
            root = fixtures_dir / name
            if not (root / "index.json").is_file():
                pytest.fail(f"fixture layout {root} is missing", pytrace=False)
            cache[name] = OCILayout(root)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def corners(oci_layout) -> OCILayout:
    return oci_layout("oci-corners")


@pytest.fixture(scope="session")
def busybox(oci_layout) -> OCILayout:
    return oci_layout("oci-busybox")


# --- tree listings -------------------------------------------------------------------------


def _parents(path: str):
    while "/" in path:
        path = path.rpartition("/")[0]
        yield path


def _tar_key(name: str) -> str:
    parts = [p for p in name.split("/") if p not in ("", ".")]
    return "/".join(parts)


def tar_tree(src: str | os.PathLike | bytes | BinaryIO) -> dict[str, dict[str, Any]]:
    """What a filesystem unpacked from a plain tar (any compression) would show.

    Records hold type, permission bits, owner, size and sha256 of content, link target,
    device numbers, xattrs and ``group`` (the canonical path of the inode, so hardlinks
    share it and carry their target's attributes). Directories that only exist as parents
    are ``{"type": "dir", "implicit": True}``; a later entry replaces an earlier one.
    """
    if isinstance(src, bytes):
        tf = tarfile.open(fileobj=io.BytesIO(src), mode="r:*")
    elif isinstance(src, (str, os.PathLike)):
        tf = tarfile.open(src, mode="r:*")
    else:
        tf = tarfile.open(fileobj=src, mode="r:*")
    out: dict[str, dict[str, Any]] = {}
    links: list[tuple[str, str]] = []
    with tf:
        for m in tf:
            key = _tar_key(m.name)
            etype = _TAR_TYPES[m.type]
            if etype == "hardlink":
                out.pop(key, None)
                links.append((key, _tar_key(m.linkname)))
                continue
            rec: dict[str, Any] = {
                "type": etype,
                "mode": m.mode & 0o7777,
                "uid": m.uid,
                "gid": m.gid,
                "xattrs": {
                    k[len("SCHILY.xattr.") :]: v.encode("utf-8", "surrogateescape")
                    for k, v in m.pax_headers.items()
                    if k.startswith("SCHILY.xattr.")
                },
                "group": key,
                "mtime": math.floor(m.mtime),  # (a PAX mtime has a fraction)
            }
            if etype == "reg":
                f = tf.extractfile(m)
                assert f is not None
                data = f.read()
                rec["size"] = len(data)
                rec["sha256"] = hashlib.sha256(data).hexdigest()
            elif etype == "symlink":
                rec["link"] = m.linkname
            elif etype in ("char", "block"):
                rec["dev"] = (m.devmajor, m.devminor)
            out[key] = rec
    for key, target in links:
        out[key] = out[target]  # same dict: same inode, same attributes
    for key in list(out):
        for parent in _parents(key):
            out.setdefault(parent, {"type": "dir", "implicit": True})
    return out


def _epoch(modtime: str) -> int:
    if not modtime:
        return 0
    return int(datetime.datetime.fromisoformat(modtime.replace("Z", "+00:00")).timestamp())


def reader_tree(reader, *, window: int | None = None) -> dict[str, dict[str, Any]]:
    """The same listing from an opened `stargz.estargz.Reader` (landmarks left out).

    Content is read through ``Reader.read`` in ``window``-byte pieces (whole file if None),
    so chunk boundaries are crossed. ``group`` is the canonical path of the Node, so paths
    that resolve to one Node (hardlinks) share it.
    """
    out: dict[str, dict[str, Any]] = {}
    for path, node in reader.walk():
        if path in LANDMARKS:
            continue
        e = node.entry
        assert node.st_mode & 0o7777 == e.mode & 0o7777
        rec: dict[str, Any] = {
            "type": e.type,
            "mode": e.mode & 0o7777,
            "uid": e.uid,
            "gid": e.gid,
            "xattrs": dict(e.xattrs),
            "group": node.path,
            "mtime": _epoch(e.modtime),
        }
        if e.type == "reg":
            h = hashlib.sha256()
            step = window or max(e.size, 1)
            got = 0
            for off in range(0, e.size, step):
                piece = reader.read(node.id, off, step)
                assert len(piece) == min(step, e.size - off), (path, off)
                h.update(piece)
                got += len(piece)
            assert reader.read(node.id, e.size, 1) == b""
            rec["size"] = got
            rec["sha256"] = h.hexdigest()
        elif e.type == "symlink":
            rec["link"] = e.link_name
        elif e.type in ("char", "block"):
            rec["dev"] = (e.dev_major, e.dev_minor)
        out[path] = rec
    return out


def compare_trees(got: dict[str, dict], want: dict[str, dict]) -> None:
    """Assert two listings are the same layer; implicit dirs only need to be dirs.

    The root ("") is compared only when the tar holds it (busybox's "./").
    """
    got = dict(got)
    if "" not in want:
        got.pop("", None)
    assert sorted(got) == sorted(want), (
        f"paths differ: only in reader {sorted(set(got) - set(want))[:10]}, "
        f"only in tar {sorted(set(want) - set(got))[:10]}"
    )
    for path, w in want.items():
        g = got[path]
        if w.get("implicit"):
            assert g["type"] == "dir", path
            continue
        assert g == w, f"{path!r}: reader {g} != tar {w}"

    # hardlink grouping: same partition of paths into inodes on both sides
    def groups(tree):
        by: dict[str, set[str]] = {}
        for p, r in tree.items():
            if "group" in r:
                by.setdefault(r["group"], set()).add(p)
        return sorted(sorted(s) for s in by.values())

    want_explicit = {p: r for p, r in want.items() if not r.get("implicit")}
    got_explicit = {p: got[p] for p in want_explicit}
    assert groups(got_explicit) == groups(want_explicit)


@pytest.fixture(scope="session")
def trees():
    """The listing helpers, for test modules (conftest is not imported directly)."""

    class _Trees:
        tar = staticmethod(tar_tree)
        reader = staticmethod(reader_tree)
        compare = staticmethod(compare_trees)

    return _Trees


# --- backends of the native core ----------------------------------------------------------


def swap_backend(mp: pytest.MonkeyPatch, name: str):
    """Put one backend ("native" or "python") of codec + tocindex + tocbuild under the reader.

    The reader calls ``codec.decode_chunk`` through the module and binds ``ChunkTable`` and
    ``NameTable`` at import, so those are what is patched; tests should check (isinstance on
    ``Reader.chunks``) that the swap took. Returns the tocindex module in use.
    """
    from stargz.estargz import codec, reader, tocbuild, tocindex

    if name == "native":
        if codec.native is None or tocindex.native is None or tocbuild.native is None:
            pytest.fail(
                f"native backend not built (codec: {codec.native_error}; "
                f"tocindex: {tocindex.native_error}; tocbuild: {tocbuild.native_error}); "
                "run `pip install -e .` or `python setup.py build_ext --inplace`",
                pytrace=False,
            )
        c, t, b = codec.native, tocindex.native, tocbuild.native
    else:
        c, t, b = codec.python, tocindex.python, tocbuild.python
    mp.setattr(tocbuild, "build", b.build)
    mp.setattr(tocbuild, "build_json", b.build_json)
    mp.setattr(codec, "decode_chunk", c.decode_chunk)
    mp.setattr(codec, "sha256", c.sha256)
    mp.setattr(reader, "ChunkTable", t.ChunkTable)
    mp.setattr(reader, "NameTable", t.NameTable)
    return t


@pytest.fixture(name="swap_backend", scope="session")
def _swap_backend_fixture():
    """``swap_backend(monkeypatch, "native"|"python")``: see `swap_backend`."""
    return swap_backend


# --- the Go reference reader ---------------------------------------------------------------


@pytest.fixture(scope="session")
def esgz_verify(shared_dir: Path, tmp_path_factory) -> Path:
    """Path of the Go reference reader: the prebuilt one under .tools, or built now.

    Building needs ``go`` and Debian's stargz-snapshotter Go sources (ci/setup.sh installs
    both); their absence is a failure, not a skip.
    """
    prebuilt = REPO / ".tools" / "bin" / "esgz-verify"
    if os.access(prebuilt, os.X_OK):
        return prebuilt
    script = shared_dir / "tools" / "esgz-verify" / "build.sh"
    if not script.is_file():
        pytest.fail(f"{script} is missing", pytrace=False)
    if shutil.which("go") is None:
        pytest.fail(
            "`go` is not installed: the Go reference reader cannot be built "
            "(ci/setup.sh installs golang-go and golang-github-containerd-stargz-snapshotter-dev)",
            pytrace=False,
        )
    out = tmp_path_factory.mktemp("tools") / "esgz-verify"
    proc = subprocess.run(
        ["bash", str(script), str(out)], capture_output=True, text=True, timeout=600
    )
    if proc.returncode != 0 or not out.is_file():
        pytest.fail(
            f"building esgz-verify failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}",
            pytrace=False,
        )
    return out


def make_tar(*members: tuple[str, bytes | None, dict]) -> bytes:
    """A PAX tar of (name, content or None, TarInfo attributes) members."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data, attrs in members:
            info = tarfile.TarInfo(name)
            for k, v in attrs.items():
                setattr(info, k, v)
            if data is not None:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()
