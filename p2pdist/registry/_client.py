"""The registry client: manifests, blobs and auth against one OCI/Docker registry."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from types import TracebackType

import httpx
import trio

from ..config import RegistryConfig, is_loopback_host
from ..digest import Digest, sha256_digest
from ..errors import (
    ConfigError,
    DigestMismatch,
    InvalidDigest,
    InvalidReference,
    ManifestInvalid,
    NetworkError,
    RegistryError,
    Unauthorized,
    UpstreamError,
)
from ..reference import is_valid_repository, is_valid_tag
from ..source import SourceInfo
from ._auth import (
    Credentials,
    TokenCache,
    TokenKey,
    parse_token_response,
    parse_www_authenticate,
    resolve_credentials,
)
from ._fastrange import FastPathUnavailable, FastRangeReader
from ._http import (
    error_code,
    make_http_client,
    open_range_stream,
    open_response,
    read_capped,
    status_error,
)
from ._manifest import (
    ALL_MANIFEST_TYPES,
    MAX_MANIFEST_SIZE,
    Descriptor,
    ImageManifest,
    Manifest,
    parse_manifest,
    parse_platform,
    select_platform,
)
from ._retry import RetryPolicy

__all__ = ["RegistryBlobSource", "RegistryClient"]

_MAX_ERROR_BODY = 64 << 10
_MAX_TOKEN_BODY = 1 << 20
_MAX_INDEX_DEPTH = 3


class _RegistryAuth:
    """Chooses the ``Authorization`` for each request and answers 401 challenges.

    Once a registry has sent a Bearer challenge, later requests fetch (or reuse) a token
    for their scope up front, so only the first request of a session pays for a 401.
    Tokens are cached per (realm, service, scope) until shortly before they expire; one
    trio.Lock per key makes concurrent requests share one token fetch.
    """

    def __init__(
        self,
        client: httpx.AsyncClient,
        config: RegistryConfig,
        creds: Credentials,
        retry: RetryPolicy,
    ) -> None:
        self._client = client
        self._config = config
        self._creds = creds
        self._retry = retry
        self._cache = TokenCache()
        self._locks: dict[TokenKey, trio.Lock] = {}
        self._bearer: tuple[str, str] | None = None  # (realm, service)
        self._scope_alias: dict[str, str] = {}
        self._basic = False
        self.token_fetches = 0

    def __repr__(self) -> str:
        return f"<_RegistryAuth {self._config.host}>"

    @property
    def has_credentials(self) -> bool:
        return not self._creds.empty

    def _key(self, scope: str) -> TokenKey:
        assert self._bearer is not None
        realm, service = self._bearer
        return (realm, service, self._scope_alias.get(scope, scope))

    async def header(self, scope: str) -> str | None:
        if self._creds.registry_token:
            return f"Bearer {self._creds.registry_token}"
        if self._bearer is not None:
            return f"Bearer {await self._token(self._key(scope))}"
        if self._basic:
            return self._creds.basic_header()
        return None

    async def on_challenge(self, challenge: str, sent: str | None, scope: str) -> bool:
        scheme, params = parse_www_authenticate(challenge)
        if scheme == "bearer" and params.get("realm"):
            if self._creds.registry_token:
                return False  # a configured token was refused: nothing better to try
            if params.get("scope"):
                self._scope_alias[scope] = params["scope"]
            self._bearer = (params["realm"], params.get("service", ""))
            key = self._key(scope)
            if sent is not None and sent.startswith("Bearer "):
                self._cache.invalidate(key, sent[len("Bearer ") :])
            await self._token(key)
            return True
        if scheme == "basic":
            if not self._creds.has_basic or (sent is not None and sent.startswith("Basic ")):
                return False
            self._basic = True
            return True
        return False

    def _may_send_secrets_to(self, url: httpx.URL) -> bool:
        return url.scheme == "https" or is_loopback_host(url.host) or self._config.insecure

    async def _token(self, key: TokenKey) -> str:
        now = trio.current_time()
        token = self._cache.get(key, now)
        if token is not None:
            return token
        lock = self._locks.setdefault(key, trio.Lock())
        async with lock:
            token = self._cache.get(key, trio.current_time())
            if token is not None:
                return token
            token, expires_in = await self._fetch_token(key)
            self._cache.put(key, token, expires_in, trio.current_time())
            return token

    async def _fetch_token(self, key: TokenKey) -> tuple[str, float]:
        realm, service, scope = key
        what = f"token for {self._config.host}"
        try:
            url = httpx.URL(realm)
        except httpx.InvalidURL:
            raise UpstreamError(f"{what}: invalid realm in WWW-Authenticate") from None
        if url.scheme not in ("http", "https"):
            raise UpstreamError(f"{what}: realm is not an http(s) URL")
        params: list[tuple[str, str | int | float | bool | None]] = []
        if service:
            params.append(("service", service))
        params.extend(("scope", s) for s in scope.split())
        creds = self._creds
        secrets_ok = self._may_send_secrets_to(url)
        headers = {"Accept": "application/json"}
        self.token_fetches += 1
        if creds.identity_token and secrets_ok:
            # OAuth2 refresh-token grant, as docker does with an identitytoken.
            form = {
                "grant_type": "refresh_token",
                "refresh_token": creds.identity_token,
                "client_id": "p2pdist",
            }
            if service:
                form["service"] = service
            if scope:
                form["scope"] = scope
            request = self._client.build_request("POST", url, data=form, headers=headers)
            response = await self._send_once_with_retry(request, what)
        else:
            if creds.has_basic and secrets_ok:
                headers["Authorization"] = creds.basic_header()
            response = await open_response(
                self._client,
                "GET",
                url.copy_merge_params(params),
                headers=headers,
                retry=self._retry,
                what=what,
            )
        try:
            if response.status_code in (401, 403):
                why = "credentials refused" if creds.has_basic else "anonymous access refused"
                raise Unauthorized(
                    f"{what}: token endpoint said HTTP {response.status_code} ({why})",
                    status=response.status_code,
                )
            if response.status_code != 200:
                raise status_error(response.status_code, what)
            body = await read_capped(response, _MAX_TOKEN_BODY, what)
        finally:
            await response.aclose()
        if body is None:
            raise UpstreamError(f"{what}: token response too large")
        try:
            return parse_token_response(body)
        except ValueError as exc:
            raise UpstreamError(f"{what}: {exc}") from None

    async def _send_once_with_retry(self, request: httpx.Request, what: str) -> httpx.Response:
        attempt = 0
        while True:
            try:
                return await self._client.send(request, stream=True, follow_redirects=False)
            except httpx.TransportError as exc:
                if not self._retry.should_retry(attempt):
                    raise NetworkError(f"{what}: {type(exc).__name__}") from exc
                await trio.sleep(self._retry.delay(attempt))
                attempt += 1


def _check_repo(repo: str) -> None:
    if not is_valid_repository(repo):
        raise InvalidReference(f"invalid repository name {repo[:80]!r}")


def _parse_reference(reference: str) -> Digest | None:
    """A digest reference → Digest; a tag → None.  InvalidReference for anything else."""
    if ":" in reference:
        try:
            return Digest.parse(reference)
        except InvalidDigest as exc:
            raise InvalidReference(str(exc)) from None
    if not is_valid_tag(reference):
        raise InvalidReference(f"invalid tag {reference[:80]!r}")
    return None


def _media_type(response: httpx.Response) -> str:
    value: str = response.headers.get("content-type", "")
    return value.split(";", 1)[0].strip().lower()


def _sniff_media_type(data: bytes, header: str) -> str:
    if header in ALL_MANIFEST_TYPES:
        return header
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        return header
    mt = doc.get("mediaType") if isinstance(doc, dict) else None
    if isinstance(mt, str):
        return mt
    return header


class RegistryClient:
    """A client for one registry host (``RegistryConfig``).  Use as an async context
    manager (or call :meth:`aclose`); safe to share between many concurrent tasks."""

    def __init__(
        self,
        config: RegistryConfig,
        *,
        platform: str = "linux/amd64",
        docker_config: Path | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        max_connections: int = 32,
        retry: RetryPolicy | None = None,
        mirror: str | None = None,
    ) -> None:
        """``mirror``: send every request to this registry mirror (a p2pdist daemon's
        ``/v2/`` API) instead, naming the registry with ``?ns=<host>`` as containerd does;
        credentials and tokens are still those of ``config.host``."""
        try:
            parse_platform(platform)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self._config = config
        self._base = mirror.rstrip("/") if mirror else config.base_url
        self._query = f"?ns={config.host}" if mirror else ""
        self.platform = platform
        self._retry = retry or RetryPolicy()
        self._http = make_http_client(
            insecure=config.insecure,
            ca_file=config.ca_file,
            max_connections=max_connections,
            transport=transport,
        )
        credentials = resolve_credentials(config, docker_config)
        self._auth = _RegistryAuth(self._http, config, credentials, self._retry)
        # The lean body path: plain http, no credentials, no injected transport (tests that
        # inject one exercise the general path).  Disabled for good on a 401/3xx.
        self._fast: FastRangeReader | None = None
        url = httpx.URL(self._base)
        if url.scheme == "http" and credentials.empty and transport is None and not mirror:
            self._fast = FastRangeReader(url.host, url.port or 80)

    def __repr__(self) -> str:
        return f"<RegistryClient {self._base}>"

    @property
    def host(self) -> str:
        return self._config.host

    @property
    def base_url(self) -> str:
        return self._base

    @property
    def http(self) -> httpx.AsyncClient:
        """The pooled httpx client (shared with blob sources)."""
        return self._http

    @property
    def token_fetches(self) -> int:
        """How many times a bearer token was requested (for tests and metrics)."""
        return self._auth.token_fetches

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._fast is not None:
            await self._fast.aclose()
        await self._http.aclose()

    # -- plumbing ------------------------------------------------------------------------

    async def _open(
        self, method: str, path: str, *, repo: str, headers: dict[str, str], what: str
    ) -> httpx.Response:
        scope = f"repository:{repo}:pull" if repo else ""

        async def auth() -> str | None:
            return await self._auth.header(scope)

        async def on_challenge(challenge: str, sent: str | None) -> bool:
            return await self._auth.on_challenge(challenge, sent, scope)

        return await open_response(
            self._http,
            method,
            self._base + path + self._query,
            headers=headers,
            retry=self._retry,
            what=what,
            auth=auth,
            on_challenge=on_challenge,
        )

    def _error(self, status: int, what: str, code: str = "") -> RegistryError:
        detail = code
        if status == 401:
            hint = (
                "credentials refused" if self._auth.has_credentials else "no credentials configured"
            )
            detail = f"{code}; {hint}" if code else hint
        return status_error(status, what, detail=detail)

    async def _fail(self, response: httpx.Response, what: str) -> RegistryError:
        code = ""
        if response.request.method != "HEAD":
            try:
                body = await read_capped(response, _MAX_ERROR_BODY, what)
            except NetworkError:
                body = None
            code = error_code(body or b"")
        return self._error(response.status_code, what, code)

    # -- API -----------------------------------------------------------------------------

    async def ping(self) -> None:
        """``GET /v2/``: raises if the registry is unreachable or refuses us."""
        what = f"registry {self.host}"
        response = await self._open("GET", "/v2/", repo="", headers={}, what=what)
        try:
            if response.status_code != 200:
                raise await self._fail(response, what)
        finally:
            await response.aclose()

    async def head_manifest(
        self, repo: str, reference: str, *, accept: Sequence[str] = ALL_MANIFEST_TYPES
    ) -> Descriptor:
        """``HEAD manifests/<reference>`` → its descriptor (falls back to GET when the
        registry leaves out ``Docker-Content-Digest`` for a tag)."""
        _check_repo(repo)
        want = _parse_reference(reference)
        what = f"manifest {self._name(repo, reference)}"
        headers = {"Accept": ", ".join(accept), "Accept-Encoding": "identity"}
        path = f"/v2/{repo}/manifests/{reference}"
        response = await self._open("HEAD", path, repo=repo, headers=headers, what=what)
        try:
            if response.status_code != 200:
                raise await self._fail(response, what)
            header_digest = response.headers.get("docker-content-digest")
            length = response.headers.get("content-length")
            media_type = _media_type(response)
        finally:
            await response.aclose()
        digest: Digest | None = None
        if header_digest:
            try:
                digest = Digest.parse(header_digest.strip())
            except InvalidDigest:
                raise UpstreamError(f"{what}: invalid Docker-Content-Digest header") from None
            if want is not None and digest != want:
                raise DigestMismatch(f"{what}: registry says its digest is {digest}")
        elif want is not None:
            digest = want
        if digest is None or length is None or not length.isdigit() or not media_type:
            m = await self.get_manifest(repo, reference, accept=accept)
            return Descriptor(m.media_type, m.digest, len(m.data))
        return Descriptor(media_type, digest, int(length))

    async def get_manifest(
        self, repo: str, reference: str, *, accept: Sequence[str] = ALL_MANIFEST_TYPES
    ) -> Manifest:
        """``GET manifests/<reference>``, verified: by digest, the bytes must hash to it;
        by tag, to ``Docker-Content-Digest`` if the registry sends one."""
        _check_repo(repo)
        want = _parse_reference(reference)
        what = f"manifest {self._name(repo, reference)}"
        headers = {"Accept": ", ".join(accept), "Accept-Encoding": "identity"}
        path = f"/v2/{repo}/manifests/{reference}"
        response = await self._open("GET", path, repo=repo, headers=headers, what=what)
        try:
            if response.status_code != 200:
                raise await self._fail(response, what)
            data = await read_capped(response, MAX_MANIFEST_SIZE, what)
            header_digest = response.headers.get("docker-content-digest")
            media_type = _media_type(response)
        finally:
            await response.aclose()
        if data is None:
            raise ManifestInvalid(f"{what}: larger than {MAX_MANIFEST_SIZE} bytes")
        if want is not None:
            if not want.matches(data):
                raise DigestMismatch(f"{what}: content does not match its digest")
            digest = want
        else:
            digest = sha256_digest(data)
            if header_digest:
                try:
                    claimed = Digest.parse(header_digest.strip())
                except InvalidDigest:
                    raise UpstreamError(f"{what}: invalid Docker-Content-Digest header") from None
                if not claimed.matches(data):
                    raise DigestMismatch(
                        f"{what}: content does not match Docker-Content-Digest {claimed}"
                    )
                digest = claimed
        return Manifest(_sniff_media_type(data, media_type), digest, data)

    async def resolve_image(
        self, repo: str, reference: str, *, platform: str | None = None
    ) -> ImageManifest:
        """The image manifest for ``reference``, following an index / manifest list to
        ``platform`` (default: the client's)."""
        plat = platform or self.platform
        manifest = await self.get_manifest(repo, reference)
        parsed = parse_manifest(manifest.data, manifest.media_type, digest=manifest.digest)
        index_digest: Digest | None = None
        for _ in range(_MAX_INDEX_DEPTH):
            if isinstance(parsed, ImageManifest):
                return dataclasses.replace(parsed, index_digest=index_digest)
            desc = select_platform(parsed, plat)
            if index_digest is None:
                index_digest = parsed.digest
            child = await self.get_manifest(repo, str(desc.digest))
            if len(child.data) != desc.size:
                raise ManifestInvalid(
                    f"manifest {self._name(repo, str(desc.digest))}: size {len(child.data)}, "
                    f"index says {desc.size}"
                )
            media_type = child.media_type or desc.media_type
            parsed = parse_manifest(child.data, media_type, digest=child.digest)
        raise ManifestInvalid(f"manifest {self._name(repo, reference)}: indexes nested too deep")

    async def _open_blob(
        self, method: str, repo: str, digest: Digest
    ) -> tuple[httpx.Response, str]:
        """``method blobs/<digest>`` answered 200 (else the typed error), and its name for
        messages.  The caller closes the response."""
        _check_repo(repo)
        what = self._blob_what(repo, digest)
        response = await self._open(
            method,
            f"/v2/{repo}/blobs/{digest}",
            repo=repo,
            headers={"Accept-Encoding": "identity"},
            what=what,
        )
        if response.status_code != 200:
            try:
                raise await self._fail(response, what)
            finally:
                await response.aclose()
        return response, what

    async def blob_size(self, repo: str, digest: Digest) -> int:
        """``HEAD blobs/<digest>`` → its size."""
        response, what = await self._open_blob("HEAD", repo, digest)
        try:
            length = response.headers.get("content-length")
        finally:
            await response.aclose()
        if length is None or not length.isdigit():
            raise UpstreamError(f"{what}: no Content-Length")
        return int(length)

    def blob_source(
        self, repo: str, digest: Digest, *, size: int | None = None
    ) -> RegistryBlobSource:
        """A :class:`~p2pdist.source.Source` for one blob (ranges, retries, auth)."""
        _check_repo(repo)
        return RegistryBlobSource(self, repo, digest, size)

    @asynccontextmanager
    async def stream_blob(
        self, repo: str, digest: Digest
    ) -> AsyncIterator[tuple[int, AsyncIterator[bytes]]]:
        """``GET blobs/<digest>`` as one stream: ``(size, chunks)``.  The caller checks
        the digest (the bytes are not verified here)."""
        response, what = await self._open_blob("GET", repo, digest)
        try:
            length = response.headers.get("content-length")
            if length is None or not length.isdigit():
                raise UpstreamError(f"{what}: no Content-Length")
            yield int(length), response.aiter_raw()
        except httpx.TransportError as exc:
            raise NetworkError(f"{what}: {type(exc).__name__}: {exc}") from None
        finally:
            await response.aclose()

    async def fetch_blob(self, repo: str, digest: Digest, *, max_size: int = 64 << 20) -> bytes:
        """A small blob (e.g. an image config) in memory, verified against its digest."""
        response, what = await self._open_blob("GET", repo, digest)
        try:
            data = await read_capped(response, max_size, what)
        finally:
            await response.aclose()
        if data is None:
            raise UpstreamError(f"{what}: larger than {max_size} bytes")
        if not digest.matches(data):
            raise DigestMismatch(f"{what}: content does not match its digest")
        return data

    # -- helpers -------------------------------------------------------------------------

    def _name(self, repo: str, reference: str) -> str:
        sep = "@" if ":" in reference else ":"
        return f"{self.host}/{repo}{sep}{reference}"

    def _blob_what(self, repo: str, digest: Digest) -> str:
        return f"blob {digest} in {self.host}/{repo}"


class RegistryBlobSource:
    """One registry blob as a :class:`~p2pdist.source.Source`."""

    def __init__(self, client: RegistryClient, repo: str, digest: Digest, size: int | None) -> None:
        self._client = client
        self.repo = repo
        self.digest = digest
        self._size = size
        self._path = f"/v2/{repo}/blobs/{digest}"

    def __repr__(self) -> str:
        return f"<RegistryBlobSource {self.description}>"

    @property
    def description(self) -> str:
        return f"blob {self.digest.hex[:12]} from {self._client.host}/{self.repo}"

    async def probe(self) -> SourceInfo:
        """The size (HEAD unless given) and range support.  Registries serve ranges (OCI
        distribution spec); only an explicit ``Accept-Ranges: none`` says otherwise."""
        if self._size is not None:
            return SourceInfo(self._size, True)
        c = self._client
        what = c._blob_what(self.repo, self.digest)
        response = await c._open(
            "HEAD", self._path, repo=self.repo, headers={"Accept-Encoding": "identity"}, what=what
        )
        try:
            if response.status_code != 200:
                raise await c._fail(response, what)
            length = response.headers.get("content-length")
            ranges = response.headers.get("accept-ranges", "").strip().lower()
        finally:
            await response.aclose()
        size = int(length) if length is not None and length.isdigit() else None
        self._size = size
        return SourceInfo(size, ranges != "none")

    def open_range(
        self, start: int, end: int | None
    ) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
        return self._open_range(start, end)

    @asynccontextmanager
    async def _open_range(self, start: int, end: int | None) -> AsyncIterator[AsyncIterator[bytes]]:
        c = self._client
        stop = self._size if end is None else end
        fast = c._fast
        if fast is not None and stop is not None and start < stop:
            try:
                async with fast.open(self._path, start, stop, host_header=c.host) as chunks:
                    yield chunks
                return
            except FastPathUnavailable as exc:
                if exc.status is not None and exc.status != 429 and exc.status < 500:
                    # An answer the lean path cannot use (auth, a redirect, no ranges...):
                    # it would cost every request twice, so the general path takes over
                    # for this registry.  5xx/429 are transient: retried there, once.
                    c._fast = None
                    await fast.aclose()
        async with self._open_general(start, end) as body:
            yield body

    def _open_general(
        self, start: int, end: int | None
    ) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
        c = self._client
        what = c._blob_what(self.repo, self.digest)

        async def opener(headers: Mapping[str, str]) -> httpx.Response:
            return await c._open(
                "GET", self._path, repo=self.repo, headers=dict(headers), what=what
            )

        return open_range_stream(
            opener,
            start,
            end,
            what=what,
            total=self._size,
            error_for=lambda status: c._error(status, what),
        )
