"""A real Docker token server (Bearer, RS256 JWT) and a docker-registry that trusts it.

    with open_token_registry(users={"alice": "pw"}, expires_in=60) as tr:
        tr.registry.url     # LocalRegistry with auth.token → realm tr.tokens.url + "/token"
        tr.tokens           # TokenServer: counts requests, expires_in settable at runtime
        push_image(tr.url, "test/app", "v1", image,
                   auth=lambda: tr.tokens.issue("repository:test/app:pull,push"))

Token endpoint (the registry's ``WWW-Authenticate: Bearer realm=…,service=…,scope=…``):
``GET /token?service=S&scope=repository:NAME:pull[,push]`` (``scope`` may repeat).
With ``Authorization: Basic`` matching ``users`` the requested actions are granted
(pull/push/delete/*); without credentials the caller is anonymous and gets only
``anonymous_actions`` (pull by default; ``None`` → 401 for anonymous callers); wrong
credentials → 401.  The answer is ``{"token", "access_token", "expires_in", "issued_at"}``.

Tokens are RS256 JWTs whose header carries ``x5c`` = [the self-signed certificate], which the
registry verifies against ``rootcertbundle``.  Note: distribution 2.8 accepts ``exp``/``nbf``
with 60 s of leeway (verified here), so an expired token keeps working for a minute.  With
``strict_expiry=True`` the JWT's ``exp`` is set 60 s early (``nbf``/``iat`` too), so the
registry starts refusing the token exactly ``expires_in`` seconds after issue — use that to
test a client's expiry/refresh with a short ``expires_in``.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import json
import secrets
import shutil
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

from bench.localregistry import LocalRegistry, TokenAuth
from tests.faultproxy import BackgroundHTTPServer

__all__ = ["TokenRecord", "TokenRegistry", "TokenServer", "open_token_registry", "parse_scope"]

SERVICE = "p2pdist-test"
ISSUER = "p2pdist-test-issuer"
ALL_ACTIONS = ("pull", "push", "delete", "*")
REGISTRY_LEEWAY = 60  # seconds distribution 2.8 allows past exp / before nbf


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def parse_scope(scope: str) -> dict[str, Any]:
    """``repository:test/app:pull,push`` → ``{"type", "name", "actions"}``."""
    typ, _, rest = scope.partition(":")
    name, _, actions = rest.rpartition(":")
    if not typ or not name:
        raise ValueError(f"invalid scope {scope!r}")
    return {"type": typ, "name": name, "actions": [a for a in actions.split(",") if a]}


@dataclass(slots=True)
class TokenRecord:
    """One ``GET /token`` request: who asked, for what, what was granted (None if refused)."""

    account: str | None
    scopes: list[str]
    service: str | None
    status: int
    access: list[dict[str, Any]] | None


class _TokenHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 60

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _reply(self, status: int, body: dict[str, Any], extra: Mapping[str, str] = {}) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in extra.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        ts: TokenServer = self.server.owner  # type: ignore[attr-defined]
        url = urllib.parse.urlsplit(self.path)
        if url.path != "/token":
            self._reply(404, {"error": "not found"})
            return
        query = urllib.parse.parse_qs(url.query)
        scopes = query.get("scope", [])
        service = query.get("service", [None])[0]
        account, status = ts._authenticate(self.headers.get("Authorization"))
        if status != 200 or service != ts.service:
            status = status if status != 200 else 400
            ts._record(TokenRecord(account, scopes, service, status, None))
            challenge = {"WWW-Authenticate": 'Basic realm="p2pdist-token"'}
            self._reply(status, {"errors": [{"code": "UNAUTHORIZED"}]}, challenge)
            return
        try:
            access = ts.grant(scopes, account)
        except ValueError as exc:
            ts._record(TokenRecord(account, scopes, service, 400, None))
            self._reply(400, {"errors": [{"code": "INVALID_SCOPE", "message": str(exc)}]})
            return
        token, expires_in, issued = ts._sign(account or "", access)
        ts._record(TokenRecord(account, scopes, service, 200, access))
        self._reply(
            200,
            {
                "token": token,
                "access_token": token,
                "expires_in": expires_in,
                "issued_at": issued.isoformat().replace("+00:00", "Z"),
            },
        )


class TokenServer(BackgroundHTTPServer):
    """An RS256 JWT token server on a loopback port (``realm`` = ``url + "/token"``).

    ``expires_in`` (seconds), ``strict_expiry`` and ``anonymous_actions`` may be changed
    while it runs.
    ``requests`` lists every token request; ``token_requests`` counts them.
    """

    handler_class = _TokenHandler

    def __init__(
        self,
        *,
        users: Mapping[str, str] | None = None,
        anonymous_actions: Sequence[str] | None = ("pull",),
        expires_in: int = 300,
        strict_expiry: bool = False,
        service: str = SERVICE,
        issuer: str = ISSUER,
        addr: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        super().__init__(addr=addr, port=port)
        self.users = dict(users or {})
        self.anonymous_actions = anonymous_actions
        self.expires_in = expires_in
        self.strict_expiry = strict_expiry
        self.service = service
        self.issuer = issuer
        self.requests: list[TokenRecord] = []
        self._lock = threading.Lock()
        self._dir: Path | None = None
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "p2pdist test token signer")])
        now = dt.datetime.now(dt.UTC)
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self._key, hashes.SHA256())
        )
        self._x5c = base64.b64encode(self._cert.public_bytes(serialization.Encoding.DER)).decode()

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="p2pdist-tokens-"))
        self.cert_path.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))
        try:
            super().start()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        try:
            super().stop()
        finally:
            d, self._dir = self._dir, None
            if d is not None:
                shutil.rmtree(d, ignore_errors=True)

    @property
    def cert_path(self) -> Path:
        """The PEM certificate: the registry's ``rootcertbundle``."""
        if self._dir is None:
            raise RuntimeError("TokenServer is not started")
        return self._dir / "cert.pem"

    @property
    def realm(self) -> str:
        return f"{self.url}/token"

    def registry_auth(self) -> TokenAuth:
        """The ``auth.token`` settings for a LocalRegistry that trusts this server."""
        return TokenAuth(
            realm=self.realm,
            service=self.service,
            issuer=self.issuer,
            rootcertbundle=self.cert_path,
        )

    # -- tokens ----------------------------------------------------------------------------

    @property
    def token_requests(self) -> int:
        with self._lock:
            return len(self.requests)

    def _record(self, rec: TokenRecord) -> None:
        with self._lock:
            self.requests.append(rec)

    def _authenticate(self, header: str | None) -> tuple[str | None, int]:
        """(account, 200) or (None, 200) for anonymous, or (name, 401)."""
        if header is None:
            return None, (200 if self.anonymous_actions is not None else 401)
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic":
            return None, 401
        try:
            user, _, password = base64.b64decode(value).decode().partition(":")
        except ValueError:
            return None, 401
        if user in self.users and secrets.compare_digest(self.users[user], password):
            return user, 200
        return user, 401

    def grant(self, scopes: Sequence[str], account: str | None) -> list[dict[str, Any]]:
        """The ``access`` claim for ``scopes``: all requested actions for a known user,
        ``anonymous_actions`` only for anonymous callers."""
        allowed = ALL_ACTIONS if account is not None else tuple(self.anonymous_actions or ())
        access = []
        for scope in scopes:
            for part in scope.split(" "):
                if part:
                    s = parse_scope(part)
                    s["actions"] = [a for a in s["actions"] if a in allowed]
                    access.append(s)
        return access

    def issue(self, *scopes: str, subject: str = "p2pdist-test-admin") -> str:
        """Mint a token granting exactly ``scopes`` (no HTTP request, not counted) — for
        test set-up such as pushing images: ``issue("repository:test/app:pull,push")``."""
        access = [parse_scope(s) for s in scopes]
        return self._sign(subject, access)[0]

    def _sign(self, subject: str, access: list[dict[str, Any]]) -> tuple[str, int, dt.datetime]:
        issued_at = int(time.time())
        expires_in = self.expires_in
        now = issued_at - REGISTRY_LEEWAY if self.strict_expiry else issued_at
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self._x5c]}
        claims = {
            "iss": self.issuer,
            "sub": subject,
            "aud": self.service,
            "exp": now + expires_in,
            "nbf": now - 1,
            "iat": now,
            "jti": secrets.token_hex(16),
            "access": access,
        }
        signing_input = (
            _b64url(json.dumps(header, separators=(",", ":")).encode())
            + "."
            + _b64url(json.dumps(claims, separators=(",", ":")).encode())
        )
        sig = self._key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        issued = dt.datetime.fromtimestamp(issued_at, dt.UTC)
        return f"{signing_input}.{_b64url(sig)}", expires_in, issued

    def __repr__(self) -> str:
        where = self.url if self._server is not None else "stopped"
        return f"<TokenServer {where}>"


@dataclass(frozen=True, slots=True)
class TokenRegistry:
    """A LocalRegistry with token auth and the TokenServer it trusts."""

    registry: LocalRegistry
    tokens: TokenServer

    @property
    def url(self) -> str:
        return self.registry.url

    @property
    def host(self) -> str:
        return self.registry.host

    def push_token(self, repo: str) -> str:
        """A pull+push token for ``repo`` (minted directly, not counted)."""
        return self.tokens.issue(f"repository:{repo}:pull,push")


@contextlib.contextmanager
def open_token_registry(
    *,
    users: Mapping[str, str] | None = None,
    anonymous_actions: Sequence[str] | None = ("pull",),
    expires_in: int = 300,
    strict_expiry: bool = False,
) -> Iterator[TokenRegistry]:
    """Start a TokenServer, then a LocalRegistry trusting it; stop both on exit."""
    server = TokenServer(
        users=users,
        anonymous_actions=anonymous_actions,
        expires_in=expires_in,
        strict_expiry=strict_expiry,
    )
    with (
        server as ts,
        LocalRegistry(token=ts.registry_auth()) as reg,
    ):
        yield TokenRegistry(reg, ts)
