"""A small aiohttp proxy in front of the real registry, for faults it cannot produce.

The real docker-registry serves every byte; the proxy only adds what a test needs and
the registry will not do: a bearer-token or basic auth gate, redirects to a second
"storage" server, 503s, refusing or ignoring multi-range requests, merging ranges,
unparsable multipart bodies, stalls. It records every request it sees (method, path,
query, headers) so tests can assert on what reached which server.
"""

from __future__ import annotations

import asyncio
import base64
import re
import secrets
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

_HOP = {"host", "content-length", "transfer-encoding", "connection", "keep-alive", "authorization"}
_BLOB_RE = re.compile(r"^/v2/(?P<repo>.+)/blobs/(?P<digest>[a-z0-9]+:[a-f0-9]+)$")
_REPO_RE = re.compile(r"^/v2/(?P<repo>.+)/(?:blobs|manifests)/")

Hook = Callable[["Proxy", web.Request], Awaitable[web.StreamResponse | None]]


@dataclass
class Seen:
    method: str
    path: str
    query: dict[str, str]
    headers: CIMultiDictProxy[str]
    body: bytes = b""


class Proxy:
    """Forwards to ``upstream`` (``http://127.0.0.1:PORT``) unless ``hook`` answers."""

    def __init__(
        self,
        upstream: str,
        hook: Hook | None = None,
        *,
        port: int = 0,
        host: str = "127.0.0.1",
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.upstream = upstream.rstrip("/")
        self.port = port
        self.host = host
        self.ssl_context = ssl_context
        self.hook = hook
        self.seen: list[Seen] = []
        self.netloc = ""
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.ssl_context else 'http'}://{self.netloc}"

    async def __aenter__(self) -> Proxy:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(
            app, access_log=None, handler_cancellation=True, shutdown_timeout=1.0
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, ssl_context=self.ssl_context)
        await site.start()
        port = self._runner.addresses[0][1]
        self.netloc = f"{self.host}:{port}"
        self._session = aiohttp.ClientSession(auto_decompress=False)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    def requests(self, method: str | None = None, path_re: str = "") -> list[Seen]:
        return [
            s
            for s in self.seen
            if (method is None or s.method == method) and re.search(path_re, s.path)
        ]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append(
            Seen(
                request.method,
                request.path,
                dict(request.query),
                request.headers.copy(),
                await request.read(),
            )
        )
        if self.hook is not None:
            answer = await self.hook(self, request)
            if answer is not None:
                return answer
        return await self.forward(request)

    async def forward(
        self,
        request: web.Request,
        *,
        path: str | None = None,
        headers: dict[str, str] | None = None,
        drop: tuple[str, ...] = (),
    ) -> web.Response:
        """Send the request on to the registry and return its answer unchanged."""
        assert self._session is not None
        out = CIMultiDict(
            (k, v) for k, v in request.headers.items() if k.lower() not in _HOP | set(drop)
        )
        out.update(headers or {})
        url = self.upstream + (path or request.path_qs)
        async with self._session.request(
            request.method, url, headers=out, allow_redirects=False, data=await request.read()
        ) as r:
            body = await r.read()
            resp_headers = CIMultiDict(
                (k, v) for k, v in r.headers.items() if k.lower() not in _HOP
            )
            return web.Response(status=r.status, body=body, headers=resp_headers)


def repo_of(path: str) -> str | None:
    m = _REPO_RE.match(path)
    return m.group("repo") if m else None


# --- faults ---------------------------------------------------------------------------------


