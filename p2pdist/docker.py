"""A thin client of the Docker Engine API: what ``p2pdist pull`` needs, nothing more.

::

    async with DockerEngine(docker_host()) as engine:
        await engine.ping()
        image_id = await engine.load(archive_chunks, size)   # POST /images/load
        await engine.tag(image_id, "127.0.0.1:5000/app", "v1")

``DOCKER_HOST`` forms: ``unix:///path/to.sock`` (the default, ``/var/run/docker.sock``) and
``tcp://HOST:PORT`` (plain http; TLS to the engine is not supported).  Every failure is a
:class:`~p2pdist.errors.DockerError` with one line of explanation.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from types import TracebackType

import httpx

from .errors import DockerError, UsageError

__all__ = ["DEFAULT_DOCKER_HOST", "DockerEngine", "docker_host", "parse_load_output"]

DEFAULT_DOCKER_HOST = "unix:///var/run/docker.sock"
_MAX_ANSWER = 1 << 20


def docker_host(explicit: str | None = None) -> str:
    """``--docker-host``, else ``$DOCKER_HOST``, else the default socket."""
    return explicit or os.environ.get("DOCKER_HOST") or DEFAULT_DOCKER_HOST


def parse_load_output(body: bytes) -> list[str]:
    """The image ids (``sha256:…``) a ``POST /images/load`` answer reports as loaded.
    Raises DockerError with the engine's message when it reports an error."""
    ids: list[str] = []
    for line in body.splitlines():
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except ValueError:
            raise DockerError(f"docker load: unexpected answer {line[:120]!r}") from None
        if not isinstance(event, dict):
            continue
        if event.get("error") or event.get("errorDetail"):
            detail = event.get("errorDetail")
            message = (detail.get("message") if isinstance(detail, dict) else None) or event.get(
                "error"
            )
            raise DockerError(f"docker load: {str(message).strip()[:300]}")
        stream = event.get("stream")
        if isinstance(stream, str) and "Loaded image ID:" in stream:
            ids.append(stream.split("Loaded image ID:", 1)[1].strip())
    return ids


class DockerEngine:
    def __init__(self, host: str) -> None:
        self.host = host
        if host.startswith("unix://"):
            path = host[len("unix://") :]
            if not path:
                raise UsageError(f"invalid docker host {host!r}")
            transport = httpx.AsyncHTTPTransport(uds=path)
            base = "http://docker"
        elif host.startswith("tcp://"):
            transport = httpx.AsyncHTTPTransport()
            base = "http://" + host[len("tcp://") :].rstrip("/")
        else:
            raise UsageError(
                f"unsupported docker host {host!r}: use unix:///path/to/docker.sock or "
                "tcp://HOST:PORT"
            )
        self._http = httpx.AsyncClient(
            transport=transport,
            base_url=base,
            trust_env=False,
            timeout=httpx.Timeout(None, connect=5.0),
        )

    async def __aenter__(self) -> DockerEngine:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._http.aclose()

    async def _request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        content: AsyncIterator[bytes] | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, bytes]:
        try:
            async with self._http.stream(
                method, path, params=params, content=content, headers=headers
            ) as resp:
                body = b""
                async for chunk in resp.aiter_bytes():
                    if len(body) < _MAX_ANSWER:
                        body += chunk
                return resp.status_code, body
        except httpx.TransportError as exc:
            raise DockerError(
                f"cannot reach Docker at {self.host}: {type(exc).__name__}: {exc} "
                "(is dockerd running? set --docker-host or DOCKER_HOST)"
            ) from None

    @staticmethod
    def _message(body: bytes) -> str:
        try:
            return str(json.loads(body)["message"])[:300]
        except Exception:
            return body[:300].decode("utf-8", "replace").strip()

    async def ping(self) -> None:
        status, _ = await self._request("GET", "/_ping")
        if status != 200:
            raise DockerError(f"docker at {self.host}: /_ping answered {status}")

    async def load(self, archive: AsyncIterator[bytes], size: int) -> list[str]:
        """Stream a ``docker save``-format tar of ``size`` bytes into the engine; the ids
        of the images it loaded."""
        status, body = await self._request(
            "POST",
            "/images/load",
            params={"quiet": "1"},
            content=archive,
            headers={"Content-Type": "application/x-tar", "Content-Length": str(size)},
        )
        if status != 200:
            raise DockerError(f"docker load: {status} {self._message(body)}")
        return parse_load_output(body)

    async def tag(self, image: str, repo: str, tag: str) -> None:
        status, body = await self._request(
            "POST", f"/images/{image}/tag", params={"repo": repo, "tag": tag}
        )
        if status not in (200, 201):
            raise DockerError(f"docker tag {repo}:{tag}: {status} {self._message(body)}")

    async def inspect(self, image: str) -> dict[str, object] | None:
        """``GET /images/<image>/json``, or None when the engine has no such image."""
        status, body = await self._request("GET", f"/images/{image}/json")
        if status == 404:
            return None
        if status != 200:
            raise DockerError(f"docker inspect {image}: {status} {self._message(body)}")
        data = json.loads(body)
        if not isinstance(data, dict):
            raise DockerError(f"docker inspect {image}: unexpected answer")
        return data
