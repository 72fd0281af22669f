"""Image references: ``[host[:port]/]path[:tag][@digest]``, normalized as Docker does.

Grammar and normalization follow ``github.com/distribution/reference``
(``ParseNormalizedNamed``): a first component is a registry host only if it contains
``.`` or ``:``, is ``localhost``, or has upper-case letters; otherwise the host is
``docker.io``, and a one-component Docker Hub name gets the ``library/`` prefix.
``index.docker.io`` is an alias of ``docker.io``. Without tag or digest the tag is
``latest``. A reference with both keeps both; the digest is what gets fetched.

``docker.io`` stays the reference's host (credentials and mirror config are keyed by
it); requests go to ``registry-1.docker.io`` (see :func:`api_host`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from stargz.errors import InvalidReference

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
_HUB_ALIASES = ("docker.io", "index.docker.io")

_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_HOST = rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[0-9A-Fa-f:.]+\])"
_DOMAIN_RE = re.compile(rf"{_HOST}(?::[0-9]+)?\Z")
_PATH_COMPONENT_RE = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*\Z")
_TAG_RE = re.compile(r"[\w][\w.-]{0,127}\Z")
_DIGEST_RE = re.compile(r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}\Z")
_DIGEST_LENGTHS = {"sha256": 64, "sha384": 96, "sha512": 128}
_MAX_NAME = 255


def validate_digest(digest: str) -> str:
    """``algo:hex``; for known algorithms the hex length is checked. Returns the digest."""
    if not _DIGEST_RE.match(digest):
        raise InvalidReference(f"invalid digest {digest!r}")
    algo, _, hexd = digest.partition(":")
    want = _DIGEST_LENGTHS.get(algo)
    if want is not None and (len(hexd) != want or hexd != hexd.lower()):
        raise InvalidReference(f"invalid {algo} digest {digest!r}")
    return digest


@dataclass(frozen=True)
class Reference:
    """A normalized reference. ``str()`` gives the fully qualified form."""

    host: str  # "docker.io", "ghcr.io", "127.0.0.1:5000"
    repository: str  # "library/ubuntu"
    tag: str | None = None
    digest: str | None = None

    @property
    def locator(self) -> str:
        """``host/repository`` (containerd's ``reference.Spec.Locator``)."""
        return f"{self.host}/{self.repository}"

    @property
    def object(self) -> str:
        """What to ask the registry for: the digest if any, else the tag."""
        return self.digest or self.tag or "latest"

    def with_digest(self, digest: str) -> Reference:
        return Reference(self.host, self.repository, self.tag, validate_digest(digest))

    def __str__(self) -> str:
        out = self.locator
        if self.tag:
            out += ":" + self.tag
        if self.digest:
            out += "@" + self.digest
        return out


def api_host(host: str) -> str:
    """The host requests go to: Docker Hub's API host for ``docker.io``."""
    return DOCKER_HUB_API if host in _HUB_ALIASES else host


def parse_reference(ref: str | Reference) -> Reference:
    """Parse and normalize (``ubuntu`` -> ``docker.io/library/ubuntu:latest``)."""
    if isinstance(ref, Reference):
        return ref
    if not isinstance(ref, str) or not ref:
        raise InvalidReference("empty image reference")
    if "://" in ref:
        raise InvalidReference(f"{ref!r}: a reference has no URL scheme")
    name, digest = ref, None
    if "@" in ref:
        name, _, digest = ref.partition("@")
        validate_digest(digest)
    tag = None
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        name, tag = name[:colon], name[colon + 1 :]
        if not _TAG_RE.match(tag):
            raise InvalidReference(f"{ref!r}: invalid tag {tag!r}")
    if not name:
        raise InvalidReference(f"{ref!r}: empty repository name")

    first, sep, rest = name.partition("/")
    if sep and (any(c in first for c in ".:") or first == "localhost" or first != first.lower()):
        host, path = first, rest
        if not _DOMAIN_RE.match(host):
            raise InvalidReference(f"{ref!r}: invalid registry host {host!r}")
    else:
        host, path = DOCKER_HUB, name
    if host in _HUB_ALIASES:
        host = DOCKER_HUB
        if "/" not in path:
            path = "library/" + path
    if path != path.lower():
        raise InvalidReference(f"{ref!r}: repository name must be lowercase")
    for comp in path.split("/"):
        if not _PATH_COMPONENT_RE.match(comp):
            raise InvalidReference(f"{ref!r}: invalid path component {comp!r}")
    if len(host) + 1 + len(path) > _MAX_NAME:
        raise InvalidReference(f"{ref!r}: name longer than {_MAX_NAME} characters")
    if tag is None and digest is None:
        tag = "latest"
    return Reference(host=host, repository=path, tag=tag, digest=digest)
