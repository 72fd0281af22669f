"""A small aiohttp proxy in front of the real registry, for faults it cannot produce.

The real docker-registry serves every byte; the proxy only adds what a test needs and
the registry will not do: a bearer-token or basic auth gate, redirects to a second
"storage" server (with signatures that expire), 5xx and 429 with ``Retry-After``, reset
connections, stalls before or in the middle of a body, cut or bit-flipped bodies, 206
answers for another range, refusing or ignoring multi-range requests, merging ranges,
unparsable multipart bodies, and going away altogether (:meth:`Proxy.down`). It records
every request it sees (method, path, query, headers) so tests can assert on what reached
which server.

Used by the registry-client tests (on the test's own loop) and by the daemon fault matrix
(:mod:`harness.faultmatrix`, on a loop thread of its own: :class:`ProxyThread`).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import concurrent.futures
import logging
import re
import secrets
import socket
import ssl
import struct
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

_HOP = {"host", "content-length", "transfer-encoding", "connection", "keep-alive", "authorization"}
_BLOB_RE = re.compile(r"^/v2/(?P<repo>.+)/blobs/(?P<digest>[a-z0-9]+:[a-f0-9]+)$")
_REPO_RE = re.compile(r"^/v2/(?P<repo>.+)/(?:blobs|manifests)/")
#: A range read of a blob's bytes (not the ``0-0`` liveness probe, not a suffix probe).
_DATA_RANGE_RE = re.compile(r"bytes=(\d+)-(\d+)$")
T = TypeVar("T")
#: :class:`Body` ``flip`` inverts one byte in this many.
FLIP_STRIDE = 64

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
        self._site: web.TCPSite | None = None
        self._session: aiohttp.ClientSession | None = None
        #: While set, the port is closed and requests on kept-alive connections are reset.
        self.is_down = False

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
        self._site = web.TCPSite(self._runner, self.host, self.port, ssl_context=self.ssl_context)
        await self._site.start()
        self.port = self._runner.addresses[0][1]
        self.netloc = f"{self.host}:{self.port}"
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

    async def down(self) -> None:
        """Go away: the port refuses connections, and a request on a connection the client
        kept alive is answered with a reset (as when the host behind it dies)."""
        self.is_down = True
        if self._site is not None:
            await self._site.stop()
            self._site = None

    async def up(self) -> None:
        """Listen again on the same port."""
        assert self._runner is not None
        self._site = web.TCPSite(self._runner, self.host, self.port, ssl_context=self.ssl_context)
        await self._site.start()
        self.is_down = False

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if self.is_down:
            return await Reset()(self, request)
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
    #: When given, each signature handed out is recorded here with its time of issue
    #: (:class:`Storage` ``max_age`` reads it).
    issued: dict[str, float] | None = None

    async def __call__(self, proxy: Proxy, request: web.Request) -> web.StreamResponse | None:
        m = _BLOB_RE.match(request.path)
        if m and request.method == "GET":
            self.redirects += 1
            sig = secrets.token_hex(4)
            if self.issued is not None:
                self.issued[sig] = time.monotonic()
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
    carrying Authorization or an ``X-`` header, and 403s signatures in ``expired``, and
    (with ``max_age``) those issued (``issued``, shared with :class:`RedirectBlobs`) more
    than ``max_age`` seconds ago."""

    expired: set[str] = field(default_factory=set)
    leaks: list[str] = field(default_factory=list)
    issued: dict[str, float] = field(default_factory=dict)
    max_age: float | None = None
    refused: int = 0

    async def __call__(self, proxy: Proxy, request: web.Request) -> web.StreamResponse | None:
        leaked = [
            k for k in request.headers if k.lower() == "authorization" or k.lower().startswith("x-")
        ]
        if leaked:
            self.leaks.extend(leaked)
            return web.Response(status=400, text=f"leaked headers: {leaked}")
        sig = request.query.get("sig", "")
        too_old = (
            self.max_age is not None
            and sig in self.issued
            and time.monotonic() - self.issued[sig] > self.max_age
        )
        if sig in self.expired or too_old:
            self.refused += 1
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


# --- faults of one answer (for the daemon fault matrix) ----------------------------------------


def is_data_range(request: web.Request) -> bool:
    """A GET of blob bytes ``a-b`` (not the ``0-0`` liveness probe), on the registry or on
    storage: the requests a read of a lazily mounted file makes."""
    if request.method != "GET":
        return False
    if not (_BLOB_RE.match(request.path) or request.path.startswith("/store/")):
        return False
    m = _DATA_RANGE_RE.match(request.headers.get("Range", ""))
    return bool(m) and m.group(2) != "0"


@dataclass
class Reset:
    """The connection is reset (TCP RST) before any answer."""

    hits: int = 0

    async def __call__(self, proxy: Proxy, request: web.Request) -> web.StreamResponse | None:
        self.hits += 1
        transport = request.transport
        if transport is not None:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()
        return web.Response(status=500)  # never sent: the connection is gone


@dataclass
class Status:
    """Answer ``status`` (with ``Retry-After`` when given) instead of the registry."""

    status: int = 503
    retry_after: str | None = None
    hits: int = 0

    async def __call__(self, proxy: Proxy, request: web.Request) -> web.StreamResponse | None:
        self.hits += 1
        headers = {"Retry-After": self.retry_after} if self.retry_after else None
        return web.Response(status=self.status, text="injected", headers=headers)


