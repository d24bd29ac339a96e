"""``p2pdist setup``: runtime configuration files, printed or written with a backup."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from p2pdist.errors import UsageError
from p2pdist.setup import containerd_hosts_toml, docker_daemon_json


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "p2pdist", "setup", *args], capture_output=True, text=True
    )


def test_docker_json_adds_proxy_first_and_keeps_other_keys() -> None:
    existing = json.dumps({"registry-mirrors": ["https://m.example"], "debug": True})
    out = json.loads(docker_daemon_json(existing, "http://127.0.0.1:65001"))
    assert out["registry-mirrors"] == ["http://127.0.0.1:65001", "https://m.example"]
    assert out["debug"] is True
    again = json.loads(docker_daemon_json(json.dumps(out), "http://127.0.0.1:65001/"))
    assert again["registry-mirrors"].count("http://127.0.0.1:65001") == 1


@pytest.mark.parametrize("bad", ["{", "[1]", '{"registry-mirrors": "x"}'])
def test_docker_json_refuses_malformed_existing(bad: str) -> None:
    with pytest.raises(UsageError):
        docker_daemon_json(bad)


def test_containerd_hosts_toml_is_valid_toml() -> None:
    doc = tomllib.loads(containerd_hosts_toml("docker.io", "http://127.0.0.1:65001"))
    assert doc["server"] == "https://registry-1.docker.io"
    assert doc["host"]["http://127.0.0.1:65001"]["capabilities"] == ["pull", "resolve"]
    with pytest.raises(UsageError):
        containerd_hosts_toml("bad host")
    with pytest.raises(UsageError):
        containerd_hosts_toml("docker.io", "ftp://x")


def test_cli_writes_with_backup(tmp_path: Path) -> None:
    daemon_json = tmp_path / "daemon.json"
    daemon_json.write_text('{"debug": true}\n')
    res = _cli("docker", "--write", "--path", str(daemon_json))
    assert res.returncode == 0, res.stderr
    assert json.loads(daemon_json.read_text())["registry-mirrors"] == ["http://127.0.0.1:65001"]
    assert (tmp_path / "daemon.json.bak").read_text() == '{"debug": true}\n'
    res = _cli("containerd", "--registry", "docker.io", "--write", "--path", str(tmp_path / "d"))
    assert res.returncode == 0, res.stderr
    hosts = tomllib.loads((tmp_path / "d" / "docker.io" / "hosts.toml").read_text())
    assert hosts["host"]["http://127.0.0.1:65001"]["capabilities"] == ["pull", "resolve"]


def test_cli_prints_without_write_and_errors_are_one_line(tmp_path: Path) -> None:
    res = _cli("docker", "--path", str(tmp_path / "none.json"))
    assert res.returncode == 0 and "registry-mirrors" in res.stdout
    assert not (tmp_path / "none.json").exists()
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    res = _cli("docker", "--write", "--path", str(bad))
    assert res.returncode == 2
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert bad.read_text() == "{"  # the malformed file is left alone
    res = _cli("containerd")
    assert res.returncode == 2 and "--registry" in res.stderr
