"""Registry credentials and auth challenges: pure parts (no network).

* :func:`parse_www_authenticate` reads a ``WWW-Authenticate`` challenge;
* :func:`docker_config_credentials` looks a host up in ``~/.docker/config.json``;
* :class:`TokenCache` keeps bearer tokens per (realm, service, scope) until they expire.

:class:`Credentials` never shows its secrets in ``repr``.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import RegistryConfig
from ..errors import ConfigError

__all__ = [
    "Challenge",
    "Credentials",
    "TokenCache",
    "default_docker_config_path",
    "docker_config_credentials",
    "parse_token_response",
    "parse_www_authenticate",
    "resolve_credentials",
]

DOCKER_HUB_KEY = "https://index.docker.io/v1/"
_DOCKER_HUB_HOSTS = {
    "docker.io",
    "index.docker.io",
    "registry-1.docker.io",
    "registry.hub.docker.com",
}

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')
_WS = re.compile(r"[ \t]*")


@dataclass(frozen=True, slots=True)
class Challenge:
    scheme: str  # lowercased: "bearer", "basic", ...
    params: dict[str, str]


def parse_www_authenticate(header: str) -> tuple[str, dict[str, str]]:
    """``'Bearer realm="https://a/token",service="reg",scope="repository:x:pull"'`` →
    ``("bearer", {"realm": ..., "service": ..., "scope": ...})``.

    The scheme and parameter names are lowercased; quoted values are unescaped.  Only the
    first challenge of the header is read.  A header without a scheme gives ``("", {})``.
    """
    pos = _WS.match(header, 0).end()  # type: ignore[union-attr]
    m = _TOKEN.match(header, pos)
    if m is None:
        return "", {}
    scheme = m.group(0).lower()
    pos = m.end()
    params: dict[str, str] = {}
    n = len(header)
    while pos < n:
        pos = _WS.match(header, pos).end()  # type: ignore[union-attr]
        if pos < n and header[pos] == ",":
            pos += 1
            continue
        name_m = _TOKEN.match(header, pos)
        if name_m is None:
            break
        after = _WS.match(header, name_m.end()).end()  # type: ignore[union-attr]
        if after >= n or header[after] != "=":
            break  # a new challenge (or token68) starts here: stop at the first challenge
        pos = _WS.match(header, after + 1).end()  # type: ignore[union-attr]
        if pos < n and header[pos] == '"':
            q = _QUOTED.match(header, pos)
            if q is None:  # unterminated quote: take the rest
                value = header[pos + 1 :]
                pos = n
            else:
                value = re.sub(r"\\(.)", r"\1", q.group(1))
                pos = q.end()
        else:
            v = re.compile(r"[^,\s]*").match(header, pos)
            assert v is not None
            value = v.group(0)
            pos = v.end()
        params.setdefault(name_m.group(0).lower(), value)
    return scheme, params


@dataclass(frozen=True, slots=True)
class Credentials:
    """What we can authenticate with.  Secrets are kept out of ``repr``."""

    username: str | None = None
    password: str | None = field(default=None, repr=False)
    identity_token: str | None = field(default=None, repr=False)
    """An OAuth2 refresh token (docker config ``identitytoken``)."""
    registry_token: str | None = field(default=None, repr=False)
    """A bearer token to send as is (``RegistryConfig.token``, docker ``registrytoken``)."""

    @property
    def has_basic(self) -> bool:
        return bool(self.username) and self.password is not None

    @property
    def empty(self) -> bool:
        return not (self.has_basic or self.identity_token or self.registry_token)

    def basic_header(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")


ANONYMOUS = Credentials()


def default_docker_config_path() -> Path:
    """``$DOCKER_CONFIG/config.json``, else ``~/.docker/config.json``."""
    base = os.environ.get("DOCKER_CONFIG")
    if base:
        return Path(base) / "config.json"
    return Path.home() / ".docker" / "config.json"


def _auth_keys(host: str) -> list[str]:
    keys = [host, f"https://{host}", f"http://{host}", f"https://{host}/v1/", f"https://{host}/v2/"]
    if host in _DOCKER_HUB_HOSTS:
        keys.insert(0, DOCKER_HUB_KEY)
    return keys


def _normalise_key(key: str) -> str:
    k = key
    for prefix in ("https://", "http://"):
        if k.startswith(prefix):
            k = k[len(prefix) :]
    return k.split("/", 1)[0]


def _entry_credentials(entry: Mapping[str, Any], path: Path) -> Credentials | None:
    username = entry.get("username")
    password = entry.get("password")
    auth = entry.get("auth")
    if isinstance(auth, str) and auth:
        try:
            decoded = base64.b64decode(auth, validate=False).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise ConfigError(f"{path}: an 'auth' entry is not base64 of user:password") from None
        user, sep, pw = decoded.partition(":")
        if not sep:
            raise ConfigError(f"{path}: an 'auth' entry is not base64 of user:password")
        username, password = user, pw
    identity = entry.get("identitytoken")
    regtoken = entry.get("registrytoken")
    creds = Credentials(
        username=username if isinstance(username, str) and username else None,
        password=password if isinstance(password, str) else None,
        identity_token=identity if isinstance(identity, str) and identity else None,
        registry_token=regtoken if isinstance(regtoken, str) and regtoken else None,
    )
    return None if creds.empty else creds


def docker_config_credentials(host: str, path: Path | None = None) -> Credentials | None:
    """Credentials for ``host`` from a docker ``config.json`` ``auths`` table, or ``None``.

    Keys may be ``host``, ``https://host``, ``https://host/v1/`` …; Docker Hub hosts also
    match ``https://index.docker.io/v1/``.  A missing file is ``None``; an unreadable or
    malformed one is :class:`ConfigError` (its message never quotes the file's secrets).
    Credential helpers (``credsStore``/``credHelpers``) are not consulted.
    """
    path = path or default_docker_config_path()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"cannot read docker config {path}: {exc.strerror}") from None
    try:
        doc = json.loads(text)
    except ValueError:
        raise ConfigError(f"docker config {path} is not valid JSON") from None
    auths = doc.get("auths") if isinstance(doc, dict) else None
    if not isinstance(auths, dict):
        return None
    for key in _auth_keys(host):
        entry = auths.get(key)
        if isinstance(entry, dict):
            return _entry_credentials(entry, path)
    # Last chance: any key naming the same host (e.g. with another path).
    for key, entry in auths.items():
        if isinstance(key, str) and isinstance(entry, dict) and _normalise_key(key) == host:
            return _entry_credentials(entry, path)
    return None


def resolve_credentials(config: RegistryConfig, docker_config: Path | None = None) -> Credentials:
    """The config's credentials if it has any, else docker config.json's, else anonymous."""
    if config.username or config.token:
        return Credentials(
            username=config.username,
            password=config.password,
            registry_token=config.token,
        )
    return docker_config_credentials(config.host, docker_config) or ANONYMOUS


def parse_token_response(data: bytes, *, default_expires_in: float = 60.0) -> tuple[str, float]:
    """A token endpoint's JSON → ``(token, expires_in seconds)``.  ValueError if unusable."""
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        raise ValueError("token response is not JSON") from None
    if not isinstance(doc, dict):
        raise ValueError("token response is not a JSON object")
    token = doc.get("token") or doc.get("access_token")
    if not isinstance(token, str) or not token:
        raise ValueError("token response has no token")
    expires = doc.get("expires_in")
    if isinstance(expires, bool) or not isinstance(expires, int | float) or expires <= 0:
        expires = default_expires_in
    return token, float(expires)


TokenKey = tuple[str, str, str]  # realm, service, scope


class TokenCache:
    """Bearer tokens per (realm, service, scope), valid until their expiry minus a margin
    (10% of the lifetime, at most 30 s).  Time is passed in, so it tests without clocks."""

    def __init__(self) -> None:
        self._tokens: dict[TokenKey, tuple[str, float]] = {}

    def __repr__(self) -> str:
        return f"<TokenCache {len(self._tokens)} tokens>"

    def get(self, key: TokenKey, now: float) -> str | None:
        hit = self._tokens.get(key)
        if hit is None:
            return None
        token, valid_until = hit
        if now >= valid_until:
            del self._tokens[key]
            return None
        return token

    def put(self, key: TokenKey, token: str, expires_in: float, now: float) -> None:
        margin = min(30.0, expires_in * 0.1)
        self._tokens[key] = (token, now + expires_in - margin)

    def invalidate(self, key: TokenKey, token: str | None = None) -> None:
        hit = self._tokens.get(key)
        if hit is not None and (token is None or hit[0] == token):
            del self._tokens[key]
