"""The CRI keychain: registry credentials learned from kubelet's ``PullImage`` calls.

kubelet sends a pod's pull secret with every ``PullImageRequest`` (``auth``) to its image
service; when that is the daemon (`stargz.service.cri_proxy`), the daemon learns the
credentials before forwarding the call to containerd, and its registry client uses them to
fetch the layers it mounts lazily. This module is the store, without gRPC:

- Credentials are keyed by the **registry host** of the pulled image
  (``127.0.0.1:5000``; Docker Hub as ``docker.io``, whichever alias asked). A later pull
  with other credentials for that host replaces them (a rotated secret); a pull without
  credentials (a public image) leaves them alone.
- ``AuthConfig`` is read as containerd's CRI plugin reads it (``ParseAuth``): a
  ``server_address`` that is not the image's host means "not for this image";
  ``username``/``password`` win, then ``identity_token`` (an OAuth2 refresh token), then
  ``auth`` (base64 of ``user:password``, which must decode); ``registry_token`` is a
  bearer token sent as is. A malformed ``auth`` is :class:`stargz.errors.InvalidArgument`.
- Unlike the Go snapshotter, which keeps them in memory only (a restarted daemon can no
  longer read uncached chunks of private images), they are kept in
  ``<root>/cri-keychain.json``: mode 0600 in the daemon's 0700 root, replaced atomically,
  never logged. :meth:`CRIKeychain.prune` drops the hosts no image in containerd comes
  from any more (the proxy calls it after each ``RemoveImage``), and the file goes away
  with the last host.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import os
import stat
from collections.abc import Iterable
from dataclasses import asdict
from urllib.parse import urlsplit

from stargz.errors import InvalidArgument
from stargz.private import FILE_MODE
from stargz.remote.auth import DOCKER_HUB_HOSTS, Credentials, credentials_changed
from stargz.remote.reference import DOCKER_HUB, parse_reference

log = logging.getLogger("stargz.keychain")

FILE_NAME = "cri-keychain.json"
FORMAT_VERSION = 1
_FIELDS = ("username", "password", "identity_token", "registry_token")


def registry_key(host: str) -> str:
    """The key of a registry host: lower case, Docker Hub's aliases as ``docker.io``."""
    host = host.lower()
    return DOCKER_HUB if host in DOCKER_HUB_HOSTS else host


def image_host(image: str) -> str:
    """The registry key of image reference ``image`` (``busybox`` -> ``docker.io``)."""
    return registry_key(parse_reference(image).host)


