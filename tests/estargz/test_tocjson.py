"""TOC builder from JSON bytes: the native scanner agrees with ``load_toc_doc`` + build.

``tocbuild.python.build_json`` is the reference (json.loads, then the twin's build). The
native ``build_json`` must return an equal `OpenedTOC` or raise the same exception type
with the same message, on every fixture TOC, on random TOCs in every JSON spelling, and on
a table of hostile documents. Its fast path (``build_json_fast``) may refuse a document
(the slow path then decides), but where a case says it must accept or must refuse, that is
checked too: refusing the corpus would be correct and slow, accepting what it cannot read
exactly would be wrong.
"""

from __future__ import annotations

import base64
import gc
import json
import threading
import time
from pathlib import Path

import pytest
from conftest import NO_EXTENSIONS, backend_of
from hypothesis import given
from hypothesis import strategies as st

from stargz.errors import TOCError
from stargz.estargz import open_file, tocbuild
from stargz.estargz.node import Node, same

from .test_tocbuild import D1, D2, KW, SETTINGS, _entry, reg


@pytest.fixture(scope="module")
def native():
    return backend_of(tocbuild, "native")


def outcome(fn, *args, **kw):
    try:
        return None, fn(*args, **kw)
    except Exception as e:  # noqa: BLE001 - the exception is the result
        return (type(e), str(e)), None


def slots(built) -> list[tuple]:
    """Every slot of every node (``same`` leaves out ``_entry``; the native builder sets
    the slots itself, without Node.__init__)."""
    return [
        tuple(_id_of(getattr(n, s)) if s == "parent" else getattr(n, s) for s in Node.__slots__)
        for n in built.nodes
    ]


def _id_of(parent: Node | None) -> int | None:
    return None if parent is None else parent.id


def agree(native, data, *, fast: bool | None = None, **kw) -> None:
    """Native build_json == reference; ``fast``: the fast path must accept (True) or
    refuse (False) the document."""
    kw = {**KW, **kw}
    want_err, want = outcome(tocbuild.python.build_json, data, **kw)
    got_err, got = outcome(native.build_json, data, **kw)
    assert got_err == want_err
    if want is not None:
        assert same(got, want) == []
        assert slots(got) == slots(want)
    if isinstance(data, bytes):
        args = (data, kw["payload_end"], kw["verify"], kw["max_chunk_size"])
        limits = {k: kw[k] for k in ("max_depth", "max_name_bytes") if k in kw}
        fast_err, fast_got = outcome(native.build_json_fast, *args, **limits)
        if fast_got is not None:
            assert want is not None and same(fast_got, want) == []
            assert slots(fast_got) == slots(want)
        if fast is not None:
            assert (fast_got is not None) == fast, fast_err


def doc(entries, **top) -> bytes:
    return json.dumps({"version": 1, "entries": entries, **top}).encode()


def toc_bytes(path: Path) -> tuple[bytes, int]:
    """(TOC JSON bytes, payload end) of a layer blob."""
    with open_file(str(path), keep_toc=False) as r:
        return r._read_toc_json(b"", r.blob_size, 1 << 30), r.footer.toc_offset


def test_selector() -> None:
    if NO_EXTENSIONS:
        assert tocbuild.build_json is tocbuild.python.build_json
    else:
        assert tocbuild.native is not None, tocbuild.native_error
        assert tocbuild.build_json is tocbuild.native.build_json


def fixture_layers(oci_layout):
    for name in ("oci-corners", "oci-busybox"):
        layout = oci_layout(name)
        for tag in layout.tags:
            for layer in layout.layers(tag):
                if layer.toc_digest:  # (else an unconverted tag: not eStargz)
                    yield layer


def test_fixture_tocs_build_the_same(native, oci_layout) -> None:
    seen = 0
    for layer in fixture_layers(oci_layout):
        data, payload_end = toc_bytes(layer.path)
        for verify in (True, False):
            agree(
                native,
                data,
                fast=True,
                payload_end=payload_end,
                verify=verify,
                max_chunk_size=1 << 28,
            )
        seen += 1
    assert seen >= 8


