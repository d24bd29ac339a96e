"""Configuration of the node role: one object, from a TOML file, then ``P2PDIST_*``
environment variables, then command-line flags (each layer overrides the one before).

Example ``p2pdist.toml``::

    data_dir = "/var/lib/p2pdist"
    piece_size = "2MiB"
    concurrency = 8

    [registries."registry.example.com"]
    username = "ci"
    password = "..."            # or leave it out and use ~/.docker/config.json
    ca_file = "/etc/ssl/private-ca.pem"

    [registries."127.0.0.1:5000"]
    # loopback registries speak plain http by default
    url = "http://127.0.0.1:5000"

Secrets (``password``, ``token``) are kept out of ``repr`` so they never reach a log.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .pieces import DEFAULT_PIECE_SIZE, MAX_PIECE_SIZE, MIN_PIECE_SIZE

__all__ = [
    "DEFAULT_PROXY_LISTEN",
    "NodeConfig",
    "RegistryConfig",
    "default_data_dir",
    "is_loopback_host",
    "load_node_config",
    "parse_duration",
    "parse_rate",
    "parse_size",
    "read_toml",
    "split_hostport",
]

_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?i?B?)?\s*", re.IGNORECASE)
_UNITS = {
    "": 1,
    "B": 1,
    "K": 1000,
    "M": 1000**2,
    "G": 1000**3,
    "T": 1000**4,
    "KIB": 1 << 10,
    "MIB": 1 << 20,
    "GIB": 1 << 30,
    "TIB": 1 << 40,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "TB": 1000**4,
    "KI": 1 << 10,
    "MI": 1 << 20,
    "GI": 1 << 30,
    "TI": 1 << 40,
}


def parse_size(value: str | int) -> int:
    """``"4MiB"`` → 4194304, ``"100MB"`` → 100000000, ``123`` → 123."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ConfigError(f"invalid size {value!r}: must be >= 0")
        return value
    m = _SIZE.fullmatch(str(value))
    if m is None or (m.group(2) or "").upper() not in _UNITS:
        raise ConfigError(f"invalid size {value!r}: expected e.g. 4MiB, 512KiB, 1GB or bytes")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])


_RATE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?)(?:bit(?:/s|ps)?|bps)\s*", re.IGNORECASE)


def parse_rate(value: str | int | None) -> int | None:
    """A bandwidth in bytes/s: ``"100Mbit"`` (also ``100Mbit/s``, ``100Mbps``) →
    12500000, ``"12MiB"``/``"12MB/s"`` as a size per second, ``123`` bytes/s; ``0``,
    ``"off"``, ``""`` or None → None (unlimited)."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "off", "0")):
        return None
    if isinstance(value, str):
        m = _RATE.fullmatch(value)
        if m is not None:
            bits = float(m.group(1)) * _UNITS[m.group(2).upper()]
            return int(bits / 8) or None
        value = value.strip().removesuffix("/s")
    try:
        rate = parse_size(value)
    except ConfigError:
        raise ConfigError(
            f"invalid rate {value!r}: expected e.g. 100Mbit, 12MiB (per second) or bytes/s"
        ) from None
    return rate or None


_DURATION = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h|d)?\s*", re.IGNORECASE)
_DURATION_UNITS = {"": 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: str | float | None) -> float | None:
    """Seconds: ``"24h"`` → 86400, ``"30m"``, ``"1.5s"``, ``"250ms"``, ``"7d"``, a number
    of seconds; ``0``, ``"off"``, ``""`` or None → None (never)."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "off", "0")):
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        if value < 0:
            raise ConfigError(f"invalid duration {value!r}: must be >= 0")
        return float(value) or None
    m = _DURATION.fullmatch(str(value))
    if m is None:
        raise ConfigError(f"invalid duration {value!r}: expected e.g. 24h, 30m, 10s or seconds")
    return float(m.group(1)) * _DURATION_UNITS[(m.group(2) or "").lower()] or None


_LOG_LEVELS = ("debug", "info", "warning", "error")


def is_loopback_host(host: str) -> bool:
    """True for ``localhost``, ``127.x.y.z`` and ``[::1]`` (with or without a port)."""
    h = host
    if h.startswith("["):
        h = h[1 : h.find("]")] if "]" in h else h
    elif h.count(":") == 1:
        h = h.split(":", 1)[0]
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True, kw_only=True)
class RegistryConfig:
    """How to reach one registry host."""

    host: str
    url: str | None = None
    insecure: bool = False
    ca_file: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)

    @property
    def base_url(self) -> str:
        if self.url:
            return self.url.rstrip("/")
        scheme = "http" if is_loopback_host(self.host) else "https"
        return f"{scheme}://{self.host}"


