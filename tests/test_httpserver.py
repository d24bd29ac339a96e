"""Tests of p2pdist.httpserver over real loopback sockets (httpx, raw trio streams)."""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import trio

from p2pdist.errors import NotFound
from p2pdist.httpserver import (
    FileBody,
    Headers,
    HTTPError,
    RangeNotSatisfiable,
    Request,
    Response,
    ServerConfig,
    ServerInfo,
    content_range,
    parse_range,
    serve_http,
)

Handler = Callable[[Request], Awaitable[Response]]
LOGGER = "p2pdist.http"


@asynccontextmanager
async def running(
    handler: Handler, config: ServerConfig | None = None
) -> AsyncIterator[ServerInfo]:
    async with trio.open_nursery() as nursery:
        info: ServerInfo = await nursery.start(
            lambda task_status: serve_http(
                handler, "127.0.0.1", 0, config=config, task_status=task_status
            )
        )
        try:
            yield info
        finally:
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def client(info: ServerInfo) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=info.url, timeout=10) as c:
        yield c


async def raw_exchange(info: ServerInfo, data: bytes) -> bytes:
    """Send ``data`` on a fresh connection; return everything until the server closes."""
    stream = await trio.open_tcp_stream(info.host, info.port)
    async with stream:
        await stream.send_all(data)
        out = bytearray()
        with trio.fail_after(5):
            while chunk := await stream.receive_some(65536):
                out += chunk
    return bytes(out)


async def echo(request: Request) -> Response:
    return Response.json(
        {
            "method": request.method,
            "path": request.path,
            "target": request.target,
            "query": request.query,
            "client": list(request.client),
        }
    )


# --------------------------------------------------------------------------- basics


async def test_get_and_head_bytes() -> None:
    async def handler(request: Request) -> Response:
        return Response(200, [("Content-Type", "text/plain"), ("X-A", "1")], b"hello world")

    async with running(handler) as info, client(info) as c:
        r = await c.get("/x")
        assert r.status_code == 200
        assert r.content == b"hello world"
        assert r.headers["content-length"] == "11"
        assert r.headers["x-a"] == "1"
        assert r.headers["server"] == "p2pdist"
        assert "date" in r.headers
        assert r.reason_phrase == "OK"
        h = await c.head("/x")
        assert h.status_code == 200
        assert h.headers["content-length"] == "11"
        assert h.content == b""


async def test_request_fields_and_keepalive() -> None:
    async with running(echo) as info, client(info) as c:
        ports = set()
        for i in range(5):
            r = await c.get(f"/v2/a%20b/blobs/sha256:ab?ns=docker.io&x=1&x={i}&empty=")
            body = r.json()
            assert body["path"] == "/v2/a b/blobs/sha256:ab"
            assert body["target"] == f"/v2/a%20b/blobs/sha256:ab?ns=docker.io&x=1&x={i}&empty="
            assert body["query"] == {"ns": ["docker.io"], "x": ["1", str(i)], "empty": [""]}
            assert body["client"][0] == "127.0.0.1"
            ports.add(body["client"][1])
        assert len(ports) == 1  # all five over one connection


async def test_pipelined_requests_on_raw_connection() -> None:
    async with running(echo) as info:
        req = b"GET /%d HTTP/1.1\r\nHost: x\r\n\r\n"
        data = req % 1 + req % 2 + b"GET /3 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        out = await raw_exchange(info, data)
        assert out.count(b"HTTP/1.1 200 OK") == 3
        assert out.index(b'"path":"/1"') < out.index(b'"path":"/2"') < out.index(b'"path":"/3"')


async def test_http10_client() -> None:
    async def gen() -> AsyncIterator[bytes]:
        yield b"abc"
        yield b"def"

    async def handler(request: Request) -> Response:
        if request.path == "/stream":
            return Response(200, [], gen())
        return await echo(request)

    async with running(handler) as info:
        out = await raw_exchange(info, b"GET /x HTTP/1.0\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 200 OK") and b'"path":"/x"' in out
        out = await raw_exchange(info, b"GET /stream HTTP/1.0\r\n\r\n")
        assert out.endswith(b"\r\n\r\nabcdef")  # close-delimited, not chunked
        assert b"transfer-encoding" not in out.lower()


