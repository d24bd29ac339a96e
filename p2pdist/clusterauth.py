"""Optional cluster authentication: a shared token.

When ``cluster_token`` is set (``cluster_token_file`` in the config, ``--cluster-token-file``,
``P2PDIST_CLUSTER_TOKEN_FILE`` or ``P2PDIST_CLUSTER_TOKEN``), every request between the
members of a cluster carries it in the ``P2PDist-Token`` header: daemon → scheduler (register,
announce, report pieces and hashes) and daemon → daemon (pieces, bad-piece reports).  The
scheduler's events endpoint and the daemons' peer servers refuse a request without the
right token with ``401``, compared in constant time.  Health endpoints stay open; the local
API and the registry proxy listen on loopback and do not ask for it.  The token is a secret:
it is never logged, printed, put in an error or written anywhere by p2pdist.
"""

from __future__ import annotations

import hmac
from pathlib import Path

from .errors import ConfigError
from .httpserver import HTTPError, Request

__all__ = ["HEADER", "check_token", "read_token", "token_headers"]

HEADER = "P2PDist-Token"
MIN_TOKEN_LENGTH = 16


def read_token(*, value: str | None = None, file: str | Path | None = None) -> str | None:
    """The token from ``value`` (e.g. an environment variable) or the first line of
    ``file``; None when neither is given.  Too short or unreadable → ConfigError (the
    message never contains the token)."""
    token = value
    if token is None and file is not None:
        try:
            token = Path(file).read_text().strip()
        except OSError as exc:
            raise ConfigError(
                f"cannot read the cluster token file {str(file)!r}: {exc.strerror}"
            ) from None
    if token is None:
        return None
    token = token.strip()
    if len(token) < MIN_TOKEN_LENGTH or any(c.isspace() or not c.isprintable() for c in token):
        raise ConfigError(
            f"the cluster token must be at least {MIN_TOKEN_LENGTH} printable characters "
            "without spaces (e.g. `openssl rand -hex 32`)"
        )
    return token


def token_headers(token: str | None) -> dict[str, str]:
    return {HEADER: token} if token else {}


def check_token(request: Request, token: str | None) -> None:
    """HTTPError 401 unless the request carries ``token`` (no-op when auth is off)."""
    if token is None:
        return
    given = request.headers.get(HEADER.lower()) or ""
    if not hmac.compare_digest(given.encode(), token.encode()):
        raise HTTPError(401, "cluster token missing or wrong", code="UNAUTHORIZED")
