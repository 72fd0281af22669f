"""The handler contract (`stargz.fuse.Operations`) is what the filesystem and the toy
filesystem of these tests implement."""

from __future__ import annotations

import inspect

from stargz.fs.metrics import FsMetrics
from stargz.fs.ops import Operations as FsOperations
from stargz.fs.options import FsOptions
from stargz.fuse import Operations

from .memfs import MemFS


def test_implementations_have_every_handler_with_its_arity():
    members = {
        name: fn
        for name, fn in inspect.getmembers(Operations, inspect.isfunction)
        if not name.startswith("_")
    }
    assert set(members) == {
        "lookup", "getattr", "readlink", "open", "read", "release", "opendir", "readdir",
        "statfs", "getxattr", "listxattr",
    }  # fmt: skip
    for impl in (MemFS(), FsOperations(FsOptions(), FsMetrics())):
        assert isinstance(impl, Operations)
        for name, fn in members.items():
            want = len(inspect.signature(fn).parameters) - 1  # without self
            got = len(inspect.signature(getattr(impl, name)).parameters)
            assert got == want, (type(impl).__name__, name)
