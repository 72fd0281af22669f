"""The request engine under the registry client: HTTP over aiohttp with the policy of
Go's ``fs/remote`` + go-retryablehttp.

One :class:`Transport` (the base of :class:`stargz.remote.client.RegistryClient`) owns one
``aiohttp.ClientSession`` (one connection pool), the authorizer (challenges, token cache)
and the per-host "single-range only" memory. It works on any asyncio loop, uvloop
included. Manifests (images.py) and blobs (locate.py, blob.py) are built on it; it knows none of
them.

Every request goes through :meth:`Transport.request`:

- **Retries**: connection errors, timeouts, truncated bodies, 206 answers for another
  range than asked (:class:`RangeMismatch`, raised by the consumer), 429 and 5xx (but 501)
  are retried up to ``max_retries`` times with exponential backoff
  ``min(min_wait * 2**n, max_wait)`` plus up to as much jitter (``Retry-After`` wins for
  429/503). Other 4xx are final.
- **Timeouts**: each attempt is bounded by the host's ``request_timeout_sec`` (body
  included); blob reads add ``fetching_timeout_sec`` over all attempts (in blob.py).
- **Auth**: a 401 from a registry host feeds the challenge to the authorizer and the
  request is repeated with credentials (at most twice).
- **Redirects** are followed by hand: the target gets only the request's own headers
  (Range, Accept...), never the registry's ``Authorization`` nor the mirror's configured
  headers. Credentials the request carries itself (a token request's ``Authorization:
  Basic``, its refresh-token form body) go only to the origin (scheme, host and port) of
  the first URL: a redirect elsewhere, https -> http included, drops the header, and one
  that would re-send the body fails with :class:`AuthError`.
- **TLS**: a host's ``ca`` files are trusted besides the system's CAs (one SSL context
  per set of files), ``skip_verify`` turns verification off; a redirect target, and the
  token realm a host's challenge points at, are reached with that host's TLS settings.
  A failed handshake (wrong host name, unknown CA, plain http on the other end) is final
  for that host and its error says so.
- **Mirrors fail over at once**: a mirror's connection errors, timeouts and 5xx are not
  retried (the next host is there for that); the registry's are.
- **Logs and errors** show URLs through :func:`stargz.remote.redact.redact_url` (no query
  string, no userinfo): a pre-signed storage URL's signature is a credential.

Reads of a manifest or blob try the hosts of :func:`stargz.remote.hosts.registry_hosts`
in order (mirrors, then the registry) through :meth:`Transport.over_hosts`; any failure on
a mirror moves on to the next.
"""

from __future__ import annotations

import asyncio
import contextvars
import random
import ssl
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Self, TypeVar
from urllib.parse import urlencode, urljoin

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from stargz.errors import (
    AuthError,
    NotFound,
    RangeMismatch,
    RangeNotSatisfiable,
    RegistryError,
    RegistryProtocolError,
    StargzError,
)
from stargz.remote.auth import Authorizer, Credentials, DockerConfigKeychain, Keychain
from stargz.remote.hosts import RegistryHost, registry_hosts
from stargz.remote.manifest import load_json
from stargz.remote.options import BlobOptions, ResolverOptions
from stargz.remote.redact import redact_text, redact_url
from stargz.remote.reference import Reference, parse_reference
from stargz.remote.stats import FetchStats

T = TypeVar("T")

USER_AGENT = "stargz-snapshotter-py/0.1"
MAX_REDIRECTS = 10
MAX_TOKEN_RESPONSE = 1 << 20
_REDIRECT_STATUSES = (301, 302, 303, 307, 308)
_FINAL_CLIENT_ERRORS = (aiohttp.InvalidURL, aiohttp.ClientSSLError)
#: Headers that are credentials: sent to the first URL's origin only.
_CREDENTIAL_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie"})
_UNSET: Any = object()
_HTTP_TO_HTTPS = b"Client sent an HTTP request to an HTTPS server"
#: ``keychain=`` default: the docker config file (:class:`DockerConfigKeychain`).
DEFAULT_KEYCHAIN: Any = object()
#: The host a request is sent for, while its credentials are worked out: a token request
#: made then (in a task that inherits this context) uses that host's TLS settings.
_asking_for: contextvars.ContextVar[RegistryHost | None] = contextvars.ContextVar(
    "asking_for", default=None
)


