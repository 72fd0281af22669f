"""Fuzz: the two TOC builders on mutated TOC JSON bytes, and the Reader on mutated blobs.

Seeds are the TOC JSON of every converted fixture layer (Go's spelling, whole and cut to
a few entries), the hostile TOCs of `tests/estargz/hostile.py` (refused and just-accepted,
with their builder limits) and the TOC of a small layer of our own. Hypothesis damages
the bytes: bit flips, deleted and duplicated spans, splices of two seeds, and JSON tokens
chosen to reach the native scanner's corners (escapes, surrogates, invalid UTF-8, numbers
at the 64-bit edges, keys repeated, nesting). For every input the native builder
(``build_json``, its scanner and fast path) and the pure-Python reference
(``json.loads`` + ``build``) must return equal trees or raise the same exception type
with the same message (`test_tocjson.agree`), and only typed errors.

The same mutations inside a whole blob: opening it with the native core and with the
pure-Python twins, as the daemon does (``keep_toc=False``) and as the CLI does, gives
one outcome (`test_bad_input.open_blob`), and only `StargzError`s.
"""

from __future__ import annotations

import json
import re

import pytest
from conftest import NO_EXTENSIONS, OCILayout, backend_of, find_shared
from fuzzing import fuzz_settings, fuzz_timeout
from hypothesis import event, example, given
from hypothesis import strategies as st

from stargz.errors import StargzError
from stargz.estargz import open_file, tocbuild

from .hostile import ACCEPTED, SEEDS, toc_json
from .test_bad_input import Parts, make_blob, open_blob
from .test_tocjson import agree, outcome

pytestmark = [pytest.mark.fuzz, fuzz_timeout(90)]

#: (TOC JSON, payload end, builder limits)
Corpus = list[tuple[bytes, int, dict[str, int]]]


def _corpus() -> Corpus:
    out: Corpus = []
    for name in ("oci-corners", "oci-busybox"):
        layout = OCILayout(find_shared() / "fixtures" / name)
        for tag in layout.tags:
            for layer in layout.layers(tag):
                if not layer.toc_digest:
                    continue
                with open_file(str(layer.path), keep_toc=False) as r:
                    data = r._read_toc_json(b"", r.blob_size, 1 << 30)
                    end = r.footer.toc_offset
                out.append((data, end, {}))
                # a few entries of it, still in Go's spelling (tab indent, key order)
                doc = json.loads(data)
                for lo in (0, len(doc["entries"]) // 2):
                    doc2 = {"version": 1, "entries": doc["entries"][lo : lo + 6]}
                    out.append((json.dumps(doc2, indent="\t").encode(), end, {}))
    for seed in SEEDS + ACCEPTED:
        if len(json.dumps(seed.entries)) < 20_000:  # (the budget seeds are large)
            out.append((toc_json(seed.entries), 1 << 40, dict(seed.limits)))
    out.append((Parts(make_blob()).toc_json, 1 << 20, {}))
    return out


CORPUS = _corpus()
TOKENS = [
    b'"', b"\\", b"\\u0000", b"\\ud800", b"\\udc00", b"\\ud83d\\ude00", b"\\/", b"\\x",
    b"\xff", b"\xc3", b"\xc3\xa9", b"\xed\xa0\x80", b"\xef\xbb\xbf", b"\x00", b"\x7f",
    b"-0", b"0.0", b"1e3", b"1E-2", b"01", b"-", b"+1", b"9223372036854775807",
    b"9223372036854775808", b"-9223372036854775808", b"-9223372036854775809",
    b"18446744073709551616", b"1" * 40, b"NaN", b"Infinity",
    b"null", b"true", b"false", b"{}", b"[]", b"[", b"{", b"]", b"}", b",", b":", b" ",
    b"\t", b"\n",
    b'"name"', b'"type"', b'"size"', b'"offset"', b'"chunkOffset"', b'"chunkSize"',
    b'"chunkDigest"', b'"digest"', b'"linkName"', b'"xattrs"', b'"entries"', b'"version"',
    b'"reg"', b'"dir"', b'"chunk"', b'"hardlink"', b'"symlink"', b'"../x"', b'"a//b/."',
    b'"sha256:' + b"0" * 64 + b'"',
    b'{"name":"x","type":"reg","size":1,"chunkDigest":"sha256:' + b"1" * 64 + b'"},',
    b'"name":"dup",',
    b"[" * 40,
]  # fmt: skip


NUMBER = re.compile(rb"(?<![\w.])-?\d{1,19}(?![\w.])")
#: The limits the builders check, and one past each (the twins must agree at the edge).
LIMITS = [
    (1 << 32) - 2, (1 << 32) - 1, 4095, 4096, (1 << 20) - 1, 1 << 20, 0o177777, 1 << 16,
    255, 256, (1 << 63) - 1, 1 << 63, -(1 << 63), -(1 << 63) - 1, 1 << 40, (1 << 40) + 1,
]  # fmt: skip


class Mutant(tuple):
    """(JSON bytes, payload end, limits), shown as the seed and the edits made to it (a
    fixture TOC is too long to print; the edits reproduce it)."""

    how: str

    def __repr__(self) -> str:
        data = self[0]
        return repr(data) if len(data) < 2000 else f"<{len(data)} bytes: {self.how}>"


@st.composite
def mutated(draw, corpus: Corpus) -> Mutant:
    """A seed with 1 to 6 edits."""
    k = draw(st.integers(0, len(corpus) - 1))
    data, end, limits = corpus[k]
    buf = bytearray(data)
    how = [f"seed {k}"]
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "delete", "insert", "insert", "dup", "splice",
                                   "number", "number"]))  # fmt: skip
        pos = draw(st.integers(0, len(buf)))
        numbers = list(NUMBER.finditer(buf)) if op == "number" else []
        if numbers:
            m = draw(st.sampled_from(numbers))
            n = int(m.group())
            new = draw(st.sampled_from([n - 1, n + 1, -n, 2 * n, 0, *LIMITS]))
            buf[m.start() : m.end()] = b"%d" % new
            how.append(f"number at {m.start()} = {new}")
        elif op == "flip" and pos < len(buf):
            bit = draw(st.integers(0, 7))
            buf[pos] ^= 1 << bit
            how.append(f"flip bit {bit} at {pos}")
        elif op == "delete":
            n = draw(st.integers(1, 32))
            del buf[pos : pos + n]
            how.append(f"delete {n} at {pos}")
        elif op == "insert":
            token = draw(st.sampled_from(TOKENS))
            buf[pos:pos] = token
            how.append(f"insert {token!r} at {pos}")
        elif op == "dup":
            n = draw(st.integers(1, 200))
            buf[pos:pos] = buf[pos : pos + n]
            how.append(f"repeat {n} at {pos}")
        elif op == "splice":
            j = draw(st.integers(0, len(corpus) - 1))
            other = corpus[j][0]
            at = draw(st.integers(0, len(other)))
            buf[pos:] = other[at:]
            how.append(f"seed {j} from {at} on at {pos}")
    out = Mutant((bytes(buf), end, limits))
    out.how = ", ".join(how)
    return out