async def test_helpers_and_http_error() -> None:
    async def handler(request: Request) -> Response:
        if request.path == "/text":
            return Response.text("héllo", 201)
        if request.path == "/empty":
            return Response.empty()
        if request.path == "/denied":
            raise HTTPError(403, "no", headers=[("WWW-Authenticate", 'Bearer realm="x"')])
        if request.path == "/custom":
            raise HTTPError(404, body=b"nope", content_type="text/plain")
        if request.path == "/group":
            async with trio.open_nursery() as n:

                async def fail() -> None:
                    raise HTTPError(404, "blob unknown", code="BLOB_UNKNOWN")

                n.start_soon(fail)
        raise HTTPError(409)

    async with running(handler) as info, client(info) as c:
        r = await c.get("/text")
        assert (r.status_code, r.text) == (201, "héllo")
        assert r.headers["content-type"] == "text/plain; charset=utf-8"
        r = await c.get("/empty")
        assert r.status_code == 204 and r.content == b""
        r = await c.get("/denied")
        assert r.status_code == 403
        assert r.headers["www-authenticate"] == 'Bearer realm="x"'
        assert r.json() == {"errors": [{"code": "DENIED", "message": "no"}]}
        r = await c.get("/custom")
        assert (r.status_code, r.content, r.headers["content-type"]) == (
            404,
            b"nope",
            "text/plain",
        )
        r = await c.get("/group")
        assert r.status_code == 404
        assert r.json()["errors"][0]["code"] == "BLOB_UNKNOWN"
        r = await c.get("/other")
        assert r.status_code == 409
        assert r.json() == {"errors": [{"code": "CONFLICT", "message": "Conflict"}]}


# --------------------------------------------------------------------------- streaming


async def test_streaming_body_chunked_and_sized() -> None:
    async def gen(n: int, size: int) -> AsyncIterator[bytes]:
        for i in range(n):
            yield bytes([i % 256]) * size
            await trio.lowlevel.checkpoint()

    async def handler(request: Request) -> Response:
        if request.path == "/chunked":
            return Response(200, [], gen(50, 100_000))
        if request.path == "/sized":
            return Response(200, [("Content-Length", str(50 * 1000))], gen(50, 1000))
        if request.path == "/short":
            return Response(200, [("Content-Length", "5000")], gen(2, 1000))
        if request.path == "/long":
            return Response(200, [("Content-Length", "1500")], gen(2, 1000))
        return Response(200, [], gen(0, 0))

    expect = b"".join(bytes([i]) * 100_000 for i in range(50))
    async with running(handler) as info, client(info) as c:
        r = await c.get("/chunked")
        assert r.headers["transfer-encoding"] == "chunked"
        assert r.content == expect
        r = await c.get("/sized")
        assert r.headers["content-length"] == "50000"
        assert r.content == b"".join(bytes([i]) * 1000 for i in range(50))
        r = await c.get("/empty")
        assert r.content == b""
        h = await c.head("/chunked")
        assert h.content == b""
        for path in ("/short", "/long"):
            with pytest.raises(httpx.RemoteProtocolError):
                await c.get(path)
        assert (await c.get("/sized")).status_code == 200  # server still fine


async def test_stream_failing_before_first_chunk_is_an_error_status() -> None:
    async def bad() -> AsyncIterator[bytes]:
        raise NotFound("blob unknown upstream")
        yield b""  # pragma: no cover

    async def bad_http() -> AsyncIterator[bytes]:
        raise HTTPError(404, "gone")
        yield b""  # pragma: no cover

    async def handler(request: Request) -> Response:
        return Response(200, [], bad_http() if request.path == "/http" else bad())

    async with running(handler) as info, client(info) as c:
        assert (await c.get("/http")).status_code == 404
        assert (await c.get("/other")).status_code == 500


