"""The ``--version`` line both commands print: package version and the backend in use.

A wheel whose bundled libraries cannot be loaded still runs, on the slower pure-Python
twins; the version line is where an operator sees that, with the reason.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from stargz import __version__


def backends() -> dict[str, tuple[str, str | None]]:
    """{module: (backend, why the native one is not used or None)} for every native module."""
    from stargz.estargz import codec, tocbuild, tocindex

    return {
        m.__name__.rsplit(".", 1)[1]: (m.backend, m.native_error)
        for m in (codec, tocindex, tocbuild)
    }


def version_text(prog: str) -> str:
    """``PROG VERSION (native backend)``, or which modules fell back and why."""
    status = backends()
    fallen = {name: why for name, (backend, why) in status.items() if backend != "native"}
    if not fallen:
        return f"{prog} {__version__} (native backend: {', '.join(status)})"
    lines = [f"{prog} {__version__} (python backend: {', '.join(fallen)})"]
    lines += [f"  {name}: {why}" for name, why in fallen.items()]
    return "\n".join(lines)


class VersionAction(argparse.Action):
    """``--version``: argparse's own action rewraps the text, which would join the lines."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, help="print the version and backend")

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> None:
        print(version_text(parser.prog))
        sys.exit(0)
