"""An emulated cluster network on one machine: Linux network namespaces, veth links into a
bridge, every link shaped in both directions with ``tc tbf`` (this kernel has no netem, so
there is bandwidth but no added latency).

    with EmulatedNetwork(nodes=8, node_mbit=100, origin_mbit=100) as net:
        net.origin.address                      # 10.77.0.2: the registry's namespace
        net.scheduler.address                   # 10.77.0.3: unshaped
        node = net.node_hosts[3]
        node.address                            # 10.77.1.4
        proc = net.popen(node, argv, log=f)     # argv runs inside node 3's netns
        node.call(http_json, url)               # any Python call, its sockets in that netns
        node.counters()                         # its eth0: rx/tx bytes and packets

Layout (``<run>`` = ``<our pid>-<counter>``, so concurrent runs never collide and a
leftover names the process that made it)::

    netns p2pd-<run>-br   bridge "br0", one veth end per host ("or", "sc", "n0", "n1", ...)
    netns p2pd-<run>-or   origin (registry)   eth0 10.77.0.2/16   shaped at origin_mbit
    netns p2pd-<run>-sc   scheduler           eth0 10.77.0.3/16   not shaped
    netns p2pd-<run>-n<i> node i              eth0 10.77.1.1+i/16 shaped at node_mbit

Both ends of a veth are created directly inside their namespaces (``ip -n BR link add ...
peer ... netns NS``), so nothing ever appears among the host's own interfaces, and every
address lives inside a namespace made here.  A shaped link carries a ``tbf`` on the host's
``eth0`` (its upload) and on the bridge-side end (its download: that end's egress is the
host's ingress).  tbf counts whole frames, so TCP/IP/Ethernet headers take about 4.4 % of
the rate at MTU 1500: one TCP stream across a 100 Mbit/s link carries ≈ 95.7 Mbit/s of
payload.  ``tcp_cc`` sets each namespace's TCP congestion control (new namespaces inherit
the host's; a namespace may only pick one the host lists in
``net.ipv4.tcp_allowed_congestion_control``, and ``reno`` always is).

Clean-up (:meth:`EmulatedNetwork.close`, also run on exceptions, Ctrl-C, SIGTERM/SIGHUP and
at exit) terminates every process living in one of these namespaces (``ip netns pids``),
then deletes the namespaces, which destroys their veths and the bridge.  Namespaces left
by a run whose process is gone (``kill -9``) are removed by :func:`cleanup_leftovers`,
which runs before each new network and as ``python -m bench rollout --cleanup``.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any, Self, TypeVar

__all__ = [
    "PREFIX",
    "EmulatedNetwork",
    "Host",
    "NetNS",
    "cleanup_leftovers",
    "leftover_links",
    "measure_throughput",
    "node_address",
    "our_namespaces",
    "preflight",
    "tbf_params",
]

PREFIX = "p2pd-"
_NAME_RE = re.compile(rf"^{re.escape(PREFIX)}(\d+)-(\d+)-([a-z0-9]+)$")
_NETNS_DIR = Path("/run/netns")
_CLONE_NEWNET = 0x40000000
MIN_BURST = 64 * 1024
T = TypeVar("T")

_counter = 0
_counter_lock = threading.Lock()


def preflight(*, need: Sequence[str] = ("ip", "tc", "docker-registry")) -> str | None:
    """One line saying why an emulated network cannot be built here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, veth and tc): run it with sudo"
    missing = [tool for tool in need if shutil.which(tool) is None]
    if missing:
        hint = {
            "ip": "iproute2",
            "tc": "iproute2",
            "docker-registry": "docker-registry",
        }
        pkgs = sorted({hint.get(t, t) for t in missing})
        return f"missing {', '.join(missing)}: apt-get install -y {' '.join(pkgs)}"
    return None


def _run(argv: Sequence[str], *, check: bool = True, timeout: float = 30.0) -> str:
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def tbf_params(mbit: float, *, latency_ms: float = 20.0) -> tuple[str, int, str]:
    """``(rate, burst bytes, latency)`` for ``tc qdisc ... tbf``: burst ≥ 64 KiB (a TSO/GSO
    frame must fit) and ≥ 1 ms at the rate."""
    rate_bytes = mbit * 1e6 / 8
    burst = max(MIN_BURST, int(rate_bytes / 1000))
    return f"{mbit:g}mbit", burst, f"{latency_ms:g}ms"