def _origin(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port): where credentials for ``url`` may go."""
    u = URL(url, encoded=True)
    return (u.scheme.lower(), (u.host or "").lower(), u.port)


def _tls_reason(e: aiohttp.ClientSSLError) -> str:
    """The SSL library's own words (``certificate verify failed: IP address mismatch...``,
    ``wrong version number`` for a plain http server), without aiohttp's wrapping."""
    inner = getattr(e, "certificate_error", None) or getattr(e, "os_error", None) or e
    reason = getattr(inner, "verify_message", None) or getattr(inner, "reason", None)
    text = str(reason) if reason else str(inner)
    if isinstance(e, aiohttp.ClientConnectorCertificateError) or "CERTIFICATE" in text.upper():
        return f"certificate verify failed: {text}"
    return redact_text(text)


def retryable_status(status: int) -> bool:
    """go-retryablehttp's DefaultRetryPolicy: 429, and 5xx except 501."""
    return status == 429 or (500 <= status <= 599 and status != 501)


def pull_scope(ref: Reference) -> str:
    return f"repository:{ref.repository}:pull"


class Exchange:
    """One response as a consumer sees it, with byte counting."""

    __slots__ = ("resp", "url", "redirected", "stats")

    def __init__(
        self, resp: aiohttp.ClientResponse, url: str, redirected: bool, stats: Sequence[FetchStats]
    ) -> None:
        self.resp = resp
        self.url = url
        self.redirected = redirected
        self.stats = stats

    @property
    def status(self) -> int:
        return self.resp.status

    def _count(self, n: int) -> None:
        for s in self.stats:
            s.bytes_fetched += n

    async def read(self, limit: int) -> bytes:
        """The whole body; RegistryError if it is longer than ``limit``."""
        length = self.resp.content_length
        if length is not None and length > limit:
            raise RegistryProtocolError(
                f"GET {redact_url(self.url)}: body of {length} bytes exceeds {limit}",
                status=self.status,
                url=redact_url(self.url),
            )
        if length is not None:
            data = await self.resp.read()
            self._count(len(data))
            return data
        buf = bytearray()
        while True:
            piece = await self.resp.content.read(1 << 20)
            if not piece:
                break
            buf += piece
            self._count(len(piece))
            if len(buf) > limit:
                raise RegistryProtocolError(
                    f"GET {redact_url(self.url)}: body exceeds {limit} bytes",
                    status=self.status,
                    url=redact_url(self.url),
                )
        return bytes(buf)

    async def read_prefix(
        self, n: int, on_piece: Callable[[int, bytes], None] | None = None, piece: int = 0
    ) -> bytes:
        """The first ``n`` bytes of the body (fewer at its end). The rest is never read:
        if the server sends more, the connection is closed instead of drained.

        With ``on_piece``, each consecutive ``piece`` bytes (the last ones fewer) are also
        handed to ``on_piece(offset in the body, bytes)`` as soon as they are all here."""
        buf = bytearray()
        handed = 0
        while len(buf) < n:
            data = await self.resp.content.read(min(n - len(buf), 1 << 20))
            if not data:
                break
            buf += data
            self._count(len(data))
            while on_piece is not None and handed < len(buf):
                end = min(handed + piece, n)
                if end > len(buf):
                    break
                on_piece(handed, bytes(buf[handed:end]))
                handed = end
        if len(buf) == n and self.resp.content_length != n and not self.resp.content.at_eof():
            self.resp.close()
        return bytes(buf)

    async def error(self, what: str, not_found: type[NotFound] = NotFound) -> StargzError:
        """The error for an unexpected status, with the registry's own message if any."""
        status = self.status
        detail = ""
        try:
            body = await self.read_prefix(2048)
            obj = load_json(body, "error") if body[:1] == b"{" else {}
            errs = obj.get("errors") or []
            if errs and isinstance(errs[0], dict):
                detail = f": {errs[0].get('code', '')} {errs[0].get('message', '')}".rstrip()
            elif status == 400 and body.startswith(_HTTP_TO_HTTPS):
                # Go's answer to plain http on its TLS port
                detail = ": the server speaks https (write the host as https://...)"
        except (StargzError, aiohttp.ClientError, TimeoutError):
            pass
        msg = redact_text(f"{what}: HTTP {status} {self.resp.reason or ''}".rstrip() + detail)
        if status == 404:
            return not_found(msg)
        if status in (401, 403):
            return AuthError(msg, status=status, url=redact_url(self.url))
        if status == 416:
            return RangeNotSatisfiable(msg)
        return RegistryError(msg, status=status, url=redact_url(self.url))


