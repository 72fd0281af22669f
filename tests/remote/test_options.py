"""Registry client options from the loaded config: upstream defaults, zero means the default."""

from __future__ import annotations

from stargz.remote import (
    BlobOptions,
    ResolverOptions,
    registry_hosts,
)


def test_blob_options_defaults_are_upstream():
    o = BlobOptions()
    assert (o.valid_interval, o.check_always, o.chunk_size, o.fetching_timeout_sec) == (
        60,
        False,
        50000,
        300,
    )
    assert (o.force_single_range_mode, o.prefetch_chunk_size) == (False, 0)
    assert (o.max_retries, o.min_wait_msec, o.max_wait_msec) == (5, 30, 300000)
    assert o.check_interval == 60


def test_blob_options_zero_means_default():
    from stargz import config

    cfg = config.loads(
        "[blob]\nmax_retries = 0\nchunk_size = 0\ncheck_always = true\nmin_wait_msec = 5\n"
    )
    o = BlobOptions.from_config(cfg.blob)
    assert o.max_retries == 5 and o.chunk_size == 50000 and o.min_wait_msec == 5
    assert o.check_interval == 0
    assert BlobOptions.from_config(None) == BlobOptions()
    assert BlobOptions(valid_interval=0).valid_interval == 60


def test_options_from_the_config_loader():
    from stargz import config

    cfg = config.loads(
        """
        [blob]
        chunk_size = 1234
        force_single_range_mode = true
        [resolver]
        request_timeout_sec = 7
        [[resolver.host."docker.io".mirrors]]
        host = "mirror.example.com"
        insecure = true
        header = { "x-one" = "1", "x-many" = ["a", "b"] }
        [[resolver.host."docker.io".mirrors]]
        host = "second.example.com:5000"
        request_timeout_sec = -1
        """
    )
    blob = BlobOptions.from_config(cfg.blob)
    assert blob.chunk_size == 1234 and blob.force_single_range_mode
    res = ResolverOptions.from_config(cfg.resolver)
    hosts = registry_hosts("docker.io", res)
    assert [(h.netloc, h.scheme, h.timeout, h.namespace) for h in hosts] == [
        ("mirror.example.com", "http", 7.0, "docker.io"),
        ("second.example.com:5000", "https", None, "docker.io"),
        ("registry-1.docker.io", "https", 7.0, None),
    ]
    assert hosts[0].headers == (("x-one", "1"), ("x-many", "a"), ("x-many", "b"))
    assert hosts[2].headers == ()  # the registry never gets a mirror's headers
    assert hosts[0].url("library/x/blobs/sha256:1") == (
        "http://mirror.example.com/v2/library/x/blobs/sha256:1?ns=docker.io"
    )


def test_resolver_options_from_config():
    from stargz import config

    res = ResolverOptions.from_config(
        config.parse(
            {
                "resolver": {
                    "host": {"ghcr.io": {"mirrors": [{"host": "m", "header": {"a": ["x", "y"]}}]}}
                }
            }
        ).resolver
    )
    assert res.request_timeout_sec == 30
    assert res.host["ghcr.io"].mirrors[0].header == (("a", ("x", "y")),)
    assert ResolverOptions.from_config(None) == ResolverOptions()