async def test_stream_failing_midway_truncates() -> None:
    async def gen() -> AsyncIterator[bytes]:
        yield b"a" * 1000
        raise RuntimeError("upstream died")

    async def handler(request: Request) -> Response:
        return Response(200, [], gen())

    async with running(handler) as info, client(info) as c:
        with pytest.raises(httpx.RemoteProtocolError):
            await c.get("/")


async def test_client_disconnect_mid_stream(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, LOGGER)
    closed = trio.Event()

    async def forever() -> AsyncIterator[bytes]:
        try:
            while True:
                yield b"z" * 65536
        finally:
            closed.set()

    async def handler(request: Request) -> Response:
        if request.path == "/forever":
            return Response(200, [], forever())
        return Response.text("ok")

    async with running(handler) as info:
        stream = await trio.open_tcp_stream(info.host, info.port)
        await stream.send_all(b"GET /forever HTTP/1.1\r\nHost: x\r\n\r\n")
        got = 0
        while got < 1 << 20:
            got += len(await stream.receive_some(65536))
        await stream.aclose()
        with trio.fail_after(5):
            await closed.wait()
        async with client(info) as c:
            assert (await c.get("/")).text == "ok"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


# --------------------------------------------------------------------------- files


@pytest.fixture
def data_file(tmp_path: Path) -> tuple[Path, bytes]:
    data = os.urandom(3 << 20)
    path = tmp_path / "blob"
    path.write_bytes(data)
    return path, data


async def test_file_body_ranges(data_file: tuple[Path, bytes]) -> None:
    path, data = data_file
    fds: list[int] = []

    async def handler(request: Request) -> Response:
        if request.path == "/whole":
            return Response(200, [], FileBody(str(path)))
        if request.path == "/fd":
            fd = os.open(path, os.O_RDONLY)
            fds.append(fd)
            return Response(200, [], FileBody(fd=fd, offset=5, length=1000))
        if request.path == "/range":
            rng = parse_range(request.headers.get("range"), len(data))
            if rng is None:
                return Response(200, [], FileBody(path))
            start, end = rng
            return Response(
                206,
                [("Content-Range", content_range(start, end, len(data)))],
                FileBody(path, start, end - start),
            )
        if request.path == "/beyond":
            return Response(200, [], FileBody(path, len(data) - 10, 20))
        return Response(200, [], FileBody(path, 12345, 0))

    async with running(handler) as info, client(info) as c:
        r = await c.get("/whole")
        assert r.content == data
        r = await c.get("/fd")
        assert r.content == data[5:1005]
        with pytest.raises(OSError) as err:  # the server closed the fd it was given
            os.fstat(fds[0])
        assert err.value.errno == errno.EBADF
        r = await c.get("/range", headers={"Range": "bytes=100-2000000"})
        assert r.status_code == 206
        assert r.headers["content-range"] == f"bytes 100-2000000/{len(data)}"
        assert r.content == data[100:2000001]
        r = await c.get("/range", headers={"Range": "bytes=-500"})
        assert r.content == data[-500:]
        r = await c.get("/range", headers={"Range": f"bytes={len(data)}-"})
        assert r.status_code == 416
        assert r.headers["content-range"] == f"bytes */{len(data)}"
        r = await c.get("/range", headers={"Range": "bytes=0-1,5-6"})
        assert (r.status_code, len(r.content)) == (200, len(data))
        r = await c.get("/beyond")
        assert r.status_code == 500
        r = await c.get("/zero")
        assert (r.status_code, r.content) == (200, b"")


def _write_file(path: Path, mib: int) -> None:
    block = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for i in range(mib):
            f.write(bytes([i % 256]) + block[1:])