def split_hostport(text: str, *, what: str = "address") -> tuple[str, int]:
    """``"127.0.0.1:65002"`` → ``("127.0.0.1", 65002)``; ``[::1]:80`` works too."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535 or not host:
        raise ConfigError(f"invalid {what} {text!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


DEFAULT_PROXY_LISTEN = "127.0.0.1:65001"


def default_data_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/var/lib/p2pdist")
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "p2pdist"


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeConfig:
    """Everything a node (daemon or standalone CLI) needs to know."""

    data_dir: Path = field(default_factory=default_data_dir)
    piece_size: int = DEFAULT_PIECE_SIZE
    concurrency: int = 8
    platform: str = "linux/amd64"
    docker_config: Path | None = None
    registries: Mapping[str, RegistryConfig] = field(default_factory=dict)
    # -- the daemon (``p2pdist daemon``) ------------------------------------------------
    schedulers: tuple[str, ...] = ()
    """Scheduler base URLs (``http://host:port``); the first that answers is used."""
    host_id: str | None = None
    """This node's id in the swarm (default: hostname + peer port)."""
    zone: str = ""
    peer_listen: str = "0.0.0.0:65002"
    advertise: str | None = None
    """The address peers reach this node's peer server at (host or host:port)."""
    api_listen: str = "127.0.0.1:65003"
    upload_slots: int = 16
    piece_timeout: float = 30.0
    download_rate: int | None = None
    """Bytes/s this node receives at most, from peers and registries together."""
    upload_rate: int | None = None
    """Bytes/s this node's peer server sends at most."""
    source_rate: int | None = None
    """Bytes/s this node fetches from registries (back-to-source) at most."""
    cluster_token: str | None = field(default=None, repr=False)
    """The cluster's shared secret (:mod:`p2pdist.clusterauth`); None: no cluster auth."""
    # -- the registry proxy (part of the daemon) -----------------------------------------
    proxy_listen: str | None = DEFAULT_PROXY_LISTEN
    """HOST:PORT of the registry pull-through proxy (``None``: no proxy)."""
    upstream: str | None = None
    """The registry URL the proxy forwards to when a request names none (no ``?ns=``),
    e.g. ``https://registry-1.docker.io`` for dockerd's ``registry-mirrors``."""
    proxy_tag_ttl: float = 0.0
    """Seconds the proxy answers a tag from its cache before asking the upstream again
    (0: every tag request goes upstream; the cache then only serves when it is down)."""
    # -- cache GC (:mod:`p2pdist.gc`) ----------------------------------------------------
    cache_ttl: float | None = None
    """Seconds after its last use that a complete blob is evicted (None: never)."""
    cache_quota: int | None = None
    """Bytes the store may hold (None: no quota); see the watermarks."""
    cache_high_watermark: float = 0.9
    """Above this fraction of ``cache_quota``, least-recently-used blobs are evicted ..."""
    cache_low_watermark: float = 0.8
    """... until the store holds at most this fraction."""
    gc_interval: float = 60.0
    """Seconds between GC passes (one also runs after each download completes)."""
    log_level: str | None = None
    """debug, info, warning or error (None: the ``--log-level`` flag's, else info)."""
    log_format: str = "text"
    """The daemon's log lines: ``text`` or ``json`` (:mod:`p2pdist.logs`)."""

    def registry(self, host: str) -> RegistryConfig:
        """The settings for ``host``; credentials from the environment apply to it when
        ``P2PDIST_REGISTRY_HOST`` names it (or is unset)."""
        reg = self.registries.get(host) or RegistryConfig(host=host)
        env = os.environ
        env_host = env.get("P2PDIST_REGISTRY_HOST")
        if (
            reg.username is None
            and env.get("P2PDIST_REGISTRY_USERNAME")
            and env_host
            in (
                None,
                host,
            )
        ):
            reg = replace(
                reg,
                username=env["P2PDIST_REGISTRY_USERNAME"],
                password=env.get("P2PDIST_REGISTRY_PASSWORD"),
            )
        return reg

    def validate(self) -> NodeConfig:
        if not MIN_PIECE_SIZE <= self.piece_size <= MAX_PIECE_SIZE:
            raise ConfigError(
                f"piece_size must be between {MIN_PIECE_SIZE} and {MAX_PIECE_SIZE} bytes"
            )
        if not 1 <= self.concurrency <= 256:
            raise ConfigError("concurrency must be between 1 and 256")
        if re.fullmatch(r"[a-z0-9]+/[a-z0-9_]+(/[a-z0-9]+)?", self.platform) is None:
            raise ConfigError(f"invalid platform {self.platform!r}: expected os/arch[/variant]")
        for url in self.schedulers:
            if not re.fullmatch(r"https?://[^\s/]+(/\S*)?", url):
                raise ConfigError(f"invalid scheduler URL {url!r}: expected http://host:port")
        for name in ("peer_listen", "api_listen"):
            split_hostport(getattr(self, name), what=name)
        if self.proxy_listen is not None:
            split_hostport(self.proxy_listen, what="proxy_listen")
        if self.upstream is not None and not re.fullmatch(r"https?://[^\s/?#@]+", self.upstream):
            raise ConfigError(f"invalid upstream {self.upstream!r}: expected http(s)://host[:port]")
        if not 0 < self.piece_timeout <= 3600:
            raise ConfigError("piece_timeout must be more than 0 and at most 3600 seconds")
        if not 0 <= self.proxy_tag_ttl <= 86400:
            raise ConfigError("proxy_tag_ttl must be between 0 and 86400 seconds")
        if not 1 <= self.upload_slots <= 1024:
            raise ConfigError("upload_slots must be between 1 and 1024")
        if self.cache_ttl is not None and not 0 < self.cache_ttl <= 10 * 365 * 86400:
            raise ConfigError("cache_ttl must be more than 0 and at most 10 years (or off)")
        if self.cache_quota is not None and self.cache_quota <= 0:
            raise ConfigError("cache_quota must be more than 0 bytes (or off)")
        for name in ("cache_high_watermark", "cache_low_watermark"):
            if not 0 < getattr(self, name) <= 1:
                raise ConfigError(f"{name} must be a fraction of cache_quota in (0, 1]")
        if self.cache_low_watermark > self.cache_high_watermark:
            raise ConfigError(
                f"cache_low_watermark ({self.cache_low_watermark}) must not be above "
                f"cache_high_watermark ({self.cache_high_watermark})"
            )
        if not 0 < self.gc_interval <= 86400:
            raise ConfigError("gc_interval must be more than 0 and at most 86400 seconds")
        if self.log_level is not None and self.log_level not in _LOG_LEVELS:
            raise ConfigError(
                f"invalid log_level {self.log_level!r}: expected one of {', '.join(_LOG_LEVELS)}"
            )
        if self.log_format not in ("text", "json"):
            raise ConfigError(f"invalid log_format {self.log_format!r}: expected text or json")
        return self


def _registries_from(table: Any) -> dict[str, RegistryConfig]:
    if not isinstance(table, dict):
        raise ConfigError("[registries] must be a table of tables")
    out: dict[str, RegistryConfig] = {}
    allowed = {"url", "insecure", "ca_file", "username", "password", "token"}
    for host, values in table.items():
        if not isinstance(values, dict):
            raise ConfigError(f"[registries.{host!r}] must be a table")
        unknown = set(values) - allowed
        if unknown:
            raise ConfigError(f"[registries.{host!r}]: unknown keys {sorted(unknown)}")
        for key, value in values.items():
            # `insecure = "false"` must not turn TLS checks off (a string is truthy).
            want: type = bool if key == "insecure" else str
            if not isinstance(value, want):
                raise ConfigError(
                    f"[registries.{host!r}] {key}: expected {_TOML_TYPE_NAMES[want]}, "
                    f"got {_toml_type(value)}"
                )
        out[host] = RegistryConfig(host=host, **values)
    return out


_TOML_TYPE_NAMES: dict[type, str] = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "true or false",
    list: "a list of strings",
}
# What each top-level key of the file may hold (TOML's own types; env and flags are text).
_FILE_TYPES: dict[str, tuple[type, ...]] = {
    "piece_size": (str, int),
    "concurrency": (int,),
    "upload_slots": (int,),
    "piece_timeout": (int, float),
    "proxy_tag_ttl": (int, float),
    "download_rate": (str, int),
    "upload_rate": (str, int),
    "source_rate": (str, int),
    "schedulers": (list, str),
    "cache_ttl": (str, int, float),
    "cache_quota": (str, int),
    "cache_high_watermark": (int, float),
    "cache_low_watermark": (int, float),
    "gc_interval": (str, int, float),
}