def test_reader_without_toc_takes_the_fast_path(native, oci_layout) -> None:
    """The daemon's open (keep_toc=False) reads the JSON itself, and opens the same layer
    as the CLI's (json.loads + build)."""
    before = native.json_fallbacks()
    for layer in fixture_layers(oci_layout):
        with (
            open_file(str(layer.path), toc_digest=layer.toc_digest) as full,
            open_file(str(layer.path), toc_digest=layer.toc_digest, keep_toc=False) as lean,
        ):
            assert slots(lean) == slots(full)
            assert lean.landmark == full.landmark and list(lean._trailing) == list(full._trailing)
            for col in ("chunk_off", "chunk_comp", "chunk_size", "chunk_digests"):
                assert getattr(lean, col) == getattr(full, col), col
            assert lean.dirents == full.dirents
    assert native.json_fallbacks() == before
    with pytest.raises(TOCError, match="TOC JSON must be an object"):
        native.build_json(b"[]", **KW)
    assert native.json_fallbacks() == before + 1


def large_go_toc(dirs: int = 300, files: int = 40) -> tuple[bytes, int]:
    """A distribution-sized TOC (12k files, chunked ones, symlinks, hard links, xattrs,
    non-ASCII names) in the Go tools' spelling: tab indent, UTF-8 left unescaped."""
    entries: list[dict] = [{"name": "usr/", "type": "dir", "mode": 0o755}]
    off = 0
    for d in range(dirs):
        base = f"usr/lib/pkg{d}/"
        entries.append(
            {"name": base, "type": "dir", "mode": 0o755, "modtime": "2024-01-01T00:00:00Z"}
        )
        for f in range(files):
            name = f"{base}mod_{f}_é.py"
            size = 100 + f * 997
            e = {
                "name": name,
                "type": "reg",
                "size": size,
                "offset": off,
                "mode": 0o644,
                "uid": 0,
                "gid": 0,
                "modtime": "2024-01-01T00:00:00Z",
                "digest": D2,
                "chunkDigest": D1,
                "chunkSize": min(size, 4096) if f % 7 == 0 else 0,
            }
            if f % 5 == 0:
                e["xattrs"] = {"user.tag": base64.b64encode(b"v").decode()}
            entries.append(e)
            if e["chunkSize"]:
                for c in range(4096, size, 4096):
                    entries.append(
                        {
                            "name": name,
                            "type": "chunk",
                            "offset": off + c,
                            "chunkOffset": c,
                            "chunkSize": min(4096, size - c),
                            "chunkDigest": D1,
                        }
                    )
            off += size
        entries.append({"name": base + "link", "type": "symlink", "linkName": "mod_0_é.py"})
        entries.append({"name": base + "hard", "type": "hardlink", "linkName": base + "mod_1_é.py"})
    text = json.dumps({"version": 1, "entries": entries}, indent="\t", ensure_ascii=False)
    return text.encode(), off + 1


def test_distribution_sized_toc_takes_the_fast_path(native) -> None:
    """The daemon opens a big layer's TOC without the slow path, and agrees with the
    reference on it."""
    data, payload_end = large_go_toc()
    assert len(data) > 2_000_000
    agree(native, data, fast=True, payload_end=payload_end, max_chunk_size=1 << 28)


# --- random TOCs, every spelling -----------------------------------------------------------

SPELLINGS = {
    "go": {"indent": "\t", "ensure_ascii": False},  # what the Go tools write
    "go-ascii": {"indent": "\t"},
    "compact": {"separators": (",", ":"), "ensure_ascii": False},
    "compact-ascii": {"separators": (",", ":")},
    "default": {},
}

