"""The scheduler holds an ``Assign`` that has nothing yet (a long poll) and answers it as
soon as the task changes; daemons use it, and fall back to asking at once when the
scheduler is one from before long polls.  A real scheduler on loopback, real HTTP."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest
import trio

import scheduler.service as service
from p2pdist.digest import Digest
from p2pdist.httpserver import HTTPError, Request, Response, serve_http
from p2pdist.peerclient import PeerConnections
from p2pdist.schedclient import SchedulerClient
from scheduler import Scheduler
from scheduler._codec import decode_answer, decode_event, encode
from scheduler._events import (
    Announce,
    Answer,
    Assign,
    Assignment,
    Event,
    RegisterHost,
    ReportPieces,
    StartTask,
)

D = "sha256:" + hashlib.sha256(b"long poll").hexdigest()
PIECE = 1 << 20
SIZE = 2 * PIECE  # one source run: a leases it all, b can only wait for a
H0 = hashlib.sha256(b"piece 0").hexdigest()


@asynccontextmanager
async def running_scheduler(handler: object = None) -> AsyncIterator[tuple[str, httpx.AsyncClient]]:
    """A scheduler on 127.0.0.1 (``handler`` in front of it, when given) and a client."""
    svc = service.SchedulerService(Scheduler())
    async with trio.open_nursery() as nursery:
        info = await nursery.start(serve_http, handler or svc.handle, "127.0.0.1", 0)
        async with httpx.AsyncClient(base_url=info.url, trust_env=False) as http:
            yield info.url, http
        nursery.cancel_scope.cancel()


async def send(http: httpx.AsyncClient, event: Event) -> Answer:
    resp = await http.post("/api/v1/events", json=encode(event), timeout=10.0)
    assert resp.status_code == 200, resp.text
    return decode_answer(resp.json())


async def two_hosts(http: httpx.AsyncClient) -> list[int]:
    """Hosts a and b on task D; a holds the source lease of the first pieces."""
    for h in ("a", "b"):
        await send(http, RegisterHost(h, f"{h}:7000"))
        await send(http, StartTask(h, D, SIZE, PIECE))
    lease = await send(http, Assign("a", D, 16))
    assert isinstance(lease, Assignment) and lease.from_source
    return lease.from_source


async def test_a_held_assign_is_answered_as_soon_as_a_piece_is_reported() -> None:
    async with running_scheduler() as (_, http):
        leased = await two_hosts(http)
        # b would have to wait for a's pieces: nothing for it now, asked at once...
        now = await send(http, Assign("b", D, 16, wait=0.0))
        assert isinstance(now, Assignment) and not now.from_peers and now.retry_after > 0
        # ... held: answered when a reports its first piece, 0.3 s later.
        answer: list[Answer] = []

        async def ask() -> None:
            answer.append(await send(http, Assign("b", D, 16, wait=1.5)))

        started = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask)
            await trio.sleep(0.3)
            assert not answer  # held
            await send(http, ReportPieces("a", D, (leased[0],), {leased[0]: H0}, True))
        took = trio.current_time() - started
        got = answer[0]
        assert isinstance(got, Assignment)
        assert [(p.piece, p.parent_id) for p in got.from_peers] == [(leased[0], "a")]
        assert got.piece_hashes == {leased[0]: H0}
        assert 0.3 <= took < 1.0, took


async def test_a_held_assign_with_nothing_new_gets_retry_after_when_its_wait_ends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with running_scheduler() as (_, http):
        await two_hosts(http)
        started = trio.current_time()
        got = await send(http, Assign("b", D, 16, wait=0.4))
        took = trio.current_time() - started
        assert isinstance(got, Assignment) and not got.from_peers and not got.from_source
        assert got.retry_after > 0 and not got.done
        assert 0.4 <= took < 0.9, took
        # A wait longer than the cap is cut to it (the daemon's request timeout is 5 s).
        monkeypatch.setattr(service, "MAX_ASSIGN_WAIT", 0.2)
        started = trio.current_time()
        await send(http, Assign("b", D, 16, wait=1e9))
        assert trio.current_time() - started < 0.6
        # A negative wait is answered at once; NaN is not a number the codec takes.
        for wait, status in ((-1.0, 200), (float("nan"), 400)):
            started = trio.current_time()
            body = encode(Assign("b", D, 16))
            body["wait"] = wait
            resp = await http.post("/api/v1/events", content=json.dumps(body))
            assert resp.status_code == status, resp.text
            assert trio.current_time() - started < 0.15


async def test_daemon_asks_an_old_scheduler_without_wait() -> None:
    """A scheduler from before long polls refuses the field; the client asks it the old
    way from then on, and its downloads go on."""
    svc = service.SchedulerService(Scheduler())
    refused: list[str] = []

    async def old_scheduler(request: Request) -> Response:
        if request.path == "/api/v1/events":
            body = await request.read_body(1 << 20)
            event = json.loads(body)
            if "wait" in event:
                refused.append(event["type"])
                raise HTTPError(400, f"invalid event: {event['type']}: unknown fields ['wait']")
            return Response.json(encode(svc.scheduler.handle(decode_event(event), 0.0)))
        raise HTTPError(404, "not found")

    async with running_scheduler(old_scheduler) as (url, http):
        conns = PeerConnections()

        async def nothing() -> list[Announce]:
            return []

        client = SchedulerClient(
            [url], RegisterHost("c", "c:7000"), http=http, announcements=nothing, lean=conns
        )
        digest = Digest.parse(D)
        await client.start_task(digest, SIZE, PIECE)
        first = await client.assign(digest, 16, wait=1.0)
        second = await client.assign(digest, 16, wait=1.0)
        await conns.aclose()
    assert first.from_source and second.retry_after >= 0
    assert refused == ["Assign"]  # asked with wait once, then never again


async def test_asking_again_ends_the_held_assign_without_assigning_it_anything() -> None:
    """A client that timed out and asks again: the first question (nobody reads its
    answer) ends with nothing, so no piece is assigned to it; the second gets the piece."""
    async with running_scheduler() as (_, http):
        leased = await two_hosts(http)
        answers: dict[str, tuple[float, Answer]] = {}
        started = trio.current_time()

        async def ask(name: str) -> None:
            got = await send(http, Assign("b", D, 16, wait=1.5))
            answers[name] = (trio.current_time() - started, got)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask, "first")
            await trio.sleep(0.2)
            nursery.start_soon(ask, "second")
            await trio.sleep(0.2)
            assert "first" in answers and "second" not in answers
            await send(http, ReportPieces("a", D, (leased[0],), {leased[0]: H0}, True))
        took, first = answers["first"]
        assert isinstance(first, Assignment) and not first.from_peers and took < 0.35
        second = answers["second"][1]
        assert isinstance(second, Assignment)
        assert [p.piece for p in second.from_peers] == [leased[0]]
