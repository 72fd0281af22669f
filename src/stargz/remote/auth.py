"""Registry authentication: credentials (keychains) and the WWW-Authenticate dance.

The flow is Docker's token authentication (``distribution/docs/spec/auth/token.md``), as
containerd's ``docker.Authorizer`` does it:

1. A request goes out anonymously. A ``401`` carries ``WWW-Authenticate``.
2. ``Basic``: the request is repeated with the host's credentials.
   ``Bearer realm=...,service=...,scope=...``: a token is fetched from ``realm`` (with the
   host's credentials as HTTP basic auth when there are any, or a refresh token from an
   ``identitytoken``), then the request is repeated with ``Authorization: Bearer``.
3. Later requests to that host send the cached token up front; it is reused per
   (host, realm, service, scopes) until ``expires_in`` (default 60 s) runs out, and
   dropped when the registry refuses it.

Credentials are looked up by the host the request goes to (a mirror's own host for a
mirror; Docker Hub's entries under ``index.docker.io``). Nothing here is ever sent to a
redirect target: the client strips ``Authorization`` when it follows a redirect.

Sources outside this package (the daemon's CRI keychain, `stargz.service.keychain`) join
every authorizer that has a keychain with :func:`add_credential_source`; they are asked
after its own keychain (the docker config first, as Go's ``multiCredsFuncs``), and
:func:`credentials_changed` makes authorizers forget what they cached.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import os
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from stargz.errors import AuthError

DOCKER_HUB_HOSTS = ("docker.io", "index.docker.io", "registry-1.docker.io")
DOCKER_HUB_HELPER_KEY = "https://index.docker.io/v1/"
DEFAULT_TOKEN_TTL = 60.0
_CREDS_TTL = 60.0


@dataclass(frozen=True)
class Credentials:
    username: str = ""
    password: str = field(default="", repr=False)
    #: An OAuth2 refresh token (docker config ``identitytoken``).
    identity_token: str = field(default="", repr=False)
    #: A bearer token for the registry itself (CRI ``AuthConfig.registry_token``): sent
    #: as is when the registry asks for a bearer token, instead of fetching one.
    registry_token: str = field(default="", repr=False)

    def __bool__(self) -> bool:
        return bool(self.username or self.password or self.identity_token or self.registry_token)

    def basic(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")


class Keychain(Protocol):
    """Where credentials come from; ``host`` is a netloc (``ghcr.io``, ``10.0.0.1:5000``)."""

    async def credentials(self, host: str) -> Credentials | None: ...


class StaticKeychain:
    """Fixed credentials by host (for tests, and for keychains fed over gRPC later)."""

    def __init__(self, creds: Mapping[str, Credentials] | None = None) -> None:
        self._creds = dict(creds or {})

    def set(self, host: str, creds: Credentials) -> None:
        self._creds[host] = creds

    async def credentials(self, host: str) -> Credentials | None:
        for key in _host_keys(host):
            if key in self._creds:
                return self._creds[key]
        return None


class ChainKeychain:
    """The first keychain with non-empty credentials wins (``multiCredsFuncs``)."""

    def __init__(self, keychains: Sequence[Keychain]) -> None:
        self.keychains = list(keychains)

    async def credentials(self, host: str) -> Credentials | None:
        for k in self.keychains:
            creds = await k.credentials(host)
            if creds:
                return creds
        return None


_SOURCES: list[Keychain] = []
_generation = 0


def add_credential_source(source: Keychain) -> None:
    """Ask ``source`` too, after its own keychain, in every :class:`Authorizer` that has
    one (anonymous-only authorizers stay anonymous)."""
    if source not in _SOURCES:
        _SOURCES.append(source)
    credentials_changed()


def remove_credential_source(source: Keychain) -> None:
    if source in _SOURCES:
        _SOURCES.remove(source)
    credentials_changed()


def credentials_changed() -> None:
    """A source learned or dropped credentials: authorizers look them up again."""
    global _generation
    _generation += 1


def _host_keys(host: str) -> list[str]:
    host = host.lower()
    if host in DOCKER_HUB_HOSTS:
        return list(DOCKER_HUB_HOSTS)
    return [host]


def _normalize_key(key: str) -> str:
    """A docker config ``auths`` key as a bare host: no scheme, no path."""
    key = key.strip().lower()
    for prefix in ("http://", "https://"):
        if key.startswith(prefix):
            key = key[len(prefix) :]
    return key.split("/", 1)[0]


def docker_config_path() -> str:
    """``$DOCKER_CONFIG/config.json``, else ``~/.docker/config.json``."""
    base = os.environ.get("DOCKER_CONFIG") or os.path.join(os.path.expanduser("~"), ".docker")
    return os.path.join(base, "config.json")


class DockerConfigKeychain:
    """Credentials from a docker ``config.json``: ``auths`` and credential helpers.

    Per host, as the docker CLI does: ``credHelpers[host]``, else ``credsStore``, runs
    ``docker-credential-<name> get``; otherwise (or if the helper knows nothing)
    ``auths[host]`` gives ``auth`` (base64 ``user:password``) or ``username``/``password``,
    and ``identitytoken`` (a refresh token). The file is re-read when it changes; a
    missing file means no credentials. ``path`` defaults to :func:`docker_config_path`
    evaluated when the keychain is made.
    """

    def __init__(self, path: str | None = None, *, helper_timeout: float = 10.0) -> None:
        self.path = path or docker_config_path()
        self.helper_timeout = helper_timeout
        self._stamp: tuple[int, int] | None = None
        self._config: dict = {}

    def _load(self) -> dict:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._stamp, self._config = None, {}
            return self._config
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            try:
                with open(self.path, "rb") as f:
                    config = json.loads(f.read() or b"{}")
            except (OSError, ValueError) as e:
                raise AuthError(f"cannot read docker config {self.path}: {e}") from e
            self._config = config if isinstance(config, dict) else {}
            self._stamp = stamp
        return self._config

    async def credentials(self, host: str) -> Credentials | None:
        config = self._load()
        keys = _host_keys(host)
        helpers = config.get("credHelpers") or {}
        helper = next((helpers[k] for k in keys if k in helpers), None) or config.get("credsStore")
        if helper:
            server = DOCKER_HUB_HELPER_KEY if keys[0] in DOCKER_HUB_HOSTS else host
            creds = await self._run_helper(str(helper), server)
            if creds:
                return creds
        auths = {_normalize_key(k): v for k, v in (config.get("auths") or {}).items()}
        for k in keys:
            entry = auths.get(k)
            if isinstance(entry, dict):
                return _entry_credentials(entry, self.path, k)
        return None

    async def _run_helper(self, name: str, server: str) -> Credentials | None:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise AuthError(f"docker config {self.path}: bad credential helper name {name!r}")
        prog = f"docker-credential-{name}"
        try:
            proc = await asyncio.create_subprocess_exec(
                prog,
                "get",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        except FileNotFoundError as e:
            raise AuthError(f"credential helper {prog} not found on PATH") from e
        try:
            out, err = await asyncio.wait_for(
                proc.communicate(server.encode()), self.helper_timeout
            )
        except TimeoutError as e:
            proc.kill()
            await proc.wait()
            raise AuthError(f"credential helper {prog} timed out") from e
        if proc.returncode != 0:
            if b"credentials not found" in (out + err).lower():
                return None
            msg = (err or out).decode(errors="replace").strip()
            raise AuthError(f"credential helper {prog} failed: {msg}")
        try:
            data = json.loads(out)
            user, secret = data.get("Username", ""), data.get("Secret", "")
        except (ValueError, AttributeError) as e:
            raise AuthError(f"credential helper {prog} printed no JSON") from e
        if user == "<token>":
            return Credentials(identity_token=secret)
        return Credentials(username=user, password=secret)


def _entry_credentials(entry: dict, path: str, key: str) -> Credentials | None:
    user = entry.get("username") or ""
    password = entry.get("password") or ""
    if entry.get("auth"):
        try:
            raw = base64.b64decode(entry["auth"], validate=False).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError, TypeError) as e:
            raise AuthError(f"docker config {path}: auths.{key}.auth is not base64") from e
        user, sep, password = raw.partition(":")
        if not sep:
            raise AuthError(f"docker config {path}: auths.{key}.auth is not user:password")
    creds = Credentials(user, password, entry.get("identitytoken") or "")
    return creds or None


# --- challenges ---------------------------------------------------------------------------

_TOKEN_RE = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~/-]+")
_QUOTED_RE = re.compile(r'"((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True)
class Challenge:
    scheme: str  # lower case: "bearer", "basic"
    params: Mapping[str, str]

    @property
    def scopes(self) -> frozenset[str]:
        return frozenset(self.params.get("scope", "").split())


def parse_www_authenticate(values: Iterable[str]) -> list[Challenge]:
    """Every challenge in the ``WWW-Authenticate`` header lines, in order.

    ``Bearer realm="https://auth.example/token",service="reg",scope="repository:a:pull"``
    gives ``Challenge("bearer", {"realm": ..., "service": ..., "scope": ...})``. A token
    followed by ``=`` is a parameter of the current challenge; any other token starts a
    new challenge (token68 credentials, unused by registries, are skipped).
    """
    out: list[Challenge] = []
    for value in values:
        pos, n = 0, len(value)
        params: dict[str, str] | None = None
        while pos < n:
            if value[pos] in " \t,":
                pos += 1
                continue
            m = _TOKEN_RE.match(value, pos)
            if not m:
                break  # unparsable tail: keep what we have
            word, pos = m.group(0), m.end()
            while pos < n and value[pos] in " \t":
                pos += 1
            if pos < n and value[pos] == "=" and params is not None:
                pos += 1
                while pos < n and value[pos] in " \t":
                    pos += 1
                q = _QUOTED_RE.match(value, pos)
                if q:
                    v, pos = re.sub(r"\\(.)", r"\1", q.group(1)), q.end()
                else:
                    end = pos
                    while end < n and value[end] not in " \t,":
                        end += 1
                    v, pos = value[pos:end], end
                params[word.lower()] = v
            elif pos < n and value[pos] == "=":
                pos += 1  # a stray parameter before any scheme
            else:
                params = {}
                out.append(Challenge(word.lower(), params))
    return out


# --- authorizer ---------------------------------------------------------------------------


@dataclass
class _Token:
    value: str
    expires_at: float


#: fetch_token(realm, service, scopes, credentials) -> (token, expires_in seconds or None)
TokenFetcher = Callable[
    [str, str | None, Sequence[str], Credentials | None], Awaitable[tuple[str, float | None]]
]


class Authorizer:
    """Per-host challenge memory, credential lookup and a bearer token cache."""

    def __init__(
        self,
        keychain: Keychain | None,
        fetch_token: TokenFetcher,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.keychain = keychain
        self._fetch_token = fetch_token
        self._clock = clock
        self._challenges: dict[str, Challenge] = {}
        self._extra_scopes: dict[tuple[str, str | None], frozenset[str]] = {}
        self._tokens: dict[tuple, _Token] = {}
        self._inflight: dict[tuple, asyncio.Future[_Token]] = {}
        self._creds: dict[str, tuple[Credentials | None, float, int]] = {}
        self.token_fetches = 0

    async def credentials(self, host: str) -> Credentials | None:
        hit = self._creds.get(host)
        now = self._clock()
        if hit is not None and hit[1] > now and hit[2] == _generation:
            return hit[0]
        generation = _generation
        creds = None
        if self.keychain is not None:
            for source in [self.keychain, *_SOURCES]:
                creds = await source.credentials(host)
                if creds:
                    break
        self._creds[host] = (creds, now + _CREDS_TTL, generation)
        return creds

    def _token_key(self, host: str, ch: Challenge, scope: str | None) -> tuple:
        scopes = set(self._extra_scopes.get((host, scope), frozenset()))
        if scope:
            scopes.update(scope.split())  # a push with a mount asks for two repositories
        return (host, ch.params.get("realm", ""), ch.params.get("service"), tuple(sorted(scopes)))

    async def header(self, host: str, scope: str | None) -> str | None:
        """The ``Authorization`` value to send to ``host`` now (None: go anonymous)."""
        ch = self._challenges.get(host)
        if ch is None:
            return None
        if ch.scheme == "basic":
            creds = await self.credentials(host)
            return creds.basic() if creds and (creds.username or creds.password) else None
        key = self._token_key(host, ch, scope)
        tok = self._tokens.get(key)
        if tok is not None and tok.expires_at > self._clock():
            return "Bearer " + tok.value
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.ensure_future(self._new_token(host, ch, key[3]))
            self._inflight[key] = task
            task.add_done_callback(lambda t, key=key: self._token_done(key, t))
        # shield: one waiter giving up must not cancel the fetch the others wait for
        tok = await asyncio.shield(task)
        return "Bearer " + tok.value

    def _token_done(self, key: tuple, task: asyncio.Future[_Token]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled() and task.exception() is None:
            self._tokens[key] = task.result()

    async def _new_token(self, host: str, ch: Challenge, scopes: Sequence[str]) -> _Token:
        creds = await self.credentials(host)
        if creds is not None and creds.registry_token:
            return _Token(creds.registry_token, self._clock() + DEFAULT_TOKEN_TTL)
        realm = ch.params.get("realm")
        if not realm:
            raise AuthError(f"{host}: bearer challenge without a realm")
        self.token_fetches += 1
        value, expires_in = await self._fetch_token(realm, ch.params.get("service"), scopes, creds)
        ttl = expires_in if expires_in and expires_in > 0 else DEFAULT_TOKEN_TTL
        # renew a little early so a token does not die between header and server
        return _Token(value, self._clock() + ttl - min(10.0, ttl / 10))

    async def unauthorized(
        self, host: str, www_authenticate: Sequence[str], scope: str | None, sent: str | None
    ) -> bool:
        """Learn from a 401. True if repeating the request with new auth may succeed."""
        challenges = parse_www_authenticate(www_authenticate)
        ch = next((c for c in challenges if c.scheme == "bearer"), None) or next(
            (c for c in challenges if c.scheme == "basic"), None
        )
        if ch is None:
            return False
        self._challenges[host] = ch
        if ch.scheme == "basic":
            if sent is not None and sent.startswith("Basic "):
                self._creds.pop(host, None)
                return False  # our credentials were refused
            creds = await self.credentials(host)
            return bool(creds and (creds.username or creds.password))
        if ch.scopes:
            key = (host, scope)
            self._extra_scopes[key] = self._extra_scopes.get(key, frozenset()) | (
                ch.scopes - set((scope or "").split())
            )
        if sent is not None and sent.startswith("Bearer "):
            # expired, revoked, or too narrow: drop every cached token with that value
            token = sent[len("Bearer ") :]
            for k in [k for k, t in self._tokens.items() if t.value == token]:
                del self._tokens[k]
        return True

    def close(self) -> None:
        """Cancel token fetches still in flight."""
        for task in list(self._inflight.values()):
            task.cancel()
        self._inflight.clear()

    def forget(self, host: str) -> None:
        """Drop what we know about ``host`` (challenge, tokens, credentials)."""
        self._challenges.pop(host, None)
        self._creds.pop(host, None)
        for k in [k for k in self._tokens if k[0] == host]:
            del self._tokens[k]
