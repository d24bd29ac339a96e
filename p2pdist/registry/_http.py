"""HTTP plumbing shared by the registry client and :class:`~p2pdist.urlsource.UrlSource`:
one pooled client factory, opening a request with retries and manual redirects, and
streaming a checked byte range.

Errors out of here are always from :mod:`p2pdist.errors`; an ``httpx`` exception never
escapes.  Messages name what was being fetched (``what``), never a URL's query string,
credentials or tokens.
"""

from __future__ import annotations

import json
import logging
import re
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager

import httpx
import trio

from ..errors import (
    ConfigError,
    Forbidden,
    NetworkError,
    NotFound,
    RegistryError,
    Unauthorized,
    UpstreamError,
)
from ._retry import RetryPolicy, is_retryable_status, parse_retry_after


def _tune_httpcore_reads(read_size: int = 256 * 1024) -> None:
    """Let httpcore read up to 256 KiB per ``recv`` instead of 64 KiB.

    Blob bodies are most of what p2pdist receives, and per-read Python overhead (httpcore →
    h11 → httpx) dominated its CPU: measured on 1 GiB over 8 ranges, the receive path's CPU
    fell from 1.1–1.3 s to 0.7 s.  ``READ_NUM_BYTES`` is a class attribute of httpcore's
    HTTP/1.1 connection with no public knob; p2pdist is an application (its processes are
    its own), so it is set once, process-wide, if the attribute exists."""
    try:
        from httpcore._async.http11 import AsyncHTTP11Connection
    except ImportError:  # pragma: no cover - httpcore reorganised
        return
    if getattr(AsyncHTTP11Connection, "READ_NUM_BYTES", read_size) < read_size:
        AsyncHTTP11Connection.READ_NUM_BYTES = read_size


_tune_httpcore_reads()

__all__ = [
    "MAX_REDIRECTS",
    "USER_AGENT",
    "AuthHook",
    "ChallengeHook",
    "make_http_client",
    "open_range_stream",
    "open_response",
    "read_capped",
    "safe_url",
    "status_error",
]

log = logging.getLogger("p2pdist.registry")

USER_AGENT = "p2pdist/0.1"
MAX_REDIRECTS = 5
REDIRECT_STATUS = frozenset({301, 302, 303, 307, 308})
_SENSITIVE = frozenset({"authorization", "cookie", "proxy-authorization"})
_DEFAULT_PORT = {"http": 80, "https": 443}

AuthHook = Callable[[], Awaitable[str | None]]
"""Returns the ``Authorization`` value for the next attempt (``None``: send none)."""
ChallengeHook = Callable[[str, str | None], Awaitable[bool]]
"""Called with (``WWW-Authenticate``, the Authorization we sent) on a same-origin 401;
True means "credentials refreshed, try again" (done at most once per request)."""


def make_http_client(
    *,
    insecure: bool = False,
    ca_file: str | None = None,
    max_connections: int = 32,
    transport: httpx.AsyncBaseTransport | None = None,
    trust_env: bool = False,
) -> httpx.AsyncClient:
    """A pooled keep-alive ``httpx.AsyncClient`` for blob traffic (HTTP/1.1).

    TLS verifies against the system CAs (``ssl.create_default_context``) plus ``ca_file``
    if given; ``insecure=True`` turns verification off.  Connect timeout 10 s, read/write
    60 s (per socket operation); no pool timeout (the caller's deadline governs).  It never
    follows redirects itself (see :func:`open_response`).  Proxy environment variables
    are ignored unless ``trust_env``.
    """
    verify: ssl.SSLContext | bool
    if insecure:
        verify = False
    else:
        verify = ssl.create_default_context()
        if ca_file:
            try:
                verify.load_verify_locations(cafile=ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"cannot load CA file {ca_file!r}: {exc}") from None
    limits = httpx.Limits(
        max_connections=max_connections,
        max_keepalive_connections=max_connections,
        keepalive_expiry=30.0,
    )
    return httpx.AsyncClient(
        verify=verify,
        limits=limits,
        timeout=httpx.Timeout(60.0, connect=10.0, pool=None),
        follow_redirects=False,
        transport=transport,
        trust_env=trust_env,
        headers={"User-Agent": USER_AGENT},
    )


