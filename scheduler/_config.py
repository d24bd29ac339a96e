"""The scheduler's configuration: one frozen, keyword-only object with defaults, loaded
from a TOML file, then ``P2PDIST_*`` environment variables, then flags
(:func:`load_scheduler_config`).

Example ``scheduler.toml`` (every key optional; the names are :class:`SchedulerConfig`'s)::

    listen = "0.0.0.0:65004"
    cluster_token_file = "/etc/p2pdist/token"   # or $P2PDIST_CLUSTER_TOKEN(_FILE)
    heartbeat_timeout = 30.0
    source_fanout = 1
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from p2pdist.clusterauth import read_token
from p2pdist.config import read_toml, split_hostport
from p2pdist.errors import ConfigError

__all__ = ["DEFAULT_LISTEN", "SchedulerConfig", "load_scheduler_config"]

DEFAULT_LISTEN = "0.0.0.0:65004"


@dataclass(frozen=True, slots=True, kw_only=True)
class SchedulerConfig:
    """Every number the scheduler's rules use.  Times are in seconds."""

    #: A host that sends nothing (no heartbeat, no event) for this long is expired.
    heartbeat_timeout: float = 30.0
    #: A source lease (the right to fetch a piece from the registry) lapses after this.
    lease_timeout: float = 30.0
    #: A piece assigned from a parent and not reported within this is offered again.
    piece_timeout: float = 15.0
    #: How many nodes may hold a source lease on the same piece at once.
    source_fanout: int = 1
    #: Longest contiguous run of pieces leased to one node in one answer (one Range
    #: request); a node asks again for more.
    source_run_pieces: int = 2
    #: Most outstanding source leases one node may hold on one task.
    max_source_leases_per_host: int = 8
    #: Most pieces of one task leased from the registry at once, all nodes together.
    #: The origin's uplink is shared by every range in flight: the fewer there are, the
    #: sooner each piece is whole and can spread from peer to peer (with 64 ranges of
    #: 4 MiB at once, the first pieces took seconds and the peers' links sat idle).
    #: The cost: a lessee that dies holds its room until peers' errors bench it or its
    #: heartbeats stop (``heartbeat_timeout``).
    max_source_leases_per_task: int = 4
    #: Cap on pieces (from peers and from the source together) in one answer.
    max_pieces_per_assignment: int = 16
    #: Cap on pieces one parent is named for in one answer.
    max_pieces_per_parent: int = 2
    #: Most children one parent sends the same piece to at once.  A fresh piece has one
    #: holder, and rarest-first sends every child to it: shared twelve ways, its uplink
    #: made the piece's first copies take seconds, and only then could they be passed
    #: on.  Two at a time, the copies are whole sooner and the holders double; the
    #: other children fetch other pieces meanwhile.  Side by side at N=8 (6 runs each):
    #: max / T_min 1.27-1.30x against 1.29-1.33x.
    max_uploads_per_piece: int = 2
    #: Holders sampled per piece when choosing its parent (per zone pool).
    parent_candidates: int = 8
    #: Parent score weights (lower score wins): busy fraction, CPU (0..1), other zone.
    load_weight: float = 1.0
    cpu_weight: float = 0.25
    zone_weight: float = 1.0
    #: Penalties after a failure report: ``error`` (doubling per recent failure,
    #: capped at ``max_penalty``), ``slow``, ``refused`` (the parent was full).
    error_penalty: float = 5.0
    slow_penalty: float = 2.0
    refused_penalty: float = 0.5
    max_penalty: float = 60.0
    #: Failures older than this are forgotten; ``avoid_after_failures`` within the
    #: window bench the parent for ``avoid_duration``.
    failure_window: float = 60.0
    avoid_after_failures: int = 3
    avoid_duration: float = 120.0
    #: ``retry_after`` of an answer that assigns nothing (waiting for lessees/parents).
    retry_after: float = 0.1
    #: The HTTP service's address (not used by the rules).
    listen: str = DEFAULT_LISTEN
    #: The cluster's shared token events must carry (None: no cluster auth); never shown.
    cluster_token: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        ints = {
            "source_fanout": self.source_fanout,
            "source_run_pieces": self.source_run_pieces,
            "max_source_leases_per_host": self.max_source_leases_per_host,
            "max_source_leases_per_task": self.max_source_leases_per_task,
            "max_pieces_per_assignment": self.max_pieces_per_assignment,
            "max_pieces_per_parent": self.max_pieces_per_parent,
            "max_uploads_per_piece": self.max_uploads_per_piece,
            "parent_candidates": self.parent_candidates,
            "avoid_after_failures": self.avoid_after_failures,
        }
        for name, value in ints.items():
            if value < 1:
                raise ValueError(f"SchedulerConfig.{name} must be >= 1, not {value}")
        for name in ("heartbeat_timeout", "lease_timeout", "piece_timeout", "retry_after"):
            if not getattr(self, name) > 0:
                raise ValueError(f"SchedulerConfig.{name} must be > 0")


