"""A plain HTTP(S) URL as a :class:`~p2pdist.source.Source` (what ``p2pdist get URL`` uses).

::

    async with make_http_client() as client:
        src = UrlSource(client, "http://127.0.0.1:8000/big.iso")
        info = await src.probe()                   # HEAD, else GET bytes=0-0
        async with src.open_range(0, 4 << 20) as chunks:
            async for chunk in chunks: ...

Retries opening a request (connection errors, 5xx, 429 with ``Retry-After``); follows
redirects itself, dropping ``Authorization``/``Cookie`` when one leaves the origin.  A
200 answer to a range starting after 0 is refused (:class:`UpstreamError`), not skipped
through; ``probe()`` tells the caller whether ranges work.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager

import httpx

from .errors import UsageError
from .registry._http import (
    make_http_client,
    open_range_stream,
    open_response,
    parse_content_range,
    safe_url,
    status_error,
)
from .registry._retry import RetryPolicy
from .source import SourceInfo

__all__ = ["UrlSource", "make_http_client"]

_NO_HEADERS: Mapping[str, str] = {}


class UrlSource:
    """Any http(s) URL, fetched dfget-style: probe once, then ranges in parallel."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        url: str,
        *,
        headers: Mapping[str, str] = _NO_HEADERS,
        retry: RetryPolicy | None = None,
    ) -> None:
        try:
            parsed = httpx.URL(url)
        except httpx.InvalidURL:
            raise UsageError("invalid URL") from None
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise UsageError(f"not an http(s) URL: {safe_url(parsed) if parsed.host else url[:8]}")
        self._client = client
        self._url = parsed
        self._headers = dict(headers)
        self._retry = retry or RetryPolicy()
        self._size: int | None = None
        self._description = safe_url(parsed)

    def __repr__(self) -> str:
        return f"<UrlSource {self._description}>"

    @property
    def description(self) -> str:
        return self._description

    async def _open(self, method: str, headers: Mapping[str, str]) -> httpx.Response:
        return await open_response(
            self._client,
            method,
            self._url,
            headers={**self._headers, **headers},
            retry=self._retry,
            what=self._description,
        )

    async def probe(self) -> SourceInfo:
        """``HEAD``; if it is refused, or does not say whether ranges work, ``GET`` with
        ``Range: bytes=0-0`` and read the total from ``Content-Range``."""
        response = await self._open("HEAD", {"Accept-Encoding": "identity"})
        try:
            status = response.status_code
            length = response.headers.get("content-length")
            ranges = response.headers.get("accept-ranges", "").strip().lower()
        finally:
            await response.aclose()
        if status in (401, 404, 410):
            raise status_error(status, self._description)
        if status == 200:
            size = int(length) if length is not None and length.isdigit() else None
            if size is not None and "bytes" in ranges:
                self._size = size
                return SourceInfo(size, True)
            if ranges == "none":
                self._size = size
                return SourceInfo(size, False)
        # HEAD refused (405, or a presigned URL signed for GET only) or inconclusive.
        response = await self._open("GET", {"Accept-Encoding": "identity", "Range": "bytes=0-0"})
        try:
            status = response.status_code
            if status == 206:
                cr = parse_content_range(response.headers.get("content-range", ""))
                size = cr[2] if cr is not None else None
                self._size = size
                return SourceInfo(size, cr is not None)
            if status == 200:
                length = response.headers.get("content-length")
                size = int(length) if length is not None and length.isdigit() else None
                self._size = size
                return SourceInfo(size, False)
            if status == 416:  # an empty object
                cr = response.headers.get("content-range", "")
                if cr.strip().lower() == "bytes */0":
                    self._size = 0
                    return SourceInfo(0, True)
            raise status_error(status, self._description)
        finally:
            await response.aclose()

    def open_range(
        self, start: int, end: int | None
    ) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
        return open_range_stream(
            lambda headers: self._open("GET", headers),
            start,
            end,
            what=self._description,
            total=self._size,
        )
