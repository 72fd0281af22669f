"""The registry client: OCI distribution / Docker registry v2 over aiohttp.

One :class:`RegistryClient` per daemon owns one ``aiohttp.ClientSession`` (one
connection pool), the authorizer (challenges, token cache) and the per-host
"single-range only" memory. It works on any asyncio loop, uvloop included.

Every request goes through :meth:`RegistryClient.request`, which implements the policy
of Go's ``fs/remote`` + go-retryablehttp:

- **Retries**: connection errors, timeouts, truncated bodies, 429 and 5xx (but 501) are
  retried up to ``max_retries`` times with exponential backoff
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
- **Logs and errors** show URLs through :func:`stargz.remote.redact.redact_url` (no query
  string, no userinfo): a pre-signed storage URL's signature is a credential.

Reads of a manifest or blob try the hosts of :func:`stargz.remote.hosts.registry_hosts`
in order (mirrors, then the registry); any failure on a mirror moves on to the next.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlencode, urljoin

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from stargz.errors import (
    AuthError,
    BlobNotFound,
    DigestMismatch,
    InvalidArgument,
    ManifestNotFound,
    NotFound,
    RangeNotSatisfiable,
    RegistryError,
    RegistryProtocolError,
    StargzError,
)
from stargz.remote.auth import Authorizer, Credentials, DockerConfigKeychain, Keychain
from stargz.remote.hosts import RegistryHost, registry_hosts
from stargz.remote.manifest import (
    ACCEPT,
    INDEX_TYPES,
    Descriptor,
    Manifest,
    Platform,
    host_platform,
    load_json,
    media_type_of,
    parse_manifest,
    select_platform,
)
from stargz.remote.multipart import parse_content_range
from stargz.remote.options import BlobOptions, ResolverOptions
from stargz.remote.redact import redact_text, redact_url
from stargz.remote.reference import Reference, parse_reference, validate_digest
from stargz.remote.stats import FetchStats

if TYPE_CHECKING:
    from stargz.remote.blob import BlobReader

T = TypeVar("T")

USER_AGENT = "stargz-snapshotter-py/0.1"
MAX_REDIRECTS = 10
MAX_MANIFEST_SIZE = 4 << 20
MAX_TOKEN_RESPONSE = 1 << 20
#: Bytes of a blob's end that :meth:`RegistryClient.open_blob`'s probe asks for
#: (``Range: bytes=-N``), so that an eStargz footer (and a small TOC) come with the probe
#: instead of in a request of their own. Sized so that the answer (body + ~1 KiB of
#: headers) fits in a fresh TCP connection's first flight (10 segments of 1448 bytes):
#: the probe then costs no more round trips than ``bytes=0-0``. Measured in
#: benchmarks/bench_layer_open.py.
TAIL_PROBE_SIZE = 12 << 10
_REDIRECT_STATUSES = (301, 302, 303, 307, 308)
_FINAL_CLIENT_ERRORS = (aiohttp.InvalidURL, aiohttp.ClientSSLError)
#: Headers that are credentials: sent to the first URL's origin only.
_CREDENTIAL_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie"})


def _origin(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port): where credentials for ``url`` may go."""
    u = URL(url, encoded=True)
    return (u.scheme.lower(), (u.host or "").lower(), u.port)


def retryable_status(status: int) -> bool:
    """go-retryablehttp's DefaultRetryPolicy: 429, and 5xx except 501."""
    return status == 429 or (500 <= status <= 599 and status != 501)


def pull_scope(ref: Reference) -> str:
    return f"repository:{ref.repository}:pull"


def _digest_of(data: bytes, like: str) -> str:
    algo = like.partition(":")[0] if like else "sha256"
    try:
        h = hashlib.new(algo)
    except ValueError:
        raise InvalidArgument(f"unsupported digest algorithm {algo!r}") from None
    h.update(data)
    return f"{algo}:{h.hexdigest()}"


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

    async def read_prefix(self, n: int) -> bytes:
        """The first ``n`` bytes of the body (fewer at its end). The rest is never read:
        if the server sends more, the connection is closed instead of drained."""
        buf = bytearray()
        while len(buf) < n:
            piece = await self.resp.content.read(min(n - len(buf), 1 << 20))
            if not piece:
                break
            buf += piece
        self._count(len(buf))
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
        except (StargzError, aiohttp.ClientError, TimeoutError):
            pass
        msg = f"{what}: HTTP {status} {self.resp.reason or ''}".rstrip() + detail
        if status == 404:
            return not_found(msg)
        msg = redact_text(msg)
        if status in (401, 403):
            return AuthError(msg, status=status, url=redact_url(self.url))
        if status == 416:
            return RangeNotSatisfiable(msg)
        return RegistryError(msg, status=status, url=redact_url(self.url))


