"""Unit tests of the pure core: digests, references, piece math, configuration."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pdist import (
    ConfigError,
    Digest,
    InvalidDigest,
    InvalidReference,
    PiecePlan,
    load_node_config,
    parse_reference,
    parse_size,
    piece_size_for,
)
from p2pdist.config import is_loopback_host
from p2pdist.pieces import DEFAULT_PIECE_SIZE, MAX_PIECES

HEX = "a" * 64


# --- digests -------------------------------------------------------------------------


def test_digest_parses_canonical_sha256() -> None:
    d = Digest.parse(f"sha256:{HEX}")
    assert (d.algorithm, d.hex, str(d)) == ("sha256", HEX, f"sha256:{HEX}")


@pytest.mark.parametrize(
    "text",
    [
        "",
        HEX,
        "sha256:",
        f"sha256:{HEX[:-1]}",
        f"sha256:{HEX}0",
        f"sha256:{HEX.upper()}",
        f"sha256:{'g' * 64}",
        f"md5:{HEX[:32]}",
        f"SHA256:{HEX}",
        f"sha256:{HEX}\n",
    ],
)
def test_digest_rejects_malformed(text: str) -> None:
    with pytest.raises(InvalidDigest):
        Digest.parse(text)


def test_digest_matches_checks_content() -> None:
    data = b"hello"
    d = Digest("sha256", hashlib.sha256(data).hexdigest())
    assert d.matches(data)
    assert not d.matches(b"hellO")


# --- references ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "registry", "repo", "tag", "digest"),
    [
        ("127.0.0.1:5000/app:v1", "127.0.0.1:5000", "app", "v1", None),
        ("localhost/team/app", "localhost", "team/app", "latest", None),
        ("ubuntu", "docker.io", "library/ubuntu", "latest", None),
        ("user/app:1.0", "docker.io", "user/app", "1.0", None),
        ("ghcr.io/o/r@sha256:" + HEX, "ghcr.io", "o/r", None, "sha256:" + HEX),
        ("reg.example:443/a/b:t@sha256:" + HEX, "reg.example:443", "a/b", "t", "sha256:" + HEX),
        ("[::1]:5000/app:x", "[::1]:5000", "app", "x", None),
    ],
)
def test_reference_parses(
    text: str, registry: str, repo: str, tag: str | None, digest: str | None
) -> None:
    ref = parse_reference(text)
    assert ref.registry == registry
    assert ref.repository == repo
    assert ref.tag == tag
    assert (str(ref.digest) if ref.digest else None) == digest


def test_reference_reference_prefers_digest_and_hub_api_host() -> None:
    ref = parse_reference(f"ubuntu:22.04@sha256:{HEX}")
    assert ref.reference == f"sha256:{HEX}"
    assert ref.api_host == "registry-1.docker.io"
    assert parse_reference("127.0.0.1:5000/a").api_host == "127.0.0.1:5000"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "UPPER/case",
        "127.0.0.1:5000/app:bad tag",
        "127.0.0.1:5000/app:" + "t" * 129,
        "127.0.0.1:5000/app@sha256:abc",
        "127.0.0.1:5000/-app",
        "127.0.0.1:5000/app//x",
        "127.0.0.1:5000/app:",
        "a b",
        "x" * 2000,
    ],
)
def test_reference_rejects_malformed(text: str) -> None:
    with pytest.raises(InvalidReference):
        parse_reference(text)


@given(st.text(max_size=80))
def test_reference_parser_never_crashes(text: str) -> None:
    try:
        ref = parse_reference(text)
    except InvalidReference:
        return
    assert ref.repository
    assert parse_reference(str(ref)) == ref


# --- piece math ----------------------------------------------------------------------


def test_piece_size_default_and_growth() -> None:
    assert piece_size_for(0) == DEFAULT_PIECE_SIZE
    assert piece_size_for(100 * DEFAULT_PIECE_SIZE) == DEFAULT_PIECE_SIZE
    big = 10 * (1 << 30)  # 10 GiB: 2560 pieces at 4 MiB, too many
    size = piece_size_for(big)
    assert size == 16 << 20
    assert -(-big // size) <= MAX_PIECES


@given(st.integers(min_value=0, max_value=1 << 44), st.sampled_from([1 << 16, 1 << 20, 4 << 20]))
def test_piece_plan_covers_blob_exactly(size: int, base: int) -> None:
    plan = PiecePlan.for_size(size, base)
    assert plan.count <= MAX_PIECES or plan.piece_size >= 1 << 30
    if plan.count:
        assert plan.range(0)[0] == 0
        assert plan.range(plan.count - 1)[1] == size
        assert 0 < plan.length(plan.count - 1) <= plan.piece_size
    else:
        assert size == 0


def test_piece_plan_ranges_and_bounds() -> None:
    plan = PiecePlan(10, 4)
    assert [plan.range(i) for i in plan] == [(0, 4), (4, 8), (8, 10)]
    assert list(plan.pieces_in(3, 9)) == [0, 1, 2]
    assert list(plan.pieces_in(4, 8)) == [1]
    assert list(plan.pieces_in(5, 5)) == []
    with pytest.raises(IndexError):
        plan.range(3)
    with pytest.raises(IndexError):
        plan.length(-1)


# --- configuration -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [("4MiB", 4 << 20), ("512KiB", 512 << 10), ("1GB", 10**9), ("123", 123), (7, 7)],
)
def test_parse_size(text: str | int, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "4 XB", "-1", "MiB", "1.2.3MiB"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_size(text)


def test_config_layers_file_env_flags(tmp_path: object) -> None:
    from pathlib import Path

    assert isinstance(tmp_path, Path)
    cfg = tmp_path / "p2pdist.toml"
    cfg.write_text(
        'data_dir = "/tmp/from-file"\npiece_size = "1MiB"\nconcurrency = 3\n'
        '[registries."reg.example"]\nusername = "u"\npassword = "secret-pw"\n'
    )
    conf = load_node_config(cfg, env={"P2PDIST_CONCURRENCY": "5"}, overrides={"concurrency": None})
    assert str(conf.data_dir) == "/tmp/from-file"
    assert conf.piece_size == 1 << 20
    assert conf.concurrency == 5  # env beats file; a None flag is "not given"
    conf = load_node_config(cfg, env={}, overrides={"concurrency": 9})
    assert conf.concurrency == 9
    reg = conf.registries["reg.example"]
    assert reg.username == "u"
    assert "secret-pw" not in repr(conf)


def test_config_rejects_bad_values(tmp_path: object) -> None:
    from pathlib import Path

    assert isinstance(tmp_path, Path)
    bad = tmp_path / "bad.toml"
    bad.write_text("nonsense = 1\n")
    with pytest.raises(ConfigError, match="unknown key"):
        load_node_config(bad, env={})
    bad.write_text("piece_size = [\n")
    with pytest.raises(ConfigError, match="cannot read"):
        load_node_config(bad, env={})
    with pytest.raises(ConfigError, match="not found"):
        load_node_config(tmp_path / "missing.toml", env={})
    with pytest.raises(ConfigError):
        load_node_config(None, env={"P2PDIST_PIECE_SIZE": "1KiB"})
    with pytest.raises(ConfigError):
        load_node_config(None, env={"P2PDIST_CONCURRENCY": "many"})


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1:5000", True),
        ("localhost", True),
        ("[::1]:5000", True),
        ("127.9.9.9", True),
        ("registry.example", False),
        ("10.0.0.1:5000", False),
    ],
)
def test_loopback_detection(host: str, loopback: bool) -> None:
    assert is_loopback_host(host) is loopback
