"""``p2pdist preheat IMAGE``: warm an image on chosen nodes before a rollout.

The command talks to the scheduler only (``POST /api/v1/preheat``, then ``GET
/api/v1/preheat/<id>`` every ``interval`` seconds): the scheduler picks the nodes (one,
``--nodes N``, ``--percent P`` or ``--all``) and each chosen daemon resolves the image
and fetches every blob through the swarm (:mod:`p2pdist.preheater`).  A progress line is
printed whenever a node's progress changes; the command returns when every chosen node
holds every blob, verified, and raises :class:`~p2pdist.errors.PreheatFailed` when a node
fails (with that node's exit code) or ``timeout`` passes (the job goes on in the swarm).
"""

from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import trio

from .clusterauth import token_headers
from .errors import (
    EXIT_NETWORK,
    NetworkError,
    NotFound,
    PreheatFailed,
    Unauthorized,
    UsageError,
)
from .progress import format_bytes
from .reference import parse_reference

__all__ = ["PreheatRequest", "format_node", "format_status", "run_preheat"]


@dataclass(frozen=True, slots=True, kw_only=True)
class PreheatRequest:
    image: str
    scheduler: str
    """The scheduler's base URL (``http://host:port``)."""
    nodes: int | None = None
    percent: float | None = None
    all: bool = False
    platform: str | None = None
    timeout: float = 600.0
    interval: float = 1.0
    quiet: bool = False
    token: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if sum((self.nodes is not None, self.percent is not None, self.all)) > 1:
            raise UsageError("give at most one of --nodes, --percent, --all")
        if self.nodes is not None and self.nodes < 1:
            raise UsageError(f"--nodes must be at least 1, not {self.nodes}")
        if self.percent is not None and not 0 < self.percent <= 100:
            raise UsageError(f"--percent must be more than 0 and at most 100, not {self.percent:g}")
        if not self.timeout > 0:
            raise UsageError("--timeout must be more than 0 seconds")
        if re.fullmatch(r"https?://[^\s/?#@]+/?", self.scheduler) is None:
            raise UsageError(
                f"invalid scheduler URL {self.scheduler[:80]!r}: expected http://HOST:PORT"
            )

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"image": self.image}
        if self.platform:
            body["platform"] = self.platform
        if self.nodes is not None:
            body["nodes"] = self.nodes
        elif self.percent is not None:
            body["percent"] = self.percent
        elif self.all:
            body["all"] = True
        return body


def format_node(node: dict[str, Any]) -> str:
    """``n0: running, 2/4 blobs, 3.0 MiB/6.1 MiB`` (or ``failed: why``)."""
    state = node.get("state", "?")
    text = f"{node.get('host_id', '?')}: {state}"
    if node.get("blobs_total"):
        text += (
            f", {node.get('blobs_done', 0)}/{node['blobs_total']} blobs, "
            f"{format_bytes(node.get('bytes_done', 0))}/{format_bytes(node.get('bytes_total', 0))}"
        )
    if state == "failed" and node.get("error"):
        text += f": {node['error']}"
    return text


#: Up to this many nodes, a progress line shows each; beyond, counts per state.
DETAILED_NODES = 8


def _some_nodes(nodes: list[dict[str, Any]], most: int = DETAILED_NODES) -> str:
    shown = "; ".join(format_node(n) for n in nodes[:most])
    return shown + (f"; and {len(nodes) - most} more" if len(nodes) > most else "")


def format_status(status: dict[str, Any]) -> str:
    """One progress line: nodes done, bytes over all nodes, and each node's state (counts
    per state, and the failed nodes, when there are many)."""
    nodes = status.get("nodes", [])
    done = sum(n.get("bytes_done", 0) for n in nodes)
    total = sum(n.get("bytes_total", 0) for n in nodes)
    head = f"preheat {status.get('id', '?')}: {status.get('nodes_done', 0)}/{len(nodes)} nodes done"
    if total:
        head += f", {format_bytes(done)}/{format_bytes(total)}"
    if len(nodes) <= DETAILED_NODES:
        return head + " [" + _some_nodes(nodes) + "]"
    counts: dict[str, int] = {}
    for n in nodes:
        counts[str(n.get("state"))] = counts.get(str(n.get("state")), 0) + 1
    tail = ", ".join(f"{state} {count}" for state, count in sorted(counts.items()))
    failed = [n for n in nodes if n.get("state") == "failed"]
    if failed:
        tail += "; " + _some_nodes(failed, 3)
    return head + " [" + tail + "]"


def _say(req: PreheatRequest, text: str) -> None:
    if not req.quiet:
        print(text, file=sys.stderr, flush=True)