Consume = Callable[[Exchange], Awaitable[T]]


class Transport:
    """Requests to registries, mirrors and storage; see the module docstring."""

    def __init__(
        self,
        *,
        resolver: ResolverOptions | None = None,
        blob: BlobOptions | None = None,
        keychain: Keychain | None = DEFAULT_KEYCHAIN,
        max_connections: int = 64,
        trust_env: bool = False,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        """``keychain`` defaults to the docker config file; pass None for anonymous only.

        ``trust_env``: honour ``HTTP(S)_PROXY``/``NO_PROXY`` (and aiohttp's netrc lookup).
        ``session``: an existing aiohttp session to use (not closed by :meth:`close`).
        """
        self.resolver_options = resolver or ResolverOptions()
        self.blob_options = blob or BlobOptions()
        self.keychain = DockerConfigKeychain() if keychain is DEFAULT_KEYCHAIN else keychain
        self.max_connections = max_connections
        self.trust_env = trust_env
        self._session = session
        self._own_session = session is None
        self.authorizer = Authorizer(self.keychain, self._fetch_token)
        self.stats = FetchStats()
        #: netlocs (registry, mirror or storage hosts) that get single-range requests only
        self.single_range_hosts: set[str] = set()
        self._ssl_contexts: dict[tuple[str, ...], ssl.SSLContext] = {}
        self._closed = False

    # --- lifecycle ------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._closed:
            raise RuntimeError("the registry client is closed")
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.max_connections),
                headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"},
                # no cookies: a storage or token server's cookie must not follow us around
                cookie_jar=aiohttp.DummyCookieJar(),
                auto_decompress=False,
                trust_env=self.trust_env,
                timeout=aiohttp.ClientTimeout(total=None),
            )
        return self._session

    async def close(self) -> None:
        self._closed = True
        self.authorizer.close()
        if self._session is not None and self._own_session:
            await self._session.close()
        self._session = None

    # --- hosts ----------------------------------------------------------------------

    def hosts(self, ref: Reference | str) -> list[RegistryHost]:
        """Hosts for ``ref``'s registry, in the order they are tried."""
        return registry_hosts(parse_reference(ref).host, self.resolver_options)

    async def over_hosts(
        self,
        ref: Reference,
        what: str,
        fn: Callable[[int, RegistryHost], Awaitable[T]],
        *,
        start: int = 0,
    ) -> T:
        """``fn(index, host)`` on each host from ``start`` until one succeeds; a mirror's
        failure is not final, the last host's (the registry) is."""
        hosts = self.hosts(ref)
        failures: list[str] = []
        for i, host in enumerate(hosts):
            if i < start:
                continue
            try:
                return await fn(i, host)
            except StargzError as e:
                if i == len(hosts) - 1:
                    if failures:
                        note = "; after mirrors failed: " + "; ".join(failures)
                        e.args = (f"{e.args[0] if e.args else e}{note}", *e.args[1:])
                    raise
                failures.append(f"{host.netloc}: {e}")
        raise AssertionError("unreachable: the registry itself is always the last host")

    # --- TLS ------------------------------------------------------------------------

    def ssl_for(self, host: RegistryHost | None) -> ssl.SSLContext | bool:
        """What aiohttp's ``ssl=`` gets for requests on behalf of ``host``: True (system
        CAs), False (``skip_verify``), or a context that also trusts ``host.ca``."""
        if host is None or host.scheme != "https":
            return True
        if host.skip_verify:
            return False
        if not host.ca:
            return True
        ctx = self._ssl_contexts.get(host.ca)
        if ctx is None:
            ctx = ssl.create_default_context()
            for path in host.ca:
                try:
                    ctx.load_verify_locations(cafile=path)
                except (OSError, ssl.SSLError) as e:
                    raise RegistryError(f"{host.netloc}: cannot load CA file {path}: {e}") from e
            self._ssl_contexts[host.ca] = ctx
        return ctx

    # --- the request engine -----------------------------------------------------------

    def backoff(self, attempt: int, resp: aiohttp.ClientResponse | None = None) -> float:
        """Seconds to wait before retry ``attempt + 1`` (jittered, like stargz's Go code)."""
        lo = self.blob_options.min_wait_msec / 1000
        hi = self.blob_options.max_wait_msec / 1000
        if resp is not None and resp.status in (429, 503):
            after = resp.headers.get("Retry-After", "")
            if after.isdigit():
                return min(float(after), hi)
        delay = min(lo * (2**attempt), hi)
        return delay + random.uniform(0, delay)

    async def request(
        self,
        method: str,
        url: str,
        *,
        consume: Consume[T],
        host: RegistryHost | None = None,
        scope: str | None = None,
        headers: Mapping[str, str] | None = None,
        stats: Sequence[FetchStats] = (),
        timeout: float | None = _UNSET,
        follow_redirects: bool = True,
        data: Any = None,
        via: RegistryHost | None = _UNSET,
    ) -> T:
        """Send a request with retries, auth and redirects; ``consume`` reads the answer.

        ``host`` is the registry host ``url`` belongs to: its configured headers and
        credentials are added (None: send only ``headers``, as for a storage URL).
        ``via`` is the host the request is made for (default ``host``; a storage URL's is
        the host that redirected there): its TLS settings apply, and a mirror's failures
        are not retried.
        ``consume`` runs inside the attempt, so a body cut short is retried as well.
        Retryable statuses reach ``consume`` only once the retries are used up.
        """
        if via is _UNSET:
            via = host
        tls = self.ssl_for(via)
        max_retries = 0 if via is not None and via.is_mirror else self.blob_options.max_retries
        if timeout is _UNSET:
            timeout = host.timeout if host is not None else self.resolver_options.default_timeout()
        all_stats = (self.stats, *stats)
        attempt = auth_rounds = 0
        while True:
            delay = 0.0
            try:
                async with asyncio.timeout(timeout):
                    resp, final, redirected, sent = await self._send(
                        method, url, host, scope, headers, all_stats, follow_redirects, data, tls
                    )
                    try:
                        if (
                            resp.status == 401
                            and host is not None
                            and not redirected
                            and auth_rounds < 2
                            and await self.authorizer.unauthorized(
                                host.netloc,
                                resp.headers.getall("WWW-Authenticate", []),
                                scope,
                                sent,
                            )
                        ):
                            auth_rounds += 1
                            continue
                        if not (retryable_status(resp.status) and attempt < max_retries):
                            return await consume(Exchange(resp, final, redirected, all_stats))
                        delay = self.backoff(attempt, resp)
                    finally:
                        resp.release()
            except aiohttp.ClientSSLError as e:
                raise RegistryError(
                    f"{method} {redact_url(url)}: TLS handshake with "
                    f"{URL(url, encoded=True).host_port_subcomponent} failed: {_tls_reason(e)}",
                    url=redact_url(url),
                ) from e
            except _FINAL_CLIENT_ERRORS as e:
                raise RegistryError(
                    f"{method} {redact_url(url)}: {redact_text(str(e))}", url=redact_url(url)
                ) from e
            except RangeMismatch:
                # a cache or proxy on the way that answered for another request: the same
                # request again usually gets the right bytes (the last mismatch is final)
                if attempt >= max_retries:
                    raise
                delay = self.backoff(attempt)
            except (aiohttp.ClientError, TimeoutError) as e:
                if attempt >= max_retries:
                    reason = (
                        f"timed out after {timeout} s"
                        if isinstance(e, TimeoutError)
                        else redact_text(str(e))
                    )
                    raise RegistryError(
                        f"{method} {redact_url(url)}: {reason} (after {attempt} retries)",
                        url=redact_url(url),
                    ) from e
                delay = self.backoff(attempt)
            attempt += 1
            for s in all_stats:
                s.retries += 1
            await asyncio.sleep(delay)

    async def _send(
        self,
        method: str,
        url: str,
        host: RegistryHost | None,
        scope: str | None,
        headers: Mapping[str, str] | None,
        stats: Sequence[FetchStats],
        follow: bool,
        data: Any,
        tls: ssl.SSLContext | bool = True,
    ) -> tuple[aiohttp.ClientResponse, str, bool, str | None]:
        hdrs: CIMultiDict[str] = CIMultiDict()
        sent_auth = None
        if host is not None:
            for k, v in host.headers:
                hdrs.add(k, v)
        for k, v in (headers or {}).items():
            hdrs[k] = v
        if host is not None:
            token = _asking_for.set(host)
            try:
                sent_auth = await self.authorizer.header(host.netloc, scope)
            finally:
                _asking_for.reset(token)
            if sent_auth:
                hdrs["Authorization"] = sent_auth
        current, redirected = url, False
        origin = _origin(url)
        for _ in range(MAX_REDIRECTS + 1):
            for s in stats:
                s.requests += 1
            resp = await self.session.request(
                method,
                URL(current, encoded=True),
                headers=hdrs,
                allow_redirects=False,
                data=data,
                ssl=tls,
            )
            location = resp.headers.get("Location")
            if not (follow and resp.status in _REDIRECT_STATUSES and location):
                return resp, current, redirected, sent_auth
            resp.release()
            current = urljoin(current, location)
            redirected = True
            for s in stats:
                s.redirects += 1
            if resp.status == 303 or (resp.status in (301, 302) and method == "POST"):
                method, data = "GET", None
            # Nothing of the registry's goes to the redirect target: no credentials, no
            # configured headers; only what this request itself needs, and its own
            # credentials (header or form body) only back to the origin they were meant for.
            trusted = _origin(current) == origin
            if data is not None and not trusted:
                raise AuthError(
                    f"{method} {redact_url(url)} redirects to {redact_url(current)}: "
                    "its body (credentials) is not sent to another origin",
                    status=resp.status,
                    url=redact_url(url),
                )
            hdrs = CIMultiDict(
                (k, v)
                for k, v in (headers or {}).items()
                if trusted or k.lower() not in _CREDENTIAL_HEADERS
            )
        raise RegistryError(
            f"{method} {redact_url(url)}: more than {MAX_REDIRECTS} redirects",
            url=redact_url(url),
        )

    async def _fetch_token(
        self, realm: str, service: str | None, scopes: Sequence[str], creds: Credentials | None
    ) -> tuple[str, float | None]:
        """GET (or, with a refresh token, POST) the bearer token endpoint."""
        query: list[tuple[str, str]] = []
        if service:
            query.append(("service", service))
        headers: dict[str, str] = {}
        if creds and creds.identity_token:
            form = [
                ("grant_type", "refresh_token"),
                ("refresh_token", creds.identity_token),
                ("client_id", "stargz-snapshotter"),
                ("scope", " ".join(scopes)),
                *query,
            ]
            method, url, data = "POST", realm, urlencode(form)
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        else:
            query += [("scope", s) for s in scopes]
            sep = "&" if "?" in realm else "?"
            method, url, data = "GET", realm + (sep + urlencode(query) if query else ""), None
            if creds and (creds.username or creds.password):
                headers["Authorization"] = creds.basic()

        shown = redact_url(realm)

        async def consume(ex: Exchange) -> tuple[str, float | None]:
            if ex.status != 200:
                err = await ex.error(f"token request to {shown}")
                if ex.status in (400, 401, 403):
                    raise AuthError(str(err), status=ex.status, url=shown)
                raise err
            obj = load_json(await ex.read(MAX_TOKEN_RESPONSE), f"token from {shown}")
            token = obj.get("token") or obj.get("access_token")
            if not isinstance(token, str) or not token:
                raise AuthError(f"token response from {shown} holds no token", url=shown)
            expires = obj.get("expires_in")
            return token, float(expires) if isinstance(expires, int | float) else None

        # the realm is reached with the TLS settings (ca, skip_verify) of the registry host
        # that asked for the token, as containerd does with the host's HTTP client
        return await self.request(
            method, url, consume=consume, headers=headers, data=data, via=_asking_for.get()
        )