async def test_file_body_64mib(tmp_path: Path) -> None:
    path = tmp_path / "big"
    _write_file(path, 64)

    async def handler(request: Request) -> Response:
        return Response(200, [], FileBody(path, 1, (64 << 20) - 2))

    async with running(handler) as info, client(info) as c:
        r = await c.get("/")
        assert r.content == path.read_bytes()[1:-1]


async def test_head_file_body_does_not_touch_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing"

    async def handler(request: Request) -> Response:
        return Response(200, [("Content-Type", "x/y")], FileBody(missing, 0, 4242))

    async with running(handler) as info, client(info) as c:
        h = await c.head("/")
        assert (h.status_code, h.headers["content-length"], h.content) == (200, "4242", b"")
        assert (await c.get("/")).status_code == 500  # GET would have to open it
        # the connection is still usable after the HEAD
        assert (await c.head("/")).headers["content-length"] == "4242"


async def test_file_body_fallback_without_sendfile(
    data_file: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, data = data_file

    def no_sendfile(*args: object) -> int:
        raise OSError(errno.EINVAL, "sendfile unsupported here")

    monkeypatch.setattr(os, "sendfile", no_sendfile)

    async def handler(request: Request) -> Response:
        return Response(200, [], FileBody(path, 7))

    async with running(handler) as info, client(info) as c:
        assert (await c.get("/")).content == data[7:]


async def test_client_disconnect_mid_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, LOGGER)
    path = tmp_path / "big"
    _write_file(path, 32)
    seen: list[tuple[int, int]] = []
    first_done = trio.Event()

    def hook(request: Request, status: int, sent: int, seconds: float) -> None:
        seen.append((status, sent))
        first_done.set()

    async def handler(request: Request) -> Response:
        return Response(200, [], FileBody(path))

    async with running(handler, ServerConfig(on_response=hook)) as info:
        stream = await trio.open_tcp_stream(info.host, info.port)
        await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        got = 0
        while got < 1 << 20:
            got += len(await stream.receive_some(65536))
        await stream.aclose()
        with trio.fail_after(5):
            await first_done.wait()
        async with client(info) as c:
            r = await c.get("/")
            assert len(r.content) == 32 << 20
    assert seen[0][0] == 200 and 0 < seen[0][1] < 32 << 20  # partial count reported
    assert seen[1] == (200, 32 << 20)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_head_releases_fd_and_stream(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"0123456789")
    fds: list[int] = []
    closed = trio.Event()

    async def gen() -> AsyncIterator[bytes]:
        try:
            yield b"never sent"
        finally:
            closed.set()

    async def handler(request: Request) -> Response:
        if request.path == "/fd":
            fd = os.open(path, os.O_RDONLY)
            fds.append(fd)
            return Response(200, [], FileBody(fd=fd, offset=2))
        g = gen()
        await anext(g)  # started: aclose must run its finally
        return Response(200, [("Content-Length", "10")], g)

    async with running(handler) as info, client(info) as c:
        h = await c.head("/fd")
        assert (h.headers["content-length"], h.content) == ("8", b"")
        with pytest.raises(OSError):
            os.fstat(fds[0])
        h = await c.head("/stream")
        assert (h.headers["content-length"], h.content) == ("10", b"")
        assert closed.is_set()


async def test_read_timeout_is_408() -> None:
    async def handler(request: Request) -> Response:
        return Response(200, [], await request.read_body())

    async with running(handler, ServerConfig(read_timeout=0.2)) as info:
        out = await raw_exchange(
            info, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc"
        )
        assert out.startswith(b"HTTP/1.1 408 ")
        assert b"connection: close" in out.lower()


# --------------------------------------------------------------------------- parse_range