@dataclass
class BearerAuth:
    """Registry API needs ``Bearer <token>``; tokens come from ``/token`` on the proxy,
    which wants HTTP basic ``user:password`` when ``user`` is set. ``realm`` points the
    challenge at another token endpoint (default: this proxy's ``/token``)."""

    user: str | None = None
    password: str = ""
    #: When set, ``POST /token`` with this OAuth2 refresh token also gets a token.
    refresh_token: str | None = None
    expires_in: int = 300
    tokens: dict[str, float] = field(default_factory=dict)  # token -> expiry
    token_requests: list[dict[str, object]] = field(default_factory=list)
    challenges: int = 0
    realm: str | None = None

    def revoke_all(self) -> None:
        self.tokens.clear()

    async def __call__(self, proxy: Proxy, request: web.Request) -> web.StreamResponse | None:
        if request.path == "/token" and request.method == "POST":
            form = await request.post()
            self.token_requests.append(
                {
                    "method": "POST",
                    "scope": str(form.get("scope", "")).split(),
                    "service": form.get("service"),
                    "grant_type": form.get("grant_type"),
                    "auth": request.headers.get("Authorization"),
                }
            )
            if self.refresh_token is None or form.get("refresh_token") != self.refresh_token:
                return web.json_response({"details": "bad refresh token"}, status=401)
            token = secrets.token_hex(16)
            self.tokens[token] = time.monotonic() + self.expires_in
            return web.json_response({"access_token": token, "expires_in": self.expires_in})
        if request.path == "/token":
            self.token_requests.append(
                {
                    "scope": request.query.getall("scope", []),
                    "service": request.query.get("service"),
                    "auth": request.headers.get("Authorization"),
                }
            )
            if self.user is not None:
                want = "Basic " + base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
                if request.headers.get("Authorization") != want:
                    return web.json_response({"details": "bad credentials"}, status=401)
            token = secrets.token_hex(16)
            self.tokens[token] = time.monotonic() + self.expires_in
            return web.json_response({"token": token, "expires_in": self.expires_in})
        if not request.path.startswith("/v2/"):
            return None
        auth = request.headers.get("Authorization", "")
        token = auth[len("Bearer ") :] if auth.startswith("Bearer ") else None
        if token is not None and self.tokens.get(token, 0) > time.monotonic():
            return None  # let the next hook (or the registry) answer
        self.challenges += 1
        repo = repo_of(request.path)
        scope = f',scope="repository:{repo}:pull"' if repo else ""
        return web.Response(
            status=401,
            headers={
                "WWW-Authenticate": f'Bearer realm="{self.realm or proxy.url + "/token"}",'
                'service="test-registry"' + scope
            },
        )


@dataclass
class BasicAuth:
    user: str
    password: str
    challenges: int = 0

    async def __call__(self, proxy: Proxy, request: web.Request) -> web.StreamResponse | None:
        want = "Basic " + base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
        if request.headers.get("Authorization") == want:
            return None
        self.challenges += 1
        return web.Response(status=401, headers={"WWW-Authenticate": 'Basic realm="test"'})


@dataclass
class RedirectBlobs:
    """Blob GETs answer 307 to ``storage`` (another Proxy with :class:`Storage`)."""

    storage: Proxy
    redirects: int = 0

    async def __call__(self, proxy: Proxy, request: web.Request) -> web.StreamResponse | None:
        m = _BLOB_RE.match(request.path)
        if m and request.method == "GET":
            self.redirects += 1
            sig = secrets.token_hex(4)
            location = f"{self.storage.url}/store/{m['repo']}/{m['digest']}?sig={sig}"
            return web.Response(status=307, headers={"Location": location})
        return None


@dataclass
class RedirectToken:
    """``/token`` answers ``status`` to the same path and query on ``target`` (another
    Proxy, e.g. on 127.0.0.2, or this one), once: the target sees ``hop=1``."""

    target: Proxy
    status: int = 302
    redirects: int = 0

    async def __call__(self, proxy: Proxy, request: web.Request) -> web.StreamResponse | None:
        if request.path != "/token" or request.query.get("hop"):
            return None
        self.redirects += 1
        sep = "&" if request.query_string else ""
        location = f"{self.target.url}/token?{request.query_string}{sep}hop=1"
        return web.Response(status=self.status, headers={"Location": location})