def safe_url(url: httpx.URL | str) -> str:
    """A URL fit for messages: no userinfo, query or fragment."""
    u = httpx.URL(url)
    port = f":{u.port}" if u.port else ""
    host = f"[{u.host}]" if ":" in u.host else u.host
    return f"{u.scheme}://{host}{port}{u.path}" + ("?…" if u.query else "")


def _origin(u: httpx.URL) -> tuple[str, str, int | None]:
    return (u.scheme, u.host, u.port or _DEFAULT_PORT.get(u.scheme))


def _one_line(text: str, limit: int = 200) -> str:
    return " ".join(text.split())[:limit]


def status_error(status: int, what: str, *, detail: str = "") -> RegistryError:
    """The typed error for a final HTTP status."""
    extra = f" ({detail})" if detail else ""
    if status == 404:
        return NotFound(f"{what}: not found (HTTP 404){extra}", status=status)
    if status == 401:
        return Unauthorized(f"{what}: unauthorized (HTTP 401){extra}", status=status)
    if status == 403:
        return Forbidden(f"{what}: forbidden (HTTP 403){extra}", status=status)
    return UpstreamError(f"{what}: unexpected HTTP {status}{extra}", status=status)


_ERROR_CODE = re.compile(r"[A-Z][A-Z0-9_]{0,63}")


def error_code(body: bytes) -> str:
    """The first OCI ``errors[].code`` of an error body, or ""."""
    try:
        doc = json.loads(body)
        code = doc["errors"][0]["code"]
    except (ValueError, KeyError, IndexError, TypeError, RecursionError):
        return ""
    if isinstance(code, str) and _ERROR_CODE.fullmatch(code):
        return code
    return ""


async def read_capped(response: httpx.Response, limit: int, what: str) -> bytes | None:
    """The whole (decoded) body, or ``None`` if it is longer than ``limit`` bytes."""
    length = response.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        return None
    parts: list[bytes] = []
    total = 0
    try:
        async for chunk in response.aiter_raw():
            total += len(chunk)
            if total > limit:
                return None
            parts.append(chunk)
    except httpx.TransportError as exc:
        raise NetworkError(f"{what}: {_transport_msg(exc)}") from exc
    return b"".join(parts)


def _transport_msg(exc: BaseException) -> str:
    text = _one_line(str(exc), 160)
    name = type(exc).__name__
    return f"{name}: {text}" if text else name


async def _send_following_redirects(
    client: httpx.AsyncClient,
    method: str,
    url: httpx.URL,
    headers: Mapping[str, str],
    authorization: str | None,
    what: str,
) -> tuple[httpx.Response, bool]:
    """Send, following up to MAX_REDIRECTS redirects by hand.  Returns the final response
    (streaming, open) and whether it came from the original origin."""
    origin = _origin(url)
    hdrs = dict(headers)
    if authorization is not None:
        hdrs["Authorization"] = authorization
    for hop in range(MAX_REDIRECTS + 1):
        request = client.build_request(method, url, headers=hdrs)
        response = await client.send(request, stream=True, follow_redirects=False)
        location = response.headers.get("location")
        if response.status_code not in REDIRECT_STATUS or not location:
            return response, _origin(url) == origin
        status = response.status_code
        await response.aclose()
        if hop == MAX_REDIRECTS:
            raise UpstreamError(f"{what}: more than {MAX_REDIRECTS} redirects", status=status)
        try:
            nxt = url.join(location)
        except httpx.InvalidURL:
            raise UpstreamError(f"{what}: redirect to an invalid URL", status=status) from None
        if nxt.scheme not in ("http", "https"):
            raise UpstreamError(f"{what}: redirect to a non-HTTP URL", status=status)
        if _origin(nxt) != origin:
            # Never hand our credentials to another scheme/host/port.
            hdrs = {k: v for k, v in hdrs.items() if k.lower() not in _SENSITIVE}
        if status == 303 and method != "HEAD":
            method = "GET"
        url = nxt
    raise AssertionError("unreachable")  # pragma: no cover


