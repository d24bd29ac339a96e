"""``python -m bench rollout``: how long a rollout of one image to N nodes takes, and what it
costs the registry, on an emulated network (:mod:`bench.netns`), measured against the
network's physical lower bound.

One run:

1. generates a synthetic image (``--image-size``, ``--layers``, ``--layer-format``) and
   pushes it to a real ``docker-registry`` inside the origin namespace (the push goes over
   that namespace's loopback: it is neither shaped nor counted);
2. checks the shaping with one TCP stream across a node link and across the origin link;
3. per mode (``registry``: each node runs ``p2pdist pull`` straight from the registry;
   ``p2p``: each node runs a daemon, all share one scheduler, and ``p2pdist pull
   --daemon`` goes through it; ``both``: registry, then p2p with fresh stores): starts
   one client per node and lets each import everything it needs, then releases them all
   at once (t0: one byte down each client's stdin) — Python start-up is not part of the
   figure, the whole pull is (manifest, config, layers, every digest verified, an OCI
   layout written);
4. records each node's completion (the client's own monotonic clock at exit, which is
   system-wide), its exit code, and then checks every blob in every node's layout against
   the image's digests; the origin interface's ``tx_bytes`` from t0 to the last
   completion (the registry's egress: nothing can hide from it); every node interface's
   rx/tx bytes; in p2p mode each daemon's account of bytes from peers and from the
   registry; CPU use;
5. writes ``result.json`` and ``report.md`` (a summary table per mode, per-node tables, and
   SVG step charts of nodes complete over time, with T_min marked).

Without root (or with ``--network loopback``) only ``--mode p2p`` runs, on loopback:
every node on its own 127.B.1.x address, its link paced by its daemon's own
``--download-rate``/``--upload-rate``, the registry behind a counting relay at the origin
rate (:mod:`bench.loopback`).

``--client get`` (the default) is what the steps above describe: ``p2pdist pull --output``
into an OCI layout, no Docker.  ``--client pull`` is the path a user takes: every node
also runs a private dockerd (:class:`bench.dockerd.Dockerd`, vfs storage, ``--bridge=none
--iptables=false``) inside its namespace (``nsenter --net``: ``ip netns exec`` would hide
the cgroups dockerd needs), started before the clients and not timed, and each client runs
``p2pdist pull REF --docker-host unix://…/docker.sock`` (through its daemon in p2p mode,
standalone into a piece store in registry mode).  A node completes when that command exits:
after its fetch, ``docker load`` of the verified blobs and the tag.  So each figure adds
that node's load (``docker_load_s`` per node ≈ exit less the fetch time the client prints;
``dockerd_cpu_seconds`` per mode): dockerd gunzips each layer, hashes it against the
config's diff id and unpacks it — with vfs, into a full copy of the layers below it (L
layers of F/L write ≈ F·(L+1)/2 bytes), much dearer than overlay2 on a real node — and
every node's load lands at the same moment on the same 2 cores.  Verification asks each
node's dockerd for ``REPO:TAG``: image id = the config digest, RootFS layers = its diff
ids.  Every dockerd is stopped, and its directory removed, when the mode ends (also on
failure and Ctrl-C; its log is kept as ``logs/MODE/nI-dockerd.log``).  For the stall
detector below, a pending node's dockerd using CPU (loading: no bytes on the wire) is
progress too.  Eight vfs dockerds are heavy for a 2-core machine: keep ``get`` for the
protocol's figures.

The lower bound, with F the image's blob bytes (config + layers; the manifest is a few
hundred bytes) and rates in bytes/s::

    T_min = max(F / u_origin, F / d_node, N·F / (u_origin + N·u_node))

(every byte leaves the origin at least once; every node takes in F; N·F bytes must be
uploaded by someone).

Network defaults, and why: TCP ``reno`` in every namespace (``--tcp-cc``; new namespaces
inherit the host's default, bbr on some hosts, which keeps a 20 ms tbf queue dropping ~18 %
of the origin's packets; cubic cannot be chosen inside a namespace unless the host allows
it), and in registry mode one range request per blob (``--registry-concurrency 1``, like
docker: with 8 per blob, 256 streams shared the origin, the registry's kernel aborted
some of them (TcpExtTCPAbortOnTimeout, no RST reached the node) and the standalone client,
which has no read timeout on its lean Range path, waited forever).  A
mode in which less than 1 MiB reaches the pulling nodes for a minute is stopped and its
nodes reported as stalled.  Rates are the nominal link rates: tbf counts whole frames, so at
MTU 1500 about 4.4 % of a link goes to TCP/IP/Ethernet headers and ≈ 1.05 × T_min is the
practical floor.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import html
import json
import math
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

import httpx

from .dockerd import Dockerd, DockerdError
from .image import Image, make_image, push_image
from .localregistry import LocalRegistry
from .loopback import LoopbackHost, LoopbackNetwork
from .netns import (
    EmulatedNetwork,
    Host,
    cleanup_leftovers,
    measure_throughput,
    preflight,
    tbf_params,
)

__all__ = [
    "Refused",
    "completion_svg",
    "node_client_main",
    "percentile",
    "render_report",
    "rollout_cli",
    "run_rollout",
    "summarize_times",
    "t_min",
]

MIB = 1 << 20
PYTHON = sys.executable
REPO, TAG = "bench/rollout", "v1"
REGISTRY_PORT = 5000
SCHEDULER_PORT = 65004
PEER_PORT = 65002
API_PORT = 65003
MODES = ("registry", "p2p")
FRAME_HEAD = 14 + 20 + 32  # Ethernet, IPv4, TCP with timestamps
STALL_BYTES = 1 << 20  # less than this into the pulling nodes in stall_seconds: stalled
Mode = Literal["registry", "p2p"]
Network = EmulatedNetwork | LoopbackNetwork
AnyHost = Host | LoopbackHost


class Refused(RuntimeError):
    """The rollout cannot run here (one line for the user; exit status 2)."""


# -- the figures (pure) ----------------------------------------------------------------


def t_min(image_bytes: int, nodes: int, node_bps: float, origin_bps: float) -> tuple[float, str]:
    """The lower bound on the slowest node's time and which term sets it (``origin``,
    ``node_download`` or ``upload_capacity``); rates in bytes/s, node links symmetric."""
    if nodes < 1 or node_bps <= 0 or origin_bps <= 0:
        raise ValueError("nodes and rates must be positive")
    terms = {
        "origin": image_bytes / origin_bps,
        "node_download": image_bytes / node_bps,
        "upload_capacity": nodes * image_bytes / (origin_bps + nodes * node_bps),
    }
    binding = max(terms, key=lambda k: terms[k])
    return terms[binding], binding


def registry_bound(image_bytes: int, nodes: int, node_bps: float, origin_bps: float) -> float:
    """The lower bound when every node pulls from the registry: N·F through the origin."""
    return max(nodes * image_bytes / origin_bps, image_bytes / node_bps)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0–100), linear between closest ranks (numpy's default)."""
    if not values:
        raise ValueError("no values")
    if not 0 <= q <= 100:
        raise ValueError("q must be within 0..100")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    lo = math.floor(rank)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)


def summarize_times(times: Sequence[float | None], bound: float) -> dict[str, Any]:
    """p50/p95/max/min/mean of the completed nodes' seconds, each also ÷ ``bound``;
    ``failed`` counts the nodes that did not complete (None)."""
    done = [t for t in times if t is not None]
    out: dict[str, Any] = {"completed": len(done), "failed": len(times) - len(done)}
    if not done:
        out["seconds"] = out["ratio_to_t_min"] = None
        return out
    seconds = {
        "p50": percentile(done, 50),
        "p95": percentile(done, 95),
        "max": max(done),
        "min": min(done),
        "mean": sum(done) / len(done),
    }
    out["seconds"] = {k: round(v, 3) for k, v in seconds.items()}
    out["ratio_to_t_min"] = {k: round(v / bound, 3) for k, v in seconds.items()}
    return out


