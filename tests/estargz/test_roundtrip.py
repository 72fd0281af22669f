"""Round trip: random trees -> tar -> writer -> Reader -> the same tree, byte for byte.

Hypothesis draws trees of directories (explicit or only implied), regular files of 0 to
~300 KiB (including exact multiples of the chunk size and one byte either side), symlinks,
hardlinks (also chains), fifos, devices, ``user.*`` xattrs, uid/gid/uname/gname, long and
unicode names, in random archive order; then a chunk size (down to 1 byte), a compression
(gzip or zstd), a level and maybe a prioritized subset of the files. The layer read back
must list the same paths with the same attributes and content, and reads of random
``(offset, size)`` windows must equal the slices of the original content.
"""

from __future__ import annotations

import io
import random
import tarfile

import pytest
from conftest import make_tar
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from stargz.estargz import Reader, build

NAME_CHARS = st.sampled_from(list("abcxyz019-_. ") + ["é", "ü", "日", "本", "Ω", "🙂", "\u00a0"])
PLAIN = st.text(NAME_CHARS, min_size=1, max_size=12).filter(
    lambda s: s not in (".", "..") and not s.startswith(".wh.")
)
LONG = st.integers(100, 250).map(lambda n: "L" * n)
COMPONENT = st.one_of(PLAIN, PLAIN, PLAIN, LONG, st.sampled_from(["a", "b", "dir", "f"]))
RESERVED = {"stargz.index.json", ".prefetch.landmark", ".no.prefetch.landmark"}

KINDS = ["dir", "reg", "reg", "reg", "symlink", "hardlink", "fifo", "char", "block"]


def _content(rng: random.Random, size: int) -> bytes:
    if rng.random() < 0.5:
        return rng.randbytes(size)  # incompressible
    word = rng.randbytes(rng.randint(1, 40))
    return (word * (size // len(word) + 1))[:size]


@st.composite
def layers(draw):
    """(tar bytes, build kwargs, read seed)."""
    chunk = draw(
        st.one_of(
            st.sampled_from([1, 2, 3, 7, 512, 4096, 65536, 100_000]),
            st.integers(1, 4096),
        )
    )
    max_size = min(300 << 10, chunk * 48)  # keep the member count (and runtime) bounded
    sizes = st.one_of(
        st.integers(0, max_size),
        st.sampled_from([0, 1, chunk - 1, chunk, chunk + 1, 2 * chunk, 3 * chunk + 1]).filter(
            lambda n: 0 <= n <= max_size
        ),
        st.integers(1, max(1, max_size // chunk)).map(lambda m: m * chunk),
    )
    rng = random.Random(draw(st.integers(0, 2**32)))
    entries: dict[str, dict] = {}
    for _ in range(draw(st.integers(1, 14))):
        comps = draw(st.lists(COMPONENT, min_size=1, max_size=3))
        path = "/".join(comps)
        if path in entries or path in RESERVED or len(path.encode()) > 700:
            continue
        parents = ["/".join(comps[:i]) for i in range(1, len(comps))]
        if any(entries.get(p, {"kind": "dir"})["kind"] != "dir" for p in parents):
            continue
        is_parent = any(k.startswith(path + "/") for k in entries)
        kind = "dir" if is_parent else draw(st.sampled_from(KINDS))
        regs = [k for k, v in entries.items() if v["kind"] in ("reg", "hardlink")]
        if kind == "hardlink" and not regs:
            kind = "reg"
        e = {
            "kind": kind,
            "mode": draw(st.integers(0, 0o7777)),
            "uid": draw(st.one_of(st.just(0), st.integers(0, 70_000))),
            "gid": draw(st.one_of(st.just(0), st.integers(0, 70_000))),
            "uname": draw(st.sampled_from(["", "root", "app", "ünï"])),
            "gname": draw(st.sampled_from(["", "root", "grp"])),
            "mtime": draw(st.one_of(st.just(0), st.integers(1, 4_000_000_000))),
            "xattrs": draw(
                st.dictionaries(
                    st.sampled_from(["user.a", "user.purpose", "user.ünï", "trusted.overlay.x"]),
                    st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=20),
                    max_size=2,
                )
            ),
        }
        if kind == "reg":
            e["data"] = _content(rng, draw(sizes))
        elif kind == "symlink":
            e["link"] = draw(
                st.one_of(PLAIN, st.sampled_from(["/etc/passwd", "../../x", "a/../b", "ünï"]))
            )
        elif kind == "hardlink":
            e["link"] = draw(st.sampled_from(regs))
        elif kind in ("char", "block"):
            e["dev"] = (draw(st.integers(0, 4095)), draw(st.integers(0, 1 << 19)))
        entries[path] = e

    # archive order: random, except that a hardlink follows its target
    order = list(entries)
    rng.shuffle(order)
    placed: list[str] = []
    pending = order
    while pending:
        rest = []
        for p in pending:
            e = entries[p]
            if e["kind"] == "hardlink" and e["link"] not in placed:
                rest.append(p)
            else:
                placed.append(p)
        pending = rest
    fmt = draw(st.sampled_from([tarfile.PAX_FORMAT, tarfile.GNU_FORMAT]))
    if any(e["xattrs"] for e in entries.values()):
        fmt = tarfile.PAX_FORMAT
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, encoding="utf-8") as tf:
        for p in placed:
            e = entries[p]
            info = tarfile.TarInfo(p + ("/" if e["kind"] == "dir" and rng.random() < 0.5 else ""))
            info.type = {
                "dir": tarfile.DIRTYPE,
                "reg": tarfile.REGTYPE,
                "symlink": tarfile.SYMTYPE,
                "hardlink": tarfile.LNKTYPE,
                "fifo": tarfile.FIFOTYPE,
                "char": tarfile.CHRTYPE,
                "block": tarfile.BLKTYPE,
            }[e["kind"]]
            info.mode, info.uid, info.gid = e["mode"], e["uid"], e["gid"]
            info.uname, info.gname, info.mtime = e["uname"], e["gname"], e["mtime"]
            info.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in e["xattrs"].items()}
            if "link" in e:
                info.linkname = e["link"]
            if "dev" in e:
                info.devmajor, info.devminor = e["dev"]
            data = e.get("data")
            if data is not None:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)

    compression = draw(st.sampled_from(["gzip", "zstd"]))
    level = draw(st.integers(0, 9) if compression == "gzip" else st.integers(1, 19))
    files = [p for p in placed if entries[p]["kind"] in ("reg", "hardlink")]
    prioritized = []
    if files:
        prioritized = draw(st.one_of(st.just([]), st.lists(st.sampled_from(files), unique=True)))
    kw = {
        "compression": compression,
        "chunk_size": chunk,
        "level": level,
        "prioritized_files": prioritized,
    }
    return buf.getvalue(), kw, draw(st.integers(0, 2**32))


