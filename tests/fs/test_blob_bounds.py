"""What a hostile or broken blob can make the daemon hold: bounded by the read, not by the
registry's numbers. Blobs are sparse files (gigabytes on paper, almost nothing on disk),
served by the real `LocalLayerSource`."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import json
import os
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest

from stargz.errors import TOCError
from stargz.estargz.footer import gzip_footer, parse_footer
from stargz.estargz.toc import TOC_TAR_NAME
from stargz.estargz.writer import BuildResult, build
from stargz.fs import LocalLayerSource
from stargz.fs.layer_open import TAIL_FETCH_SIZE, fetch_tail

GiB = 1 << 30


def test_a_toc_region_over_the_cap_is_refused_before_it_is_fetched(tmp_path):
    """A footer that puts the TOC 2 GiB before the end of the blob: TOCError naming both
    numbers, after fetching only the first tail read."""
    size = 2 * GiB + 4096
    path = tmp_path / "blob"
    with open(path, "wb") as f:
        f.truncate(size - 51)
        f.seek(size - 51)
        f.write(gzip_footer(4096))
    digest = "sha256:" + "ab" * 32
    source = LocalLayerSource(blobs={digest: path})

    async def run():
        blob = await source.resolve("x", digest, {})
        with ThreadPoolExecutor(1) as ex:
            return await fetch_tail(blob, digest, None, ex, 64 << 20)

    with pytest.raises(TOCError) as e:
        asyncio.run(run())
    msg = str(e.value)
    assert str(size - 4096) in msg and str(64 << 20) in msg
    assert source.bytes_read <= TAIL_FETCH_SIZE


# --- through a real FUSE mount -------------------------------------------------------------


def _rss_peak_reset() -> None:
    """Make VmHWM start again from the current RSS (clear_refs 5, Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/self/status")


class _Zeros(io.RawIOBase):
    """Zero bytes, but for a 16-byte mark (file tag, offset) every 4 MiB: each chunk of the
    converted layer differs (so none is shared through the content-addressed cache) and
    still compresses ~1000:1."""

    def __init__(self, tag: int) -> None:
        self.tag, self.pos = tag, 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = len(b)
        b[:] = bytes(n)
        step = 4 << 20
        mark = -(-self.pos // step) * step
        while mark < self.pos + n:
            at = mark - self.pos
            tag = (self.tag.to_bytes(8, "little") + mark.to_bytes(8, "little"))[: n - at]
            b[at : at + len(tag)] = tag
            mark += step
        self.pos += n
        return n


def _tar(path, files: list[tuple[str, int, bytes | None]]) -> None:
    """A tar of ``(name, size, data)`` files; data None means mostly zeros (`_Zeros`)."""

    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for name, size, data in files:
            info = tarfile.TarInfo(name)
            info.size = size
            info.mode = 0o644
            if data is not None:
                tf.addfile(info, io.BytesIO(data))
            else:
                tf.addfile(info, io.BufferedReader(_Zeros(len(name) + size)))


def _estargz(tmp_path, files) -> tuple[bytes, BuildResult]:
    tar = tmp_path / "layer.tar"
    _tar(tar, files)
    out = io.BytesIO()
    with open(tar, "rb") as src:
        res = build(src, out)
    tar.unlink()
    return out.getvalue(), res


def _toc_json(blob: bytes) -> dict:
    footer = parse_footer(blob[-64:], len(blob))
    raw = gzip.decompress(blob[footer.toc_offset : len(blob) - footer.footer_size])
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        return json.loads(tf.extractfile(TOC_TAR_NAME).read())


def _gap_blob(tmp_path, gap: int) -> SimpleNamespace:
    """A 1-byte file whose member is followed by ``gap`` bytes (a sparse hole) before the
    next member: the TOC says the tiny file's member spans ``gap`` bytes and more."""
    blob, _ = _estargz(tmp_path, [("a/tiny", 1, b"x"), ("b/after", 65536, os.urandom(65536))])
    toc = _toc_json(blob)
    footer = parse_footer(blob[-64:], len(blob))
    g = next(e["offset"] for e in toc["entries"] if e["name"] == "b/after")
    for e in toc["entries"]:
        if e.get("offset", 0) >= g:
            e["offset"] += gap
    toc_json = json.dumps(toc).encode()
    info = tarfile.TarInfo(TOC_TAR_NAME)
    info.size = len(toc_json)
    toc_tar = info.tobuf(tarfile.USTAR_FORMAT) + toc_json + bytes(-len(toc_json) % 512 + 1024)
    path = tmp_path / "gap-blob"
    with open(path, "wb") as f:
        f.write(blob[:g])
        f.seek(g + gap)
        f.write(blob[g : footer.toc_offset])
        f.write(gzip.compress(toc_tar))
        f.write(gzip_footer(footer.toc_offset + gap))
    digest = "sha256:" + hashlib.sha256(blob + b"gap %d" % gap).hexdigest()
    return SimpleNamespace(
        digest=digest, toc_digest="sha256:" + hashlib.sha256(toc_json).hexdigest(), path=path
    )


#: The hole after the tiny file's member.
GAP = 2 * GiB


def test_a_tiny_file_before_a_huge_member_span_fetches_little(fs_env, tmp_path):
    """The TOC puts the next member 2 GiB after a 1-byte file's: reading the file fetches
    a few KiB (what decoding the byte can need), not the 2 GiB span, and RSS stays flat."""
    layer = _gap_blob(tmp_path, GAP)
    source = LocalLayerSource(blobs={layer.digest: layer.path})
    fs_env.start(source)
    mp = fs_env.mount(layer)
    before = source.bytes_read
    _rss_peak_reset()
    base = _status_kib("VmRSS")
    with open(mp / "a/tiny", "rb") as f:
        assert f.read() == b"x"
    grew = _status_kib("VmHWM") - base
    fetched = source.bytes_read - before
    print(f"1-byte file before a {GAP}-byte member span: fetched {fetched}, peak RSS +{grew} KiB")
    assert fetched < 1 << 20, source.log[-1]
    assert grew < 64 << 10, f"peak RSS grew by {grew} KiB"
    with open(mp / "b/after", "rb") as f:  # the member after the hole still serves
        assert len(f.read()) == 65536


def test_background_fetch_of_zero_filled_files_holds_little_decoded_data(fs_env, tmp_path):
    """512 MiB of zeros compress ~1000:1 into one background request: its chunks are
    decoded and written in bounded waves, not all at once."""
    files = [(f"z/{i}", (128 << 20) + i, None) for i in range(4)]
    blob, res = _estargz(tmp_path, files)
    path = tmp_path / "zeros-blob"
    path.write_bytes(blob)
    assert len(blob) < 4 << 20  # one background request
    layer = SimpleNamespace(digest=res.blob_digest, toc_digest=res.toc_digest)
    del blob
    source = LocalLayerSource(blobs={layer.digest: path})
    fs = fs_env.start(source, no_background_fetch=False, background_silence_sec=0.0)
    _rss_peak_reset()
    base = _status_kib("VmRSS")
    mp = fs_env.mount(layer)
    lay = fs.layer(str(mp))
    deadline = time.monotonic() + 20
    while not lay.fully_fetched:
        assert time.monotonic() < deadline, lay.state()
        time.sleep(0.05)
    grew = _status_kib("VmHWM") - base
    print(f"background fetch of 512 MiB of zeros: peak RSS +{grew} KiB")
    assert len(fs.disk) >= 128  # every chunk its own cache file
    assert lay.metrics.background_bytes > 0
    assert grew < 160 << 10, f"peak RSS grew by {grew} KiB"