# -- the chart (pure) --------------------------------------------------------------------

_COLORS = {"registry": "#d62728", "p2p": "#1f77b4"}
_FALLBACK_COLORS = ("#2ca02c", "#9467bd", "#8c564b", "#e377c2")


def _nice_step(span: float, target: int) -> float:
    raw = span / max(target, 1)
    if raw <= 0:
        return 1.0
    mag = 10.0 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag


def _fmt_tick(v: float) -> str:
    return f"{v:g}" if abs(v - round(v)) > 1e-9 else str(round(v))


def completion_svg(
    series: Mapping[str, Sequence[float | None]],
    *,
    nodes: int,
    t_min_s: float,
    title: str,
    width: int = 640,
    height: int = 360,
) -> str:
    """An SVG step chart: x = seconds since the start, y = nodes complete, one line per
    series (None = a node that never completed), T_min as a dashed vertical line."""
    left, right, top, bottom = 56, 20, 40, 46
    pw, ph = width - left - right, height - top - bottom
    finite = [t for ts in series.values() for t in ts if t is not None]
    span = max([t_min_s, *finite]) * 1.08 if finite or t_min_s > 0 else 1.0
    xstep = _nice_step(span, 8)
    xmax = math.ceil(span / xstep) * xstep
    ymax = max(nodes, 1)
    ystep = max(1, int(_nice_step(ymax, 6)))

    def x(t: float) -> float:
        return left + pw * min(t, xmax) / xmax

    def y(n: float) -> float:
        return top + ph * (1 - n / ymax)

    esc = html.escape
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{width / 2:.1f}" y="20" text-anchor="middle" font-size="14">{esc(title)}</text>',
    ]
    tick = 0.0
    while tick <= xmax + 1e-9:
        parts.append(
            f'<line x1="{x(tick):.1f}" y1="{top}" x2="{x(tick):.1f}" y2="{top + ph}" '
            'stroke="#e5e5e5"/>'
            f'<text x="{x(tick):.1f}" y="{top + ph + 16}" text-anchor="middle">'
            f"{_fmt_tick(tick)}</text>"
        )
        tick += xstep
    for n in range(0, ymax + 1, ystep):
        parts.append(
            f'<line x1="{left}" y1="{y(n):.1f}" x2="{left + pw}" y2="{y(n):.1f}" '
            'stroke="#e5e5e5"/>'
            f'<text x="{left - 6}" y="{y(n) + 4:.1f}" text-anchor="end">{n}</text>'
        )
    parts.append(
        f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#444"/>'
        f'<text x="{left + pw / 2:.1f}" y="{height - 8}" text-anchor="middle">'
        "seconds since all nodes started</text>"
        f'<text transform="translate(14 {top + ph / 2:.1f}) rotate(-90)" '
        'text-anchor="middle">nodes complete</text>'
    )
    if t_min_s > 0:
        parts.append(
            f'<line x1="{x(t_min_s):.1f}" y1="{top}" x2="{x(t_min_s):.1f}" '
            f'y2="{top + ph}" stroke="#333" stroke-dasharray="5,4"/>'
            f'<text x="{x(t_min_s) + 4:.1f}" y="{top + ph - 8}">'
            f"T_min {t_min_s:.1f} s</text>"
        )
    legend: list[tuple[str, str]] = []
    for k, (label, times) in enumerate(series.items()):
        color = _COLORS.get(label, _FALLBACK_COLORS[k % len(_FALLBACK_COLORS)])
        done = sorted(t for t in times if t is not None)
        d = [f"M{x(0):.1f},{y(0):.1f}"]
        for n, t in enumerate(done, start=1):
            d.append(f"H{x(t):.1f}V{y(n):.1f}")
        d.append(f"H{x(xmax):.1f}")
        parts.append(f'<path d="{"".join(d)}" fill="none" stroke="{color}" stroke-width="2"/>')
        for n, t in enumerate(done, start=1):
            parts.append(f'<circle cx="{x(t):.1f}" cy="{y(n):.1f}" r="2.5" fill="{color}"/>')
        missing = len(times) - len(done)
        text = label
        if done and t_min_s > 0:
            text += f" (slowest {done[-1] / t_min_s:.2f}× T_min)"
        if missing:
            text += f", {missing} failed"
        legend.append((color, text))
    # The legend goes top left: above a completion curve, where no line runs.
    parts.append(
        f'<rect x="{left + 8}" y="{top + 8}" width="250" height="{8 + 18 * len(legend)}" '
        'fill="white" fill-opacity="0.9" stroke="#ccc"/>'
    )
    for k, (color, text) in enumerate(legend):
        ly = top + 22 + 18 * k
        parts.append(
            f'<line x1="{left + 16}" y1="{ly - 4}" x2="{left + 40}" y2="{ly - 4}" '
            f'stroke="{color}" stroke-width="2"/>'
            f'<text x="{left + 46}" y="{ly}">{esc(text)}</text>'
        )
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


# -- the report (pure) -------------------------------------------------------------------


def _mib(n: int | float | None) -> str:
    return "–" if n is None else f"{n / MIB:.1f}"


def _ratio(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}×"


def _secs(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}"


def _counters_text(c: Mapping[str, int] | None) -> str:
    if not c:
        return ""
    out = c.get("origin_tcp_out_segs") or 0
    re_ = c.get("origin_tcp_retrans_segs") or 0
    share = f" ({re_ / out * 100:.1f} %)" if out else ""
    return (
        f" The registry's TCP retransmitted {re_} of {out} segments{share}; tbf drops: origin "
        f"up {c.get('drops_origin_up', 0)}, down {c.get('drops_origin_down', 0)}, nodes up "
        f"{c.get('drops_nodes_up', 0)}, down {c.get('drops_nodes_down', 0)}."
    )


def chart_files(result: Mapping[str, Any]) -> dict[str, str]:
    """file name → SVG for a result: one chart per mode, plus both side by side."""
    bound = float(result["bounds"]["t_min_seconds"])
    nodes = int(result["params"]["nodes"])
    modes = result["modes"]
    charts = {}
    for mode, mr in modes.items():
        times = [n["seconds"] for n in mr["per_node"]]
        charts[f"completion-{mode}.svg"] = completion_svg(
            {mode: times}, nodes=nodes, t_min_s=bound, title=f"{mode}: nodes complete over time"
        )
    if len(modes) > 1:
        charts["completion.svg"] = completion_svg(
            {m: [n["seconds"] for n in mr["per_node"]] for m, mr in modes.items()},
            nodes=nodes,
            t_min_s=bound,
            title="nodes complete over time, every mode",
        )
    return charts


