"""TOC builder: the native fast path and its pure-Python twin agree.

Three ways to disagree, each checked: a different result on input both accept (every
fixture layer, random TOCs), a different error (type or message) on input the twin
rejects (a table of malformed entries, random TOCs), and the fast path rejecting input the
twin accepts (it would fall back and stay correct, but slow: ``build_fast`` must accept
everything the twin does).
"""

from __future__ import annotations

import base64
import os

import pytest
from conftest import NO_EXTENSIONS, backend_of
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stargz.errors import ChunkError, TOCError, UnsafePathError, VerificationError
from stargz.estargz import open_file, tocbuild
from stargz.estargz.node import same

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "ab" * 32
KW = {"payload_end": 1 << 20, "verify": True, "max_chunk_size": 1 << 16}


@pytest.fixture(scope="module")
def native():
    return backend_of(tocbuild, "native")


def outcome(build, entries, **kw):
    try:
        return None, build(entries, **kw)
    except Exception as e:  # noqa: BLE001 - the exception is the result
        return (type(e), str(e)), None


def agree(native, entries, **kw) -> None:
    kw = {**KW, **kw}
    want_err, want = outcome(tocbuild.python.build, entries, **kw)
    got_err, got = outcome(native.build, entries, **kw)
    assert got_err == want_err
    if want is not None:
        assert same(got, want) == []
        fast = native.build_fast(
            entries,
            kw["payload_end"],
            kw["verify"],
            kw["max_chunk_size"],
            kw.get("max_depth", tocbuild.python.DEFAULT_MAX_DEPTH),
            kw.get("max_name_bytes", tocbuild.python.DEFAULT_MAX_NAME_BYTES),
        )
        assert same(fast, want) == []


def test_selector() -> None:
    if NO_EXTENSIONS:
        assert tocbuild.backend == "python" and tocbuild.native is None
    else:
        assert tocbuild.native is not None, tocbuild.native_error
        assert tocbuild.build is tocbuild.native.build


def test_fixture_layers_build_the_same(native, oci_layout) -> None:
    seen = 0
    for name in ("oci-corners", "oci-busybox"):
        layout = oci_layout(name)
        for tag in layout.tags:
            for layer in layout.layers(tag):
                if not layer.toc_digest:
                    continue  # an unconverted tag: not eStargz
                with open_file(str(layer.path), toc_digest=layer.toc_digest) as r:
                    kw = {
                        "payload_end": r.footer.toc_offset,
                        "verify": True,
                        "max_chunk_size": 1 << 28,
                    }
                    agree(native, r._entries, **kw)
                    seen += 1
    assert seen >= 8


def reg(name, size=10, **kw):
    return {"name": name, "type": "reg", "size": size, "offset": 100, "chunkDigest": D1, **kw}