def _toml_type(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(
        type(value), f"a {type(value).__name__}"
    )


def _check_file_type(key: str, value: Any, path: str | Path) -> None:
    want = _FILE_TYPES.get(key, (str,))
    ok = isinstance(value, want) and not (isinstance(value, bool) and bool not in want)
    if ok and isinstance(value, list):
        ok = all(isinstance(v, str) for v in value)
    if not ok:
        names = " or ".join(_TOML_TYPE_NAMES[t] for t in want)
        raise ConfigError(f"{path}: {key}: expected {names}, got {_toml_type(value)}")


_SIMPLE_KEYS = (
    "data_dir",
    "piece_size",
    "concurrency",
    "platform",
    "docker_config",
    "schedulers",
    "host_id",
    "zone",
    "peer_listen",
    "advertise",
    "api_listen",
    "upload_slots",
    "piece_timeout",
    "download_rate",
    "upload_rate",
    "source_rate",
    "cluster_token_file",
    "proxy_listen",
    "upstream",
    "proxy_tag_ttl",
    "cache_ttl",
    "cache_quota",
    "cache_high_watermark",
    "cache_low_watermark",
    "gc_interval",
    "log_level",
    "log_format",
)


def read_toml(path: str | Path) -> dict[str, Any]:
    """A config file's table; ConfigError (one line) when it is missing or malformed."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} not found") from None
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {str(path)!r}: {exc}") from None


def load_node_config(
    path: str | Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> NodeConfig:
    """File, then environment (``P2PDIST_DATA_DIR``, ``P2PDIST_PIECE_SIZE``,
    ``P2PDIST_CONCURRENCY``, ``P2PDIST_PLATFORM``, ``P2PDIST_CONFIG``), then ``overrides``
    (flags; ``None`` values are ignored)."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    path = path or env.get("P2PDIST_CONFIG")
    if path:
        for key, value in read_toml(path).items():
            if key == "registries":
                values["registries"] = _registries_from(value)
            elif key in _SIMPLE_KEYS:
                _check_file_type(key, value, path)
                values[key] = value
            else:
                raise ConfigError(f"{path}: unknown key {key!r}")
    for key in _SIMPLE_KEYS:
        if f"P2PDIST_{key.upper()}" in env:
            values[key] = env[f"P2PDIST_{key.upper()}"]
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = value
    try:
        if "data_dir" in values:
            values["data_dir"] = Path(values["data_dir"]).expanduser()
        if "docker_config" in values:
            values["docker_config"] = Path(values["docker_config"]).expanduser()
        if "piece_size" in values:
            values["piece_size"] = parse_size(values["piece_size"])
        for key in ("concurrency", "upload_slots"):
            if key in values:
                values[key] = int(values[key])
        for key in ("download_rate", "upload_rate", "source_rate"):
            if key in values:
                values[key] = parse_rate(values[key])
        for key in ("piece_timeout", "proxy_tag_ttl"):
            if key in values:
                values[key] = float(values[key])
        for key in ("cache_high_watermark", "cache_low_watermark"):
            if key in values:
                try:
                    values[key] = float(values[key])
                except ValueError:
                    raise ConfigError(
                        f"invalid {key} {values[key]!r}: expected a fraction, e.g. 0.8"
                    ) from None
        if "cache_ttl" in values:
            values["cache_ttl"] = parse_duration(values["cache_ttl"])
        if "cache_quota" in values:
            quota = values["cache_quota"]
            off = isinstance(quota, str) and quota.strip().lower() in ("", "off")
            values["cache_quota"] = None if off else parse_size(quota) or None
        if "gc_interval" in values:
            interval = parse_duration(values["gc_interval"])
            if interval is None:
                raise ConfigError("gc_interval must be more than 0 seconds")
            values["gc_interval"] = interval
        if "log_level" in values:
            values["log_level"] = str(values["log_level"]).strip().lower()
        if values.get("proxy_listen") in ("", "off", "none"):
            values["proxy_listen"] = None  # P2PDIST_PROXY_LISTEN=off: no proxy
        if "upstream" in values:
            values["upstream"] = str(values["upstream"]).rstrip("/") or None
        token_file = values.pop("cluster_token_file", None)
        if "P2PDIST_CLUSTER_TOKEN" in env or token_file:
            from .clusterauth import read_token

            values["cluster_token"] = read_token(
                value=env.get("P2PDIST_CLUSTER_TOKEN"), file=token_file or None
            )
        if "schedulers" in values:
            raw_urls = values["schedulers"]
            if isinstance(raw_urls, str):
                raw_urls = [u for u in raw_urls.replace(",", " ").split() if u]
            values["schedulers"] = tuple(str(u).rstrip("/") for u in raw_urls)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid configuration: {exc}") from None
    return NodeConfig(**values).validate()