@pytest.fixture(scope="module")
def native():
    return backend_of(tocbuild, "native")


@fuzz_settings(2000)
@given(case=mutated(CORPUS), verify=st.booleans(), max_chunk=st.sampled_from([1 << 12, 1 << 28]))
@example(case=(b'{"version":1,"entries":[{"name":"a\\u0000","type":"reg"}]}', 100, {}), verify=True,
         max_chunk=1 << 28)  # fmt: skip
def test_mutated_toc_json_same_from_both_builders(native, case, verify, max_chunk) -> None:
    data, end, limits = case
    agree(native, data, payload_end=end, verify=verify, max_chunk_size=max_chunk, **limits)
    err, _ = outcome(tocbuild.python.build_json, data, payload_end=end, verify=verify,
                     max_chunk_size=max_chunk, **limits)  # fmt: skip
    assert err is None or issubclass(err[0], StargzError), err
    event("refused: " + err[0].__name__ if err else "opened")


@pytest.fixture(scope="module")
def small_parts() -> dict[str, Parts]:
    return {c: Parts(make_blob(compression=c)) for c in ("gzip", "zstd")}


def _open_outcome(blob: bytes) -> tuple:
    try:
        r = open_blob(blob)
    except StargzError as e:
        return type(e), str(e)
    return tuple((n.id, n.path, n.type, n.mode, n.size, n.nlink) for n in r.nodes)


BLOB_CORPUS = [(data, end, {}) for data, end, limits in CORPUS if not limits]


@fuzz_settings(600)
@given(case=mutated(BLOB_CORPUS), compression=st.sampled_from(["gzip", "zstd"]))
def test_mutated_toc_in_a_blob_opens_the_same_on_both_backends(
    small_parts, swap_backend, case, compression
) -> None:
    blob = small_parts[compression].assemble(case[0])
    outcomes = []
    for backend in ["python"] if NO_EXTENSIONS else ["native", "python"]:
        with pytest.MonkeyPatch.context() as mp:
            swap_backend(mp, backend)
            outcomes.append(_open_outcome(blob))
    assert all(o == outcomes[0] for o in outcomes), outcomes
    event("refused" if isinstance(outcomes[0][0], type) else "opened")