@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [
        (None, 100, None),
        ("bytes=0-", 100, (0, 100)),
        ("bytes=10-19", 100, (10, 20)),
        ("bytes=10-1000", 100, (10, 100)),
        ("bytes=99-99", 100, (99, 100)),
        ("bytes=-500", 1000, (500, 1000)),
        ("bytes=-500", 100, (0, 100)),
        ("BYTES = 5-6", 100, (5, 7)),
        ("bytes=10-5", 100, None),  # invalid range-spec: ignored
        ("bytes=0-1,5-6", 100, None),  # multi-range: ignored, serve 200
        ("bytes=-", 100, None),
        ("bytes=a-b", 100, None),
        ("bytes=1_0-20", 100, None),
        ("bytes=+1-2", 100, None),
        ("bytes=１-2", 100, None),  # non-ASCII digit
        ("items=0-5", 100, None),
        ("garbage", 100, None),
        ("", 100, None),
        ("bytes=-5", 0, None),
    ],
)
def test_parse_range(header: str | None, size: int, expected: tuple[int, int] | None) -> None:
    assert parse_range(header, size) == expected


@pytest.mark.parametrize(
    ("header", "size"),
    [("bytes=100-", 100), ("bytes=100-200", 100), ("bytes=-0", 100), ("bytes=0-", 0)],
)
def test_parse_range_unsatisfiable(header: str, size: int) -> None:
    with pytest.raises(RangeNotSatisfiable) as err:
        parse_range(header, size)
    assert err.value.status == 416
    assert ("Content-Range", f"bytes */{size}") in err.value.headers


# --------------------------------------------------------------------------- request bodies


async def test_read_body_and_limit() -> None:
    async def handler(request: Request) -> Response:
        body = await request.read_body(limit=1000)
        assert await request.read_body(limit=1000) == body  # cached
        return Response(200, [], body[::-1])

    async def chunks(n: int) -> AsyncIterator[bytes]:
        for _ in range(n):
            yield b"ab" * 50

    async with running(handler) as info, client(info) as c:
        r = await c.post("/", content=b"0123456789")
        assert r.content == b"9876543210"
        r = await c.post("/", content=chunks(5))  # chunked upload
        assert r.content == (b"ab" * 250)[::-1]
        r = await c.post("/", content=b"x" * 1001)
        assert r.status_code == 413
        assert r.json()["errors"][0]["code"] == "REQUEST_ENTITY_TOO_LARGE"
        r = await c.post("/", content=chunks(11))  # chunked, too long
        assert r.status_code == 413
        assert (await c.post("/", content=b"ok")).content == b"ko"


async def test_unread_body_is_drained_and_connection_reused() -> None:
    async def handler(request: Request) -> Response:
        return Response.json(list(request.client))

    async with running(handler) as info, client(info) as c:
        a = (await c.post("/", content=b"x" * 100_000)).json()
        b = (await c.post("/", content=b"y" * 10)).json()
        assert a == b


async def test_expect_100_continue() -> None:
    async def handler(request: Request) -> Response:
        return Response(200, [], await request.read_body())

    async with running(handler) as info:
        stream = await trio.open_tcp_stream(info.host, info.port)
        async with stream:
            await stream.send_all(
                b"PUT / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                b"Expect: 100-continue\r\nConnection: close\r\n\r\n"
            )
            with trio.fail_after(5):
                first = await stream.receive_some(65536)
            assert first.startswith(b"HTTP/1.1 100 ")
            await stream.send_all(b"hello")
            out = bytearray()
            with trio.fail_after(5):
                while chunk := await stream.receive_some(65536):
                    out += chunk
            assert out.startswith(b"HTTP/1.1 200 OK") and out.endswith(b"hello")


# --------------------------------------------------------------------------- robustness