_text = st.text(
    st.sampled_from(["a", "b", "/", ".", "é", "😀", "中", '"', "\\", "\n", "\t", "\x7f", "\u2028"]),
    max_size=6,
)
_json_entry = st.fixed_dictionaries(
    {"name": _text | _entry.map(lambda e: e["name"]), "type": st.sampled_from(["dir", "reg"])},
    optional={
        "size": st.integers(0, 3) | st.none(),
        "offset": st.integers(0, 20) | st.none(),
        "chunkDigest": st.sampled_from([D1, D2, None]),
        "modtime": st.sampled_from(["2020-01-01T00:00:00Z", "é", None]),
        "userName": _text | st.none(),
        "linkName": _text,
        "uid": st.integers(-(1 << 63), (1 << 63) - 1) | st.none(),
        "xattrs": st.dictionaries(_text, st.sampled_from(["", "YQ==", "!"]), max_size=2)
        | st.none(),
        "NumLink": st.integers() | st.text(max_size=3) | st.booleans() | st.none(),
    },
)


@SETTINGS
@given(
    entries=st.lists(_entry | _json_entry, max_size=8),
    verify=st.booleans(),
    spelling=st.sampled_from(sorted(SPELLINGS)),
)
def test_random_tocs_agree(native, entries, verify, spelling) -> None:
    data = json.dumps({"version": 1, "entries": entries}, **SPELLINGS[spelling]).encode()
    agree(native, data, payload_end=32, verify=verify, max_chunk_size=10)


def test_corpus_spellings_take_the_fast_path(native, oci_layout) -> None:
    layer = next(iter(fixture_layers(oci_layout)))
    data, payload_end = toc_bytes(layer.path)
    obj = json.loads(data)
    for kw in SPELLINGS.values():
        again = json.dumps(obj, **kw).encode()
        agree(native, again, fast=True, payload_end=payload_end, max_chunk_size=1 << 28)


# --- hostile documents ---------------------------------------------------------------------

X = base64.b64encode(b"v").decode()
GOOD = doc([{"name": "d", "type": "dir"}, reg("d/f", size=4, chunkSize=0)])


def named(name_json: str) -> bytes:
    """A TOC with one directory whose name is spelled ``name_json`` (raw JSON text)."""
    return b'{"version": 1, "entries": [{"name": ' + name_json.encode() + b', "type": "dir"}]}'


def raw_named(raw: bytes) -> bytes:
    """A TOC with one directory whose name is the raw bytes ``raw`` between quotes."""
    return named('"a"').replace(b'"a"', b'"' + raw + b'"')


def entry_text(text: str) -> bytes:
    """A TOC whose one entry is the JSON text ``{"name": "d", "type": "dir", <text>}``."""
    return b'{"version":1,"entries":[{"name":"d","type":"dir",' + text.encode() + b"}]}"


