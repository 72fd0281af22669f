"""Which hosts serve a registry: its mirrors, in order, then the registry itself.

Mirrors ``service/resolver/registry.go`` (``RegistryHostsFromConfig``): every mirror of
``[resolver.host."<registry>"]`` in config order, then the registry (never configured
headers for it). A host uses plain http when it is ``insecure`` or a loopback address
(``localhost``, ``127.0.0.0/8``, ``::1``, with or without port), https otherwise.
``docker.io`` becomes ``registry-1.docker.io``. Requests to a mirror carry
``?ns=<registry>`` so a mirror serving several registries knows which one is meant
(containerd's convention).

TLS (ours, in containerd's hosts.toml spelling): an entry's ``ca`` files are trusted for
that host besides the system's CAs, ``skip_verify`` turns verification off. A host written
with ``https://`` uses https even on a loopback address. An entry naming the registry
itself is the registry (no ``?ns=``), tried where it is listed and not again at the end:
``[[resolver.host."10.0.0.5:5000".mirrors]] host = "https://10.0.0.5:5000"`` with ``ca``
is how a registry with a private CA is configured.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from dataclasses import dataclass
from urllib.parse import quote

from stargz.errors import InvalidArgument
from stargz.remote.options import MirrorOptions, ResolverOptions
from stargz.remote.reference import api_host


def is_localhost(netloc: str) -> bool:
    """``localhost``/loopback IP, with an optional port (containerd ``MatchLocalhost``)."""
    host = netloc
    if host.startswith("["):
        host = host[1 : host.find("]")] if "]" in host else host[1:]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class RegistryHost:
    """One place to send registry API requests to."""

    netloc: str  # "registry-1.docker.io", "127.0.0.1:5000"
    scheme: str  # "http" or "https"
    #: Per-request timeout in seconds, None for none.
    timeout: float | None
    #: Extra headers (name, value) pairs, repeated names allowed.
    headers: tuple[tuple[str, str], ...] = ()
    #: For a mirror, the registry it stands in for (sent as ``?ns=``); None for the origin.
    namespace: str | None = None
    #: PEM files of extra CAs to trust for this host's certificate.
    ca: tuple[str, ...] = ()
    #: https without certificate verification.
    skip_verify: bool = False

    @property
    def is_mirror(self) -> bool:
        return self.namespace is not None

    def url(self, path: str) -> str:
        """``<scheme>://<netloc>/v2/<path>``, with ``?ns=`` on a mirror."""
        out = f"{self.scheme}://{self.netloc}/v2/{path}"
        if self.namespace is not None:
            out += "?ns=" + quote(self.namespace, safe="")
        return out

    def __str__(self) -> str:
        kind = f"mirror of {self.namespace}" if self.is_mirror else "registry"
        return f"{self.scheme}://{self.netloc} ({kind})"


def _host_entry(m: MirrorOptions, default_timeout: float, namespace: str | None) -> RegistryHost:
    netloc, scheme = m.host, None
    for prefix in ("http://", "https://"):
        if netloc.startswith(prefix):
            scheme, netloc = prefix[:-3], netloc[len(prefix) :]
    netloc = netloc.rstrip("/")
    if not netloc or "/" in netloc:
        raise InvalidArgument(f"mirror host {m.host!r}: want host[:port], without a path")
    netloc = api_host(netloc)
    if scheme is None:
        scheme = "http" if (m.insecure or is_localhost(netloc)) else "https"
    if m.request_timeout_sec < 0:
        timeout = None
    elif m.request_timeout_sec == 0:
        timeout = default_timeout
    else:
        timeout = float(m.request_timeout_sec)
    headers = tuple((name, v) for name, values in m.header for v in values)
    return RegistryHost(netloc, scheme, timeout, headers, namespace, m.ca, m.skip_verify)


def registry_hosts(registry: str, options: ResolverOptions | None = None) -> list[RegistryHost]:
    """Hosts to try for ``registry`` (a reference's host, e.g. ``docker.io``), in order."""
    options = options or ResolverOptions()
    default_timeout = options.default_timeout()
    cfg = options.host.get(registry)
    out = []
    itself = False
    for m in cfg.mirrors if cfg else ():
        entry = _host_entry(m, default_timeout, registry)
        if entry.netloc == api_host(registry):  # the registry itself: not a proxy
            entry = dataclasses.replace(entry, namespace=None)
            itself = True
        out.append(entry)
    if not itself:
        out.append(_host_entry(MirrorOptions(host=registry), default_timeout, None))
    return out