async def test_malformed_request_400_and_server_keeps_serving(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, LOGGER)
    async with running(echo) as info:
        for garbage in (
            b"THIS IS NOT HTTP\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: banana\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"GET / HTTP/1.1\r\n\r\n",  # no Host
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(64),  # TLS hello
        ):
            out = await raw_exchange(info, garbage)
            assert out.startswith(b"HTTP/1.1 400 "), (garbage, out[:80])
            assert b"connection: close" in out.lower()
            assert b'"errors"' in out
        out = await raw_exchange(info, b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 70000)
        assert out.startswith(b"HTTP/1.1 431 ")
        out = await raw_exchange(
            info, b"GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n"
        )
        assert out.startswith(b"HTTP/1.1 501 ")
        out = await raw_exchange(info, b"GET /ok HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 200 OK")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_bad_chunked_body_is_400() -> None:
    async def handler(request: Request) -> Response:
        return Response(200, [], await request.read_body())

    async with running(handler) as info:
        out = await raw_exchange(
            info,
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nZZZ\r\nabc\r\n",
        )
        assert out.startswith(b"HTTP/1.1 400 ")


async def test_handler_exception_is_500_with_traceback(caplog: pytest.LogCaptureFixture) -> None:
    async def handler(request: Request) -> Response:
        if request.path == "/boom":
            raise ZeroDivisionError("boom")
        if request.path == "/notresponse":
            return "oops"  # type: ignore[return-value]
        return Response.text("fine")

    async with running(handler) as info, client(info) as c:
        r = await c.get("/boom")
        assert r.status_code == 500
        assert r.json() == {"errors": [{"code": "UNKNOWN", "message": "internal error"}]}
        assert (await c.get("/notresponse")).status_code == 500
        assert (await c.get("/")).text == "fine"
    errors = [r for r in caplog.records if r.name == LOGGER and r.levelno >= logging.ERROR]
    assert errors and errors[0].exc_info is not None
    assert errors[0].exc_info[0] is ZeroDivisionError


async def test_slowloris_cut_after_header_timeout() -> None:
    config = ServerConfig(header_timeout=0.3, keepalive_timeout=5)
    async with running(echo, config) as info:
        stream = await trio.open_tcp_stream(info.host, info.port)
        async with stream:
            await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
            start = time.monotonic()
            with trio.fail_after(5):
                while True:  # keep trickling; the deadline counts from the first byte
                    try:
                        await stream.send_all(b"X")
                    except trio.BrokenResourceError:
                        break
                    with trio.move_on_after(0.05):
                        if await stream.receive_some(100) == b"":
                            break
            assert 0.25 < time.monotonic() - start < 3
        # an idle new connection is cut after header_timeout as well
        start = time.monotonic()
        assert await raw_exchange(info, b"") == b""
        assert time.monotonic() - start < 3


async def test_keepalive_timeout_closes_idle_connection() -> None:
    config = ServerConfig(keepalive_timeout=0.2)
    async with running(echo, config) as info:
        stream = await trio.open_tcp_stream(info.host, info.port)
        async with stream:
            await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            out = bytearray()
            with trio.fail_after(5):
                while chunk := await stream.receive_some(65536):
                    out += chunk
            assert out.startswith(b"HTTP/1.1 200 OK")


async def test_on_response_hook() -> None:
    seen: list[tuple[str, int, int, float]] = []

    def hook(request: Request, status: int, sent: int, seconds: float) -> None:
        seen.append((request.path, status, sent, seconds))
        if request.path == "/hookfails":
            raise RuntimeError("hook bug")

    async def handler(request: Request) -> Response:
        if request.path == "/missing":
            raise HTTPError(404)
        return Response(200, [], b"12345")

    async with running(handler, ServerConfig(on_response=hook)) as info, client(info) as c:
        await c.get("/a")
        await c.head("/a")
        await c.get("/missing")
        await c.get("/hookfails")
        assert (await c.get("/b")).content == b"12345"
    assert [(p, s, n) for p, s, n, _ in seen] == [
        ("/a", 200, 5),
        ("/a", 200, 0),
        ("/missing", 404, len(b'{"errors":[{"code":"NOT_FOUND","message":"Not Found"}]}')),
        ("/hookfails", 200, 5),
        ("/b", 200, 5),
    ]
    assert all(s >= 0 for *_, s in seen)


