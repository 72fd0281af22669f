"""The TOML config: every upstream key with its default, strict validation, one-line errors."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from stargz import config
from stargz.cli.daemon import DEFAULT_ADDRESS
from stargz.config import Config, ConfigError

# SPEC §3, key by key: (dotted key, default).
SPEC_DEFAULTS = {
    "metrics_address": "",
    "no_prometheus": False,
    "debug_address": "",
    "ipfs": False,
    "metadata_store": "memory",
    "http_cache_type": "",
    "filesystem_cache_type": "",
    "resolve_result_entry_ttl_sec": 120,
    "resolve_result_entry": 0,
    "prefetch_size": 0,
    "prefetch_timeout_sec": 10,
    "prefetch_async_size": 0,
    # ours: Go's Check always waits for the prefetch (bounded by the two keys above)
    "wait_prefetch_on_check": False,
    "noprefetch": False,
    "no_background_fetch": False,
    "debug": False,
    "allow_no_verification": False,
    "disable_verification": False,
    "max_concurrency": 2,
    "log_file_access": False,
    "head_start_max_bytes": 64 << 20,  # ours, not upstream
    "head_start_streams": 2,  # ours, not upstream
    "resolve_neighbours": True,  # ours, not upstream
    "resolve_neighbours_parallel": 8,  # ours, not upstream
    "resolve_neighbours_max_bytes": 64 << 20,  # ours, not upstream
    "preload_registry_client": True,  # ours, not upstream
    "blob.valid_interval": 60,
    "blob.check_always": False,
    "blob.chunk_size": 50000,
    "blob.fetching_timeout_sec": 300,
    "blob.force_single_range_mode": False,
    "blob.prefetch_chunk_size": 0,
    "blob.max_retries": 5,
    "blob.min_wait_msec": 30,
    "blob.max_wait_msec": 300000,
    "blob.max_toc_bytes": 64 << 20,  # ours, not upstream
    "directory_cache.max_lru_cache_entry": 10,
    "directory_cache.max_cache_fds": 10,
    "directory_cache.sync_add": False,
    "directory_cache.direct": True,
    "directory_cache.fadv_dontneed": False,
    "directory_cache.max_size_bytes": 10 << 30,  # ours, not upstream
    "directory_cache.max_memory_bytes": 64 << 20,  # ours, not upstream
    "fuse.attr_timeout": 1,
    "fuse.entry_timeout": 1,
    # ours: upstream's default is false; "auto" is on where the kernel offers it
    "fuse.passthrough": "auto",
    "fuse.merge_buffer_size": 419430400,
    "fuse.merge_worker_count": 10,
    "fuse.read_ahead_kb": 1024,  # ours, not upstream
    "fuse.notify_store": True,  # ours, not upstream
    "fuse.read_ahead_next_chunk": True,  # ours, not upstream
    "fuse.splice": True,  # ours, not upstream
    "fuse.busy_poll_us": 200,  # ours, not upstream
    "kubeconfig_keychain.enable_keychain": False,
    "kubeconfig_keychain.kubeconfig_path": "",
    "cri_keychain.enable_keychain": False,
    "cri_keychain.image_service_path": "/run/containerd/containerd.sock",
    "cri_keychain.listen_path": "",
    "resolver.request_timeout_sec": 30,
    "resolver.host": {},
    "snapshotter.allow_invalid_mounts_on_restart": False,
    "fuse_manager.enable": False,
    "fuse_manager.address": "/run/containerd-stargz-grpc/fuse-manager.sock",
    "fuse_manager.path": "",
    "fuse_manager.metrics_address": "",
    "trace.enable": False,  # ours, not upstream: [trace]
    "trace.window_sec": 30,
    "trace.max_files": 10000,
    "trace.max_images": 100,
}


def flatten(obj, prefix=""):
    out = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        key = prefix + f.name
        if dataclasses.is_dataclass(v):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def test_defaults_are_upstream_and_cover_every_key():
    assert flatten(Config()) == SPEC_DEFAULTS


def test_empty_document_is_the_defaults():
    assert config.loads("") == Config()


def test_every_key_can_be_set():
    text = """
        metrics_address = "127.0.0.1:9090"
        noprefetch = true
        metadata_store = "db"
        max_concurrency = 8
        prefetch_async_size = 1048576
        [blob]
        chunk_size = 65536
        fetching_timeout_sec = 10
        [directory_cache]
        direct = false
        [fuse]
        passthrough = true
        [kubeconfig_keychain]
        enable_keychain = true
        kubeconfig_path = "/etc/kubeconfig"
        [cri_keychain]
        enable_keychain = true
        image_service_path = "/run/containerd/containerd.sock"
        [resolver]
        request_timeout_sec = 5
        [[resolver.host."docker.io".mirrors]]
        host = "mirror.example.com"
        insecure = true
        request_timeout_sec = -1
        header = { "x-token" = "t", "x-list" = ["a", "b"] }
        [[resolver.host."docker.io".mirrors]]
        host = "second.example.com"
        [snapshotter]
        allow_invalid_mounts_on_restart = true
        [fuse_manager]
        enable = true
        address = "/run/fm.sock"
        path = "/usr/bin/stargz-fuse-manager"
    """
    c = config.loads(text)
    assert (c.noprefetch, c.metadata_store, c.max_concurrency) == (True, "db", 8)
    assert c.blob.chunk_size == 65536 and c.blob.fetching_timeout_sec == 10
    assert c.directory_cache.direct is False and c.fuse.passthrough is True
    mirrors = c.resolver.host["docker.io"].mirrors
    assert [m.host for m in mirrors] == ["mirror.example.com", "second.example.com"]
    assert mirrors[0].header == {"x-token": "t", "x-list": ["a", "b"]}
    assert mirrors[0].request_timeout_sec == -1 and mirrors[0].insecure
    assert c.snapshotter.allow_invalid_mounts_on_restart
    assert c.fuse_manager.address == "/run/fm.sock"


@pytest.mark.parametrize(
    ("text", "key", "words"),
    [
        ("no_prefetch = true", "no_prefetch", "unknown key"),
        ("[blob]\nchunk_sise = 1", "blob.chunk_sise", "unknown key"),
        ("[blob]\nfetching_tieout_sec = 1", "blob.fetching_tieout_sec", "unknown key"),
        ("[nope]\nx = 1", "nope", "unknown key"),
        ('[blob]\nchunk_size = "big"', "blob.chunk_size", "must be an integer, not a string"),
        ("[blob]\nchunk_size = 1.5", "blob.chunk_size", "must be an integer, not a float"),
        ("noprefetch = 1", "noprefetch", "must be a boolean, not an integer"),
        ("max_concurrency = true", "max_concurrency", "must be an integer, not a boolean"),
        ("max_concurrency = -1", "max_concurrency", "must be >= 0"),
        ('metadata_store = "bolt"', "metadata_store", "must be one of memory, db"),
        ("blob = 1", "blob", "must be a table"),
        ('[fuse]\npassthrough = "on"', "fuse.passthrough", 'must be true, false or "auto"'),
        ('[fuse]\npassthrough = "AUTO"', "fuse.passthrough", 'got "AUTO"'),
        ("[fuse]\npassthrough = 1", "fuse.passthrough", 'must be true, false or "auto", got 1'),
        ("[fuse]\npassthrough = []", "fuse.passthrough", "got an array"),
        ('[fuse_manager]\naddress = "x.sock"', "fuse_manager.address", "absolute path"),
        (
            '[[resolver.host."r.io".mirrors]]\nhots = "m"',
            'resolver.host."r.io".mirrors[0].hots',
            "unknown key",
        ),
        (
            '[[resolver.host."r.io".mirrors]]\nheader = { a = 1 }',
            'resolver.host."r.io".mirrors[0].header.a',
            "must be a string or an array",
        ),
    ],
)
def test_bad_keys_name_the_key_in_one_line(text, key, words):
    with pytest.raises(ConfigError) as e:
        config.loads(text)
    assert e.value.key == key
    msg = str(e.value)
    assert key in msg and words in msg and "\n" not in msg


@pytest.mark.parametrize(
    ("address", "words"),
    [
        ("nope", "no port"),
        ("127.0.0.1", "no port"),
        ("localhost:", "the port is not a number"),
        ("127.0.0.1:http", "the port is not a number"),
        ("127.0.0.1:65536", "the port is out of range 0-65535"),
        ("::1:8234", "brackets"),
        ("[::g]:8234", "invalid IPv6 address"),
        ("bad host:8234", "invalid host name"),
    ],
)
@pytest.mark.parametrize("key", ["metrics_address", "fuse_manager.metrics_address"])
def test_a_bad_tcp_address_names_the_key(key, address, words):
    table, _, name = key.rpartition(".")
    text = (f"[{table}]\n" if table else "") + f'{name} = "{address}"'
    with pytest.raises(ConfigError) as e:
        config.loads(text)
    assert e.value.key == key
    msg = str(e.value)
    assert f'key "{key}" must be host:port' in msg and words in msg and repr(address) in msg


@pytest.mark.parametrize(
    ("address", "split"),
    [
        ("127.0.0.1:8234", ("127.0.0.1", 8234)),
        (":8234", (None, 8234)),
        ("[::1]:8234", ("::1", 8234)),
        ("metrics.example.com:80", ("metrics.example.com", 80)),
        ("localhost:0", ("localhost", 0)),
    ],
)
def test_good_tcp_addresses(address, split):
    assert config.loads(f'metrics_address = "{address}"').metrics_address == address
    assert config.split_tcp_address(address) == split


def test_invalid_toml_is_one_line():
    with pytest.raises(ConfigError, match="invalid TOML") as e:
        config.loads("x = [")
    assert "\n" not in str(e.value)


def test_load_missing_default_file_is_defaults_but_missing_given_file_is_an_error(tmp_path):
    assert config.load(str(tmp_path / "none.toml"), missing_ok=True) == Config()
    with pytest.raises(ConfigError, match="no such file"):
        config.load(str(tmp_path / "none.toml"))


def test_load_names_the_file(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[blob]\nchunk_size = 'x'\n")
    with pytest.raises(ConfigError, match=f'{p}: key "blob.chunk_size"'):
        config.load(str(p))


@pytest.mark.parametrize(
    ("text", "value"),
    [("", "auto"), ('passthrough = "auto"', "auto"), ("passthrough = true", True)]
    + [("passthrough = false", False)],
)
def test_passthrough_takes_upstreams_booleans_and_auto(text, value):
    got = config.loads(f"[fuse]\n{text}").fuse.passthrough
    assert got == value and type(got) is type(value)


def test_packaged_example_config_is_the_defaults():
    repo = Path(__file__).resolve().parents[1]
    assert config.load(str(repo / "packaging" / "config.toml")) == Config()
    snippet = tomllib.loads((repo / "packaging" / "containerd-config.toml").read_text())
    plugin = snippet["proxy_plugins"]["stargz"]
    assert plugin == {"type": "snapshot", "address": DEFAULT_ADDRESS}


def test_cross_key_and_required_values_are_checked_at_load():
    with pytest.raises(ConfigError, match=r'"blob.min_wait_msec" \(5000\) exceeds'):
        config.loads("[blob]\nmin_wait_msec = 5000\nmax_wait_msec = 10\n")
    config.loads("[blob]\nmin_wait_msec = 5000\nmax_wait_msec = 0\n")  # 0: the default
    with pytest.raises(ConfigError, match=r'mirrors\[0\].host" must be set'):
        config.loads('[[resolver.host."d.io".mirrors]]\ninsecure = true\n')


def test_trace_keys_are_validated():
    c = config.loads("[trace]\nenable = true\nwindow_sec = 5\nmax_files = 3\nmax_images = 2\n")
    assert (c.trace.enable, c.trace.window_sec, c.trace.max_files, c.trace.max_images) == (
        True,
        5,
        3,
        2,
    )
    for bad, msg in (
        ("window_sec = 0", 'key "trace.window_sec" must be >= 1, got 0'),
        ("max_files = 0", 'key "trace.max_files" must be >= 1, got 0'),
        ('enable = "yes"', 'key "trace.enable" must be a boolean, not a string'),
        ("size = 1", 'unknown key "trace.size"'),
    ):
        with pytest.raises(config.ConfigError) as e:
            config.loads(f"[trace]\n{bad}\n")
        assert str(e.value) == msg