_NOT_IN_FILE = {"cluster_token"}  # a secret: from cluster_token_file or the environment


def _file_keys() -> dict[str, type]:
    types: dict[str, type] = {"cluster_token_file": str}
    for f in fields(SchedulerConfig):
        if f.name not in _NOT_IN_FILE:
            types[f.name] = {"int": int, "float": float, "str": str}[str(f.type)]
    return types


def _typed(key: str, value: Any, want: type, where: str, *, text: bool = False) -> Any:
    """``value`` as ``want``; strings are parsed only when ``text`` (the environment and
    flags are text, a TOML file has types of its own)."""
    got = type(value).__name__
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"{where}: {key}: expected {want.__name__}, got {got}")
    if want is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: {key}: expected a string, got {got}")
        return value
    if isinstance(value, str) and not text:
        raise ConfigError(f"{where}: {key}: expected {want.__name__}, got a string")
    if isinstance(value, str):
        try:
            return want(value)
        except ValueError:
            raise ConfigError(f"{where}: {key}: expected {want.__name__}, got {value!r}") from None
    if want is int and not isinstance(value, int):
        raise ConfigError(f"{where}: {key}: expected an integer, got {value!r}")
    return want(value)


def load_scheduler_config(
    path: str | Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> SchedulerConfig:
    """The file (``path`` or ``$P2PDIST_SCHEDULER_CONFIG``), then the environment
    (``P2PDIST_SCHEDULER_LISTEN``, ``P2PDIST_CLUSTER_TOKEN_FILE``,
    ``P2PDIST_CLUSTER_TOKEN``), then ``overrides`` (flags; ``None`` values are ignored).
    Unknown keys, wrong types and out-of-range values are :class:`ConfigError`."""
    env = os.environ if env is None else env
    keys = _file_keys()
    values: dict[str, Any] = {}
    path = path or env.get("P2PDIST_SCHEDULER_CONFIG")
    if path:
        for key, value in read_toml(path).items():
            if key not in keys:
                raise ConfigError(f"{path}: unknown key {key!r}")
            values[key] = _typed(key, value, keys[key], str(path))
    for key, var in (
        ("listen", "P2PDIST_SCHEDULER_LISTEN"),
        ("cluster_token_file", "P2PDIST_CLUSTER_TOKEN_FILE"),
    ):
        if env.get(var):
            values[key] = env[var]
    for key, value in (overrides or {}).items():
        if value is not None:
            if key not in keys:
                raise ConfigError(f"unknown scheduler setting {key!r}")
            values[key] = _typed(key, value, keys[key], "flag", text=True)
    split_hostport(values.get("listen", DEFAULT_LISTEN), what="listen")
    token_file = values.pop("cluster_token_file", None)
    token = read_token(value=env.get("P2PDIST_CLUSTER_TOKEN"), file=token_file or None)
    try:
        return SchedulerConfig(**values, cluster_token=token)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