async def test_cancelling_the_server_closes_listener_and_connections() -> None:
    entered = trio.Event()

    async def handler(request: Request) -> Response:
        entered.set()
        await trio.sleep_forever()
        raise AssertionError  # pragma: no cover

    async with trio.open_nursery() as nursery:
        cancel_scope = trio.CancelScope()

        async def run(task_status: trio.TaskStatus[ServerInfo]) -> None:
            with cancel_scope:
                await serve_http(handler, "127.0.0.1", 0, task_status=task_status)

        info: ServerInfo = await nursery.start(run)
        idle = await trio.open_tcp_stream(info.host, info.port)
        busy = await trio.open_tcp_stream(info.host, info.port)
        await busy.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await entered.wait()
        cancel_scope.cancel()
    with trio.fail_after(5):
        assert await idle.receive_some(10) == b""
        assert await busy.receive_some(10) == b""
    with pytest.raises(OSError):
        await trio.open_tcp_stream(info.host, info.port)


async def test_max_connections_queues_extra_clients() -> None:
    release = trio.Event()

    async def handler(request: Request) -> Response:
        if request.path == "/hold":
            await release.wait()
        return Response.text(request.path)

    async with running(handler, ServerConfig(max_connections=1)) as info:
        async with trio.open_nursery() as nursery:
            results: list[str] = []

            async def get(path: str) -> None:
                async with client(info) as c:
                    results.append((await c.get(path)).text)

            nursery.start_soon(get, "/hold")
            await trio.sleep(0.2)
            nursery.start_soon(get, "/second")
            await trio.sleep(0.3)
            assert results == []  # the second connection waits for a slot
            release.set()
        assert sorted(results) == ["/hold", "/second"]


# --------------------------------------------------------------------------- units


def test_headers() -> None:
    h = Headers([(b"Accept", b"a/b"), ("accept", "c/d"), ("Authorization", "Bearer s3cret")])
    assert h.get("ACCEPT") == "a/b, c/d"
    assert h.get_all("accept") == ["a/b", "c/d"]
    assert h.get("missing") is None and h.get_all("missing") == []
    assert "Accept" in h and len(h) == 3
    assert next(iter(h)) == ("accept", "a/b")
    assert "s3cret" not in repr(h)


async def test_request_make_for_handler_unit_tests() -> None:
    req = Request.make("POST", "/p%2Fq?a=1", headers=[("X", "y")], body=b"{}")
    assert (req.path, req.query, req.headers.get("x")) == ("/p/q", {"a": ["1"]}, "y")
    assert await req.read_body() == b"{}"
    with pytest.raises(HTTPError) as err:
        await req.read_body(limit=1)
    assert err.value.status == 413
    absolute = Request.make("GET", "http://host:1/v2/?ns=x")
    assert (absolute.path, absolute.query) == ("/v2/", {"ns": ["x"]})
    assert Request.make("GET", "//double/slash").path == "//double/slash"


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        ServerConfig(header_timeout=0)
    with pytest.raises(ValueError):
        FileBody()
    with pytest.raises(ValueError):
        FileBody("x", fd=3)


async def test_filebody_on_done_runs_once_after_the_body(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(os.urandom(1 << 20))
    done: list[str] = []
    third = trio.Event()

    def on_done() -> None:
        done.append("x")
        if len(done) == 3:
            third.set()

    async def handler(request: Request) -> Response:
        fd = os.open(path, os.O_RDONLY)
        return Response(200, [], FileBody(fd=fd, offset=0, length=1 << 20, on_done=on_done))

    async with running(handler) as info, client(info) as c:
        r = await c.get("/")
        assert len(r.content) == 1 << 20
        assert done == ["x"]
        r = await c.head("/")
        assert r.headers["content-length"] == str(1 << 20)
        assert done == ["x", "x"]
        # a client that goes away mid-body: still exactly once
        async with c.stream("GET", "/") as resp:
            async for _ in resp.aiter_raw():
                break
        with trio.fail_after(5):
            await third.wait()
        await trio.sleep(0.1)
        assert done == ["x", "x", "x"]