def render_report(result: Mapping[str, Any]) -> str:
    """``report.md`` for a result (see :func:`run_rollout`)."""
    p = result["params"]
    b = result["bounds"]
    img = result["image"]
    lines = [
        f"# Rollout: {p['nodes']} nodes, {_mib(img['bytes'])} MiB image",
        "",
        f"{p['layers']} {p['layer_format']} layers, {img['bytes']} bytes of blobs (F); node "
        f"links {p['node_mbit']:g} Mbit/s each way, origin {p['origin_mbit']:g} Mbit/s, "
        f"piece size {p['piece_size'] or 'default'}, client `{p['client']}`, seed "
        f"{p['seed']}.",
        "",
        f"**T_min = {b['t_min_seconds']:.2f} s** (set by {b['binding'].replace('_', ' ')}; "
        + ", ".join(f"{k.replace('_', ' ')} {v:.2f} s" for k, v in b["terms"].items())
        + f"). Registry-only bound N·F/u_origin: {b['registry_bound_seconds']:.2f} s "
        f"({b['registry_bound_seconds'] / b['t_min_seconds']:.2f}× T_min).",
        "",
        "| mode | nodes ok | p50 | p95 | max | p50 / T_min | p95 / T_min | max / T_min "
        "| registry egress | egress / F | TCP payload / F |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for mode, mr in result["modes"].items():
        s = mr["times"]["seconds"] or {}
        r = mr["times"]["ratio_to_t_min"] or {}
        lines.append(
            f"| {mode} | {mr['times']['completed']}/{p['nodes']} | {_secs(s.get('p50'))} s "
            f"| {_secs(s.get('p95'))} s | {_secs(s.get('max'))} s | {_ratio(r.get('p50'))} "
            f"| {_ratio(r.get('p95'))} | **{_ratio(r.get('max'))}** "
            f"| {_mib(mr['registry_egress_bytes'])} MiB | {_ratio(mr['registry_egress_ratio'])} "
            f"| {_ratio(mr.get('registry_egress_payload_ratio'))} |"
        )
    check = result.get("network", {}).get("link_check") or {}
    if check:
        lines += [
            "",
            "Link check (one TCP stream, payload): "
            + ", ".join(f"{k.replace('_', ' ')} {v:.1f} Mbit/s" for k, v in check.items())
            + ".",
        ]
    charts = chart_files(result)
    for mode, mr in result["modes"].items():
        lines += [
            "",
            f"## {mode}",
            "",
            f"![{mode}: nodes complete over time](completion-{mode}.svg)",
            "",
            f"CPU busy {mr['cpu_busy'] * 100:.0f} % of {result['host']['cpus']} cores "
            f"during the rollout; clients' CPU {mr['client_cpu_seconds']:.1f} s"
            + (
                f", daemons' CPU {mr['daemon_cpu_seconds']:.1f} s, scheduler's "
                f"{mr['scheduler_cpu_seconds']:.1f} s"
                if mr.get("daemon_cpu_seconds") is not None
                else ""
            )
            + f", registry's {mr['registry_cpu_seconds']:.1f} s"
            + _dockerd_cpu_text(mr)
            + "."
            + _counters_text(mr.get("network_counters")),
            "",
            "| node | seconds | ÷ T_min | exit | verified | from registry MiB "
            "| from peers MiB | rx MiB | tx MiB |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for n in mr["per_node"]:
            ratio = None if n["seconds"] is None else n["seconds"] / b["t_min_seconds"]
            lines.append(
                f"| n{n['node']} | {_secs(n['seconds'])} | {_ratio(ratio)} | {n['exit_code']} "
                f"| {'yes' if n['verified'] else 'NO: ' + str(n['problem'])} "
                f"| {_mib(n['from_registry'])} | {_mib(n['from_peers'])} "
                f"| {_mib(n['rx_bytes'])} | {_mib(n['tx_bytes'])} |"
            )
        if mr["problems"]:
            lines += ["", "Problems:", ""] + [f"- {x}" for x in mr["problems"]]
    if "completion.svg" in charts:
        lines += ["", "## every mode", "", "![nodes complete over time](completion.svg)"]
    if result.get("params", {}).get("network") == "loopback":
        measured = (
            "The nodes ran on loopback, each link paced by its daemon's own "
            "--download-rate/--upload-rate and the origin by a relay in front of the "
            "registry (a token bucket at the origin rate); registry egress is what that "
            "relay sent (TCP payload: no frame heads, so T_min itself is the floor); both "
            "byte columns are the daemon's own account (the nodes have no interfaces)."
        )
    else:
        measured = (
            "Registry egress is the origin interface's tx_bytes over the same interval "
            "(frames: TCP/IP/Ethernet heads and retransmissions included); TCP payload is "
            "that less 66 bytes a frame. In registry mode 'from registry' is the node "
            "interface's rx bytes; in p2p mode both columns are the daemon's own account. "
            "tbf shapes whole frames, so ≈ 1.05 × T_min is the practical floor at MTU 1500."
        )
    lines += [
        "",
        "## how",
        "",
        f"`{result['command']}` — {result['wall_seconds']:.0f} s in all. Times run from the "
        "moment every client was released (after Python start-up) to each client's exit "
        + _client_how(p["client"])
        + " "
        + measured,
        "",
    ]
    return "\n".join(lines)


def _client_how(client: str) -> str:
    if client == "pull":
        return (
            "after it verified every digest and loaded and tagged the image in the node's own "
            "dockerd (vfs; the load time is part of each figure, see docker_load_s in "
            "result.json)."
        )
    return "after it verified every digest and wrote its OCI layout."


def _dockerd_cpu_text(mr: Mapping[str, Any]) -> str:
    cpu = mr.get("dockerd_cpu_seconds")
    if cpu is None:
        return ""
    loads = [n["docker_load_s"] for n in mr["per_node"] if n.get("docker_load_s") is not None]
    text = f", the dockerds' {cpu:.1f} s"
    if loads:
        text += f" (docker load + tag ≈ {min(loads):.1f}–{max(loads):.1f} s a node)"
    return text


# -- one node's client -------------------------------------------------------------------


def node_client_main(argv: Sequence[str]) -> int:
    """The per-node client, run as ``python -c ... READY DONE PULL-ARGS...``: import
    everything, create READY, wait for one byte on stdin (the start signal), run ``p2pdist
    PULL-ARGS``, write DONE (JSON: monotonic go/end, exit code, CPU seconds)."""
    import resource

    import httpx  # noqa: F401 - paid before the start signal
    import trio  # noqa: F401

    import p2pdist.pull  # noqa: F401
    from p2pdist.cli import main

    ready, done, *args = argv
    Path(ready).write_text(str(os.getpid()))
    if sys.stdin.buffer.read(1) != b"g":
        return 125  # the harness went away
    go = time.monotonic()
    try:
        rc = main(args)
    except SystemExit as exc:
        rc = exc.code if isinstance(exc.code, int) else 1
    end = time.monotonic()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    Path(done).write_text(
        json.dumps({"go": go, "end": end, "rc": rc, "cpu": usage.ru_utime + usage.ru_stime})
    )
    return rc


_CLIENT_BOOT = (
    "import sys; from bench.rollout import node_client_main; "
    "sys.exit(node_client_main(sys.argv[1:]))"
)


# -- helpers ---------------------------------------------------------------------------


def _http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """GET without any proxy from the environment: ``(status, body)``."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()


def _answers(url: str) -> bool:
    try:
        _http_get(url, timeout=1.0)
        return True
    except OSError:
        return False


def _healthy(url: str) -> bool:
    try:
        return _http_get(f"{url}/healthz", timeout=1.0)[0] == 200
    except OSError:
        return False


def _json_in(host: AnyHost, url: str) -> Any:
    status, body = host.call(_http_get, url, 5.0)
    if status != 200:
        raise RuntimeError(f"GET {url}: HTTP {status}")
    return json.loads(body)


def _clean_env(home: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("P2PDIST_") and not k.lower().endswith("_proxy")
    }
    env["HOME"] = str(home)
    env["DOCKER_CONFIG"] = str(home / ".docker")
    env["XDG_CACHE_HOME"] = str(home / ".cache")
    return env


def _cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields) - idle, sum(fields)


def _proc_cpu_seconds(pid: int | None, *, children: bool = False) -> float:
    """CPU seconds of process ``pid`` (and, with ``children``, of the children it waited
    for); 0 when it is gone."""
    if pid is None:
        return 0.0
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()
    ticks = fields[11:15] if children else fields[11:13]
    return sum(int(v) for v in ticks) / os.sysconf("SC_CLK_TCK")


def _origin_counters(net: Network) -> dict[str, int]:
    counters = net.origin.counters()
    if counters is None:
        raise RuntimeError("the origin has no byte counters")
    return counters


def _rx_bytes(host: AnyHost) -> int:
    """Bytes the host received so far, or -1 where it has no counters of its own."""
    counters = host.counters()
    return -1 if counters is None else counters["rx_bytes"]


def _popen(net: Network, host: AnyHost, argv: Sequence[str], **kw: Any) -> subprocess.Popen[bytes]:
    """``net.popen`` for either kind of network."""
    if isinstance(net, EmulatedNetwork):
        assert isinstance(host, Host)
        return net.popen(host, argv, **kw)
    return net.popen(host, argv, **kw)


def _net_snapshot(net: Network) -> dict[str, int]:
    """Counters that explain the bytes: the origin's TCP segments and retransmissions,
    and the drops of every tbf (a full queue drops; TCP then sends the bytes again).
    None on loopback (no queues)."""
    if isinstance(net, LoopbackNetwork):
        return {}
    tcp = net.origin.ns.tcp_stats()
    snap = {
        "origin_tcp_out_segs": tcp.get("OutSegs", 0),
        "origin_tcp_retrans_segs": tcp.get("RetransSegs", 0),
        "drops_origin_up": net.origin.ns.qdisc_stats()["drops"],
        "drops_origin_down": net.bridge.qdisc_stats(net.origin.bridge_if)["drops"],
        "drops_nodes_up": 0,
        "drops_nodes_down": 0,
        "nodes_tcp_retrans_segs": 0,
    }
    for h in net.node_hosts:
        snap["drops_nodes_up"] += h.ns.qdisc_stats()["drops"]
        snap["drops_nodes_down"] += net.bridge.qdisc_stats(h.bridge_if)["drops"]
        snap["nodes_tcp_retrans_segs"] += h.ns.tcp_stats().get("RetransSegs", 0)
    return snap


def _hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MIB):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def verify_layout(root: Path, image: Image) -> str | None:
    """None when the OCI layout at ``root`` holds ``image`` intact (index → manifest →
    every blob, each file's sha256 = its digest), else what is wrong."""
    try:
        index = json.loads((root / "index.json").read_bytes())
        entries = index.get("manifests") or []
        if len(entries) != 1:
            return f"index.json lists {len(entries)} manifests"
        mdigest = entries[0]["digest"]
        mpath = root / "blobs" / "sha256" / mdigest.removeprefix("sha256:")
        if _hash_file(mpath) != mdigest:
            return "the manifest does not match its digest"
        manifest = json.loads(mpath.read_bytes())
        named = [manifest["config"]["digest"], *(d["digest"] for d in manifest["layers"])]
        want = [image.config_digest, *image.layer_digests]
        if named != want:
            return "the manifest names other blobs than the image's"
        for digest, data in image.blobs().items():
            path = root / "blobs" / "sha256" / digest.removeprefix("sha256:")
            if path.stat().st_size != len(data):
                return f"{digest[:19]}…: {path.stat().st_size} bytes, want {len(data)}"
            if _hash_file(path) != digest:
                return f"{digest[:19]}…: the bytes do not match the digest"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"layout unreadable: {exc}"
    return None


# -- --client pull: a dockerd per node -------------------------------------------------

CLIENTS = ("get", "pull")
_PULL_TOOLS = {"dockerd": "docker.io", "containerd": "containerd", "nsenter": "util-linux"}
_LOADED_RE = re.compile(r"loaded \S+ into Docker: .* verified in ([0-9.]+)s")


def client_refusal(client: str) -> str | None:
    """One line saying why ``--client CLIENT`` cannot run here, or None (``pull`` starts a
    dockerd in every node: root, dockerd and its containerd, nsenter)."""
    if client not in CLIENTS:
        return f"--client {client}: not one of {', '.join(CLIENTS)}"
    if client == "get":
        return None
    if os.geteuid() != 0:
        return "--client pull starts a dockerd in every node: needs root (run it with sudo)"
    missing = [tool for tool in _PULL_TOOLS if shutil.which(tool) is None]
    if missing:
        pkgs = " ".join(sorted({_PULL_TOOLS[t] for t in missing}))
        return (
            f"--client pull starts a dockerd in every node: missing {', '.join(missing)}: "
            f"apt-get install -y {pkgs}"
        )
    return None


def inspect_docker_image(d: Dockerd | None, name: str) -> dict[str, Any] | str:
    """``GET /images/NAME/json`` on dockerd ``d``: the image's record, or what went wrong."""
    if d is None:
        return "no dockerd"
    try:
        r = d.api("GET", f"/images/{name}/json")
        if r.status_code == 404:
            return f"dockerd has no image {name}"
        if r.status_code != 200:
            return f"dockerd: GET /images/{name}/json: HTTP {r.status_code}"
        info = r.json()
    except (httpx.HTTPError, ValueError) as exc:
        return f"dockerd: GET /images/{name}/json: {exc!r}"
    return info if isinstance(info, dict) else f"dockerd: GET /images/{name}/json: {info!r}"


def docker_image_problem(info: Mapping[str, Any] | str, image: Image, name: str) -> str | None:
    """None when dockerd's record of ``name`` (``REPO:TAG``, see :func:`inspect_docker_image`)
    is ``image``: the image id is the config digest, it is tagged ``name``, and its RootFS
    layers are the config's diff ids in order (docker load checked each layer's
    uncompressed sha256 against them); else what is wrong."""
    if isinstance(info, str):
        return info
    image_id = info.get("Id")
    tags = info.get("RepoTags") or []
    layers = (info.get("RootFS") or {}).get("Layers") or []
    if image_id != image.config_digest:
        return f"{name} is image {image_id}, want {image.config_digest}"
    if name not in tags:
        return f"image {str(image_id)[:19]}… is not tagged {name} (tags: {tags})"
    if layers != image.diff_ids:
        return f"the image has {len(layers)} layers (diff ids), want {len(image.diff_ids)}"
    return None


def _start_dockerds(nodes: Sequence[_Node], log_dir: Path) -> None:
    """A private dockerd inside each node's namespace (one after the other: each start
    is a burst of CPU); a failure is one line, the dockerd's log kept in ``log_dir``."""
    for n in nodes:
        assert isinstance(n.host, Host), "a dockerd per node needs network namespaces"
        try:
            n.dockerd = Dockerd.start(
                cmd_prefix=n.host.ns.net_only_prefix, startup_timeout=60.0, stop_timeout=10.0
            )
        except DockerdError as exc:
            log = log_dir / f"n{n.index}-dockerd.log"
            log.write_text(str(exc) + "\n")
            first = str(exc).splitlines()[0].removesuffix(" its log:").rstrip(";")
            raise RuntimeError(f"dockerd n{n.index} did not start: {first} ({log})") from None


def _stop_dockerds(nodes: Sequence[_Node], log_dir: Path, say: Callable[[str], None]) -> None:
    """Stop every node's dockerd and remove its directory (its log copied to ``log_dir``
    first); all of them, even when one fails (what is left in a namespace dies with it)."""
    for n in nodes:
        d, n.dockerd = n.dockerd, None
        if d is None:
            continue
        with contextlib.suppress(OSError):
            shutil.copyfile(d.log_path, log_dir / f"n{n.index}-dockerd.log")
        try:
            d.stop()
        except (OSError, subprocess.SubprocessError) as exc:
            say(f"clean-up: dockerd n{n.index}: {exc}")


def _dockerd_cpu_seconds(nodes: Sequence[_Node]) -> float:
    """CPU seconds of every node's dockerd and of the children it waited for (each layer
    is unpacked by a re-executed ``docker-applyLayer`` child); containerd plays no part in
    a load."""
    return sum(
        _proc_cpu_seconds(n.dockerd.pid if n.dockerd else None, children=True) for n in nodes
    )


def _fetch_seconds(client_log: str) -> float | None:
    """The seconds ``p2pdist pull`` says its fetch took (manifest to every blob verified,
    before ``docker load``), from its last line; None when it did not get that far."""
    found = _LOADED_RE.findall(client_log)
    return float(found[-1]) if found else None


# -- one mode --------------------------------------------------------------------------


@dataclass
class _Node:
    index: int
    host: AnyHost
    root: Path
    log_dir: Path
    proc: subprocess.Popen[bytes] | None = None
    daemon: subprocess.Popen[bytes] | None = None
    dockerd: Dockerd | None = None  # --client pull: this node's private dockerd
    exited_at: float | None = None
    logs: list[IO[bytes]] = field(default_factory=list)

    @property
    def ready_file(self) -> Path:
        return self.root / "ready"

    @property
    def done_file(self) -> Path:
        return self.root / "done.json"

    @property
    def layout(self) -> Path:
        return self.root / "layout"

    @property
    def config(self) -> Path:
        return self.root / "p2pdist.toml"

    def log(self, name: str) -> IO[bytes]:
        f = open(self.log_dir / f"n{self.index}-{name}.log", "ab")  # noqa: SIM115
        self.logs.append(f)
        return f

    def log_tail(self, name: str, nbytes: int = 1500) -> str:
        try:
            data = (self.log_dir / f"n{self.index}-{name}.log").read_bytes()
        except OSError:
            return ""
        return data[-nbytes:].decode(errors="replace").strip()


@dataclass
class _Setup:
    net: Network
    image: Image
    registry: LocalRegistry
    nodes: int
    piece_size: str | None
    work: Path
    logs: Path
    bound: float
    deadline_s: float
    stall_s: float
    registry_concurrency: int
    say: Callable[[str], None]
    client: str = "get"


def _wait(cond: Callable[[], Any], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {timeout:g}s")
        time.sleep(0.05)


def _start_swarm(s: _Setup, nodes: list[_Node], log_dir: Path) -> subprocess.Popen[bytes]:
    net = s.net
    sched_url = f"http://{net.scheduler.address}:{SCHEDULER_PORT}"
    with open(log_dir / "scheduler.log", "ab") as log:
        scheduler = _popen(
            net,
            net.scheduler,
            [PYTHON, "-m", "p2pdist", "scheduler", "--listen",
             f"{net.scheduler.address}:{SCHEDULER_PORT}", "--log-level", "info"],
            log=log,
            env=_clean_env(s.work),
        )  # fmt: skip
    _wait(
        lambda: scheduler.poll() is None and net.scheduler.call(_healthy, sched_url),
        20,
        "the scheduler answering /healthz",
    )
    for n in nodes:
        addr = f"{n.host.address}:{PEER_PORT}"
        argv = [
            PYTHON, "-m", "p2pdist", "daemon", "--config", str(n.config),
            "--data-dir", str(n.root / "store"), "--scheduler", sched_url,
            "--peer-listen", addr, "--advertise", addr,
            "--api-listen", f"{n.host.local_address}:{API_PORT}", "--proxy-listen", "off",
            "--host-id", f"n{n.index}", "--log-level", "info",
            *(["--piece-size", s.piece_size] if s.piece_size else []),
            *net.daemon_args(),
        ]  # fmt: skip
        n.daemon = _popen(net, n.host, argv, log=n.log("daemon"), env=_clean_env(n.root / "home"))

    def ready(n: _Node) -> bool:
        assert n.daemon is not None
        if n.daemon.poll() is not None:
            raise RuntimeError(f"daemon n{n.index} exited early: {n.log_tail('daemon')}")
        return n.host.call(_healthy, f"http://{n.host.local_address}:{API_PORT}") and n.host.call(
            _healthy, f"http://{n.host.address}:{PEER_PORT}"
        )

    for n in nodes:
        _wait(functools.partial(ready, n), 30, f"daemon n{n.index} answering /healthz")
    _wait(
        lambda: _json_in(net.scheduler, f"{sched_url}/api/v1/stats")["hosts"] >= len(nodes),
        30,
        f"the scheduler knowing {len(nodes)} hosts",
    )
    return scheduler


def _stop(procs: Sequence[subprocess.Popen[bytes] | None], grace: float = 5.0) -> None:
    live = [p for p in procs if p is not None and p.poll() is None]
    for p in live:
        with contextlib.suppress(ProcessLookupError):
            p.terminate()
    deadline = time.monotonic() + grace
    for p in live:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


def _run_mode(s: _Setup, mode: Mode) -> dict[str, Any]:
    net = s.net
    say = s.say
    log_dir = s.logs / mode
    log_dir.mkdir(parents=True, exist_ok=True)
    mode_root = s.work / mode
    registry_host = f"{net.origin.address}:{REGISTRY_PORT}"
    nodes = []
    for host in net.node_hosts:
        root = mode_root / f"n{host.index}"
        (root / "home").mkdir(parents=True)
        node = _Node(host.index, host, root, log_dir)
        node.config.write_text(f'[registries."{registry_host}"]\nurl = "http://{registry_host}"\n')
        nodes.append(node)
    problems: list[str] = []
    scheduler: subprocess.Popen[bytes] | None = None
    setup_started = time.monotonic()
    docker_images: list[dict[str, Any] | str] = []
    try:
        if s.client == "pull":
            say(f"{mode}: starting {len(nodes)} dockerds (vfs), one in each node")
            _start_dockerds(nodes, log_dir)
        if mode == "p2p":
            say(f"{mode}: starting the scheduler and {len(nodes)} daemons")
            scheduler = _start_swarm(s, nodes, log_dir)
        ref = f"{registry_host}/{REPO}:{TAG}"
        for n in nodes:
            env = _clean_env(n.root / "home")
            if n.dockerd is not None:
                # into the node's dockerd; spooled blobs (p2p mode) in the node's directory
                (n.root / "tmp").mkdir()
                env["TMPDIR"] = str(n.root / "tmp")
                target = ["--docker-host", n.dockerd.url]
            else:
                target = ["--output", str(n.layout)]
            pull = ["pull", ref, *target, "--config", str(n.config), "--no-progress"]
            if mode == "p2p":
                pull += ["--daemon", f"http://{n.host.local_address}:{API_PORT}"]
            else:
                pull += ["--data-dir", str(n.root / "store")]
                pull += ["--concurrency", str(s.registry_concurrency)]
                if s.piece_size:
                    pull += ["--piece-size", s.piece_size]
            argv = [PYTHON, "-c", _CLIENT_BOOT, str(n.ready_file), str(n.done_file), *pull]
            n.proc = _popen(
                net,
                n.host,
                argv,
                log=n.log("client"),
                stdin=subprocess.PIPE,
                env=env,
            )

        def all_ready() -> bool:
            for n in nodes:
                assert n.proc is not None
                if n.proc.poll() is not None:
                    raise RuntimeError(f"client n{n.index} exited early: {n.log_tail('client')}")
            return all(n.ready_file.exists() for n in nodes)

        _wait(all_ready, 60, "every client ready")
        setup_seconds = time.monotonic() - setup_started
        say(
            f"{mode}: {len(nodes)} clients ready ({setup_seconds:.1f}s); go "
            f"(T_min {s.bound:.1f}s, giving up after {s.deadline_s:.0f}s)"
        )
        origin_before = _origin_counters(net)
        snap_before = _net_snapshot(net)
        node_before = [n.host.counters() for n in nodes]
        cpu_before = _cpu_times()
        reg_cpu_before = _proc_cpu_seconds(s.registry.pid)
        dockerd_cpu_before = _dockerd_cpu_seconds(nodes)
        t0 = time.monotonic()
        for n in nodes:
            assert n.proc is not None and n.proc.stdin is not None
            n.proc.stdin.write(b"g")
            n.proc.stdin.close()
        deadline = t0 + s.deadline_s
        pending = list(nodes)
        # (seconds since t0, registry egress so far, bytes into the nodes so far (-1: no
        # counters), nodes done): where the links idled
        timeline: list[tuple[float, int, int, int]] = []
        last_report = last_sample = last_moved = t0
        moved = -STALL_BYTES
        loading = 0.0  # --client pull: CPU seconds of the pending nodes' dockerds
        stalled = False
        while pending and time.monotonic() < deadline:
            for n in list(pending):
                assert n.proc is not None
                if n.proc.poll() is not None:
                    n.exited_at = time.monotonic()
                    pending.remove(n)
            now = time.monotonic()
            if pending and now - last_sample >= 1.0:
                # A stall detector: bytes into the nodes still pulling (a trickle of
                # heartbeats is not progress).
                last_sample = now
                total = sum(_rx_bytes(n.host) for n in pending)
                timeline.append(
                    (
                        round(now - t0, 2),
                        _origin_counters(net)["tx_bytes"] - origin_before["tx_bytes"],
                        sum(
                            _rx_bytes(n.host) - b["rx_bytes"]
                            for n, b in zip(nodes, node_before, strict=True)
                            if b
                        )
                        if all(node_before)
                        else -1,
                        len(nodes) - len(pending),
                    )
                )
                # --client pull: a dockerd loading the image (no bytes on the wire) is
                # progress too
                busy = _dockerd_cpu_seconds(pending) if s.client == "pull" else 0.0
                if total < 0:
                    pass  # on loopback nodes have no counters: the deadline alone applies
                elif (
                    total >= moved + STALL_BYTES
                    or total < moved
                    or busy >= loading + 0.5
                    or busy < loading
                ):
                    moved, last_moved, loading = total, now, busy
                elif now - last_moved > s.stall_s:
                    stalled = True
                    break
            if now - last_report > 15:
                last_report = now
                say(f"  {mode}: {len(nodes) - len(pending)}/{len(nodes)} done at "
                    f"{last_report - t0:.0f}s")  # fmt: skip
            time.sleep(0.01)
        t_end = time.monotonic()
        origin_after = _origin_counters(net)
        snap_after = _net_snapshot(net)
        node_after = [n.host.counters() for n in nodes]
        cpu_after = _cpu_times()
        reg_cpu = _proc_cpu_seconds(s.registry.pid) - reg_cpu_before
        dockerd_cpu = (
            _dockerd_cpu_seconds(nodes) - dockerd_cpu_before if s.client == "pull" else None
        )
        for n in pending:
            why = (
                f"stalled: no byte reached a pulling node for {s.stall_s:.0f}s"
                if stalled
                else f"not complete after {s.deadline_s:.0f}s"
            )
            problems.append(f"n{n.index}: {why} (at {t_end - t0:.0f}s): killed")
        _stop([n.proc for n in pending], grace=2)

        stats: list[dict[str, int] | None] = [None] * len(nodes)
        sched_stats: Any = None
        daemon_cpu = sched_cpu = None
        if mode == "p2p":
            digests = [s.image.config_digest, *s.image.layer_digests]
            for i, n in enumerate(nodes):
                totals = {"from_source": 0, "from_peers": 0, "peer_wire": 0}
                try:
                    for digest in digests:
                        st = _json_in(
                            n.host,
                            f"http://{n.host.local_address}:{API_PORT}/api/v1/blobs/{digest}/stats",
                        )
                        for key in totals:
                            totals[key] += int(st.get(key) or 0)
                    stats[i] = totals
                except (OSError, RuntimeError, ValueError) as exc:
                    problems.append(f"n{n.index}: daemon stats: {exc}")
            with contextlib.suppress(OSError, RuntimeError, ValueError):
                sched_stats = _json_in(
                    net.scheduler,
                    f"http://{net.scheduler.address}:{SCHEDULER_PORT}/api/v1/stats",
                )
            daemon_cpu = sum(_proc_cpu_seconds(n.daemon.pid if n.daemon else None) for n in nodes)
            sched_cpu = _proc_cpu_seconds(scheduler.pid if scheduler else None)
        if s.client == "pull":
            say(f"{mode}: asking every node's dockerd for the image")
            name = f"{registry_host}/{REPO}:{TAG}"
            docker_images = [inspect_docker_image(n.dockerd, name) for n in nodes]
    finally:
        _stop([n.proc for n in nodes], grace=2)
        _stop([n.daemon for n in nodes], grace=5)
        _stop([scheduler], grace=5)
        _stop_dockerds(nodes, log_dir, say)
        for n in nodes:
            for f in n.logs:
                f.close()

    docker_ids = [info.get("Id") if isinstance(info, dict) else None for info in docker_images]
    if s.client == "pull":
        name = f"{registry_host}/{REPO}:{TAG}"
        verdicts = [docker_image_problem(info, s.image, name) for info in docker_images]
    else:
        say(f"{mode}: verifying every node's layout")
        with ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1))) as pool:
            verdicts = list(pool.map(lambda n: verify_layout(n.layout, s.image), nodes))
    per_node: list[dict[str, Any]] = []
    node_times: list[float | None] = []
    client_cpu = 0.0
    F = s.image.blobs_size
    for i, n in enumerate(nodes):
        done: dict[str, Any] = {}
        with contextlib.suppress(OSError, ValueError):
            done = json.loads(n.done_file.read_text())
        rc = done.get("rc")
        if rc is None and n.proc is not None:
            rc = n.proc.returncode
        seconds: float | None = None
        if "end" in done:
            seconds = float(done["end"]) - t0
        elif n.exited_at is not None:
            seconds = n.exited_at - t0
        client_cpu += float(done.get("cpu") or 0.0)
        problem = verdicts[i]
        if rc != 0:
            problem = problem or f"exit status {rc}"
            problems.append(f"n{n.index}: exit status {rc}: {n.log_tail('client', 600)}")
        elif problem:
            problems.append(f"n{n.index}: {problem}")
        ok = rc == 0 and verdicts[i] is None
        after, before = node_after[i], node_before[i]
        rx = after["rx_bytes"] - before["rx_bytes"] if after and before else None
        tx = after["tx_bytes"] - before["tx_bytes"] if after and before else None
        st = stats[i]
        node_times.append(seconds if ok else None)
        load_s: float | None = None  # --client pull: exit less the fetch ≈ docker load + tag
        fetch_s = _fetch_seconds(n.log_tail("client", 4000)) if s.client == "pull" else None
        if ok and fetch_s is not None and "go" in done and "end" in done:
            load_s = round(max(0.0, float(done["end"]) - float(done["go"]) - fetch_s), 1)
        per_node.append(
            {
                "node": n.index,
                "address": n.host.address,
                "seconds": round(seconds, 3) if ok and seconds is not None else None,
                "exit_code": rc,
                "verified": ok,
                "problem": problem,
                "start_delay_s": round(float(done["go"]) - t0, 4) if "go" in done else None,
                "rx_bytes": rx,
                "tx_bytes": tx,
                "from_registry": st["from_source"] if st else (rx if mode == "registry" else None),
                "from_peers": st["from_peers"] if st else (0 if mode == "registry" else None),
                "peer_wire_bytes": st["peer_wire"] if st else None,
                **(
                    {"docker_image_id": docker_ids[i], "docker_load_s": load_s}
                    if s.client == "pull"
                    else {}
                ),
            }
        )
    egress = origin_after["tx_bytes"] - origin_before["tx_bytes"]
    # TCP payload (HTTP heads and bodies, retransmissions included): each frame on the
    # veth carries one Ethernet+IPv4+TCP-with-timestamps head (66 bytes; a GSO frame one).
    frames = origin_after["tx_packets"] - origin_before["tx_packets"]
    payload = egress - FRAME_HEAD * frames
    busy = (cpu_after[0] - cpu_before[0]) / max(1, cpu_after[1] - cpu_before[1])
    times = summarize_times(node_times, s.bound)
    result = {
        "mode": mode,
        "client": s.client,
        "ok": not problems and times["failed"] == 0,
        "times": times,
        "registry_egress_bytes": egress,
        "registry_egress_packets": origin_after["tx_packets"] - origin_before["tx_packets"],
        "registry_egress_ratio": round(egress / F, 4),
        "registry_egress_payload_bytes": payload,
        "registry_egress_payload_ratio": round(payload / F, 4),
        "registry_ingress_bytes": origin_after["rx_bytes"] - origin_before["rx_bytes"],
        "network_counters": {k: snap_after[k] - snap_before[k] for k in snap_after},
        "from_registry_total": (
            sum(st["from_source"] for st in stats if st) if mode == "p2p" else None
        ),
        "from_peers_total": sum(st["from_peers"] for st in stats if st) if mode == "p2p" else 0,
        "measured_seconds": round(t_end - t0, 3),
        "setup_seconds": round(setup_seconds, 2),
        "cpu_busy": round(busy, 3),
        "client_cpu_seconds": round(client_cpu, 2),
        "daemon_cpu_seconds": None if daemon_cpu is None else round(daemon_cpu, 2),
        "scheduler_cpu_seconds": None if sched_cpu is None else round(sched_cpu, 2),
        "registry_cpu_seconds": round(reg_cpu, 2),
        "dockerd_cpu_seconds": None if dockerd_cpu is None else round(dockerd_cpu, 2),
        "scheduler_stats": sched_stats,
        "egress_timeline": timeline,
        "per_node": per_node,
        "problems": problems,
    }
    shutil.rmtree(mode_root, ignore_errors=True)  # N copies of the image
    return result


# -- the whole run -----------------------------------------------------------------------


def _link_check(net: EmulatedNetwork, node_mbit: float, origin_mbit: float) -> dict[str, float]:
    """Payload Mbit/s of one TCP stream origin → n0 and (with 2+ nodes) n0 → n1, about a
    second each."""
    out = {}
    rate = min(node_mbit, origin_mbit)
    nbytes = max(4 * MIB, int(rate * 1e6 / 8))
    out["origin_to_n0_mbit"] = (
        measure_throughput(net.origin, net.node_hosts[0], nbytes=nbytes) / 1e6
    )
    if len(net.node_hosts) > 1:
        nbytes = max(4 * MIB, int(node_mbit * 1e6 / 8))
        out["n0_to_n1_mbit"] = (
            measure_throughput(net.node_hosts[0], net.node_hosts[1], nbytes=nbytes) / 1e6
        )
    return {k: round(v, 2) for k, v in out.items()}


def _start_origin(
    net: EmulatedNetwork,
    image: Image,
    result: dict[str, Any],
    queue_ms: float,
    echo: Callable[[str], None],
) -> LocalRegistry:
    """The registry inside the origin namespace, the image pushed to it."""
    rate, burst, latency = tbf_params(net.node_mbit, latency_ms=queue_ms)
    result["network"] = {
        "kind": "netns",
        "tbf": {
            "node": [rate, burst, latency],
            "origin": list(tbf_params(net.origin_mbit, latency_ms=queue_ms)),
        },
        "mtu": net.mtu,
        "queue_ms": net.latency_ms,
        "tcp_congestion_control": net.origin.ns.sysctl("net.ipv4.tcp_congestion_control"),
        "namespaces": f"{net.bridge.name.removesuffix('-br')}-*",
    }
    origin = net.origin
    registry = LocalRegistry(
        addr=origin.address,
        port=REGISTRY_PORT,
        cmd_prefix=origin.ns.exec_prefix,
        probe=lambda url: origin.call(_answers, f"{url}/v2/"),
    )
    registry.start()
    t = time.monotonic()
    origin.call(push_image, registry.url, REPO, TAG, image)
    echo(f"rollout: pushed {image.blobs_size / MIB:.1f} MiB to {registry.url} inside the "
         f"origin namespace ({time.monotonic() - t:.1f}s)")  # fmt: skip
    return registry


def run_rollout(
    *,
    nodes: int,
    node_mbit: float,
    origin_mbit: float,
    image_size: int,
    layers: int,
    layer_format: Literal["gzip", "tar"] = "gzip",
    piece_size: str | None = None,
    mode: Literal["registry", "p2p", "both"] = "both",
    client: str = "get",
    network: Literal["auto", "netns", "loopback"] = "auto",
    out: Path,
    seed: int = 1,
    queue_ms: float = 20.0,
    tcp_cc: str | None = "reno",
    stall_seconds: float = 60.0,
    registry_concurrency: int = 1,
    command: str | None = None,
    say: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """One rollout benchmark (see the module docstring); writes ``out/result.json``,
    ``out/report.md``, the SVG charts and ``out/logs/``, and returns the result.  Raises
    :class:`Refused` when it cannot run here."""

    def echo(text: str) -> None:
        if say is not None:
            say(text)

    reason = client_refusal(client)
    if reason:
        raise Refused(reason)
    if nodes < 1 or layers < 1 or image_size < 1:
        raise Refused("--nodes, --layers and --image-size must be positive")
    if node_mbit <= 0 or origin_mbit <= 0:
        raise Refused("--node-mbit and --origin-mbit must be positive")
    if network == "auto":
        network = "netns" if os.geteuid() == 0 else "loopback"
    if network == "loopback":
        if client != "get":
            raise Refused(
                f"--client {client} starts a dockerd inside each node's network namespace: "
                "not with --network loopback"
            )
        if mode != "p2p":
            raise Refused(
                f"--mode {mode} needs root (registry mode needs tc to shape each node's "
                "link); without root (or with --network loopback) only --mode p2p runs"
            )
        if shutil.which("docker-registry") is None:
            raise Refused("docker-registry not found: apt-get install docker-registry")
        tcp_cc = None
    else:
        reason = preflight()
        if reason:
            raise Refused(reason)
    if tcp_cc:
        allowed = Path("/proc/sys/net/ipv4/tcp_allowed_congestion_control").read_text().split()
        if tcp_cc not in allowed:
            raise Refused(
                f"--tcp-cc {tcp_cc}: a network namespace may only choose one of the host's "
                f"net.ipv4.tcp_allowed_congestion_control ({' '.join(allowed)})"
            )
    started = time.monotonic()
    modes: list[Mode] = ["registry", "p2p"] if mode == "both" else [mode]
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "logs"
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir()
    echo(f"rollout: generating a {layers}-layer {layer_format} image of "
         f"{image_size / MIB:.0f} MiB (seed {seed})")  # fmt: skip
    image = make_image(size=image_size, layers=layers, layer_format=layer_format, seed=seed)
    F = image.blobs_size
    node_bps, origin_bps = node_mbit * 1e6 / 8, origin_mbit * 1e6 / 8
    bound, binding = t_min(F, nodes, node_bps, origin_bps)
    reg_bound = registry_bound(F, nodes, node_bps, origin_bps)
    terms = {
        "origin": F / origin_bps,
        "node_download": F / node_bps,
        "upload_capacity": nodes * F / (origin_bps + nodes * node_bps),
    }
    result: dict[str, Any] = {
        "benchmark": "rollout",
        "command": command or f"python -m bench rollout --nodes {nodes} ...",
        "params": {
            "nodes": nodes,
            "node_mbit": node_mbit,
            "origin_mbit": origin_mbit,
            "image_size": image_size,
            "layers": layers,
            "layer_format": layer_format,
            "piece_size": piece_size,
            "mode": mode,
            "client": client,
            "network": network,
            "seed": seed,
            "queue_ms": queue_ms,
            "tcp_cc": tcp_cc,
            "registry_concurrency": registry_concurrency,
        },
        "image": {
            "bytes": F,
            "config_bytes": len(image.config),
            "layer_bytes": [len(b) for b in image.layers],
            "manifest_digest": image.manifest_digest,
            "reference": f"10.77.0.2:{REGISTRY_PORT}/{REPO}:{TAG}",
        },
        "bounds": {
            "t_min_seconds": round(bound, 4),
            "binding": binding,
            "terms": {k: round(v, 4) for k, v in terms.items()},
            "registry_bound_seconds": round(reg_bound, 4),
        },
        "host": {
            "cpus": os.cpu_count(),
            "kernel": platform.release(),
            "python": platform.python_version(),
        },
        "modes": {},
    }
    from p2pdist.pieces import DEFAULT_PIECE_SIZE

    result["params"]["piece_size_effective"] = piece_size or f"{DEFAULT_PIECE_SIZE // MIB}MiB"
    work = Path(tempfile.mkdtemp(prefix=f"p2pdist-rollout-{os.getpid()}-"))
    registry: LocalRegistry | None = None
    try:
        with contextlib.ExitStack() as stack:
            net: Network
            if network == "loopback":
                net = stack.enter_context(
                    LoopbackNetwork(nodes, node_mbit, origin_mbit, REGISTRY_PORT, say=echo)
                )
                result["network"] = {
                    "kind": "loopback",
                    "shaping": "daemons' --download-rate/--upload-rate; a relay at the "
                    "origin rate in front of the registry",
                }
                registry = LocalRegistry()
                registry.start()
                net.shape_origin((registry.addr, registry.port))
                result["image"]["reference"] = f"{net.origin.address}:{REGISTRY_PORT}/{REPO}:{TAG}"
                push_image(registry.url, REPO, TAG, image)
            else:
                net = stack.enter_context(
                    EmulatedNetwork(
                        nodes, node_mbit, origin_mbit, latency_ms=queue_ms, tcp_cc=tcp_cc, say=echo
                    )
                )
                registry = _start_origin(net, image, result, queue_ms, echo)
                check = _link_check(net, node_mbit, origin_mbit)
                result["network"]["link_check"] = check
                echo("rollout: link check (one TCP stream): "
                     + ", ".join(f"{k} {v:.1f}" for k, v in check.items()))  # fmt: skip
            setup = _Setup(
                net=net,
                image=image,
                registry=registry,
                nodes=nodes,
                piece_size=piece_size,
                work=work,
                logs=logs,
                bound=bound,
                deadline_s=60 + 5 * reg_bound,
                stall_s=stall_seconds,
                registry_concurrency=registry_concurrency,
                say=echo,
                client=client,
            )
            for m in modes:
                t = time.monotonic()
                mr = _run_mode(setup, m)
                mr["wall_seconds"] = round(time.monotonic() - t, 1)
                result["modes"][m] = mr
                s = mr["times"]
                r = s["ratio_to_t_min"] or {}
                echo(
                    f"{m}: {s['completed']}/{nodes} nodes ok; p50 {_ratio(r.get('p50'))} "
                    f"p95 {_ratio(r.get('p95'))} max {_ratio(r.get('max'))} T_min; registry "
                    f"egress {mr['registry_egress_ratio']:.2f}× the image"
                )
            with contextlib.suppress(OSError):
                shutil.copyfile(registry.log_path, logs / "registry.log")
    finally:
        if registry is not None:
            registry.stop()
        shutil.rmtree(work, ignore_errors=True)
    result["ok"] = all(mr["ok"] for mr in result["modes"].values())
    result["wall_seconds"] = round(time.monotonic() - started, 1)
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    for name, svg in chart_files(result).items():
        (out / name).write_text(svg)
    (out / "report.md").write_text(render_report(result))
    return result


def rollout_cli(
    *,
    nodes: int,
    node_mbit: float,
    origin_mbit: float,
    image_size: str,
    layers: int,
    layer_format: str,
    piece_size: str | None,
    mode: str,
    client: str,
    out: str,
    seed: int,
    network: str = "auto",
    queue_ms: float = 20.0,
    tcp_cc: str | None = "reno",
    registry_concurrency: int = 1,
    cleanup: bool = False,
    argv: Sequence[str] | None = None,
) -> int:
    """``python -m bench rollout``: 0 when every node of every mode got intact bytes, 1
    otherwise, 2 when it cannot run here, 130 when interrupted (after cleaning up)."""
    from p2pdist.config import parse_size

    def say(text: str) -> None:
        print(text, flush=True)

    if cleanup:
        if os.geteuid() != 0:
            print("bench rollout: needs root (network namespaces)", file=sys.stderr)
            return 2
        gone = cleanup_leftovers(say=say)
        say(f"rollout: {len(gone)} leftover namespaces removed")
        return 0
    try:
        size = parse_size(image_size)
    except ValueError as exc:
        print(f"bench rollout: --image-size: {exc}", file=sys.stderr)
        return 2
    command = "python -m bench " + shlex.join(argv) if argv is not None else None
    try:
        result = run_rollout(
            nodes=nodes,
            node_mbit=node_mbit,
            origin_mbit=origin_mbit,
            image_size=size,
            layers=layers,
            layer_format="tar" if layer_format == "tar" else "gzip",
            piece_size=piece_size,
            mode=mode if mode in ("registry", "p2p") else "both",  # type: ignore[arg-type]
            client=client,
            network="netns"
            if network == "netns"
            else "loopback"
            if network == "loopback"
            else "auto",
            out=Path(out),
            seed=seed,
            queue_ms=queue_ms,
            tcp_cc=None if tcp_cc == "host" else tcp_cc,
            registry_concurrency=registry_concurrency,
            command=command,
            say=say,
        )
    except Refused as exc:
        print(f"bench rollout: {exc}", file=sys.stderr)
        return 2
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        # Set-up failed (a daemon died at start, a namespace could not be made...): what,
        # in a line; the processes' logs are in OUT/logs.  Everything was cleaned up.
        print(f"bench rollout: failed: {exc} (logs: {Path(out) / 'logs'})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench rollout: interrupted; namespaces and processes cleaned up", file=sys.stderr)
        return 130
    say(f"rollout: {Path(out) / 'report.md'}, {Path(out) / 'result.json'} "
        f"({result['wall_seconds']:.0f}s)")  # fmt: skip
    return 0 if result["ok"] else 1
