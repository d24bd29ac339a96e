"""``p2pdist health``: is the local daemon (or any p2pdist server) alive, or ready?

The container image's ``HEALTHCHECK`` runs it: it GETs ``/healthz`` (``--ready``:
``/readyz``) on the daemon's local API, whose address comes from the same configuration
the daemon reads (``P2PDIST_CONFIG``, ``P2PDIST_API_LISTEN``), or on ``--url``.  Exit 0 when
the server answers 200; otherwise one line on stderr and exit 4 (the CLI's network error).
"""

from __future__ import annotations

import httpx

from .config import NodeConfig, split_hostport
from .errors import NetworkError, UsageError

__all__ = ["check_health", "health_url"]

_WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


def health_url(config: NodeConfig, *, ready: bool = False) -> str:
    """``http://HOST:PORT/healthz`` (or ``/readyz``) of ``config``'s local API; a wildcard
    listen address is reached on loopback."""
    host, port = split_hostport(config.api_listen, what="api_listen")
    host = _WILDCARDS.get(host, host)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/{'readyz' if ready else 'healthz'}"


def check_health(url: str, *, timeout: float = 5.0) -> str:
    """GET ``url``; the body's first line when it answers 200, else :class:`NetworkError`."""
    if not url.startswith(("http://", "https://")):
        raise UsageError(f"invalid health URL {url[:80]!r}: expected http://HOST:PORT/PATH")
    try:
        with httpx.Client(timeout=timeout, trust_env=False) as client:
            resp = client.get(url)
    except httpx.HTTPError as exc:
        raise NetworkError(f"{url}: {type(exc).__name__}: {exc}") from None
    body = resp.text.strip().splitlines()[0][:200] if resp.text.strip() else ""
    if resp.status_code != 200:
        raise NetworkError(f"{url}: HTTP {resp.status_code} {body}".rstrip())
    return body