@dataclass
class Storage:
    """Serves ``/store/<repo>/<digest>`` from the registry; refuses (400) any request
    carrying Authorization or an ``X-`` header, and 403s signatures in ``expired``."""

    expired: set[str] = field(default_factory=set)
    leaks: list[str] = field(default_factory=list)

    async def __call__(self, proxy: Proxy, request: web.Request) -> web.StreamResponse | None:
        leaked = [
            k for k in request.headers if k.lower() == "authorization" or k.lower().startswith("x-")
        ]
        if leaked:
            self.leaks.extend(leaked)
            return web.Response(status=400, text=f"leaked headers: {leaked}")
        if request.query.get("sig") in self.expired:
            return web.Response(status=403, text="signature expired")
        repo, _, digest = request.path[len("/store/") :].rpartition("/")
        return await proxy.forward(request, path=f"/v2/{repo}/blobs/{digest}")


@dataclass
class FailFirst:
    """The first ``n`` requests (matching ``path_re``) get ``status``."""

    n: int
    status: int = 503
    path_re: str = ""
    failed: int = 0
    retry_after: str | None = None

    async def __call__(self, proxy: Proxy, request: web.Request) -> web.StreamResponse | None:
        if self.failed < self.n and re.search(self.path_re, request.path):
            self.failed += 1
            headers = {"Retry-After": self.retry_after} if self.retry_after else None
            return web.Response(status=self.status, text="injected", headers=headers)
        return None


@dataclass
class MultiRange:
    """What to do with multi-range blob requests: ``refuse`` (status), ``ignore`` (200
    with the whole blob), ``merge`` (one 206 covering all ranges), ``garbage`` (206 with
    a multipart body that does not parse). Single ranges pass through."""

    mode: str
    status: int = 400
    hits: int = 0

    async def __call__(self, proxy: Proxy, request: web.Request) -> web.StreamResponse | None:
        rng = request.headers.get("Range", "")
        if self.mode == "ignore" and _BLOB_RE.match(request.path) and rng:
            self.hits += 1
            return await proxy.forward(request, drop=("range",))
        if "," not in rng:
            return None
        self.hits += 1
        if self.mode == "refuse":
            return web.Response(status=self.status, text="multi-range not supported")
        if self.mode == "merge":
            spans = [tuple(int(x) for x in p.split("-")) for p in rng[6:].split(",")]
            lo, hi = min(s for s, _ in spans), max(e for _, e in spans)
            return await proxy.forward(request, headers={"Range": f"bytes={lo}-{hi}"})
        if self.mode == "garbage":
            return web.Response(
                status=206,
                body=b"this is not a multipart body",
                headers={"Content-Type": "multipart/byteranges; boundary=XYZ"},
            )
        raise AssertionError(self.mode)


@dataclass
class ReshapeRange:
    """Single-range blob GETs (not the ``0-0`` and suffix probes) are forwarded with another
    range, and the registry's honest 206 for that one is returned: ``longer`` (to the
    blob's end), ``earlier`` (starting ``by`` bytes before), ``shorter`` (ending ``by``
    bytes early)."""

    mode: str
    by: int = 5
    hits: int = 0

    async def __call__(self, proxy: Proxy, request: web.Request) -> web.StreamResponse | None:
        m = re.fullmatch(r"bytes=(\d+)-(\d+)", request.headers.get("Range", ""))
        if not (m and _BLOB_RE.match(request.path)) or m.group(2) == "0":
            return None
        a, b = int(m.group(1)), int(m.group(2))
        self.hits += 1
        rng = {
            "longer": f"bytes={a}-",
            "earlier": f"bytes={max(0, a - self.by)}-{b}",
            "shorter": f"bytes={a}-{b - self.by}",
        }[self.mode]
        return await proxy.forward(request, headers={"Range": rng})


@dataclass
class Stall:
    """The first ``n`` matching requests hang for ``seconds`` before being answered."""

    n: int
    seconds: float
    path_re: str = ""
    stalled: int = 0

    async def __call__(self, proxy: Proxy, request: web.Request) -> web.StreamResponse | None:
        if self.stalled < self.n and re.search(self.path_re, request.path):
            self.stalled += 1
            await asyncio.sleep(self.seconds)
        return None


def chain(*hooks: Hook) -> Hook:
    """Hooks in order; the first that answers wins."""

    async def hook(proxy: Proxy, request: web.Request) -> web.StreamResponse | None:
        for h in hooks:
            answer = await h(proxy, request)
            if answer is not None:
                return answer
        return None

    return hook
