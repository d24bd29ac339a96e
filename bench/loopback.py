"""The rollout harness's network without root: every host on its own loopback address,
the links shaped by the daemons' own bandwidth limits and by a relay in front of the
registry.

``python -m bench rollout --mode p2p`` run by a user who is not root (or with
``--network loopback``) uses :class:`LoopbackNetwork` instead of
:class:`bench.netns.EmulatedNetwork`.  It has the same shape (``origin``, ``scheduler``,
``node_hosts``, ``popen``, ``counters``), so the harness runs unchanged:

- node ``i`` listens on ``127.B.1.(i+1)`` (Linux answers on all of 127.0.0.0/8 with no
  set-up; B is 100-199, from the process id, so that two runs at once do not meet), the
  scheduler on ``127.B.0.3``;
- each daemon runs with ``--download-rate`` and ``--upload-rate`` at the node rate
  (:mod:`p2pdist.ratelimit`: every byte in, from peers and registry, and every byte out
  to peers, paced by one token bucket each);
- the registry listens on a free port of 127.0.0.1 and the nodes reach it through
  :class:`OriginShaper` on ``127.B.0.2:5000``: a TCP relay whose answers share one token
  bucket at the origin rate (the origin's uplink) and which counts every byte it relays
  (the registry's egress, as the origin interface's counters do in the namespaced run).

What it cannot show: the kernel's queues and TCP's reaction to a full link (the limits
pace reads and writes in user space, the loopback itself is unlimited), and a node's
rx/tx outside the daemon's own account (``counters()`` of a node is None: the per-node
bytes come from the daemons' blob stats).  The relay counts TCP payload, so there are no
frame heads to subtract.  Registry mode needs ``tc`` (the standalone client has no rate
limit), so without root only ``--mode p2p`` runs.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, TypeVar

import trio

from p2pdist.ratelimit import RateLimiter

from .netns import spawn

__all__ = ["LoopbackHost", "LoopbackNetwork", "OriginShaper"]

T = TypeVar("T")

CHUNK = 64 << 10


@dataclass
class LoopbackHost:
    """One host of :class:`LoopbackNetwork`: an address on loopback."""

    role: str  # "origin", "scheduler", "node"
    address: str
    mbit: float | None
    index: int = -1
    shaper: OriginShaper | None = None

    @property
    def name(self) -> str:
        return f"n{self.index}" if self.role == "node" else self.role

    @property
    def local_address(self) -> str:
        """Where the host's own daemon API listens (a namespaced host has a loopback of
        its own; here the host's address)."""
        return self.address

    def call(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        return fn(*args, **kwargs)

    def counters(self) -> dict[str, int] | None:
        """The origin's: what its relay sent and received; a node's: None (no
        interface of its own to count on)."""
        return None if self.shaper is None else self.shaper.counters()


class OriginShaper:
    """A TCP relay ``listen`` → ``upstream`` in a thread of its own (a trio loop): the
    upstream's answers to every connection together leave at most ``rate`` bytes/s (one
    token bucket: the origin's uplink), and every byte is counted."""

    def __init__(self, listen: tuple[str, int], upstream: tuple[str, int], rate: float) -> None:
        self.listen = listen
        self.upstream = upstream
        self.rate = rate
        self.tx_bytes = 0
        self.rx_bytes = 0
        self.connections = 0
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._scope: trio.CancelScope | None = None
        self._limiter = RateLimiter(rate)

    def counters(self) -> dict[str, int]:
        with self._lock:
            return {
                "rx_bytes": self.rx_bytes,
                "tx_bytes": self.tx_bytes,
                "rx_packets": 0,
                "tx_packets": 0,
            }

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="origin-shaper", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the origin relay did not start")
        if self._error is not None:
            raise RuntimeError(f"the origin relay: {self._error}") from self._error

    def stop(self) -> None:
        if self._thread is None:
            return
        if self._token is not None and self._scope is not None:
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(self._scope.cancel, trio_token=self._token)
        self._thread.join(10)
        self._thread = None

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:  # reported to start(); the thread ends
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        with trio.CancelScope() as scope:
            self._scope = scope
            host, port = self.listen
            listeners = await trio.open_tcp_listeners(port, host=host)
            self._ready.set()
            await trio.serve_listeners(self._relay, listeners)

    async def _relay(self, client: trio.SocketStream) -> None:
        limiter = self._limiter
        self.connections += 1
        async with client:
            try:
                upstream = await trio.open_tcp_stream(*self.upstream)
            except OSError:
                return
            async with upstream, trio.open_nursery() as nursery:

                async def pump(src: trio.abc.Stream, dst: trio.abc.Stream, out: bool) -> None:
                    try:
                        while data := await src.receive_some(CHUNK):
                            if out:
                                await limiter.take(len(data))
                            await dst.send_all(data)
                            with self._lock:
                                if out:
                                    self.tx_bytes += len(data)
                                else:
                                    self.rx_bytes += len(data)
                    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                        pass
                    nursery.cancel_scope.cancel()  # either side gone: the connection is

                nursery.start_soon(pump, client, upstream, False)
                nursery.start_soon(pump, upstream, client, True)


@dataclass
class LoopbackNetwork:
    """The hosts of a rollout on loopback (see the module docstring); a context manager
    that stops the relay and every process it started."""

    nodes: int
    node_mbit: float
    origin_mbit: float
    registry_port: int
    """The origin's port (the relay's) as the nodes see it."""
    say: Callable[[str], None] | None = None
    origin: LoopbackHost = field(init=False)
    scheduler: LoopbackHost = field(init=False)
    node_hosts: list[LoopbackHost] = field(init=False)
    mtu: None = None
    latency_ms: None = None
    _procs: list[subprocess.Popen[bytes]] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        if not 1 <= self.nodes <= 250:
            raise ValueError("nodes must be 1..250 on loopback")
        # A block of 127/8 of this run's own (two runs at once, e.g. a test beside a
        # benchmark, must not meet on the same addresses and ports).
        net = f"127.{100 + os.getpid() % 100}"
        self.origin = LoopbackHost("origin", f"{net}.0.2", self.origin_mbit)
        self.scheduler = LoopbackHost("scheduler", f"{net}.0.3", None)
        self.node_hosts = [
            LoopbackHost("node", f"{net}.1.{i + 1}", self.node_mbit, i) for i in range(self.nodes)
        ]

    def all_hosts(self) -> list[LoopbackHost]:
        return [self.origin, self.scheduler, *self.node_hosts]

    def shape_origin(self, registry: tuple[str, int]) -> None:
        """Put the relay (at the origin rate) between the nodes and the registry."""
        shaper = OriginShaper(
            (self.origin.address, self.registry_port), registry, self.origin_mbit * 1e6 / 8
        )
        shaper.start()
        self.origin.shaper = shaper
        if self.say is not None:
            self.say(
                f"network: loopback, {self.nodes} nodes at {self.node_mbit:g} Mbit/s (the "
                f"daemons' own limits), origin relay at {self.origin_mbit:g} Mbit/s on "
                f"{self.origin.address}:{self.registry_port}"
            )

    def daemon_args(self) -> list[str]:
        """A node daemon's flags for its link."""
        rate = f"{self.node_mbit:g}Mbit"
        return ["--download-rate", rate, "--upload-rate", rate]

    def popen(
        self,
        host: object,
        argv: Sequence[str],
        *,
        log: IO[bytes] | None = None,
        stdin: int | None = subprocess.DEVNULL,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` (for ``host``: every host shares this machine's loopback), in a
        session of its own; it is killed by :meth:`close` if still running."""
        proc = spawn(argv, log=log, stdin=stdin, env=env, cwd=cwd)
        self._procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(5)
        self._procs.clear()
        if self.origin.shaper is not None:
            self.origin.shaper.stop()
            self.origin.shaper = None

    def __enter__(self) -> LoopbackNetwork:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