def _check(trees, tar: bytes, kw: dict, seed: int) -> None:
    out = io.BytesIO()
    res = build(io.BytesIO(tar), out, **kw)
    blob = out.getvalue()
    assert res.blob_size == len(blob)
    r = Reader(lambda off, n: blob[off : off + n], len(blob), toc_digest=res.toc_digest)
    assert r.compression == kw["compression"]
    assert r.landmark == (
        ".prefetch.landmark" if kw["prioritized_files"] else ".no.prefetch.landmark"
    )
    want = trees.tar(tar)
    trees.compare(trees.reader(r), want)

    rng = random.Random(seed)
    originals = {}
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        for m in tf:
            if m.isreg():
                originals[m.name.rstrip("/")] = tf.extractfile(m).read()
    chunk = kw["chunk_size"]
    for path, data in originals.items():
        node = r.lookup(path)
        n = len(data)
        windows = [(0, n), (n, 1), (n + 5, 3), (0, 0)]
        for _ in range(4):
            off = rng.randint(0, n)
            windows.append((off, rng.randint(0, n - off + 2)))
        if n > chunk:  # straddle a chunk boundary
            b = rng.randint(1, (n - 1) // chunk) * chunk
            windows.append((b - 1, 2))
            windows.append((b, chunk))
        for off, size in windows:
            assert r.read(node.id, off, size) == data[off : off + size], (path, off, size)


@pytest.mark.timeout(180)
@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(layer=layers())
@example(
    layer=(
        make_tar(("a/b", b"0123456789", {})),
        {"compression": "zstd", "chunk_size": 5, "level": 3, "prioritized_files": ["a/b"]},
        0,
    )
)
def test_random_trees_round_trip(trees, layer):
    tar, kw, seed = layer
    _check(trees, tar, kw, seed)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("compression", ["gzip", "zstd"])
@pytest.mark.parametrize("chunk", [1, 3, 4096, 65536])
def test_chunk_size_edges(trees, compression, chunk):
    """Files of exactly k chunks, one byte either side, empty, and one byte."""
    rng = random.Random(chunk)
    members = [("empty", b"", {}), ("one", b"x", {})]
    for k in (1, 2, 5):
        for d in (-1, 0, 1):
            size = k * chunk + d
            if size >= 0:
                members.append((f"k{k}{d:+d}", rng.randbytes(size), {}))
    members.append(("hl", None, {"type": tarfile.LNKTYPE, "linkname": "k2+0"}))
    tar = make_tar(*members)
    kw = {"compression": compression, "chunk_size": chunk, "level": 1, "prioritized_files": []}
    _check(trees, tar, kw, 0)


@pytest.mark.timeout(60)
def test_dir_listed_after_its_children_and_root_entry(trees):
    """'./' root entry, a dir entry after its files, hardlink chains, deep implied dirs."""
    tar = make_tar(
        ("./", None, {"type": tarfile.DIRTYPE, "mode": 0o700, "mtime": 5}),
        ("./x/y/z/file", b"hello", {"mode": 0o640, "uid": 7}),
        ("./x/y", None, {"type": tarfile.DIRTYPE, "mode": 0o711, "uid": 3, "gid": 4}),
        ("./x/l1", None, {"type": tarfile.LNKTYPE, "linkname": "x/y/z/file"}),
        ("./x/l2", None, {"type": tarfile.LNKTYPE, "linkname": "./x/l1"}),
    )
    kw = {"compression": "gzip", "chunk_size": 2, "level": 6, "prioritized_files": ["x/l2"]}
    _check(trees, tar, kw, 1)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("level", [0, 5, 9])
def test_large_member_streams_through_zlib(trees, monkeypatch, level):
    """A member of several parts over the one-buffer limit (in real layers, a run of
    hundreds of MB of non-file headers) is compressed by the streaming fallback, and the
    layer reads back the same as one compressed by libdeflate."""
    from stargz.estargz import writer

    members = [(f"d{i}/", None, {"type": tarfile.DIRTYPE}) for i in range(40)]
    members += [("f", b"payload" * 100, {}), ("g", b"x" * 3000, {})]
    tar = make_tar(*members)
    kw = {"compression": "gzip", "chunk_size": 1024, "level": level, "prioritized_files": []}
    monkeypatch.setattr(writer, "_ONE_BUFFER_MAX", 4096)
    streamed = []
    real = writer.zlib.compressobj
    monkeypatch.setattr(writer.zlib, "compressobj", lambda *a: streamed.append(a) or real(*a))
    _check(trees, tar, kw, 0)
    assert streamed  # the 40 directory headers before "f" were one member of 20 KiB
