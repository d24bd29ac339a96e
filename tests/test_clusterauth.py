"""Cluster authentication with a shared token: members work together; a stranger can
neither register, publish piece hashes nor fetch pieces; the token is never logged."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import httpx
import pytest

from bench.cluster import Cluster
from bench.image import push_blob
from bench.localregistry import LocalRegistry
from p2pdist.clusterauth import HEADER, read_token
from p2pdist.config import load_node_config
from p2pdist.digest import Digest
from p2pdist.errors import ConfigError
from p2pdist.peer import piece_url
from scheduler import Announce, RegisterHost
from scheduler._codec import encode
from tests.helpers import requires_registry

TOKEN = "p2pdist-cluster-" + "7f3a" * 8
MiB = 1 << 20


def test_read_token(tmp_path: Path) -> None:
    f = tmp_path / "token"
    f.write_text(TOKEN + "\n")
    assert read_token(file=f) == TOKEN
    assert read_token(value=" " + TOKEN) == TOKEN
    assert read_token() is None
    with pytest.raises(ConfigError, match="at least 16") as exc:
        read_token(value="short")
    assert "short" not in str(exc.value)  # the message never holds the token
    with pytest.raises(ConfigError, match="cannot read"):
        read_token(file=tmp_path / "missing")
    conf = load_node_config(None, env={"P2PDIST_CLUSTER_TOKEN_FILE": str(f)})
    assert conf.cluster_token == TOKEN and TOKEN not in repr(conf)


@requires_registry
@pytest.mark.integration
def test_members_share_and_strangers_are_refused(
    registry: LocalRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(6 * MiB)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    push_blob(registry.url, "auth/blob", data, digest=digest)
    target = f"{registry.host}/auth/blob@{digest}"
    monkeypatch.setenv("P2PDIST_CLUSTER_TOKEN", TOKEN)  # the cluster's processes inherit it
    with Cluster(tmp_path / "c", daemons=2, piece_size="1MiB") as c:
        for i in range(2):
            g = c.get(i, target, tmp_path / f"out{i}")
            assert g.wait(timeout=60) == 0, c.log_tails()
        assert c.stats(1, digest)["from_peers"] == len(data)  # members share pieces

        piece = piece_url(c.daemons[0].peer_addr, Digest.parse(digest), 0, MiB)
        events = f"{c.scheduler_url}/api/v1/events"
        register = encode(RegisterHost("stranger", "127.0.0.1:9"))
        publish = encode(
            Announce("stranger", digest, len(data), MiB, pieces=(0,), hashes={0: "0" * 64})
        )
        with httpx.Client(timeout=10, trust_env=False) as http:
            for headers in ({}, {HEADER: "x" * len(TOKEN)}):
                r = http.get(piece, headers=headers)
                assert r.status_code == 401, r.text
                for event in (register, publish):
                    r = http.post(events, json=event, headers=headers)
                    assert r.status_code == 401, r.text
            # with the token the same requests are answered
            assert http.get(piece, headers={HEADER: TOKEN}).status_code == 200
            assert http.post(events, json=register, headers={HEADER: TOKEN}).status_code == 200
        logs = "".join(p.log_text() for p in [c.scheduler, *c.daemons, *c.gets])
    assert TOKEN not in logs
