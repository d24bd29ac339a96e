"""``p2pdist setup docker|containerd``: point a container runtime at the node's proxy.

* dockerd: ``registry-mirrors`` in ``/etc/docker/daemon.json`` (only applies to Docker Hub
  images — dockerd's rule, not ours);
* containerd: ``<certs.d>/<registry>/hosts.toml`` with the proxy as a pull/resolve host
  (containerd then sends ``?ns=<registry>`` so the proxy knows the upstream).

Without ``--write`` the result is printed; with it the file is written atomically and an
existing file is kept as ``<file>.bak``.  A malformed existing file is an error, never
silently replaced.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

from .errors import UsageError

__all__ = ["containerd_hosts_toml", "docker_daemon_json", "write_with_backup"]

DEFAULT_PROXY = "http://127.0.0.1:65001"
_HOST = re.compile(r"[A-Za-z0-9.-]+(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?")


def _check_proxy(proxy: str) -> str:
    if not re.fullmatch(r"https?://[^\s/]+/?", proxy):
        raise UsageError(f"invalid proxy URL {proxy!r}: expected http://HOST:PORT")
    return proxy.rstrip("/")


def docker_daemon_json(existing: str | None, proxy: str = DEFAULT_PROXY) -> str:
    """``daemon.json`` with the proxy first in ``registry-mirrors`` (other keys kept)."""
    proxy = _check_proxy(proxy)
    config: dict[str, object] = {}
    if existing is not None and existing.strip():
        try:
            loaded = json.loads(existing)
        except json.JSONDecodeError as exc:
            raise UsageError(f"existing daemon.json is not valid JSON: {exc}") from None
        if not isinstance(loaded, dict):
            raise UsageError("existing daemon.json is not a JSON object")
        config = loaded
    mirrors = config.get("registry-mirrors", [])
    if not isinstance(mirrors, list) or not all(isinstance(m, str) for m in mirrors):
        raise UsageError("existing daemon.json has a malformed registry-mirrors")
    config["registry-mirrors"] = [proxy, *(m for m in mirrors if m.rstrip("/") != proxy)]
    return json.dumps(config, indent=2) + "\n"


def containerd_hosts_toml(registry: str, proxy: str = DEFAULT_PROXY) -> str:
    """``hosts.toml`` for ``registry``: pull and resolve through the proxy, falling back to
    the registry itself (containerd tries hosts in order)."""
    if not _HOST.fullmatch(registry):
        raise UsageError(f"invalid registry host {registry!r}")
    proxy = _check_proxy(proxy)
    server = "https://registry-1.docker.io" if registry == "docker.io" else f"https://{registry}"
    return f'server = "{server}"\n\n[host."{proxy}"]\n  capabilities = ["pull", "resolve"]\n'


def write_with_backup(path: Path, content: str) -> Path | None:
    """Write ``content`` to ``path`` atomically; an existing file is kept as ``.bak``
    (returned)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    backup: Path | None = None
    if path.exists():
        backup = path.with_name(path.name + ".bak")
        backup.write_bytes(path.read_bytes())
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return backup
