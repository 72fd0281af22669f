"""What a private registry needs around the real docker-registry: certificates, an htpasswd
file, a docker config with credentials, and a token issuer for ``auth: token``.

Certificates are made with the ``openssl`` CLI, the htpasswd line with libxcrypt's bcrypt
(Python's ``crypt``), so nothing beyond the base system is needed. The token issuer is the
one fake here: docker-registry verifies tokens but does not issue them, so a small
``/token`` endpoint (a :class:`harness.faults.Proxy` hook) signs JWTs with the test's key
the way a real token server does (RS256, ``kid`` = libtrust key ID of the key, which the
registry finds in its ``rootcertbundle``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import subprocess
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from .procs import run

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import crypt


@dataclass(frozen=True)
class KeyPair:
    cert: Path
    key: Path


def make_ca(workdir: Path, name: str = "test-ca") -> KeyPair:
    """A self-signed CA certificate (and its key) under ``workdir``."""
    workdir.mkdir(parents=True, exist_ok=True)
    cert, key = workdir / f"{name}.pem", workdir / f"{name}.key"
    run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2",
            "-subj", f"/CN={name}",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        ]
    )  # fmt: skip
    return KeyPair(cert, key)


def issue_cert(ca: KeyPair, workdir: Path, name: str, *, san: str) -> KeyPair:
    """A server certificate signed by ``ca`` for ``san`` (``IP:127.0.0.1``,
    ``DNS:other.invalid``...)."""
    cert, key, csr = workdir / f"{name}.pem", workdir / f"{name}.key", workdir / f"{name}.csr"
    ext = workdir / f"{name}.ext"
    ext.write_text(
        f"subjectAltName={san}\nbasicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
    )
    run(
        [
            "openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={name}",
        ]
    )  # fmt: skip
    run(
        [
            "openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca.cert), "-CAkey", str(ca.key),
            "-CAcreateserial", "-days", "2", "-extfile", str(ext), "-out", str(cert),
        ]
    )  # fmt: skip
    return KeyPair(cert, key)


def htpasswd_file(path: Path, users: dict[str, str]) -> Path:
    """An htpasswd file with a bcrypt line per user (what docker-registry accepts)."""
    lines = [f"{u}:{crypt.crypt(p, crypt.mksalt(crypt.METHOD_BLOWFISH))}" for u, p in users.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def docker_config(workdir: Path, host: str, user: str, password: str) -> Path:
    """A ``$DOCKER_CONFIG`` directory whose ``config.json`` holds ``user:password`` for
    ``host`` (the ``auths`` form ``docker login`` writes)."""
    workdir.mkdir(parents=True, exist_ok=True)
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    (workdir / "config.json").write_text(json.dumps({"auths": {host: {"auth": auth}}}))
    return workdir


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def libtrust_key_id(cert: Path) -> str:
    """The key ID docker-registry gives the public key of ``cert`` (libtrust: SHA-256 of
    the DER public key, first 30 bytes, base32, in groups of four joined by ':')."""
    pem = run(["openssl", "x509", "-in", str(cert), "-pubkey", "-noout"]).stdout
    der = subprocess.run(
        ["openssl", "pkey", "-pubin", "-outform", "DER"],
        input=pem.encode(),
        capture_output=True,
        check=True,
    ).stdout
    s = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode().rstrip("=")
    return ":".join(s[i : i + 4] for i in range(0, len(s), 4))


@dataclass
class TokenIssuer:
    """``GET /token`` of a registry token server (a :class:`harness.faults.Proxy` hook).

    Wants HTTP basic ``users`` credentials, and issues an RS256 JWT granting what the
    scopes ask for. ``lifetime`` is how long the token really lives (its ``exp``);
    ``expires_in`` is what the answer says (None: the lifetime). Saying more than the
    lifetime makes the client's cached token die on it mid-run, which is the point.
    docker-registry 2.8 grants 60 s of leeway past ``exp``; the ``exp`` written is
    ``now + lifetime - LEEWAY`` so ``lifetime`` is what the registry enforces.
    """

    key: Path
    cert: Path
    issuer: str
    service: str
    users: dict[str, str]
    lifetime: float = 300.0
    expires_in: float | None = None
    #: (client User-Agent, claims) of every token issued.
    issued: list[tuple[str, dict[str, object]]] = field(default_factory=list)
    #: User-Agents of the requests refused (bad or missing credentials).
    refused: list[str] = field(default_factory=list)

    LEEWAY = 60

    def __post_init__(self) -> None:
        self.kid = libtrust_key_id(self.cert)

    @classmethod
    def create(cls, workdir: Path, users: dict[str, str], **kw: object) -> TokenIssuer:
        workdir.mkdir(parents=True, exist_ok=True)
        cert, key = workdir / "token-signer.pem", workdir / "token-signer.key"
        run(
            [
                "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                "-out", str(cert), "-days", "2", "-subj", "/CN=token-signer",
            ]
        )  # fmt: skip
        return cls(key, cert, "test-issuer", "test-registry", users, **kw)  # type: ignore[arg-type]

    def sign(self, claims: dict[str, object]) -> str:
        header = {"typ": "JWT", "alg": "RS256", "kid": self.kid}
        signing_input = (
            f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        )
        sig = subprocess.run(
            ["openssl", "dgst", "-sha256", "-sign", str(self.key)],
            input=signing_input.encode(),
            capture_output=True,
            check=True,
        ).stdout
        return f"{signing_input}.{_b64url(sig)}"

    async def __call__(self, proxy: object, request: web.Request) -> web.StreamResponse | None:
        if request.path != "/token" or request.method != "GET":
            return web.Response(status=404)  # no OAuth2 POST form: clients fall back to GET
        agent = request.headers.get("User-Agent", "")
        auth = request.headers.get("Authorization", "")
        user = ""
        if auth.startswith("Basic "):
            user, _, password = base64.b64decode(auth[6:]).decode().partition(":")
            if self.users.get(user) != password:
                self.refused.append(agent)
                return web.json_response({"details": "bad credentials"}, status=401)
        elif self.users:
            self.refused.append(agent)
            return web.json_response({"details": "credentials needed"}, status=401)
        access = []
        for scope in request.query.getall("scope", []):
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            if kind == "repository":
                access.append({"type": kind, "name": name, "actions": actions.split(",")})
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "sub": user,
            "aud": self.service,
            "exp": now + int(self.lifetime) - self.LEEWAY,
            "nbf": now - 5,
            "iat": now,
            "jti": secrets.token_hex(8),
            "access": access,
        }
        self.issued.append((agent, claims))
        expires_in = self.expires_in if self.expires_in is not None else self.lifetime
        return web.json_response({"token": self.sign(claims), "expires_in": int(expires_in)})