async def open_response(
    client: httpx.AsyncClient,
    method: str,
    url: str | httpx.URL,
    *,
    headers: Mapping[str, str],
    retry: RetryPolicy,
    what: str,
    auth: AuthHook | None = None,
    on_challenge: ChallengeHook | None = None,
) -> httpx.Response:
    """Open ``method url`` as a streaming response, retrying what is worth retrying.

    Retried with jittered backoff: transport errors (connect, reset, timeouts), 5xx
    (not 501) and 429 (at least ``Retry-After``).  Redirects are followed (≤ 5) without
    sending credentials to another origin.  A same-origin 401 calls ``on_challenge`` once.
    Returns the final response — any status other than those — open: the caller must
    ``aclose()`` it.  Raises :class:`NetworkError` (transport, after retries) or
    :class:`UpstreamError` (5xx/429 after retries, redirect trouble).
    """
    target = httpx.URL(url)
    attempt = 0
    challenged = False
    while True:
        authorization = await auth() if auth is not None else None
        try:
            response, same_origin = await _send_following_redirects(
                client, method, target, headers, authorization, what
            )
        except httpx.UnsupportedProtocol as exc:
            raise NetworkError(f"{what}: {_transport_msg(exc)}") from exc
        except httpx.TransportError as exc:
            if not retry.should_retry(attempt):
                raise NetworkError(
                    f"{what}: {_transport_msg(exc)} (after {attempt + 1} attempts)"
                ) from exc
            delay = retry.delay(attempt)
            log.info("%s: %s; retry in %.2fs", what, _transport_msg(exc), delay)
            await trio.sleep(delay)
            attempt += 1
            continue
        status = response.status_code
        if status == 401 and same_origin and on_challenge is not None and not challenged:
            challenged = True
            challenge = response.headers.get("www-authenticate", "")
            try:
                again = await on_challenge(challenge, authorization)
            except BaseException:
                await response.aclose()
                raise
            if again:
                await response.aclose()
                continue
            return response
        if is_retryable_status(status):
            retry_after = parse_retry_after(response.headers.get("retry-after"))
            await response.aclose()
            if not retry.should_retry(attempt, retry_after=retry_after):
                hint = f", Retry-After {retry_after:.0f}s" if retry_after is not None else ""
                raise UpstreamError(
                    f"{what}: HTTP {status} (after {attempt + 1} attempts{hint})", status=status
                )
            delay = retry.delay(attempt, retry_after=retry_after)
            log.info("%s: HTTP %d; retry in %.2fs", what, status, delay)
            await trio.sleep(delay)
            attempt += 1
            continue
        return response


# -- ranges ------------------------------------------------------------------------------

