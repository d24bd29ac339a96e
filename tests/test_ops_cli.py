"""``p2pdist scheduler --config`` (:func:`scheduler.load_scheduler_config`) and
``p2pdist health`` (the image's HEALTHCHECK): the loader's layers and refusals without
sockets; ``health`` against a real scheduler and a real daemon, and against nothing."""

from __future__ import annotations

import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import trio

from bench.localregistry import free_port
from p2pdist.config import NodeConfig
from p2pdist.daemon import open_daemon
from p2pdist.errors import ConfigError
from p2pdist.healthcheck import health_url
from scheduler import SchedulerConfig, load_scheduler_config
from scheduler.service import serve_scheduler

TOKEN = "t0ken-" + "x" * 40


def _toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "scheduler.toml"
    path.write_text(text)
    return path


def test_scheduler_config_file_then_env_then_flags(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    path = _toml(
        tmp_path,
        'listen = "127.0.0.1:7000"\nsource_fanout = 2\nheartbeat_timeout = 12\n'
        f'cluster_token_file = "{token_file}"\n',
    )
    config = load_scheduler_config(path, env={})
    assert (config.listen, config.source_fanout, config.heartbeat_timeout) == (
        "127.0.0.1:7000",
        2,
        12.0,
    )
    assert config.cluster_token == TOKEN and TOKEN not in repr(config)
    env = {"P2PDIST_SCHEDULER_CONFIG": str(path), "P2PDIST_SCHEDULER_LISTEN": "127.0.0.1:7001"}
    assert load_scheduler_config(env=env).listen == "127.0.0.1:7001"
    flagged = load_scheduler_config(env=env, overrides={"listen": "127.0.0.1:7002", "x": None})
    assert flagged.listen == "127.0.0.1:7002"
    # The token's value from the environment wins over its file, as for the daemon.
    other = "other-" + "y" * 40
    assert load_scheduler_config(env={**env, "P2PDIST_CLUSTER_TOKEN": other}).cluster_token == other


def test_scheduler_config_defaults_are_the_dataclass_defaults() -> None:
    assert load_scheduler_config(env={}) == SchedulerConfig()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("bogus = 1\n", "unknown key 'bogus'"),
        ('source_fanout = "2"\n', "source_fanout: expected int"),
        ("source_fanout = 1.5\n", "source_fanout: expected an integer"),
        ("source_fanout = true\n", "source_fanout: expected int, got bool"),
        ("source_fanout = 0\n", "source_fanout must be >= 1"),
        ("retry_after = 0\n", "retry_after must be > 0"),
        ('listen = "nowhere"\n', "invalid listen 'nowhere'"),
        ("cluster_token = 'abc'\n", "unknown key 'cluster_token'"),  # only from a file/env
        ('cluster_token_file = "/nonexistent/token"\n', "cannot read the cluster token file"),
        ("listen = [\n", "cannot read config file"),
    ],
)
def test_scheduler_config_refuses_bad_input(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_scheduler_config(_toml(tmp_path, text), env={})


def _p2pdist(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "p2pdist", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent"},
        check=False,
    )


def test_scheduler_cli_refuses_a_bad_config_in_one_line(tmp_path: Path) -> None:
    result = _p2pdist("scheduler", "--config", str(_toml(tmp_path, "source_fanout = 0\n")))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "source_fanout must be >= 1" in result.stderr


def test_health_url_follows_the_daemons_api_listen() -> None:
    assert health_url(NodeConfig(api_listen="127.0.0.1:7003")) == "http://127.0.0.1:7003/healthz"
    assert health_url(NodeConfig(api_listen="0.0.0.0:7003"), ready=True) == (
        "http://127.0.0.1:7003/readyz"
    )
    assert health_url(NodeConfig(api_listen="[::]:7003")) == "http://[::1]:7003/healthz"


async def test_health_command_against_real_servers_and_nothing(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        sinfo = await nursery.start(partial(serve_scheduler, "127.0.0.1", 0))
        config = NodeConfig(
            data_dir=tmp_path / "data",
            peer_listen="127.0.0.1:0",
            api_listen="127.0.0.1:0",
            proxy_listen=None,
            schedulers=(sinfo.url,),
        )
        async with open_daemon(config) as info:
            api = info.api_url.removeprefix("http://").rstrip("/")
            daemon_toml = tmp_path / "daemon.toml"
            daemon_toml.write_text(f'api_listen = "{api}"\n')
            for args in (
                ("health", "--url", f"{sinfo.url.rstrip('/')}/healthz"),
                ("health", "--config", str(daemon_toml)),
                ("health", "--config", str(daemon_toml), "--ready"),
            ):
                result = await trio.to_thread.run_sync(lambda a=args: _p2pdist(*a))
                assert result.returncode == 0, (args, result.stderr)
                assert result.stdout.startswith("ok http://")
            missing = await trio.to_thread.run_sync(
                lambda: _p2pdist("health", "--url", f"{info.api_url.rstrip('/')}/nope")
            )
            assert missing.returncode == 4 and "HTTP 404" in missing.stderr
        nursery.cancel_scope.cancel()
    closed = _p2pdist(
        "health", "--url", f"http://127.0.0.1:{free_port()}/healthz", "--timeout", "2"
    )
    assert closed.returncode == 4
    assert closed.stderr.startswith("p2pdist: error:") and closed.stderr.count("\n") == 1
    assert "Traceback" not in closed.stderr
