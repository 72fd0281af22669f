"""No import cycles in ``src/stargz``: every arrow between modules runs one way.

The graph is built from the source with ``ast`` (see ``harness/imports.py``): imports inside
functions and under ``if TYPE_CHECKING:`` count too.
"""

from __future__ import annotations

from pathlib import Path

from harness.imports import SRC, cycles, describe, import_graph

#: Cycles that exist and are accepted for now, each as the sorted module names of its
#: strongly connected component. Empty: there are none.
KNOWN_CYCLES: frozenset[tuple[str, ...]] = frozenset()


def test_no_import_cycles():
    graph = import_graph(SRC)
    assert "stargz.remote.client" in graph and "stargz.fs.filesystem" in graph
    found = cycles(graph)
    new = [describe(graph, c) for c in found if tuple(c) not in KNOWN_CYCLES]
    assert not new, "import cycles:\n  " + "\n  ".join(new)
    gone = KNOWN_CYCLES - {tuple(c) for c in found}
    assert not gone, f"fixed, remove from KNOWN_CYCLES: {sorted(gone)}"


def test_remote_layers_run_one_way():
    """client -> images, blob -> locate -> transport (images -> transport), never back."""
    graph = import_graph(SRC)
    order = ["transport", "locate", "blob", "client"]
    for i, low in enumerate(order):
        above = {f"stargz.remote.{m}" for m in order[i + 1 :]} | {"stargz.remote"}
        imported = set(graph[f"stargz.remote.{low}"])
        assert not imported & above, (low, sorted(imported & above))
    images = graph["stargz.remote.images"]
    assert "stargz.remote.transport" in images
    assert not set(images) & {f"stargz.remote.{m}" for m in ["locate", "blob", "client"]}
    assert {"stargz.remote.images", "stargz.remote.blob"} <= set(graph["stargz.remote.client"])


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


def test_the_check_finds_hidden_cycles(tmp_path):
    """A cycle hidden behind TYPE_CHECKING plus a function-level import (the shape remote/
    had), one through a package ``__init__`` and a relative import, and a clean module."""
    _write(
        tmp_path,
        {
            "stargz/__init__.py": "",
            "stargz/errors.py": "",
            "stargz/remote/__init__.py": "from stargz.remote.client import Client\n",
            "stargz/remote/client.py": (
                "from typing import TYPE_CHECKING\n"
                "if TYPE_CHECKING:\n"
                "    from stargz.remote.blob import Reader\n"
                "def open_blob():\n"
                "    from stargz.remote.blob import Reader\n"
            ),
            "stargz/remote/blob.py": "from stargz.remote.client import Client\n",
            "stargz/fs/__init__.py": "",
            "stargz/fs/a.py": "from . import b\nimport stargz.errors\n",
            "stargz/fs/b.py": "def f():\n    from stargz.fs import a\n",
        },
    )
    graph = import_graph(tmp_path)
    assert cycles(graph) == [
        ["stargz.fs.a", "stargz.fs.b"],
        ["stargz.remote.blob", "stargz.remote.client"],
    ]
    assert describe(graph, ["stargz.remote.blob", "stargz.remote.client"]) == (
        "stargz.remote.blob (line 1) -> stargz.remote.client (line 3) -> stargz.remote.blob"
    )
    assert graph["stargz.fs.a"] == {"stargz.fs.b": 1, "stargz.errors": 2}