_CONTENT_RANGE = re.compile(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*", re.IGNORECASE)


def parse_content_range(value: str) -> tuple[int, int, int | None] | None:
    """``"bytes 0-99/1000"`` → ``(0, 100, 1000)`` (end exclusive); ``None`` if malformed."""
    m = _CONTENT_RANGE.fullmatch(value)
    if m is None:
        return None
    first, last = int(m.group(1)), int(m.group(2))
    if last < first:
        return None
    total = None if m.group(3) == "*" else int(m.group(3))
    return first, last + 1, total


def range_header(start: int, end: int | None) -> str:
    return f"bytes={start}-" if end is None else f"bytes={start}-{end - 1}"


class _Body:
    """The async iterator ``open_range_stream`` yields: raw chunks, counted."""

    __slots__ = ("_it", "_remaining", "_truncate", "_what")

    def __init__(
        self, response: httpx.Response, expected: int | None, truncate: bool, what: str
    ) -> None:
        self._it = response.aiter_raw()
        self._remaining = expected
        self._truncate = truncate
        self._what = what

    def __aiter__(self) -> _Body:
        return self

    async def __anext__(self) -> bytes:
        remaining = self._remaining
        if remaining == 0 and self._truncate:
            raise StopAsyncIteration
        try:
            chunk = await self._it.__anext__()
        except StopAsyncIteration:
            if remaining:
                raise NetworkError(
                    f"{self._what}: connection closed {remaining} bytes short"
                ) from None
            raise
        except (httpx.TransportError, httpx.StreamError) as exc:
            raise NetworkError(f"{self._what}: {_transport_msg(exc)}") from exc
        if remaining is not None:
            n = len(chunk)
            if n > remaining:
                if not self._truncate:
                    raise NetworkError(f"{self._what}: more bytes than announced")
                chunk = chunk[:remaining]
                n = remaining
            self._remaining = remaining - n
        return chunk

    async def aclose(self) -> None:
        close = getattr(self._it, "aclose", None)
        if close is not None:
            await close()


class _Empty:
    def __aiter__(self) -> _Empty:
        return self

    async def __anext__(self) -> bytes:
        raise StopAsyncIteration


Opener = Callable[[Mapping[str, str]], Awaitable[httpx.Response]]
ErrorFor = Callable[[int], Exception]


def _expected_length(
    response: httpx.Response, start: int, end: int | None, total: int | None, what: str
) -> tuple[int | None, bool]:
    """Check a response to a range request; return (bytes to yield, truncate?)."""
    status = response.status_code
    ranged = not (start == 0 and end is None)
    length_h = response.headers.get("content-length")
    length = int(length_h) if length_h is not None and length_h.isdigit() else None
    if status == 206:
        cr = parse_content_range(response.headers.get("content-range", ""))
        if cr is None:
            raise UpstreamError(f"{what}: 206 without a valid Content-Range", status=status)
        first, stop, whole = cr
        want_stop = end
        if want_stop is None:
            want_stop = whole if whole is not None else (total if total is not None else stop)
        if first != start or stop != want_stop:
            raise UpstreamError(
                f"{what}: asked for bytes {start}-{want_stop}, got {first}-{stop}", status=status
            )
        if total is not None and whole is not None and whole != total:
            raise UpstreamError(f"{what}: size is {whole}, expected {total}", status=status)
        if length is not None and length != stop - first:
            raise UpstreamError(f"{what}: Content-Length disagrees with Content-Range")
        return stop - first, False
    if status == 200:
        if ranged and start > 0:
            # We do not skip bytes here: reading a blob from 0 for every piece would be
            # quadratic.  probe() reports whether ranges work; this is the server lying.
            raise UpstreamError(f"{what}: server ignored the Range request (HTTP 200)", status=200)
        if total is not None and length is not None and length != total:
            raise UpstreamError(f"{what}: size is {length}, expected {total}", status=200)
        whole_len = length if length is not None else total
        if end is None:
            return whole_len, False
        if whole_len is not None and whole_len < end:
            raise UpstreamError(f"{what}: size is {whole_len}, range ends at {end}", status=200)
        return end, True  # a 200 to "bytes=0-N": the first N+1 bytes are ours, cut there
    if status == 416:
        raise UpstreamError(f"{what}: range {start}-{end} not satisfiable (HTTP 416)", status=416)
    raise UpstreamError(f"{what}: unexpected HTTP {status}", status=status)


@asynccontextmanager
async def open_range_stream(
    opener: Opener,
    start: int,
    end: int | None,
    *,
    what: str,
    total: int | None = None,
    headers: Mapping[str, str] | None = None,
    error_for: ErrorFor | None = None,
) -> AsyncIterator[AsyncIterator[bytes]]:
    """Open bytes ``[start, end)`` and yield an iterator of exactly that many raw bytes.

    ``opener(headers)`` sends the request with retries (see :func:`open_response`).
    A 206 must carry the matching ``Content-Range``; a 200 is accepted for ``start == 0``
    (cut at ``end``) and refused for ``start > 0`` (:class:`UpstreamError`).  Non-2xx
    statuses become ``error_for(status)`` (default :func:`status_error`).  During the
    stream, transport errors and short bodies raise :class:`NetworkError`.
    """
    if start < 0 or (end is not None and end < start):
        raise ValueError(f"invalid range [{start}, {end})")
    if end is not None and end == start:
        yield _Empty()
        return
    hdrs = {"Accept-Encoding": "identity"}
    if headers:
        hdrs.update(headers)
    if not (start == 0 and end is None):
        hdrs["Range"] = range_header(start, end)
    response = await opener(hdrs)
    try:
        status = response.status_code
        if status not in (200, 206, 416) and not 200 <= status < 300:
            raise (error_for or (lambda s: status_error(s, what)))(status)
        expected, truncate = _expected_length(response, start, end, total, what)
        body = _Body(response, expected, truncate, what)
        try:
            yield body
        finally:
            await body.aclose()
    finally:
        await response.aclose()