def parse_auth(
    *,
    host: str,
    username: str = "",
    password: str = "",
    auth: str = "",
    server_address: str = "",
    identity_token: str = "",
    registry_token: str = "",
) -> Credentials | None:
    """The credentials a CRI ``AuthConfig`` gives for registry ``host`` (None: none)."""
    if server_address:
        target = server_address if "://" in server_address else "//" + server_address
        if registry_key(urlsplit(target).netloc or server_address) != registry_key(host):
            return None
    if username:
        creds = Credentials(username=username, password=password)
    elif identity_token:
        creds = Credentials(identity_token=identity_token)
    elif auth:
        try:
            raw = base64.b64decode(auth, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            raise InvalidArgument("auth.auth is not base64") from None
        user, sep, secret = raw.partition(":")
        if not sep:
            raise InvalidArgument("auth.auth does not decode to user:password")
        creds = Credentials(username=user, password=secret.strip("\x00"))
    else:
        creds = Credentials()
    if registry_token:
        creds = Credentials(
            creds.username, creds.password, creds.identity_token, registry_token=registry_token
        )
    return creds or None


class CRIKeychain:
    """Credentials by registry host, persisted at ``path`` (a `stargz.remote.auth.Keychain`)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._creds: dict[str, Credentials] = {}

    @classmethod
    def open(cls, root: str) -> CRIKeychain:
        """The keychain of the daemon rooted at ``root``, with what an earlier run kept."""
        keychain = cls(os.path.join(root, FILE_NAME))
        keychain.load()
        return keychain

    # --- the Keychain protocol ----------------------------------------------------------

    async def credentials(self, host: str) -> Credentials | None:
        return self._creds.get(registry_key(host))

    # --- learning and forgetting ----------------------------------------------------------

    def hosts(self) -> set[str]:
        return set(self._creds)

    def learn(self, host: str, creds: Credentials) -> bool:
        """Keep ``creds`` for ``host``; True if that changed anything (then saved)."""
        key = registry_key(host)
        if self._creds.get(key) == creds:
            return False
        self._creds[key] = creds
        self.save()
        credentials_changed()
        log.info("registry credentials learned", extra={"host": key})
        return True

    def restore(self, host: str, learned: Credentials, previous: Credentials | None) -> None:
        """Undo :meth:`learn` of ``learned`` (its pull failed): ``previous`` again, or
        nothing, unless another call changed the host's credentials since."""
        key = registry_key(host)
        if self._creds.get(key) != learned:
            return
        if previous is None:
            del self._creds[key]
        else:
            self._creds[key] = previous
        self.save()
        credentials_changed()
        log.info("registry credentials of a failed pull dropped", extra={"host": key})

    def prune(self, hosts_in_use: Iterable[str]) -> list[str]:
        """Drop the credentials of every host not in ``hosts_in_use``; the dropped hosts."""
        keep = {registry_key(h) for h in hosts_in_use}
        dropped = sorted(h for h in self._creds if h not in keep)
        if dropped:
            for h in dropped:
                del self._creds[h]
            self.save()
            credentials_changed()
            log.info("registry credentials dropped: no image uses them", extra={"hosts": dropped})
        return dropped

    # --- the file ---------------------------------------------------------------------------

    def load(self) -> None:
        """Read the file (a missing one is an empty keychain). A file that is not ours
        (not a regular file, or readable by others) is narrowed to 0600; a damaged one is
        reported and ignored (the next pull with credentials rewrites it)."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            return
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                log.warning("CRI keychain file is not a regular file", extra={"path": self.path})
                return
            if stat.S_IMODE(st.st_mode) != FILE_MODE:
                os.fchmod(f.fileno(), FILE_MODE)
                log.warning(
                    "narrowed the CRI keychain file to 0600",
                    extra={"path": self.path, "old_mode": f"{stat.S_IMODE(st.st_mode):04o}"},
                )
            data = f.read()
        try:
            doc = json.loads(data)
            if doc.get("version") != FORMAT_VERSION:
                raise ValueError(f"format version {doc.get('version')!r}")
            creds = {
                registry_key(h): Credentials(**{k: str(v.get(k, "")) for k in _FIELDS})
                for h, v in doc["hosts"].items()
            }
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            # the error text names no secret: json's messages quote positions, not values
            log.warning(
                "CRI keychain file is damaged; starting without its credentials",
                extra={"path": self.path, "error": type(e).__name__},
            )
            return
        self._creds = {h: c for h, c in creds.items() if c}
        credentials_changed()
        log.info("CRI keychain loaded", extra={"path": self.path, "hosts": sorted(self._creds)})

    def save(self) -> None:
        """Write the file atomically (0600 temp file, fsync, rename); remove it when empty."""
        if not self._creds:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            return
        doc = {
            "version": FORMAT_VERSION,
            "hosts": {
                h: {k: v for k, v in asdict(c).items() if v} for h, c in sorted(self._creds.items())
            },
        }
        tmp = f"{self.path}.tmp"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        fd = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, FILE_MODE
        )
        with os.fdopen(fd, "wb") as f:
            os.fchmod(fd, FILE_MODE)  # whatever the umask
            f.write(json.dumps(doc, indent=1).encode())
            f.flush()
            os.fsync(fd)
        os.replace(tmp, self.path)
        dfd = os.open(os.path.dirname(self.path) or ".", os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
