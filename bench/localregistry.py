"""A real ``docker-registry`` (distribution 2.8) on a loopback port, for tests and benchmarks.

    with LocalRegistry() as reg:                      # anonymous
        push_image(reg.url, "test/app", "v1", image)
    with LocalRegistry(htpasswd={"alice": "s3cret"}) as reg:
        ...                                           # Basic auth, bcrypt via `htpasswd -Bbn`
    with LocalRegistry(token=TokenAuth(realm=..., service=..., issuer=...,
                                       rootcertbundle=...)) as reg:
        ...                                           # Bearer tokens from your token server

The registry runs in its own temporary directory (``reg.root``): ``config.yml``, ``storage/``,
``htpasswd`` and ``registry.log`` (its stdout+stderr).  It is terminated (then killed) on exit.
Only loopback addresses are accepted, except inside a network namespace of your own:

    LocalRegistry(addr="10.77.0.2", port=5000, cmd_prefix=["ip", "netns", "exec", NS],
                  probe=lambda url: ns.call(answers, url))

(the process runs as ``cmd_prefix + [docker-registry, serve, config]``; ``probe(url)`` says
whether ``GET url/v2/`` answers, for an address this process cannot reach itself).
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx

__all__ = [
    "LocalRegistry",
    "RegistryNotInstalled",
    "RegistryStartError",
    "TokenAuth",
    "find_registry_binary",
    "free_port",
    "registry_available",
]

DEBIAN_PACKAGE = "docker-registry"


class RegistryNotInstalled(RuntimeError):
    """The ``docker-registry`` binary is not on PATH."""


class RegistryStartError(RuntimeError):
    """The registry process died or did not answer ``GET /v2/`` in time."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenAuth:
    """``auth.token`` settings of the registry (see distribution's docs/configuration.md)."""

    realm: str
    service: str
    issuer: str
    rootcertbundle: str | os.PathLike[str]


def find_registry_binary(binary: str | None = None) -> str:
    """The path of ``docker-registry``; raises :class:`RegistryNotInstalled` if missing."""
    name = binary or "docker-registry"
    path = shutil.which(name)
    if path is None:
        raise RegistryNotInstalled(
            f"{name!r} not found on PATH: install the Debian package "
            f"(apt-get install {DEBIAN_PACKAGE})"
        )
    return path


def registry_available() -> bool:
    return shutil.which("docker-registry") is not None


def _check_loopback(addr: str) -> None:
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError as exc:
        raise ValueError(f"addr must be a loopback IP address, got {addr!r}") from exc
    if not ip.is_loopback:
        raise ValueError(f"addr must be a loopback address (127.0.0.0/8 or ::1), got {addr!r}")