# name -> (document, must the fast path accept it: True / False / None = either)
CASES: dict[str, tuple[bytes, bool | None]] = {
    "good": (GOOD, True),
    **{
        f"escape {e}": (named(f'"a{e}b"'), True)
        for e in ['\\"', "\\\\", "\\/", "\\b", "\\f", "\\n", "\\r", "\\t", "\\u00e9"]
    },
    "escape upper-case hex": (named('"\\u00E9\\u00c9"'), True),
    "escape surrogate pair": (named('"\\ud83d\\ude00"'), True),
    "escape NUL": (named('"a\\u0000b"'), None),  # UnsafePathError, either way
    "raw multibyte UTF-8": (named('"é中😀"'), True),
    "raw DEL": (named('"a\x7fb"'), True),
    "raw U+2028": (named('"a\u2028b"'), True),
    "lone high surrogate": (named('"\\ud800"'), False),
    "lone low surrogate": (named('"\\udc00"'), False),
    "high surrogate, then not low": (named('"\\ud800\\u0041"'), False),
    "high surrogate at the end": (named('"\\ud83d"'), False),
    "bad escape": (named('"\\x41"'), False),
    "short \\u": (named('"\\u12"'), False),
    "invalid UTF-8 byte": (raw_named(b"\xff"), False),
    "truncated UTF-8": (raw_named(b"\xc3"), False),
    "overlong UTF-8": (raw_named(b"\xc0\xaf"), False),
    "UTF-8 surrogate": (raw_named(b"\xed\xa0\x80"), False),
    "UTF-8 above U+10FFFF": (raw_named(b"\xf4\x90\x80\x80"), False),
    "invalid UTF-8 in a skipped string": (
        entry_text('"NumLink": "a"').replace(b'"a"', b'"\xff"'),
        False,
    ),
    "invalid UTF-8 in a skipped key": (entry_text('"Num_ink": 1').replace(b"_", b"\xff"), False),
    "UTF-8 surrogate in a skipped string": (  # (json.loads passes it: "surrogatepass")
        entry_text('"NumLink": "a"').replace(b'"a"', b'"\xed\xa0\x80"'),
        None,
    ),
    "lone surrogate in a skipped string": (entry_text('"NumLink": "\\ud800"'), False),
    "raw newline in a string": (named('"a\nb"'), False),
    "raw tab in a string": (named('"a\tb"'), False),
    "raw NUL in a string": (named('"a\x00b"'), False),
    "raw NUL between tokens": (GOOD.replace(b", ", b",\x00 ", 1), False),
    "UTF-8 BOM": (b"\xef\xbb\xbf" + GOOD, False),
    "whitespace everywhere": (
        b' \t\n\r{ \n"version" \t:\r 1 ,\n "entries" : [ { "name" : "d" , "type" : "dir" ,'
        b' "xattrs" : { "user.k" : "' + X.encode() + b'" } } , { } ] } \r\n\t ',
        False,  # (the empty entry has no name)
    ),
    "whitespace everywhere, good": (
        b' \t\n\r{ \n"version" \t:\r 1 ,\n "entries" : [ { "name" : "d" , "type" : "dir" ,'
        b' "xattrs" : { "user.k" : "' + X.encode() + b'" } } ] } \r\n\t ',
        True,
    ),
    "form feed as whitespace": (GOOD.replace(b", ", b",\x0c", 1), False),
    "empty entries": (b'{"version": 1, "entries": []}', True),
    "null entries": (b'{"entries": null, "version": 1}', True),
    "no entries": (b'{"version": 1}', True),
    "entries not an array": (b'{"version": 1, "entries": {}}', False),
    "entries twice": (b'{"version": 1, "entries": [], "entries": []}', False),
    "entry not an object": (b'{"version": 1, "entries": [["x"]]}', False),
    "entry null": (b'{"version": 1, "entries": [null]}', False),
    "empty entry": (b'{"version": 1, "entries": [{}]}', False),
    "no version": (b'{"entries": []}', False),
    "version 2": (b'{"version": 2, "entries": []}', False),
    "version 0": (b'{"version": 0}', False),
    "version -1": (b'{"version": -1}', False),
    "version string": (b'{"version": "1"}', False),
    "version float": (b'{"version": 1.0}', False),
    "version exponent": (b'{"version": 1e0}', False),
    "version true": (b'{"version": true}', False),
    "version null": (b'{"version": null}', False),
    "version leading zero": (b'{"version": 01}', False),
    "version twice": (b'{"version": 1, "version": 1}', False),
    "version last": (b'{"entries": [{"name": "d", "type": "dir"}], "version": 1}', True),
    "not an object: array": (b"[]", False),
    "not an object: number": (b"1", False),
    "not an object: string": (b'"x"', False),
    "not an object: null": (b"null", False),
    "empty document": (b"", False),
    "whitespace only": (b" \n", False),
    "empty object": (b"{}", False),
    "trailing garbage": (GOOD + b"x", False),
    "trailing object": (GOOD + b"{}", False),
    "trailing comma in the document": (GOOD + b",", False),
    "trailing comma in an object": (entry_text('"uid": 1,'), False),
    "trailing comma in the entries": (
        b'{"version":1,"entries":[{"name":"d","type":"dir"},]}',
        False,
    ),
    "missing comma": (entry_text('"uid": 1 "gid": 2'), False),
    "missing colon": (entry_text('"uid" 1'), False),
    "single quotes": (entry_text("'uid': 1"), False),
    "unquoted key": (entry_text("uid: 1"), False),
    "null values": (
        entry_text('"size": null, "modtime": null, "xattrs": null, "uid": null, "linkName": null'),
        True,
    ),
    "unknown key, string": (entry_text('"NumLink": "x"'), True),
    "unknown key, int": (entry_text('"NumLink": 3'), True),
    "unknown key, big int": (entry_text('"NumLink": 123456789012345678901234567890'), False),
    "unknown key, true": (entry_text('"NumLink": true'), True),
    "unknown key, false": (entry_text('"NumLink": false'), True),
    "unknown key, null": (entry_text('"NumLink": null'), True),
    "unknown key, float": (entry_text('"NumLink": 1.5'), False),
    "unknown key, NaN": (entry_text('"NumLink": NaN'), False),
    "unknown key, -Infinity": (entry_text('"NumLink": -Infinity'), False),
    "unknown key, array": (entry_text('"NumLink": [1, 2]'), False),
    "unknown key, object": (entry_text('"NumLink": {"a": 1}'), False),
    "unknown key, deep array": (entry_text('"NumLink": ' + "[" * 100_000 + "]" * 100_000), False),
    "unknown key twice": (entry_text('"NumLink": 1, "NumLink": 2'), True),
    "unknown key, escaped spelling": (entry_text('"Num\\u004cink": 1'), False),
    "known key, escaped spelling": (
        b'{"version":1,"entries":[{"na\\u006de":"d","type":"dir"}]}',
        False,  # json.loads reads "name": accepted, by the slow path
    ),
    "unknown top-level key, scalar": (doc([], comment="x", n=1, f=False, z=None), True),
    "unknown top-level key, object": (doc([], extra={"a": [1]}), False),
    "unknown top-level key, array": (doc([], extra=[1]), False),
    "duplicate key": (entry_text('"mode": 1, "mode": 2'), False),
    "duplicate key after null": (entry_text('"mode": null, "mode": 2'), False),
    "duplicate name": (b'{"version":1,"entries":[{"name":"a","type":"dir","name":"b"}]}', False),
    "duplicate xattr": (entry_text(f'"xattrs": {{"user.a": "{X}", "user.a": ""}}'), False),
    "xattrs": (entry_text(f'"xattrs": {{"user.a": "{X}", "user.\\u00e9": "", "": "{X}"}}'), True),
    "xattrs empty": (entry_text('"xattrs": {}'), True),
    "xattr not base64": (entry_text('"xattrs": {"user.a": "!!"}'), None),
    "xattr value escaped": (entry_text('"xattrs": {"user.a": "Y\\u0051=="}'), True),
    "xattr value null": (entry_text('"xattrs": {"user.a": null}'), False),
    "xattr value number": (entry_text('"xattrs": {"user.a": 1}'), False),
    "xattr value object": (entry_text('"xattrs": {"user.a": {}}'), False),
    "xattrs an array": (entry_text('"xattrs": []'), False),
    "xattrs a string": (entry_text('"xattrs": "x"'), False),
    "int -0": (entry_text('"uid": -0, "gid": 0'), True),
    "int max": (entry_text('"innerOffset": 9223372036854775807'), True),
    "int min": (entry_text('"innerOffset": -9223372036854775808'), True),
    "int above max": (entry_text('"uid": 9223372036854775808'), False),
    "int below min": (entry_text('"uid": -9223372036854775809'), False),
    "int huge": (entry_text('"uid": ' + "9" * 5000), False),
    "int leading zero": (entry_text('"uid": 01'), False),
    "int plus sign": (entry_text('"uid": +1'), False),
    "int minus alone": (entry_text('"uid": -'), False),
    "int float": (entry_text('"uid": 1.0'), False),
    "int exponent": (entry_text('"uid": 1e3'), False),
    "int dot": (entry_text('"uid": 1.'), False),
    "int true": (entry_text('"uid": true'), False),
    "int string": (entry_text('"uid": "1"'), False),
    "string a number": (entry_text('"modtime": 1'), False),
    "string an object": (entry_text('"linkName": {}'), False),
    "string false": (entry_text('"userName": false'), False),
    "literal misspelled": (entry_text('"uid": nul'), False),
    "literal run on": (entry_text('"uid": nullx'), False),
    "type unknown": (named('"x"').replace(b'"dir"', b'"socket"'), False),
    "type escaped": (named('"x"').replace(b'"dir"', b'"di\\u0072"'), False),
    "type a number": (named('"x"').replace(b'"dir"', b"1"), False),
    "no type": (b'{"version":1,"entries":[{"name":"d"}]}', False),
    "no name": (b'{"version":1,"entries":[{"type":"dir"}]}', False),
    "chunk digest escaped": (
        doc([reg("f", size=4)]).replace(b"sha256:1", b"sha256:\\u0031", 1),
        False,  # (the same digest: the slow path accepts it)
    ),
    "chunk digest bad": (doc([reg("f", size=4, chunkDigest="sha256:" + "g" * 64)]), False),
    "file digest bad": (doc([reg("f", size=4, digest="sha256:" + "A" * 64)]), False),
    "file digest same as chunk": (doc([reg("f", size=4, digest=D1)]), True),
    "file digest different": (doc([reg("f", size=4, digest=D2)]), True),
    "name escapes the layer": (named('"../x"'), None),
    "name absolute": (named('"/x"'), None),
    "name cleaned": (named('"./a//b/"'), True),
    "names in every directory": (
        doc([{"name": n, "type": "dir"} for n in ("a", "a/b", "c", "a/b/d", "a/e", "c/f")]),
        True,
    ),
    "hardlink": (
        doc([reg("f", size=4), {"name": "h", "type": "hardlink", "linkName": "f"}]),
        True,
    ),
    "hardlink to nothing": (doc([{"name": "h", "type": "hardlink", "linkName": "x"}]), False),
    "landmark": (doc([reg(".prefetch.landmark", size=1)]), True),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_documents(native, case) -> None:
    data, fast = CASES[case]
    agree(native, data, fast=fast)
    agree(native, data, verify=False)


def test_the_table_means_what_it_says() -> None:
    """Control: the reference accepts the cases meant to be good, and json.loads reads
    the escape cases as intended (a typo in the table would test nothing)."""
    for data, fast in CASES.values():
        if fast:
            tocbuild.python.build_json(data, **KW)
    assert json.loads(CASES["escape surrogate pair"][0])["entries"][0]["name"] == "😀"
    assert json.loads(CASES["known key, escaped spelling"][0])["entries"][0]["name"] == "d"
    built = tocbuild.python.build_json(CASES["xattrs"][0], **KW)
    assert built.nodes[1].xattrs == {"user.a": b"v", "user.é": b"", "": b"v"}


@pytest.mark.parametrize("spelling", ["go", "compact"])
def test_truncated_documents(native, spelling) -> None:
    """Every cut of a small TOC is refused with json.loads's message (or, cut in the
    trailing whitespace, read the same)."""
    entries = [
        {"name": "é/d", "type": "dir", "xattrs": {"user.k": X}, "NumLink": None, "innerOffset": -5},
        reg("é/d/f\n", size=4, uid=5, modtime="2020-01-01T00:00:00Z"),
    ]
    data = json.dumps({"version": 1, "entries": entries}, **SPELLINGS[spelling]).encode() + b"\n"
    for cut in range(len(data) + 1):
        agree(native, data[:cut], fast=True if cut >= len(data) - 1 else False)


def test_inputs_other_than_bytes(native) -> None:
    agree(native, bytearray(GOOD))
    agree(native, GOOD.decode())
    agree(native, memoryview(GOOD))


def test_nodes_share_what_they_can(native) -> None:
    """As test_tocbuild's: equal attrs tuples are one object, equal modtimes one
    str, non-directories one children mapping."""
    common = {"modtime": "2020-01-01T00:00:00Z", "userName": "root", "uid": 0, "mode": 0o644}
    entries = [
        {"name": "d", "type": "dir", **common},
        reg("d/f1", size=1, offset=10, **common),
        reg("d/f2", size=1, offset=20, **common),
        {"name": "d/l", "type": "symlink", "linkName": "f1", **common},
        {"name": "d/x", "type": "fifo", **common, "xattrs": {"user.a": X}},
    ]
    built = native.build_json_fast(doc(entries), KW["payload_end"], True, KW["max_chunk_size"])
    d, f1, f2, link, x = (built.nodes[built.by_path[e["name"]]] for e in entries)
    assert f1.attrs is f2.attrs and f1.offset == 10 and f2.offset == 20
    assert f1.children is f2.children and not f1.children
    assert d.attrs[0] is f1.attrs[0] is link.attrs[0] is x.attrs[0]  # one modtime str
    assert d.attrs[4] is x.attrs[4]  # one owner str
    assert link.link_name == "f1" and x.xattrs == {"user.a": b"v"} and x.attrs is not d.attrs
    assert f1.mode is f2.mode  # one int per mode


def ticks_during(fn) -> tuple[int, float, float]:
    """Run ``fn`` while another thread ticks every 0.5 ms: (ticks while it ran, the longest
    the ticker was held up, how long it ran)."""
    ticks: list[float] = []
    stop = threading.Event()

    def tick() -> None:
        while not stop.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.0005)

    th = threading.Thread(target=tick)
    th.start()
    gc.disable()  # as the reader does: a collection would hold the GIL too
    try:
        time.sleep(0.01)
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
    finally:
        gc.enable()
        stop.set()
        th.join()
    during = [t for t in ticks if t0 < t < t1]
    gaps = [b - a for a, b in zip([t0, *during], [*during, t1], strict=True)]
    return len(during), max(gaps), t1 - t0


