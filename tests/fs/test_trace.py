"""`stargz.fs.trace`: the per-layer first-open order (`AccessTrace`) and the daemon's
per-image production trace (`ImageTracer`: window, bounds, files on disk). A clock the
test moves stands in for time; the files are real."""

from __future__ import annotations

import json
import os
import stat

from stargz.fs.trace import AccessTrace, ImageTracer, read_trace, trace_file_name

A, B = "sha256:" + "a" * 64, "sha256:" + "b" * 64


def test_access_trace_keeps_first_opens_per_layer_while_recording():
    t = AccessTrace(recording=False)
    t.opened(A, "etc/passwd")  # before start: runc's own setup
    t.start()
    for layer, path in [(A, "bin/sh"), (B, "etc/x"), (A, "bin/sh"), (A, "etc/passwd")]:
        t.opened(layer, path)
    t.stop()
    t.opened(A, "late")
    assert [(e.layer, e.path) for e in t.events()] == [
        (A, "bin/sh"),
        (B, "etc/x"),
        (A, "etc/passwd"),
    ]
    assert t.by_layer() == {A: ["bin/sh", "etc/passwd"], B: ["etc/x"]}


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def tracer(tmp_path, clock, **kw) -> ImageTracer:
    opts = {"window_sec": 10, "max_files": 100, "max_images": 10, **kw}
    return ImageTracer(str(tmp_path / "trace"), clock=clock, **opts)


def test_opens_inside_the_window_are_recorded_per_image(tmp_path):
    clock = Clock()
    t = tracer(tmp_path, clock)
    t.opened(A, "before-mount")
    t.mounted(A, "reg/app:1")
    t.mounted(B, "reg/app:1")
    t.opened(B, "etc/conf")
    t.opened(A, "bin/app")
    t.opened(A, "bin/app")
    clock.now += 11
    t.opened(A, "after-window")
    t.flush()
    path = tmp_path / "trace" / trace_file_name("reg/app:1")
    assert [(e["layerDigest"], e["path"]) for e in read_trace(str(path))] == [
        (B, "etc/conf"),
        (A, "bin/app"),
    ]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert all(json.loads(x)["ref"] == "reg/app:1" for x in path.read_text().splitlines())


def test_a_shared_layer_records_for_every_image_in_its_window(tmp_path):
    clock = Clock()
    t = tracer(tmp_path, clock)
    t.mounted(A, "reg/one:1")
    clock.now += 5
    t.mounted(A, "reg/two:1")
    t.opened(A, "lib/x")
    clock.now += 6  # one's window is over, two's is not
    t.opened(A, "lib/y")
    t.flush()
    one = read_trace(str(tmp_path / "trace" / trace_file_name("reg/one:1")))
    two = read_trace(str(tmp_path / "trace" / trace_file_name("reg/two:1")))
    assert [e["path"] for e in one] == ["lib/x"]
    assert [e["path"] for e in two] == ["lib/x", "lib/y"]


def test_a_trace_is_continued_after_a_restart_and_bounded(tmp_path):
    clock = Clock()
    t = tracer(tmp_path, clock, max_files=3)
    t.mounted(A, "reg/app:1")
    t.opened(A, "a")
    t.flush()
    t2 = tracer(tmp_path, clock, max_files=3)  # a new daemon on the same root
    t2.mounted(A, "reg/app:1")
    for p in ["a", "b", "c", "d"]:
        t2.opened(A, p)
    t2.flush()
    got = read_trace(str(tmp_path / "trace" / trace_file_name("reg/app:1")))
    assert [e["path"] for e in got] == ["a", "b", "c"]


def test_at_most_max_images_trace_files_stay(tmp_path):
    clock = Clock()
    t = tracer(tmp_path, clock, max_images=2)
    for i in range(4):
        ref = f"reg/app:{i}"
        t.mounted(A, ref)
        t.opened(A, f"f{i}")
        t.flush()
        path = tmp_path / "trace" / trace_file_name(ref)
        os.utime(path, (1000 + i, 1000 + i))
    left = sorted(os.listdir(tmp_path / "trace"))
    assert left == sorted(trace_file_name(f"reg/app:{i}") for i in (2, 3))


def test_unreadable_lines_are_skipped(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text('{"path":"a","layerDigest":"x","ref":"r"}\nnot json\n{"path":1}\n')
    assert read_trace(str(p)) == [{"path": "a", "layerDigest": "x", "ref": "r"}]
    assert read_trace(str(tmp_path / "missing")) == []