# -- one namespace -----------------------------------------------------------------------

_libc: Any = None


def _setns(fd: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@dataclass(frozen=True)
class NetNS:
    """A named network namespace (``/run/netns/<name>``)."""

    name: str

    @property
    def exec_prefix(self) -> list[str]:
        """Prefix an argv with this to run it inside the namespace (``ip netns exec``
        execs the command, so the process id is the command's own)."""
        return ["ip", "netns", "exec", self.name]

    @property
    def net_only_prefix(self) -> list[str]:
        """Like :attr:`exec_prefix`, but enters the network namespace only: the process
        keeps the host's mounts (``ip netns exec`` also remounts ``/sys``, which hides
        the cgroup hierarchies dockerd needs).  ``nsenter`` execs the command too."""
        return ["nsenter", f"--net={_NETNS_DIR / self.name}"]

    def ip(self, *args: str, check: bool = True) -> str:
        return _run(["ip", "-n", self.name, *args], check=check)

    def tc(self, *args: str) -> str:
        return _run(["tc", "-n", self.name, *args])

    def call(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` in a fresh thread that entered this namespace: every
        socket it creates lives here (a socket keeps its namespace for life).  Blocking;
        exceptions propagate."""
        result: list[T] = []
        error: list[BaseException] = []

        def run() -> None:
            try:
                fd = os.open(_NETNS_DIR / self.name, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    _setns(fd)
                finally:
                    os.close(fd)
                result.append(fn(*args, **kwargs))
            except BaseException as exc:
                error.append(exc)

        thread = threading.Thread(target=run, name=f"netns-{self.name}", daemon=True)
        thread.start()
        thread.join()
        if error:
            raise error[0]
        return result[0]

    def counters(self, ifname: str = "eth0") -> dict[str, int]:
        """The interface's ``rx_bytes``, ``tx_bytes``, ``rx_packets``, ``tx_packets``."""
        info = json.loads(self.ip("-s", "-j", "link", "show", "dev", ifname))[0]
        stats = info["stats64"]
        return {
            "rx_bytes": int(stats["rx"]["bytes"]),
            "tx_bytes": int(stats["tx"]["bytes"]),
            "rx_packets": int(stats["rx"]["packets"]),
            "tx_packets": int(stats["tx"]["packets"]),
        }

    def qdisc_stats(self, ifname: str = "eth0") -> dict[str, int]:
        """The root qdisc's ``bytes``, ``packets``, ``drops``, ``overlimits``."""
        for q in json.loads(self.tc("-s", "-j", "qdisc", "show", "dev", ifname) or "[]"):
            if q.get("root"):
                return {k: int(q.get(k) or 0) for k in ("bytes", "packets", "drops", "overlimits")}
        return {"bytes": 0, "packets": 0, "drops": 0, "overlimits": 0}

    def tcp_stats(self) -> dict[str, int]:
        """The namespace's TCP counters (``/proc/net/snmp``): ``OutSegs``,
        ``RetransSegs``, ``InSegs``, ..."""

        def read() -> str:
            return Path("/proc/thread-self/net/snmp").read_text()

        rows = [line.split() for line in self.call(read).splitlines() if line.startswith("Tcp:")]
        if len(rows) < 2:
            return {}
        return {k: int(v) for k, v in zip(rows[0][1:], rows[1][1:], strict=False)}

    def sysctl(self, key: str, value: str | None = None) -> str:
        """Read (and first write, if ``value`` is given) a ``net.*`` sysctl of this
        namespace, e.g. ``net.ipv4.tcp_congestion_control``."""
        if not key.startswith("net."):
            raise ValueError("only net.* sysctls are per namespace")
        # (a thread that entered the namespace may not write /proc/sys/net: a process in
        # it can)
        path = "/proc/sys/" + key.replace(".", "/")
        if value is not None:
            if not re.fullmatch(r"[A-Za-z0-9_ .-]+", value):
                raise ValueError(f"unexpected sysctl value {value!r}")
            _run([*self.exec_prefix, "sh", "-c", f"echo {value} > {path}"])
        return _run([*self.exec_prefix, "cat", path]).strip()

    def pids(self) -> list[int]:
        out = _run(["ip", "netns", "pids", self.name], check=False)
        return [int(p) for p in out.split() if p.isdigit()]

    def exists(self) -> bool:
        return (_NETNS_DIR / self.name).exists()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_namespaces(names: Sequence[str], *, grace: float = 5.0) -> list[str]:
    """Terminate every process inside these namespaces (SIGTERM, then SIGKILL after
    ``grace``), then delete the namespaces.  Returns one line per thing that failed."""
    problems: list[str] = []
    spaces = [NetNS(n) for n in names if NetNS(n).exists()]
    pids = {pid for ns in spaces for pid in ns.pids()}
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(ns.pids() for ns in spaces):
        time.sleep(0.05)
    for ns in spaces:
        for pid in ns.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline and any(ns.pids() for ns in spaces):
        time.sleep(0.05)
    for ns in spaces:
        left = ns.pids()
        if left:
            problems.append(f"netns {ns.name}: processes {left} did not die")
        done = subprocess.run(
            ["ip", "netns", "del", ns.name], capture_output=True, text=True, check=False
        )
        if done.returncode != 0 and ns.exists():
            problems.append(f"ip netns del {ns.name}: {done.stderr.strip()}")
    return problems


def our_namespaces() -> list[str]:
    """Every namespace whose name has our prefix and shape."""
    if not _NETNS_DIR.is_dir():
        return []
    return sorted(p.name for p in _NETNS_DIR.iterdir() if _NAME_RE.match(p.name))


def cleanup_leftovers(*, say: Callable[[str], None] | None = None) -> list[str]:
    """Delete the namespaces (and kill the processes inside them) left by runs whose
    process is gone.  A running harness's namespaces are never touched.  Returns the
    names removed."""
    stale = []
    for name in our_namespaces():
        m = _NAME_RE.match(name)
        assert m is not None
        if not _alive(int(m.group(1))):
            stale.append(name)
    if stale:
        for problem in _kill_namespaces(stale, grace=2.0):
            if say is not None:
                say(problem)
        if say is not None:
            say(f"removed {len(stale)} leftover namespaces: {' '.join(stale)}")
    return stale


# -- the network -------------------------------------------------------------------------


@dataclass
class Host:
    """One end of the star: a namespace with ``eth0`` at ``address``."""

    role: str  # "origin", "scheduler", "node"
    ns: NetNS
    address: str
    bridge_if: str
    mbit: float | None  # None: not shaped
    index: int = -1  # node number

    @property
    def name(self) -> str:
        return f"n{self.index}" if self.role == "node" else self.role

    @property
    def local_address(self) -> str:
        """Where the host's own daemon API listens: its namespace's loopback."""
        return "127.0.0.1"

    def call(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        return self.ns.call(fn, *args, **kwargs)

    def counters(self) -> dict[str, int] | None:
        return self.ns.counters("eth0")


def node_address(i: int) -> str:
    """Node ``i``'s address: 10.77.1.1, 10.77.1.2, ... (200 per /24)."""
    if not 0 <= i < 200 * 200:
        raise ValueError("node index out of range")
    return f"10.77.{1 + i // 200}.{1 + i % 200}"


def spawn(
    argv: Sequence[str],
    *,
    log: IO[bytes] | None = None,
    stdin: int | None = subprocess.DEVNULL,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start a process of the emulated network, output to ``log``, in a session of its
    own (a Ctrl-C is ours to handle)."""
    return subprocess.Popen(
        list(argv),
        stdin=stdin,
        stdout=log if log is not None else subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        env=dict(env) if env is not None else None,
        cwd=cwd,
        start_new_session=True,
    )


@dataclass
class EmulatedNetwork:
    """The star network of the module docstring; a sync context manager."""

    nodes: int
    node_mbit: float
    origin_mbit: float
    latency_ms: float = 20.0
    mtu: int = 1500
    tcp_cc: str | None = None
    """TCP congestion control in every namespace (None: the host's default, which new
    namespaces inherit).  A namespace may only choose one of the host's
    ``net.ipv4.tcp_allowed_congestion_control``."""
    say: Callable[[str], None] | None = None
    origin: Host = field(init=False)
    scheduler: Host = field(init=False)
    node_hosts: list[Host] = field(init=False)
    bridge: NetNS = field(init=False)
    run_id: str = field(init=False)
    _made: list[str] = field(init=False, default_factory=list)
    _procs: list[subprocess.Popen[bytes]] = field(init=False, default_factory=list)
    _closed: bool = field(init=False, default=False)
    _old_handlers: dict[int, Any] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        global _counter
        if self.nodes < 1:
            raise ValueError("nodes must be >= 1")
        if self.node_mbit <= 0 or self.origin_mbit <= 0:
            raise ValueError("link rates must be > 0")
        with _counter_lock:
            _counter += 1
            self.run_id = f"{os.getpid()}-{_counter}"
        self.bridge = NetNS(f"{PREFIX}{self.run_id}-br")
        self.origin = Host("origin", self._ns("or"), "10.77.0.2", "or", self.origin_mbit)
        self.scheduler = Host("scheduler", self._ns("sc"), "10.77.0.3", "sc", None)
        self.node_hosts = [
            Host("node", self._ns(f"n{i}"), node_address(i), f"n{i}", self.node_mbit, i)
            for i in range(self.nodes)
        ]

    def daemon_args(self) -> list[str]:
        """A node daemon's flags for its link: none, tc shapes it."""
        return []

    def _ns(self, role: str) -> NetNS:
        return NetNS(f"{PREFIX}{self.run_id}-{role}")

    def all_hosts(self) -> list[Host]:
        return [self.origin, self.scheduler, *self.node_hosts]

    def namespaces(self) -> list[str]:
        return [self.bridge.name, *(h.ns.name for h in self.all_hosts())]

    # -- building ------------------------------------------------------------------------

    def _add_ns(self, ns: NetNS) -> None:
        _run(["ip", "netns", "add", ns.name])
        self._made.append(ns.name)
        ns.ip("link", "set", "lo", "up")
        if self.tcp_cc:
            got = ns.sysctl("net.ipv4.tcp_congestion_control", self.tcp_cc)
            if got != self.tcp_cc:
                raise RuntimeError(f"{ns.name}: tcp_congestion_control is {got}, not {self.tcp_cc}")

    def _shape(self, ns: NetNS, ifname: str, mbit: float) -> None:
        rate, burst, latency = tbf_params(mbit, latency_ms=self.latency_ms)
        tbf = ["tbf", "rate", rate, "burst", str(burst), "latency", latency]
        ns.tc("qdisc", "replace", "dev", ifname, "root", *tbf)

    def start(self) -> None:
        if self.tcp_cc:
            allowed = Path("/proc/sys/net/ipv4/tcp_allowed_congestion_control").read_text()
            if self.tcp_cc not in allowed.split():
                raise ValueError(
                    f"TCP congestion control {self.tcp_cc!r} cannot be chosen inside a "
                    f"namespace here (the host allows: {allowed.strip()})"
                )
        cleanup_leftovers(say=self.say)
        self._install_signal_handlers()
        atexit.register(self.close)
        self._add_ns(self.bridge)
        self.bridge.ip("link", "add", "br0", "type", "bridge")
        self.bridge.ip("link", "set", "br0", "up")
        for host in self.all_hosts():
            self._add_ns(host.ns)
            mtu = str(self.mtu)
            veth = ["link", "add", host.bridge_if, "mtu", mtu, "type", "veth"]
            peer = ["peer", "name", "eth0", "mtu", mtu, "netns", host.ns.name]
            self.bridge.ip(*veth, *peer)
            self.bridge.ip("link", "set", host.bridge_if, "master", "br0", "up")
            host.ns.ip("addr", "add", f"{host.address}/16", "dev", "eth0")
            host.ns.ip("link", "set", "eth0", "up")
            if host.mbit is not None:
                self._shape(host.ns, "eth0", host.mbit)  # its upload
                self._shape(self.bridge, host.bridge_if, host.mbit)  # its download
        if self.say is not None:
            self.say(
                f"network {PREFIX}{self.run_id}-*: {self.nodes} nodes at {self.node_mbit:g} "
                f"Mbit/s, origin at {self.origin_mbit:g} Mbit/s, scheduler unshaped "
                f"(tbf both ways, queue {self.latency_ms:g} ms, MTU {self.mtu}, TCP "
                f"{self.tcp_cc or 'host default'})"
            )

    def qdiscs(self) -> dict[str, str]:
        """``tc qdisc show`` of every shaped interface (for the record)."""
        out = {}
        for host in self.all_hosts():
            out[f"{host.name}:eth0"] = host.ns.tc("qdisc", "show", "dev", "eth0").strip()
            out[f"br:{host.bridge_if}"] = self.bridge.tc(
                "qdisc", "show", "dev", host.bridge_if
            ).strip()
        return out

    # -- processes -----------------------------------------------------------------------

    def popen(
        self,
        host: Host,
        argv: Sequence[str],
        *,
        log: IO[bytes] | None = None,
        stdin: int | None = subprocess.DEVNULL,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` inside ``host``'s namespace, in a session of its own (a Ctrl-C
        is ours to handle); it is killed by :meth:`close` if still running."""
        proc = spawn([*host.ns.exec_prefix, *argv], log=log, stdin=stdin, env=env, cwd=cwd)
        self._procs.append(proc)
        return proc

    # -- tearing down --------------------------------------------------------------------

    def close(self) -> None:
        """Kill every process in our namespaces and delete them.  Idempotent; a Ctrl-C
        during clean-up is ignored so that it completes."""
        if self._closed:
            return
        self._closed = True
        restore = None
        if threading.current_thread() is threading.main_thread():
            restore = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            for proc in self._procs:
                if proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        proc.terminate()
            problems = _kill_namespaces(self._made)
            for proc in self._procs:  # reap
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(1)
            left = [n for n in self._made if NetNS(n).exists()]
            if left:
                problems.append(f"namespaces still there: {left}")
            for problem in problems:
                if self.say is not None:
                    self.say(f"clean-up: {problem}")
        finally:
            with contextlib.suppress(ValueError):
                atexit.unregister(self.close)
            self._restore_signal_handlers()
            if restore is not None:
                signal.signal(signal.SIGINT, restore)

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def interrupt(signum: int, frame: FrameType | None) -> None:
            raise KeyboardInterrupt(f"signal {signum}")

        for sig in (signal.SIGTERM, signal.SIGHUP):
            self._old_handlers[sig] = signal.signal(sig, interrupt)

    def _restore_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        self._old_handlers.clear()

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# -- a self-check ------------------------------------------------------------------------


def measure_throughput(
    src: Host, dst: Host, *, nbytes: int, port: int = 5999, timeout: float = 60.0
) -> float:
    """Payload bits per second of one TCP stream sending ``nbytes`` from ``src`` to
    ``dst`` (through both their shaped links)."""
    server = dst.call(socket.create_server, (dst.address, port))
    received: list[float] = []
    errors: list[BaseException] = []

    def sink() -> None:
        try:
            server.settimeout(timeout)
            conn, _ = server.accept()
            with conn:
                conn.settimeout(timeout)
                got = first = 0
                started = 0.0
                while True:
                    chunk = conn.recv(1 << 20)
                    if not chunk:
                        break
                    if not got:
                        started, first = time.monotonic(), len(chunk)
                    got += len(chunk)
                received.extend([got, first, time.monotonic() - started])
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=sink, daemon=True)
    thread.start()
    try:
        conn = src.call(socket.create_connection, (dst.address, port), timeout)
        with conn:
            buf = memoryview(b"\0" * (1 << 20))
            sent = 0
            while sent < nbytes:
                sent += conn.send(buf[: min(len(buf), nbytes - sent)])
        thread.join(timeout)
    finally:
        server.close()
    if errors:
        raise errors[0]
    if not received or received[0] != nbytes:
        raise RuntimeError(f"throughput check: received {received[:1]} of {nbytes} bytes")
    # The first chunk's arrival starts the clock: the rate is that of the rest.
    return (received[0] - received[1]) * 8 / max(received[2], 1e-9)


def leftover_links() -> list[str]:
    """Interfaces in the host's own namespace with our names (there should never be
    any: we create veths inside our namespaces)."""
    out = _run(["ip", "-j", "link", "show"], check=False)
    try:
        links = json.loads(out or "[]")
    except ValueError:
        return []
    return [
        str(link.get("ifname")) for link in links if str(link.get("ifname", "")).startswith(PREFIX)
    ]
