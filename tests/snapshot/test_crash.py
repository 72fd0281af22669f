"""Crash safety: kill the snapshotter at every side effect of a scripted workload.

A child process runs the workload with its side effects (mkdtemp, mkdir, rename, directory
removal, SQLite COMMIT) instrumented, and exits abruptly (``os._exit``, like ``kill -9``)
just before, or just after, the N-th one. The parent then reopens the root and checks:

- the metadata is exactly the state before or after the operation that was cut short;
- every snapshot still has its directories;
- ``cleanup`` leaves exactly one directory per snapshot;
- the snapshotter keeps working (a new snapshot can be prepared and committed).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from stargz.snapshot import Kind, Snapshotter

CHILD = textwrap.dedent(
    """
    import asyncio, json, os, sys, tempfile
    from pathlib import Path
    from stargz.snapshot import Snapshotter, osutil

    root, crash_at, mode, progress = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    points = 0

    def point(fn):
        def wrapped(*a, **kw):
            global points
            n = points
            points += 1
            if n == crash_at and mode == "before":
                os._exit(77)
            out = fn(*a, **kw)
            if n == crash_at and mode == "after":
                os._exit(77)
            return out
        return wrapped

    os.rename = point(os.rename)
    os.mkdir = point(os.mkdir)
    tempfile.mkdtemp = point(tempfile.mkdtemp)
    osutil.remove_tree = point(osutil.remove_tree)

    class Conn:
        def __init__(self, c):
            self.c = c
            self.commit = point(lambda: c.execute("COMMIT"))
        def execute(self, sql, *args):
            return self.commit() if sql == "COMMIT" else self.c.execute(sql, *args)
        def close(self):
            self.c.close()

    def state(sn):
        infos = asyncio.run(sn.walk())
        return sorted([i.name, int(i.kind), i.parent] for i in infos)

    OPS = [
        ("prepare", "a", ""), ("commit", "A", "a"), ("prepare", "b", "A"), ("view", "v", "A"),
        ("remove", "v"), ("commit", "B", "b"), ("prepare", "c", "B"), ("remove", "c"),
        ("remove", "B"), ("cleanup",),
    ]

    async def main():
        sn = await Snapshotter.open(root)
        sn._store._c = Conn(sn._store._c)
        states = []
        for k, (op, *args) in enumerate(OPS):
            Path(progress).write_text(str(k))
            if op == "prepare":
                (m,) = await sn.prepare(args[0], args[1])
                Path(m.source if m.type == "bind" else
                     [o for o in m.options if o.startswith("upperdir=")][0][9:],
                     "f" + args[0]).write_text("data")
            elif op == "view":
                await sn.view(args[0], args[1])
            elif op == "commit":
                await sn.commit(args[0], args[1])
            elif op == "remove":
                await sn.remove(args[0])
            else:
                await sn.cleanup()
            states.append(sorted([i.name, int(i.kind), i.parent]
                                 for i in await sn.walk()))
        Path(progress).write_text("done")
        await sn.close()
        print(json.dumps({"points": points, "states": states}))

    asyncio.run(main())
    """
)


def child(root: Path, crash_at: int, mode: str, progress: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", CHILD, str(root), str(crash_at), mode, str(progress)],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("baseline")
    p = child(d / "root", -1, "none", d / "progress")
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def check_recovered(root: Path, states_ok: list, run) -> None:
    sn = run(Snapshotter.open(root))
    try:
        infos = run(sn.walk())
        got = sorted([i.name, int(i.kind), i.parent] for i in infos)
        assert got in states_ok
        snaps = root / "snapshots"
        for info in infos:
            (m,) = (
                run(sn.view("probe", info.name))
                if info.kind == Kind.COMMITTED
                else run(sn.mounts(info.name))
            )
            if info.kind == Kind.COMMITTED:
                run(sn.remove("probe"))
        owned = {p.name for p in snaps.iterdir()}
        run(sn.cleanup())
        left = {p.name for p in snaps.iterdir()}
        assert left <= owned
        assert len(left) == len(infos)
        for name in left:
            assert (snaps / name / "fs").is_dir()
        run(sn.prepare("after-crash", ""))
        run(sn.commit("after-crash-c", "after-crash"))
        assert {p.name for p in snaps.iterdir()} > left
    finally:
        run(sn.close())


@pytest.mark.parametrize("mode", ["before", "after"])
def test_crash_at_every_side_effect_is_recoverable(baseline, mode, tmp_path, run):
    states = [[], *baseline["states"]]

    def crash(n: int) -> tuple[int, Path, Path, subprocess.CompletedProcess]:
        root, progress = tmp_path / f"{mode}{n}" / "root", tmp_path / f"{mode}{n}" / "progress"
        progress.parent.mkdir()
        progress.write_text("0")  # a crash while opening counts as during the first op
        return n, root, progress, child(root, n, mode, progress)

    with ThreadPoolExecutor(4) as pool:
        for n, root, progress, p in pool.map(crash, range(baseline["points"])):
            assert p.returncode == 77, f"crash point {n}: {p.returncode} {p.stderr}"
            k = int(progress.read_text())
            check_recovered(root, [states[k], states[k + 1]], run)