@dataclass
class Delay:
    """Hold the request ``seconds`` before the registry answers it (a stall before the
    answer's headers)."""

    seconds: float
    hits: int = 0

    async def __call__(self, proxy: Proxy, request: web.Request) -> web.StreamResponse | None:
        self.hits += 1
        await asyncio.sleep(self.seconds)
        return None


@dataclass
class Body:
    """The registry's answer, with its body damaged on the way:

    - ``stall``: headers and the first half of the body, then ``seconds`` of silence,
      then the rest;
    - ``cut``: headers (the full ``Content-Length``) and the first half, then a reset;
    - ``flip``: every byte there, one in every FLIP_STRIDE inverted (the middle one among
      them), so that each chunk in the answer is damaged, the one a read waits for too.
    """

    mode: str
    seconds: float = 0.0
    hits: int = 0

    async def __call__(self, proxy: Proxy, request: web.Request) -> web.StreamResponse | None:
        answer = await proxy.forward(request)
        body = bytes(answer.body or b"")
        if answer.status not in (200, 206) or len(body) < 2:
            return answer
        self.hits += 1
        half = len(body) // 2
        if self.mode == "flip":
            damaged = bytearray(body)
            for i in range(half % FLIP_STRIDE, len(damaged), FLIP_STRIDE):
                damaged[i] ^= 0xFF
            answer.body = bytes(damaged)
            return answer
        resp = web.StreamResponse(status=answer.status, headers=answer.headers)
        resp.content_length = len(body)
        await resp.prepare(request)
        await resp.write(body[:half])
        if self.mode == "cut":
            await Reset()(proxy, request)
            return resp
        if self.mode != "stall":
            raise AssertionError(self.mode)
        await asyncio.sleep(self.seconds)
        await resp.write(body[half:])
        await resp.write_eof()
        return resp


@dataclass
class PerRequest:
    """``fault`` on the first ``times`` tries of each distinct blob range read (method,
    path, Range): a transient fault that ``times`` retries get past. Other requests (and
    later tries) reach the registry untouched."""

    fault: Hook
    times: int = 1
    tries: collections.Counter[tuple[str, str, str]] = field(default_factory=collections.Counter)
    hits: int = 0

    async def __call__(self, proxy: Proxy, request: web.Request) -> web.StreamResponse | None:
        if not is_data_range(request):
            return None
        key = (request.method, request.path, request.headers.get("Range", ""))
        self.tries[key] += 1
        if self.tries[key] > self.times:
            return None
        self.hits += 1
        return await self.fault(proxy, request)


@dataclass
class PerRegion:
    """``fault`` on a blob range read unless its bytes overlap a range it already hit:
    each part of the blob is damaged at most once (a bad moment on the wire, not a bad
    disk), however the reader cuts its requests."""

    fault: Hook
    hit_ranges: list[tuple[str, int, int]] = field(default_factory=list)
    hits: int = 0

    async def __call__(self, proxy: Proxy, request: web.Request) -> web.StreamResponse | None:
        if not is_data_range(request):
            return None
        m = _DATA_RANGE_RE.match(request.headers.get("Range", ""))
        assert m is not None
        blob, a, b = request.path.rsplit("/", 1)[-1], int(m.group(1)), int(m.group(2))
        if any(d == blob and a <= hi and lo <= b for d, lo, hi in self.hit_ranges):
            return None
        self.hit_ranges.append((blob, a, b))
        self.hits += 1
        return await self.fault(proxy, request)


@dataclass
class Every:
    """``fault`` on every blob range read (a fault that lasts until it is taken away)."""

    fault: Hook
    hits: int = 0

    async def __call__(self, proxy: Proxy, request: web.Request) -> web.StreamResponse | None:
        if not is_data_range(request):
            return None
        self.hits += 1
        return await self.fault(proxy, request)


class Switch:
    """A hook whose fault is swapped while the proxy runs: ``base`` always answers first
    (an auth gate, redirects), then ``fault`` when one is set."""

    def __init__(self, *base: Hook) -> None:
        self.base = base
        self.fault: Hook | None = None

    async def __call__(self, proxy: Proxy, request: web.Request) -> web.StreamResponse | None:
        fault = self.fault
        if fault is not None:
            answer = await fault(proxy, request)
            if answer is not None:
                return answer
        for h in self.base:
            answer = await h(proxy, request)
            if answer is not None:
                return answer
        return None


class ProxyThread:
    """Proxies served from an event loop of their own thread, for callers that block (a
    test reading files of a FUSE mount). :meth:`run` executes a coroutine there."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="proxy", daemon=True)
        self.thread.start()
        self.proxies: list[Proxy] = []
        # a reset connection or a client that gave up is the point here, not news
        logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self, upstream: str, hook: Hook | None = None, **kw: Any) -> Proxy:
        proxy = Proxy(upstream, hook, **kw)
        self.run(proxy.__aenter__())
        self.proxies.append(proxy)
        return proxy

    def close(self) -> None:
        for p in reversed(self.proxies):
            try:
                self.run(p.__aexit__(None, None, None))
            except (concurrent.futures.TimeoutError, RuntimeError):
                pass
        self.proxies.clear()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        if not self.thread.is_alive():
            self.loop.close()

    def __enter__(self) -> ProxyThread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