Consume = Callable[[Exchange], Awaitable[T]]
_UNSET: Any = object()


@dataclass(frozen=True)
class BlobLocation:
    """Where a blob's bytes are: the host that serves it and the URL to GET."""

    host_index: int
    host: RegistryHost
    url: str
    redirected: bool
    size: int


class RegistryClient:
    """Registry API client. Use as ``async with RegistryClient(...) as client:``."""

    def __init__(
        self,
        *,
        resolver: ResolverOptions | None = None,
        blob: BlobOptions | None = None,
        keychain: Keychain | None = _UNSET,
        platform: Platform | None = None,
        max_connections: int = 64,
        redirect_ttl: float = 300.0,
        trust_env: bool = False,
        session: aiohttp.ClientSession | None = None,
        tail_probe_size: int = TAIL_PROBE_SIZE,
    ) -> None:
        """``keychain`` defaults to the docker config file; pass None for anonymous only.

        ``redirect_ttl``: seconds a blob's redirect target (a pre-signed storage URL) is
        reused before the registry is asked again. ``trust_env``: honour
        ``HTTP(S)_PROXY``/``NO_PROXY`` (and aiohttp's netrc lookup). ``session``: an
        existing aiohttp session to use (not closed by :meth:`close`).
        ``tail_probe_size``: how many of a blob's last bytes :meth:`open_blob` fetches with
        its probe and keeps (:meth:`BlobReader.take_tail`); 0 probes ``bytes=0-0`` only.
        """
        self.resolver_options = resolver or ResolverOptions()
        self.blob_options = blob or BlobOptions()
        self.keychain = DockerConfigKeychain() if keychain is _UNSET else keychain
        self.platform = platform or host_platform()
        self.max_connections = max_connections
        self.redirect_ttl = redirect_ttl
        self.trust_env = trust_env
        if tail_probe_size < 0:
            raise InvalidArgument(f"tail_probe_size {tail_probe_size} is negative")
        self.tail_probe_size = tail_probe_size
        self._session = session
        self._own_session = session is None
        self.authorizer = Authorizer(self.keychain, self._fetch_token)
        self.stats = FetchStats()
        #: netlocs (registry, mirror or storage hosts) that get single-range requests only
        self.single_range_hosts: set[str] = set()
        self._closed = False

    # --- lifecycle ------------------------------------------------------------------

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._closed:
            raise RuntimeError("RegistryClient is closed")
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
        failure is not final, the registry's (always last) is."""
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
    ) -> T:
        """Send a request with retries, auth and redirects; ``consume`` reads the answer.

        ``host`` is the registry host ``url`` belongs to: its configured headers and
        credentials are added (None: send only ``headers``, as for a storage URL).
        ``consume`` runs inside the attempt, so a body cut short is retried as well.
        Retryable statuses reach ``consume`` only once the retries are used up.
        """
        max_retries = self.blob_options.max_retries
        if timeout is _UNSET:
            timeout = host.timeout if host is not None else self.resolver_options.default_timeout()
        all_stats = (self.stats, *stats)
        attempt = auth_rounds = 0
        while True:
            delay = 0.0
            try:
                async with asyncio.timeout(timeout):
                    resp, final, redirected, sent = await self._send(
                        method, url, host, scope, headers, all_stats, follow_redirects, data
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
            except _FINAL_CLIENT_ERRORS as e:
                raise RegistryError(
                    f"{method} {redact_url(url)}: {redact_text(str(e))}", url=redact_url(url)
                ) from e
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
    ) -> tuple[aiohttp.ClientResponse, str, bool, str | None]:
        hdrs: CIMultiDict[str] = CIMultiDict()
        sent_auth = None
        if host is not None:
            for k, v in host.headers:
                hdrs.add(k, v)
        for k, v in (headers or {}).items():
            hdrs[k] = v
        if host is not None:
            sent_auth = await self.authorizer.header(host.netloc, scope)
            if sent_auth:
                hdrs["Authorization"] = sent_auth
        current, redirected = url, False
        origin = _origin(url)
        for _ in range(MAX_REDIRECTS + 1):
            for s in stats:
                s.requests += 1
            resp = await self.session.request(
                method, URL(current, encoded=True), headers=hdrs, allow_redirects=False, data=data
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

        return await self.request(method, url, consume=consume, headers=headers, data=data)

    # --- manifests ------------------------------------------------------------------------

    async def _manifest_bytes(
        self, ref: Reference, obj: str, expect: str | None
    ) -> tuple[bytes, str, str]:
        async def on_host(_: int, host: RegistryHost) -> tuple[bytes, str, str]:
            url = host.url(f"{ref.repository}/manifests/{obj}")

            async def consume(ex: Exchange) -> tuple[bytes, str, str]:
                if ex.status != 200:
                    raise await ex.error(f"manifest {ref.locator}:{obj}", ManifestNotFound)
                raw = await ex.read(MAX_MANIFEST_SIZE)
                digest = _digest_of(raw, expect or "sha256:")
                if expect is not None and digest != expect:
                    raise DigestMismatch(
                        f"manifest {ref.locator}@{expect} from {host.netloc} hashes to {digest}"
                    )
                return raw, ex.resp.headers.get("Content-Type", ""), digest

            return await self.request(
                "GET",
                url,
                consume=consume,
                host=host,
                scope=pull_scope(ref),
                headers={"Accept": ACCEPT},
            )

        return await self.over_hosts(ref, f"manifest {ref}", on_host)

    async def get_manifest(
        self, ref: Reference | str, *, platform: Platform | None = None
    ) -> Manifest:
        """The image manifest for ``ref``; from an index, the entry for ``platform``
        (default: this host's, e.g. linux/amd64). A digest reference is verified."""
        ref = parse_reference(ref)
        raw, ctype, digest = await self._manifest_bytes(ref, ref.object, ref.digest)
        obj = load_json(raw, f"manifest {ref}")
        mtype = media_type_of(obj, ctype)
        index_digest = None
        if mtype in INDEX_TYPES:
            entry = select_platform(obj, platform or self.platform, f"index {ref}")
            validate_digest(entry.digest)
            index_digest = digest
            raw, ctype, digest = await self._manifest_bytes(ref, entry.digest, entry.digest)
            obj = load_json(raw, f"manifest {ref}@{entry.digest}")
            mtype = media_type_of(obj, ctype)
            if mtype in INDEX_TYPES:
                raise InvalidArgument(f"{ref}: index {index_digest} points to another index")
        m = parse_manifest(raw, digest, mtype, f"manifest {ref}")
        if index_digest is None:
            return m
        return Manifest(
            m.digest, m.media_type, m.raw, m.config, m.layers, m.annotations, index_digest
        )

    async def resolve(self, ref: Reference | str) -> Descriptor:
        """The descriptor ``ref`` points to (a manifest or an index), as the registry serves it."""
        ref = parse_reference(ref)
        raw, ctype, digest = await self._manifest_bytes(ref, ref.object, ref.digest)
        return Descriptor(media_type_of(load_json(raw, str(ref)), ctype), digest, len(raw))

    # --- blobs ------------------------------------------------------------------------

    async def fetch_blob(
        self, ref: Reference | str, digest: str, *, max_size: int = 64 << 20
    ) -> bytes:
        """A whole (small) blob such as an image config, verified against ``digest``."""
        ref = parse_reference(ref)
        validate_digest(digest)

        async def on_host(_: int, host: RegistryHost) -> bytes:
            async def consume(ex: Exchange) -> bytes:
                if ex.status != 200:
                    raise await ex.error(f"blob {ref.locator}@{digest}", BlobNotFound)
                data = await ex.read(max_size)
                got = _digest_of(data, digest)
                if got != digest:
                    raise DigestMismatch(f"blob {ref.locator}@{digest} hashes to {got}")
                return data

            return await self.request(
                "GET",
                host.url(f"{ref.repository}/blobs/{digest}"),
                consume=consume,
                host=host,
                scope=pull_scope(ref),
            )

        return await self.over_hosts(ref, f"blob {digest}", on_host)

    async def blob_size(self, ref: Reference | str, digest: str) -> int:
        """The blob's size from a HEAD request (following redirects)."""
        ref = parse_reference(ref)
        validate_digest(digest)

        async def on_host(index: int, host: RegistryHost) -> int:
            async def consume(ex: Exchange) -> int:
                if ex.status == 200 and ex.resp.content_length is not None:
                    return ex.resp.content_length
                if ex.status == 404:
                    raise BlobNotFound(f"blob {ref.locator}@{digest}: HTTP 404")
                # some storage backends refuse HEAD (ghcr's did): use the range probe
                return (await self.locate_blob(ref, digest, host_index=index)).size

            return await self.request(
                "HEAD",
                host.url(f"{ref.repository}/blobs/{digest}"),
                consume=consume,
                host=host,
                scope=pull_scope(ref),
            )

        return await self.over_hosts(ref, f"blob {digest}", on_host)

    async def locate_blob(
        self,
        ref: Reference,
        digest: str,
        *,
        host_index: int,
        size: int | None = None,
        stats: Sequence[FetchStats] = (),
    ) -> BlobLocation:
        """Probe one host for a blob with ``GET Range: bytes=0-0`` (Go's redirect probe):
        tells whether it redirects (and where), and the blob's size."""
        loc, _ = await self.probe_blob(
            ref, digest, host_index=host_index, size=size, stats=stats, tail=0
        )
        return loc

    async def probe_blob(
        self,
        ref: Reference,
        digest: str,
        *,
        host_index: int,
        size: int | None = None,
        stats: Sequence[FetchStats] = (),
        tail: int = 0,
    ) -> tuple[BlobLocation, bytes | None]:
        """:meth:`locate_blob` that also brings the blob's last ``tail`` bytes.

        With ``tail`` > 0 the probe is ``GET Range: bytes=-<tail>`` (a suffix range) and
        returns ``(location, the blob's last min(tail, size) bytes)``; the bytes are None
        when the server did not send them: it ignored the range (``200``: the body is
        read only when it is at most ``tail`` bytes, else the connection is dropped) or
        answered a range that is not the blob's end. An empty blob is answered ``416``
        (``bytes */0``) or, by Go's ``http.ServeContent``, ``206 bytes 0--1/0``.
        """
        host = self.hosts(ref)[host_index]
        url = host.url(f"{ref.repository}/blobs/{digest}")
        what = f"blob {ref.locator}@{digest}"

        async def consume(ex: Exchange) -> tuple[BlobLocation, bytes | None]:
            got: int | None
            data: bytes | None = None
            if ex.status == 206:
                value = ex.resp.headers.get("Content-Range")
                try:
                    start, end, got = parse_content_range(value)
                except RegistryProtocolError:
                    if not tail or _total_of_empty(value) != 0:
                        raise
                    start, end, got = 0, 0, 0  # Go's answer to bytes=-N on an empty blob
                n = end - start
                if tail and end == got and n <= tail and ex.resp.content_length == n:
                    data = await ex.read(n)  # the blob's last n bytes
                # else the body is not read (past a byte, the connection is dropped)
            elif ex.status == 200:
                got = ex.resp.content_length
                if tail and got is not None and got <= tail:
                    data = await ex.read(got)  # the whole blob, and the connection is kept
                # else the body is not read: the connection is dropped
            elif ex.status == 416:  # an empty blob has no byte 0
                got = _total_of_416(ex.resp.headers.get("Content-Range"))
                if tail and got == 0:
                    data = b""
            else:
                raise await ex.error(f"{what} on {host.netloc}", BlobNotFound)
            if got is None:
                got = size
            if got is None:
                raise RegistryError(f"{what}: the server gives no size")
            if size is not None and got != size:
                raise RegistryError(
                    f"{what} on {host.netloc}: size {got}, the descriptor says {size}"
                )
            return BlobLocation(host_index, host, ex.url, ex.redirected, got), data

        return await self.request(
            "GET",
            url,
            consume=consume,
            host=host,
            scope=pull_scope(ref),
            headers={"Range": f"bytes=-{tail}" if tail else "bytes=0-0"},
            stats=stats,
        )

    async def open_blob(
        self, ref: Reference | str, digest: str, *, size: int | None = None
    ) -> BlobReader:
        """A random-access reader of one blob, on the first host that serves it."""
        from stargz.remote.blob import BlobReader

        ref = parse_reference(ref)
        validate_digest(digest)
        reader = BlobReader(self, ref, digest, size)
        await reader.open()
        return reader

    async def open_layer(self, ref: Reference | str, layer: Descriptor) -> BlobReader:
        """:meth:`open_blob` for a layer descriptor (its size is checked against the host)."""
        return await self.open_blob(ref, layer.digest, size=layer.size)


def _total_of_empty(value: str | None) -> int | None:
    """The total of a ``bytes <a>-<b>/<total>`` that does not parse as a range."""
    if value and value.strip().startswith("bytes "):
        total = value.strip().rpartition("/")[2]
        if total.isdigit():
            return int(total)
    return None


def _total_of_416(value: str | None) -> int | None:
    if value and value.strip().startswith("bytes */"):
        tail = value.strip()[len("bytes */") :]
        if tail.isdigit():
            return int(tail)
    return None