def free_port(addr: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``addr`` a moment ago (the OS's choice)."""
    _check_loopback(addr)
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((addr, 0))
        port: int = s.getsockname()[1]
        return port


def _hash_htpasswd(user: str, password: str) -> str:
    """One bcrypt ``user:hash`` line, made by apache2-utils' ``htpasswd -Bbn``."""
    exe = shutil.which("htpasswd")
    if exe is None:
        raise RegistryNotInstalled(
            "'htpasswd' not found on PATH: "
            "install the Debian package (apt-get install apache2-utils)"
        )
    out = subprocess.run(
        [exe, "-Bbn", user, password], check=True, capture_output=True, text=True, timeout=30
    ).stdout
    return out.strip()


class LocalRegistry:
    """A ``docker-registry serve`` process; a sync context manager.

    Attributes (valid once started): ``url`` (``http://127.0.0.1:PORT``), ``host``
    (``127.0.0.1:PORT``), ``port``, ``addr``, ``root`` (the temp dir), ``storage_dir``
    (``root/storage``, the filesystem driver's rootdirectory), ``config_path``, ``log_path``.
    """

    def __init__(
        self,
        *,
        htpasswd: Mapping[str, str] | None = None,
        token: TokenAuth | Mapping[str, str] | None = None,
        addr: str = "127.0.0.1",
        port: int = 0,
        binary: str | None = None,
        log_level: str = "warn",
        startup_timeout: float = 20.0,
        extra_config: Mapping[str, Any] | None = None,
        keep_root: bool = False,
        cmd_prefix: Sequence[str] = (),
        probe: Callable[[str], bool] | None = None,
    ) -> None:
        if htpasswd is not None and token is not None:
            raise ValueError("choose one of htpasswd= and token=")
        if cmd_prefix:
            if not port:
                raise ValueError("port= is required with cmd_prefix= (no free-port probing)")
        else:
            _check_loopback(addr)
        self.cmd_prefix = list(cmd_prefix)
        self.probe = probe
        self.binary = find_registry_binary(binary)
        self.addr = addr
        self._want_port = port
        self.port = port
        self.htpasswd = dict(htpasswd) if htpasswd is not None else None
        if token is not None and not isinstance(token, TokenAuth):
            token = TokenAuth(
                realm=token["realm"],
                service=token["service"],
                issuer=token["issuer"],
                rootcertbundle=token["rootcertbundle"],
            )
        self.token = token
        self.log_level = log_level
        self.startup_timeout = startup_timeout
        self.extra_config = dict(extra_config or {})
        self.keep_root = keep_root
        self._root: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None

    # -- addresses ------------------------------------------------------------------------

    @property
    def host(self) -> str:
        if ":" in self.addr:
            return f"[{self.addr}]:{self.port}"
        return f"{self.addr}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def root(self) -> Path:
        if self._root is None:
            raise RuntimeError("LocalRegistry is not started")
        return self._root

    @property
    def storage_dir(self) -> Path:
        return self.root / "storage"

    @property
    def config_path(self) -> Path:
        return self.root / "config.yml"

    @property
    def log_path(self) -> Path:
        return self.root / "registry.log"

    @property
    def pid(self) -> int | None:
        """The registry process's id (None when not running)."""
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, max_bytes: int = 4000) -> str:
        """The last ``max_bytes`` of the registry's stdout+stderr."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - max_bytes))
                return f.read().decode("utf-8", "replace")
        except (OSError, RuntimeError):
            return ""

    # -- config ---------------------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        """The registry configuration (written as JSON, which is valid YAML)."""
        cfg: dict[str, Any] = {
            "version": 0.1,
            "log": {"level": self.log_level, "accesslog": {"disabled": True}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage_dir)},
                "delete": {"enabled": True},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {"addr": self.host, "secret": secrets.token_hex(16)},
        }
        if self.htpasswd is not None:
            cfg["auth"] = {
                "htpasswd": {"realm": "p2pdist-test", "path": str(self.root / "htpasswd")}
            }
        elif self.token is not None:
            cfg["auth"] = {
                "token": {
                    "realm": self.token.realm,
                    "service": self.token.service,
                    "issuer": self.token.issuer,
                    "rootcertbundle": os.fspath(self.token.rootcertbundle),
                }
            }
        for key, value in self.extra_config.items():
            if isinstance(value, Mapping) and isinstance(cfg.get(key), dict):
                cfg[key] = {**cfg[key], **value}
            else:
                cfg[key] = value
        return cfg

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        if self._proc is not None:
            raise RuntimeError("LocalRegistry already started")
        self._root = Path(tempfile.mkdtemp(prefix="p2pdist-registry-"))
        try:
            if self.htpasswd is not None:
                lines = [_hash_htpasswd(u, p) for u, p in self.htpasswd.items()]
                (self.root / "htpasswd").write_text("\n".join(lines) + "\n")
            attempts = 1 if self._want_port else 5
            for attempt in range(attempts):
                self.port = self._want_port or free_port(self.addr)
                try:
                    self._spawn_and_wait()
                    return
                except RegistryStartError as exc:
                    self._stop_process()
                    in_use = "address already in use" in str(exc)
                    if not in_use or attempt == attempts - 1:
                        raise
        except BaseException:
            self.stop()
            raise

    def _spawn_and_wait(self) -> None:
        self.config_path.write_text(json.dumps(self.config(), indent=2))
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in _stop_process
        self._proc = subprocess.Popen(
            [*self.cmd_prefix, self.binary, "serve", str(self.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            cwd=self.root,
        )
        deadline = time.monotonic() + self.startup_timeout
        with httpx.Client(timeout=2.0, trust_env=False) as client:
            while True:
                rc = self._proc.poll()
                if rc is not None:
                    raise RegistryStartError(
                        f"docker-registry exited with status {rc} during start-up "
                        f"(addr {self.host}); its output ends with:\n{self.log_tail()}"
                    )
                if self.probe is not None:
                    if self.probe(self.url):
                        return
                else:
                    try:
                        client.get(f"{self.url}/v2/")
                        return  # any HTTP answer (200, or 401 with auth) means it serves
                    except httpx.TransportError:
                        pass
                if time.monotonic() > deadline:
                    raise RegistryStartError(
                        f"docker-registry did not answer GET {self.url}/v2/ within "
                        f"{self.startup_timeout}s; its output ends with:\n{self.log_tail()}"
                    )
                time.sleep(0.05)

    def _stop_process(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def stop(self) -> None:
        """Stop the process (SIGTERM, then SIGKILL after 5 s) and remove the temp dir."""
        try:
            self._stop_process()
        finally:
            root, self._root = self._root, None
            if root is not None and not self.keep_root:
                shutil.rmtree(root, ignore_errors=True)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<LocalRegistry {self.host} {state}>"
