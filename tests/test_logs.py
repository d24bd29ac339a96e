"""Log lines: ``--log-format json`` on real daemon and scheduler processes, and the
formatters (unit tests).

The integration test runs a scheduler and two daemons as subprocesses at DEBUG level with
``--log-format json`` (the scheduler through ``$P2PDIST_LOG_FORMAT``), moves a blob from a
real registry through them, and checks that every line each wrote to stderr is one JSON
object with time, level, logger and message, and that lines about the transfer carry the
task's digest, this node's id and the parent's id as fields.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench.cluster import wait_until
from bench.image import push_blob
from bench.localregistry import LocalRegistry, free_port
from p2pdist.cli import main
from p2pdist.config import load_node_config
from p2pdist.errors import ConfigError, UsageError
from p2pdist.logs import JsonFormatter, TextFormatter, configure_logging, log_context
from tests.helpers import requires_registry

HOST = "127.0.0.1"
PIECE = 64 * 1024


class _Proc:
    def __init__(self, name: str, argv: list[str], root: Path, env: dict[str, str]) -> None:
        self.name = name
        self.stderr_path = root / f"{name}.stderr"
        self.stdout_path = root / f"{name}.stdout"
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "p2pdist", *argv],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=env,
            )

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)

    def json_lines(self) -> list[dict[str, Any]]:
        """Every stderr line, parsed: fails on the first one that is not a JSON object."""
        out = []
        for n, line in enumerate(self.stderr_path.read_text().splitlines(), 1):
            try:
                obj = json.loads(line)
            except ValueError:
                pytest.fail(f"{self.name} stderr line {n} is not JSON: {line[:300]!r}")
            assert isinstance(obj, dict), line
            assert {"time", "level", "logger", "message"} <= obj.keys(), obj
            assert obj["time"].endswith("Z") and obj["level"] in (
                "DEBUG",
                "INFO",
                "WARNING",
                "ERROR",
                "CRITICAL",
            ), obj
            out.append(obj)
        return out


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=1, trust_env=False).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture
def procs() -> Iterator[list[_Proc]]:
    started: list[_Proc] = []
    try:
        yield started
    finally:
        for p in started:
            p.stop()


@requires_registry
def test_json_logs_from_daemons_and_scheduler(
    tmp_path: Path, registry: LocalRegistry, procs: list[_Proc]
) -> None:
    data = os.urandom(6 * PIECE + 99)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    push_blob(registry.url, "logs/blob", data)
    env = {**os.environ, "P2PDIST_LOG_FORMAT": "json"}
    env.pop("P2PDIST_CONFIG", None)
    sched_port = free_port(HOST)
    sched_url = f"http://{HOST}:{sched_port}"
    procs.append(
        _Proc(
            "scheduler",
            ["scheduler", "--listen", f"{HOST}:{sched_port}", "--log-level", "debug"],
            tmp_path,
            env,
        )
    )
    wait_until(lambda: _healthy(sched_url), timeout=20, what="scheduler up")
    apis = {}
    for name in ("json-a", "json-b"):
        api_port = free_port(HOST)
        argv = [
            "daemon",
            "--log-format",
            "json",
            "--log-level",
            "debug",
            "--data-dir",
            str(tmp_path / name),
            "--scheduler",
            sched_url,
            "--peer-listen",
            f"{HOST}:{free_port(HOST)}",
            "--api-listen",
            f"{HOST}:{api_port}",
            "--proxy-listen",
            "off",
            "--host-id",
            name,
            "--piece-size",
            str(PIECE),
        ]
        procs.append(_Proc(name, argv, tmp_path, env))
        apis[name] = f"http://{HOST}:{api_port}"
    for url in apis.values():
        wait_until(lambda url=url: _healthy(url), timeout=20, what=f"daemon {url} up")
    params = {"registry": registry.host, "repository": "logs/blob"}
    with httpx.Client(trust_env=False, timeout=60) as c:
        for name in ("json-a", "json-b"):  # b fetches from a
            r = c.get(f"{apis[name]}/api/v1/blobs/{digest}", params=params)
            assert r.status_code == 200 and r.content == data
            stats = c.get(f"{apis[name]}/api/v1/blobs/{digest}/stats").json()
        assert stats["from_peers"] > 0, stats  # b's: the peer lines below exist
    for p in procs:
        p.stop()

    logs = {p.name: p.json_lines() for p in procs}
    assert any(o["logger"] == "p2pdist.scheduler" for o in logs["scheduler"]), logs["scheduler"]
    for name in ("json-a", "json-b"):
        lines = logs[name]
        assert lines, f"{name} logged nothing"
        assert any(o.get("task") == digest and o.get("host") == name for o in lines), lines
    # b's piece fetches from a name both the task and the parent.
    assert any(
        o.get("task") == digest and o.get("peer") == "json-a" and o["logger"] == "p2pdist.swarm"
        for o in logs["json-b"]
    ), [o for o in logs["json-b"] if o["logger"] == "p2pdist.swarm"]


# -- unit tests ---------------------------------------------------------------------------------


def _record(msg: str, *args: object, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("p2pdist.test", logging.WARNING, __file__, 1, msg, args, None)
    for k, v in extra.items():
        setattr(record, k, v)
    return record


def test_json_formatter_fields_from_context_and_extra() -> None:
    fmt = JsonFormatter()
    plain = json.loads(fmt.format(_record("hello %s", "world")))
    assert plain["message"] == "hello world" and plain["level"] == "WARNING"
    assert plain["logger"] == "p2pdist.test"
    assert not {"host", "task", "peer"} & plain.keys()
    with log_context(host="n1", task="sha256:ab"):
        with log_context(peer="n2"):
            inner = json.loads(fmt.format(_record("x")))
        outer = json.loads(fmt.format(_record("y", peer="n9")))  # extra= wins
    assert (inner["host"], inner["task"], inner["peer"]) == ("n1", "sha256:ab", "n2")
    assert outer["peer"] == "n9" and outer["task"] == "sha256:ab"
    after = json.loads(fmt.format(_record("z")))
    assert "task" not in after  # the context is gone after the block


def test_tracebacks_stay_on_one_line() -> None:
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        record = _record("failed")
        record.exc_info = sys.exc_info()
    line = JsonFormatter().format(record)
    assert "\n" not in line and "ValueError" in json.loads(line)["exc"]
    text = TextFormatter().format(record)
    assert "\n" not in text and "ValueError" in text


def test_text_format_appends_fields() -> None:
    with log_context(task="sha256:cd", peer="p1"):
        line = TextFormatter().format(_record("got it"))
    assert line.endswith("got it task=sha256:cd peer=p1")


def test_configure_logging_json_to_a_stream() -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        configure_logging("info", "json", stream)
        logging.getLogger("p2pdist.x").info("one %d", 1)
        logging.getLogger("p2pdist.x").debug("not shown")
        logging.getLogger("httpx").info("HTTP Request: not shown below DEBUG")
        logging.getLogger("httpx").warning("shown")
        root.setLevel(logging.DEBUG)  # as a SIGHUP to log_level = "debug" does
        logging.getLogger("httpx").info("HTTP Request: shown at DEBUG")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    lines = stream.getvalue().splitlines()
    assert [json.loads(s)["message"] for s in lines] == [
        "one 1",
        "shown",
        "HTTP Request: shown at DEBUG",
    ]
    with pytest.raises(UsageError):
        configure_logging("info", "xml")
    with pytest.raises(UsageError):
        configure_logging("loud", "json")


def test_log_format_config_env_and_flags(capsys: pytest.CaptureFixture[str]) -> None:
    assert load_node_config(None, env={}).log_format == "text"
    assert load_node_config(None, env={"P2PDIST_LOG_FORMAT": "json"}).log_format == "json"
    conf = load_node_config(
        None, env={"P2PDIST_LOG_FORMAT": "json"}, overrides={"log_format": "text"}
    )
    assert conf.log_format == "text"
    with pytest.raises(ConfigError):
        load_node_config(None, env={"P2PDIST_LOG_FORMAT": "xml"})
    for argv in (["daemon", "--log-format", "xml"], ["scheduler", "--log-format", "xml"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--log-format" in err