def _error_message(resp: httpx.Response) -> str:
    try:
        errors = resp.json().get("errors") or []
        return " ".join(str(errors[0].get("message", "")).split())[:300]
    except (ValueError, AttributeError, IndexError, TypeError):
        return resp.text[:200].strip() or resp.reason_phrase


def _check(resp: httpx.Response, scheduler: str) -> dict[str, Any]:
    status = resp.status_code
    if status in (200, 201):
        try:
            data = resp.json()
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise NetworkError(f"scheduler {scheduler} answered something that is not JSON")
        return data
    message = _error_message(resp)
    if status in (400, 409):
        raise UsageError(f"the scheduler refused the preheat: {message}")
    if status == 401:
        raise Unauthorized(
            f"scheduler {scheduler}: cluster token missing or wrong (set --cluster-token-file "
            "or P2PDIST_CLUSTER_TOKEN)",
            status=401,
        )
    if status == 404:
        raise NotFound(f"scheduler {scheduler}: {message}", status=404)
    raise NetworkError(f"scheduler {scheduler} answered {status}: {message}")


async def run_preheat(req: PreheatRequest) -> dict[str, Any]:
    """Create the job, follow it to the end; the final status (a dict, as the API gives
    it).  Raises :class:`PreheatFailed` if a node failed or ``req.timeout`` passed."""
    ref = parse_reference(req.image)  # InvalidReference (exit 2) before any network
    req_body = {**req.body(), "image": str(ref)}
    base = req.scheduler.rstrip("/")
    started = time.monotonic()
    async with httpx.AsyncClient(
        trust_env=False, timeout=10.0, headers=token_headers(req.token)
    ) as http:

        async def call(method: str, path: str, body: Any = None) -> dict[str, Any]:
            try:
                resp = await http.request(
                    method, f"{base}{path}", content=None if body is None else json.dumps(body)
                )
            except httpx.HTTPError as exc:
                raise NetworkError(
                    f"scheduler {base} unreachable: {type(exc).__name__}: {exc}"[:300]
                ) from None
            return _check(resp, base)

        status = await call("POST", "/api/v1/preheat", req_body)
        job_id = str(status.get("id", ""))
        chosen = [str(n.get("host_id")) for n in status.get("nodes", [])]
        _say(
            req,
            f"preheat {job_id}: {status.get('image')} on {len(chosen)} "
            f"node{'s' if len(chosen) != 1 else ''} ({', '.join(chosen)})",
        )
        last_line = ""
        unreachable = False
        with trio.move_on_after(req.timeout) as scope:
            while True:
                line = format_status(status)
                if line != last_line:
                    _say(req, f"[{time.monotonic() - started:5.1f}s] {line}")
                    last_line = line
                if status.get("state") != "running":
                    break
                await trio.sleep(req.interval)
                try:
                    status = await call("GET", f"/api/v1/preheat/{job_id}")
                    unreachable = False
                except NetworkError as exc:
                    # A blip or a scheduler restarting: the job goes on in the swarm;
                    # keep asking until the timeout.
                    if not unreachable:
                        _say(req, f"{exc}; retrying")
                    unreachable = True
                except NotFound:
                    raise PreheatFailed(
                        f"scheduler {base} no longer knows preheat job {job_id} (restarted?); "
                        "the nodes may have finished it: run the preheat again to check"
                    ) from None
        nodes = status.get("nodes", [])
        done = [n for n in nodes if n.get("state") == "done"]
        if scope.cancelled_caught:
            waiting = _some_nodes([n for n in nodes if n.get("state") != "done"], 5)
            raise PreheatFailed(
                f"preheat {job_id} not finished after {req.timeout:g}s: "
                f"{len(done)}/{len(nodes)} nodes done ({waiting})"
            )
        failed = [n for n in nodes if n.get("state") == "failed"]
        if failed:
            first = failed[0]
            code = first.get("exit_code")
            names = ", ".join(str(n.get("host_id")) for n in failed[:5])
            if len(failed) > 5:
                names += f" and {len(failed) - 5} more"
            raise PreheatFailed(
                f"preheat {job_id} failed on {names}"
                f" ({len(done)}/{len(nodes)} nodes done): {first.get('host_id')}: "
                f"{first.get('error') or 'failed'}",
                exit_code=code if isinstance(code, int) else EXIT_NETWORK,
            )
        size = max((n.get("bytes_total", 0) for n in nodes), default=0)
        blobs = max((n.get("blobs_total", 0) for n in nodes), default=0)
        _say(
            req,
            f"preheated {status.get('image')} ({status.get('manifest') or 'digest unknown'}) on "
            f"{len(done)} node{'s' if len(done) != 1 else ''} ({', '.join(chosen)}): "
            f"{blobs} blobs, {format_bytes(size)} each, in {time.monotonic() - started:.1f}s",
        )
        return status