@pytest.fixture(scope="module")
def big_toc() -> bytes:
    """200k entries, ~20 MB: ~20 ms of scanning, ~0.5 s of building."""
    entries = [{"name": f"d{i}", "type": "dir"} for i in range(100)]
    entries += [
        reg(f"d{i % 100}/file-{i:06d}", size=1, offset=i, modtime="2020-01-01T00:00:00Z")
        for i in range(200_000)
    ]
    return doc(entries)


def test_the_scan_does_not_hold_the_gil(native, big_toc) -> None:
    """With the GIL held throughout, the ticker would not tick at all while it ran."""
    refused = big_toc + b"x"
    assert native.scan(big_toc) and not native.scan(refused)
    # timing on a shared machine: the best of three tries (with the GIL held, every try
    # would see no tick at all)
    tries = []
    for _ in range(3):
        n, longest, took = ticks_during(lambda: native.scan(refused))
        tries.append((n, longest, took))
        if n >= 2 and longest < 0.6 * took:
            break
    else:
        raise AssertionError(tries)


def test_the_build_lets_waiting_threads_run(native, big_toc) -> None:
    """The build holds the GIL, but hands it over when asked (every 256 entries): the
    ticker waits about the switch interval (5 ms), not the whole build."""
    built = []
    tries = []
    for _ in range(3):  # the best of three tries, as above
        n, longest, took = ticks_during(
            lambda: built.append(native.build_json_fast(big_toc, 1 << 40, True, 1 << 20))
        )
        tries.append((n, longest, took))
        if n >= 3 and longest < min(0.5 * took, 0.1):
            break
    else:
        raise AssertionError(tries)
    assert len(built[0].nodes) == 200_101