BAD = {
    "not an object": [["x"]],
    "bool size": [reg("a", size=True)],
    "size beyond int64": [reg("a", size=1 << 63)],
    "name not a string": [{"name": 5, "type": "dir"}],
    "no name": [{"type": "dir"}],
    "unknown type": [{"name": "a", "type": "socket"}],
    "no type": [{"name": "a"}],
    "xattrs not base64": [{"name": "a", "type": "dir", "xattrs": {"user.x": "!!"}}],
    "xattrs not an object": [{"name": "a", "type": "dir", "xattrs": ["x"]}],
    "dotdot": [{"name": "a/../../b", "type": "dir"}],
    "absolute": [{"name": "/etc", "type": "dir"}],
    "nul": [{"name": "a\x00b", "type": "dir"}],
    "bad chunk digest": [reg("a", chunkDigest="sha256:XYZ")],
    "upper-case digest": [reg("a", chunkDigest="sha256:" + "A" * 64)],
    "bad file digest": [reg("a", digest="md5:1")],
    "no chunk digest": [reg("a", chunkDigest="")],
    "chunk alone": [{"name": "a", "type": "chunk", "offset": 5, "chunkOffset": 0}],
    "chunk of another file": [
        reg("a", chunkSize=5),
        {"name": "b", "type": "chunk", "offset": 200, "chunkOffset": 5, "chunkDigest": D1},
    ],
    "chunk gap": [
        reg("a", chunkSize=5),
        {"name": "a", "type": "chunk", "offset": 200, "chunkOffset": 6, "chunkDigest": D1},
    ],
    "short coverage": [reg("a", chunkSize=5), {"name": "b", "type": "dir"}],
    "short coverage at end": [reg("a", chunkSize=5)],
    "chunk too big": [reg("a", size=1 << 17, offset=0)],
    "offset past payload": [reg("a", offset=1 << 20)],
    "negative inner offset": [reg("a", innerOffset=-1)],
    "offsets go back": [reg("a", offset=500), reg("b", offset=400)],
    "negative size": [reg("a", size=-1)],
    "root not a dir": [{"name": "./", "type": "reg"}],
    "parent is a file": [reg("a"), {"name": "a/b", "type": "dir"}],
    "dir replaces file": [reg("a"), {"name": "a", "type": "dir"}],
    "file replaces dir": [{"name": "a", "type": "dir"}, reg("a")],
    "hardlink to nothing": [{"name": "h", "type": "hardlink", "linkName": "x"}],
    "hardlink to dir": [
        {"name": "d", "type": "dir"},
        {"name": "h", "type": "hardlink", "linkName": "d"},
    ],
    "hardlink name taken": [
        reg("a"),
        {"name": "b", "type": "symlink", "linkName": "a"},
        {"name": "b", "type": "hardlink", "linkName": "a"},
    ],
    "hardlink escapes": [reg("a"), {"name": "h", "type": "hardlink", "linkName": "../a"}],
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_entries_same_error(native, case) -> None:
    err, _ = outcome(tocbuild.python.build, BAD[case], **KW)
    assert err is not None and issubclass(
        err[0], TOCError | ChunkError | UnsafePathError | VerificationError
    ), err
    agree(native, BAD[case])


def test_deep_path_is_not_a_recursion_error(native) -> None:
    deep = "/".join(["d"] * 5000)
    entries = [{"name": deep, "type": "dir"}, reg(deep + "/f")]
    agree(native, entries, max_depth=5001)
    built = native.build(entries, **KW, max_depth=5001)
    assert len(built.nodes) == 5002
    assert built.nodes[-1].path == deep + "/f"


def test_good_shapes(native) -> None:
    xattr = base64.b64encode(b"v").decode()
    entries = [
        {"name": "./", "type": "dir", "mode": 0o700},
        {"name": "a/b/", "type": "dir", "mode": 0o711, "xattrs": {"user.k": xattr}},
        {"name": "a/b", "type": "dir", "mode": 0o750},  # a later dir entry replaces
        reg("a/b/f", size=9, chunkSize=4, offset=100, digest=D2),
        {
            "name": "a/b/f",
            "type": "chunk",
            "offset": 150,
            "chunkOffset": 4,
            "chunkSize": 4,
            "chunkDigest": D2,
        },  # fmt: skip
        {
            "name": "",
            "type": "chunk",
            "offset": 150,
            "innerOffset": 4,
            "chunkOffset": 8,
            "chunkDigest": D1,
        },  # fmt: skip
        {"name": "a/b/.wh..wh..opq", "type": "reg"},
        {"name": "x/./y//z", "type": "symlink", "linkName": "../f", "NumLink": 3},
        {"name": "a/h", "type": "hardlink", "linkName": "./a/b/f"},
        reg("a/b/f2", size=0, offset=0, chunkDigest=""),
        {"name": "dev", "type": "char", "devMajor": 1, "devMinor": 3, "uid": None},
        {
            "name": ".prefetch.landmark",
            "type": "reg",
            "size": 1,
            "offset": 300,
            "chunkDigest": D1,
        },  # fmt: skip
        reg("a/b/f", size=3, offset=400),  # a later file replaces: a fresh id
    ]
    agree(native, entries)
    built = native.build(entries, **KW)
    assert built.landmark == ".prefetch.landmark"
    f = built.nodes[built.by_path["a/b/f"]]
    assert f.size == 3 and f.entry.offset == 400 and f.entry.name == "a/b/f"
    assert built.nodes[0].mode == 0o700
    assert built.nodes[built.by_path["a/b"]].entry.xattrs == {}  # replaced by the later entry
    agree(native, entries, verify=False)


SETTINGS = settings(
    max_examples=int(os.environ.get("STARGZ_HYPOTHESIS_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

_names = st.lists(st.sampled_from(["a", "b", ".", "..", "", ".wh.a", ".wh..wh..opq"]), max_size=3)
_entry = st.fixed_dictionaries(
    {
        "name": _names.map("/".join),
        "type": st.sampled_from(["dir", "reg", "chunk", "symlink", "hardlink", "fifo", "x"]),
    },
    optional={
        "size": st.integers(-2, 12),
        "offset": st.integers(-1, 40),
        "chunkOffset": st.integers(0, 12),
        "chunkSize": st.integers(0, 12),
        "innerOffset": st.integers(-1, 6),
        "chunkDigest": st.sampled_from([D1, D2, "", "sha256:1"]),
        "digest": st.sampled_from([D1, "", "x"]),
        "linkName": _names.map("/".join),
        "mode": st.integers(0, 0o7777) | st.booleans(),
        "NumLink": st.integers(),
    },
)


@SETTINGS
@given(entries=st.lists(_entry, max_size=8), verify=st.booleans())
def test_random_tocs_agree(native, entries, verify) -> None:
    agree(native, entries, payload_end=32, verify=verify, max_chunk_size=10)


@pytest.mark.parametrize("which", ["native", "python"])
def test_nodes_share_what_they_can(which) -> None:
    """Memory: equal attrs tuples are one object, non-directories share one empty
    children mapping, and (native) no node keeps a string the JSON parser made."""
    build = backend_of(tocbuild, which).build
    common = {"modtime": "2020-01-01T00:00:00Z", "userName": "root", "uid": 0, "mode": 0o644}
    entries = [
        {"name": "d", "type": "dir", **common},
        reg("d/f1", size=1, offset=10, **common),
        reg("d/f2", size=1, offset=20, **common),
        {"name": "d/l", "type": "symlink", "linkName": "f1", **common},
    ]
    built = build(entries, **KW)
    f1, f2 = (built.nodes[built.by_path[p]] for p in ("d/f1", "d/f2"))
    assert f1.attrs is f2.attrs and f1.offset == 10 and f2.offset == 20
    assert f1.entry.offset == 10 and f1.entry.modtime == "2020-01-01T00:00:00Z"
    assert f1.children is f2.children and not f1.children
    with pytest.raises(TypeError):
        f1.children["x"] = 1  # type: ignore[index]
    link = built.nodes[built.by_path["d/l"]]
    assert link.link_name == "f1" and link.uid == 0 and link.modtime == common["modtime"]
    if which == "native":
        for node, obj in zip(built.nodes[1:], entries, strict=True):
            assert node.path == obj["name"] and node.name is not obj["name"]
            assert node.attrs[0] is not obj["modtime"]
        assert link.attrs[1] is not entries[3]["linkName"]
