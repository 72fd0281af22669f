"""Filesystem options built from the loaded config."""

from __future__ import annotations

from stargz.fs import FsOptions


def test_options_from_config():
    from stargz import config

    cfg = config.loads(
        "noprefetch = true\nprefetch_timeout_sec = 3\n"
        "[blob]\nchunk_size = 1000\ncheck_always = true\n"
        "[fuse]\nattr_timeout = 5\n[directory_cache]\nmax_cache_fds = 3\n"
    )
    o = FsOptions.from_config(cfg)
    assert o.noprefetch and o.prefetch_timeout_sec == 3 and o.chunk_size == 1000
    assert o.valid_interval == 0 and o.attr_timeout == 5 and o.max_cache_fds == 3
    assert FsOptions.from_config(None) == FsOptions() == FsOptions.from_config(config.Config())
    assert FsOptions.from_config(cfg, noprefetch=False).noprefetch is False


def test_passthrough_mode_from_config_and_checked():
    import pytest

    from stargz import config
    from stargz.errors import InvalidArgument

    assert FsOptions().passthrough == "auto"
    for text, want in (("false", False), ("true", True), ('"auto"', "auto")):
        got = FsOptions.from_config(config.loads(f"[fuse]\npassthrough = {text}")).passthrough
        assert got == want and type(got) is type(want)
    for bad in ("on", 1, None):
        with pytest.raises(InvalidArgument, match="passthrough must be"):
            FsOptions(passthrough=bad)


def test_splice_from_config():
    from stargz import config

    assert FsOptions().splice is True
    assert FsOptions.from_config(config.loads("[fuse]\nsplice = false")).splice is False


def test_busy_poll_from_config():
    import pytest

    from stargz import config
    from stargz.errors import InvalidArgument

    assert FsOptions().busy_poll_us == 200
    assert FsOptions.from_config(config.loads("[fuse]\nbusy_poll_us = 0")).busy_poll_us == 0
    with pytest.raises(InvalidArgument):
        config.loads("[fuse]\nbusy_poll_us = -1")
