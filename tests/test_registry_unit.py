"""Pure logic of the registry client: no sockets (httpx.MockTransport where HTTP is needed)."""

from __future__ import annotations

import base64
import contextlib
import json
from collections.abc import Callable
from json import dumps as _json_dumps
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from p2pdist.config import RegistryConfig
from p2pdist.digest import Digest, sha256_digest
from p2pdist.errors import (
    ConfigError,
    DigestMismatch,
    ManifestInvalid,
    NetworkError,
    NotFound,
    Unauthorized,
    UpstreamError,
)
from p2pdist.registry import (
    ALL_MANIFEST_TYPES,
    MEDIA_DOCKER_LIST,
    MEDIA_DOCKER_MANIFEST,
    MEDIA_OCI_INDEX,
    MEDIA_OCI_MANIFEST,
    Credentials,
    ImageManifest,
    Index,
    RegistryClient,
    RetryPolicy,
    TokenCache,
    docker_config_credentials,
    parse_content_range,
    parse_manifest,
    parse_retry_after,
    parse_token_response,
    parse_www_authenticate,
    resolve_credentials,
    select_platform,
)
from p2pdist.urlsource import UrlSource, make_http_client

D1 = sha256_digest(b"one")
D2 = sha256_digest(b"two")
D3 = sha256_digest(b"three")


# -- WWW-Authenticate --------------------------------------------------------------------


def test_parse_bearer_challenge() -> None:
    h = (
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:samalba/my-app:pull,push"'
    )
    assert parse_www_authenticate(h) == (
        "bearer",
        {
            "realm": "https://auth.docker.io/token",
            "service": "registry.docker.io",
            "scope": "repository:samalba/my-app:pull,push",
        },
    )


def test_parse_basic_and_odd_spacing() -> None:
    assert parse_www_authenticate('Basic realm="Registry Realm"') == (
        "basic",
        {"realm": "Registry Realm"},
    )
    assert parse_www_authenticate('  BEARER  Realm = "x" ,  Service=reg ') == (
        "bearer",
        {"realm": "x", "service": "reg"},
    )


def test_parse_escapes_unquoted_and_garbage() -> None:
    assert parse_www_authenticate(r'Bearer realm="a\"b",scope=repo:x:pull') == (
        "bearer",
        {"realm": 'a"b', "scope": "repo:x:pull"},
    )
    assert parse_www_authenticate("") == ("", {})
    assert parse_www_authenticate("Bearer") == ("bearer", {})
    # Only the first challenge is read.
    assert parse_www_authenticate('Basic realm="a", Bearer realm="b"') == (
        "basic",
        {"realm": "a"},
    )
    assert parse_www_authenticate('Bearer realm="unterminated') == (
        "bearer",
        {"realm": "unterminated"},
    )


@given(st.text(max_size=200))
def test_parse_www_authenticate_never_crashes(text: str) -> None:
    scheme, params = parse_www_authenticate(text)
    assert isinstance(scheme, str)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in params.items())


# -- manifests ---------------------------------------------------------------------------


def _desc(
    d: Digest, size: int = 3, mt: str = "application/octet-stream", **kw: Any
) -> dict[str, Any]:
    return {"mediaType": mt, "digest": str(d), "size": size, **kw}


def _image(mt: str | None = MEDIA_OCI_MANIFEST) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "config": _desc(D1, mt="application/vnd.oci.image.config.v1+json"),
        "layers": [_desc(D2, 10), _desc(D3, 20)],
    }
    if mt is not None:
        doc["mediaType"] = mt
    return doc


def _index(entries: list[dict[str, Any]], mt: str = MEDIA_OCI_INDEX) -> Index:
    doc = {"schemaVersion": 2, "mediaType": mt, "manifests": entries}
    parsed = parse_manifest(json.dumps(doc).encode(), mt)
    assert isinstance(parsed, Index)
    return parsed


def _plat(d: Digest, os_: str, arch: str, variant: str | None = None) -> dict[str, Any]:
    p: dict[str, Any] = {"os": os_, "architecture": arch}
    if variant:
        p["variant"] = variant
    return _desc(d, mt=MEDIA_OCI_MANIFEST, platform=p)


@pytest.mark.parametrize("mt", [MEDIA_OCI_MANIFEST, MEDIA_DOCKER_MANIFEST])
def test_parse_image_manifest(mt: str) -> None:
    data = json.dumps(_image(mt)).encode()
    m = parse_manifest(data, mt)
    assert isinstance(m, ImageManifest)
    assert m.media_type == mt
    assert m.digest == sha256_digest(data)
    assert m.data == data
    assert m.config.digest == D1
    assert [(x.digest, x.size) for x in m.layers] == [(D2, 10), (D3, 20)]
    assert m.index_digest is None


def test_media_type_from_body_or_shape_when_header_is_generic() -> None:
    data = json.dumps(_image(MEDIA_DOCKER_MANIFEST)).encode()
    assert parse_manifest(data, "application/json").media_type == MEDIA_DOCKER_MANIFEST
    # OCI allows mediaType to be absent: infer from the shape.
    data = json.dumps(_image(None)).encode()
    assert parse_manifest(data, "").media_type == MEDIA_OCI_MANIFEST
    idx = json.dumps({"schemaVersion": 2, "manifests": []}).encode()
    assert isinstance(parse_manifest(idx, ""), Index)


def test_parse_index_both_kinds() -> None:
    for mt in (MEDIA_OCI_INDEX, MEDIA_DOCKER_LIST):
        idx = _index([_plat(D1, "linux", "amd64"), _plat(D2, "linux", "arm64", "v8")], mt)
        assert idx.media_type == mt
        assert [d.digest for d in idx.manifests] == [D1, D2]
        want = {"os": "linux", "architecture": "arm64", "variant": "v8"}
        assert idx.manifests[1].platform == want


def _mutate(f: Callable[[dict[str, Any]], None]) -> bytes:
    doc = _image()
    f(doc)
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"{not json",
        b"\xff\xfe",
        b"[]",
        b'"string"',
        json.dumps({"schemaVersion": 1, "name": "x", "fsLayers": []}).encode(),
        _mutate(lambda d: d.update(schemaVersion="2")),
        _mutate(lambda d: d.update(schemaVersion=True)),
        _mutate(lambda d: d.pop("config")),
        _mutate(lambda d: d.update(config="sha256:abc")),
        _mutate(lambda d: d.update(layers={"a": 1})),
        _mutate(lambda d: d["layers"].append(None)),
        _mutate(lambda d: d["layers"][0].update(size="10")),
        _mutate(lambda d: d["layers"][0].update(size=-1)),
        _mutate(lambda d: d["layers"][0].update(size=True)),
        _mutate(lambda d: d["layers"][0].update(digest="sha256:XYZ")),
        _mutate(lambda d: d["layers"][0].update(digest="md5:" + "0" * 32)),
        _mutate(lambda d: d["layers"][0].update(digest=5)),
        _mutate(lambda d: d["layers"][0].pop("mediaType")),
        _mutate(lambda d: d.update(mediaType=7)),
        _mutate(lambda d: d.update(mediaType="application/vnd.example+json")),
        json.dumps({"schemaVersion": 2, "mediaType": MEDIA_OCI_INDEX, "manifests": "x"}).encode(),
        json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": MEDIA_OCI_INDEX,
                "manifests": [_desc(D1, platform="linux/amd64")],
            }
        ).encode(),
        json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": MEDIA_OCI_INDEX,
                "manifests": [_desc(D1, platform={"os": "linux"})],
            }
        ).encode(),
        json.dumps({"schemaVersion": 2}).encode(),
    ],
)
def test_malformed_manifests_are_manifest_invalid(data: bytes) -> None:
    with pytest.raises(ManifestInvalid) as info:
        parse_manifest(data, "")
    assert "\n" not in str(info.value)


def test_header_and_body_media_types_must_agree() -> None:
    data = json.dumps(_image(MEDIA_OCI_MANIFEST)).encode()
    with pytest.raises(ManifestInvalid, match="disagrees"):
        parse_manifest(data, MEDIA_DOCKER_MANIFEST)
    # A header with parameters still counts.
    assert parse_manifest(data, MEDIA_OCI_MANIFEST + "; charset=utf-8").media_type == (
        MEDIA_OCI_MANIFEST
    )


def test_oversized_manifest_refused() -> None:
    doc = _image()
    doc["annotations"] = {"pad": "x" * (4 << 20)}
    with pytest.raises(ManifestInvalid, match="limit"):
        parse_manifest(json.dumps(doc).encode(), MEDIA_OCI_MANIFEST)


@given(st.binary(max_size=300))
def test_parse_manifest_only_raises_manifest_invalid(data: bytes) -> None:
    with contextlib.suppress(ManifestInvalid):
        parse_manifest(data, "")


def test_all_manifest_types() -> None:
    assert set(ALL_MANIFEST_TYPES) == {
        MEDIA_DOCKER_MANIFEST,
        MEDIA_DOCKER_LIST,
        MEDIA_OCI_MANIFEST,
        MEDIA_OCI_INDEX,
    }


# -- platform selection ------------------------------------------------------------------


def test_select_platform_basic() -> None:
    idx = _index(
        [
            _plat(D1, "linux", "arm64", "v8"),
            _plat(D2, "linux", "amd64"),
            _desc(D3, mt=MEDIA_OCI_MANIFEST, platform={"os": "unknown", "architecture": "unknown"}),
        ]
    )
    assert select_platform(idx, "linux/amd64").digest == D2
    assert select_platform(idx, "linux/arm64").digest == D1  # v8 is arm64's default
    assert select_platform(idx, "linux/arm64/v8").digest == D1
    assert select_platform(idx, "LINUX/AMD64").digest == D2


def test_select_platform_variants() -> None:
    idx = _index(
        [
            _plat(D1, "linux", "arm", "v6"),
            _plat(D2, "linux", "arm", "v7"),
            _plat(D3, "linux", "arm64"),
        ]
    )
    assert select_platform(idx, "linux/arm/v6").digest == D1
    assert select_platform(idx, "linux/arm/v7").digest == D2
    assert select_platform(idx, "linux/arm").digest == D2  # v7 is arm's default
    assert select_platform(idx, "linux/arm64/v8").digest == D3  # no variant means v8
    with pytest.raises(NotFound):
        select_platform(idx, "linux/arm/v5")


def test_select_platform_falls_back_to_any_variant_when_none_asked() -> None:
    idx = _index([_plat(D1, "linux", "amd64", "v3"), _plat(D2, "linux", "amd64", "v2")])
    assert select_platform(idx, "linux/amd64").digest == D1
    idx = _index([_plat(D1, "linux", "amd64", "v3"), _plat(D2, "linux", "amd64")])
    assert select_platform(idx, "linux/amd64").digest == D2


def test_select_platform_missing() -> None:
    idx = _index([_plat(D1, "linux", "arm64"), _desc(D2, mt=MEDIA_OCI_MANIFEST)])
    with pytest.raises(NotFound, match=r"linux/amd64.*available: linux/arm64"):
        select_platform(idx, "linux/amd64")
    with pytest.raises(NotFound, match="available: none"):
        select_platform(_index([]), "linux/amd64")
    with pytest.raises(ManifestInvalid):
        select_platform(idx, "amd64")


# -- retry schedule ----------------------------------------------------------------------


def test_retry_schedule_bounds() -> None:
    p = RetryPolicy(attempts=6, base=0.2, cap=1.0)
    lo = p.schedule(rand=lambda: 0.0)
    hi = p.schedule(rand=lambda: 1.0)
    assert lo == pytest.approx([0.1, 0.2, 0.4, 0.5, 0.5])
    assert hi == pytest.approx([0.2, 0.4, 0.8, 1.0, 1.0])
    for _ in range(50):
        for i, d in enumerate(p.schedule()):
            assert lo[i] <= d <= hi[i]


def test_retry_after_is_a_floor() -> None:
    p = RetryPolicy(base=0.2, cap=5.0)
    assert p.delay(0, retry_after=3.0, rand=lambda: 1.0) == 3.0
    assert p.delay(5, retry_after=0.0, rand=lambda: 1.0) == pytest.approx(5.0)


def test_should_retry() -> None:
    p = RetryPolicy(attempts=3, max_retry_after=10)
    assert p.should_retry(0) and p.should_retry(1)
    assert not p.should_retry(2)
    assert p.should_retry(0, retry_after=10)
    assert not p.should_retry(0, retry_after=11)
    assert not RetryPolicy(attempts=1).should_retry(0)
    assert RetryPolicy(attempts=1).schedule() == []
    with pytest.raises(ValueError):
        RetryPolicy(attempts=0)


def test_parse_retry_after() -> None:
    assert parse_retry_after(None) is None
    assert parse_retry_after("") is None
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after(" 3 ") == 3.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after("-5") is None
    now = 1_700_000_000.0  # Tue, 14 Nov 2023 22:13:20 GMT
    assert parse_retry_after("Tue, 14 Nov 2023 22:13:50 GMT", now=now) == pytest.approx(30.0)
    assert parse_retry_after("Tue, 14 Nov 2023 22:00:00 GMT", now=now) == 0.0


# -- credentials -------------------------------------------------------------------------


def _write_config(tmp_path: Path, auths: dict[str, Any]) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"auths": auths}))
    return path


def _b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def test_docker_config_lookup(tmp_path: Path) -> None:
    path = _write_config(
        tmp_path,
        {
            "127.0.0.1:5000": {"auth": _b64("alice:s3:cret")},
            "https://reg.example.com": {"username": "bob", "password": "pw"},
            "https://index.docker.io/v1/": {"auth": _b64("hub:hubpw")},
            "other.example.com/v2/": {"identitytoken": "refresh-me"},
        },
    )
    c = docker_config_credentials("127.0.0.1:5000", path)
    assert c is not None and (c.username, c.password) == ("alice", "s3:cret")
    c = docker_config_credentials("reg.example.com", path)
    assert c is not None and (c.username, c.password) == ("bob", "pw")
    for hub in ("docker.io", "registry-1.docker.io"):
        c = docker_config_credentials(hub, path)
        assert c is not None and c.username == "hub"
    c = docker_config_credentials("other.example.com", path)
    assert c is not None and c.identity_token == "refresh-me" and not c.has_basic
    assert docker_config_credentials("nobody.example.com", path) is None
    assert docker_config_credentials("x", tmp_path / "missing.json") is None


def test_docker_config_malformed(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text("{nope")
    with pytest.raises(ConfigError):
        docker_config_credentials("h", path)
    path = _write_config(tmp_path, {"h": {"auth": _b64("no-colon-secret")}})
    with pytest.raises(ConfigError) as info:
        docker_config_credentials("h", path)
    assert "no-colon-secret" not in str(info.value)
    path.write_text(json.dumps({"credsStore": "desktop"}))
    assert docker_config_credentials("h", path) is None


def test_docker_config_env_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_config(tmp_path, {"h:1": {"auth": _b64("u:p")}})
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    c = docker_config_credentials("h:1")
    assert c is not None and c.username == "u"


def test_resolve_credentials_prefers_config(tmp_path: Path) -> None:
    path = _write_config(tmp_path, {"h": {"auth": _b64("file:filepw")}})
    c = resolve_credentials(RegistryConfig(host="h", username="cfg", password="cfgpw"), path)
    assert (c.username, c.password) == ("cfg", "cfgpw")
    c = resolve_credentials(RegistryConfig(host="h"), path)
    assert (c.username, c.password) == ("file", "filepw")
    assert resolve_credentials(RegistryConfig(host="x"), path).empty


def test_credentials_repr_hides_secrets() -> None:
    c = Credentials(username="u", password="hunter2", identity_token="tok1", registry_token="tok2")
    r = repr(c)
    assert "hunter2" not in r and "tok1" not in r and "tok2" not in r
    assert c.basic_header() == "Basic " + _b64("u:hunter2")


# -- tokens ------------------------------------------------------------------------------


def test_token_response() -> None:
    assert parse_token_response(b'{"token": "a", "expires_in": 300}') == ("a", 300.0)
    assert parse_token_response(b'{"access_token": "b"}') == ("b", 60.0)
    assert parse_token_response(b'{"token": "c", "expires_in": "x"}') == ("c", 60.0)
    for bad in (b"", b"[]", b'{"token": ""}', b'{"token": 5}'):
        with pytest.raises(ValueError):
            parse_token_response(bad)


def test_token_cache_expiry() -> None:
    cache = TokenCache()
    key = ("https://auth/token", "reg", "repository:a:pull")
    cache.put(key, "t", 100.0, now=0.0)
    assert cache.get(key, 80.0) == "t"
    assert cache.get(key, 91.0) is None  # 10% margin
    cache.put(key, "t2", 1000.0, now=0.0)
    assert cache.get(key, 969.0) == "t2"
    assert cache.get(key, 971.0) is None  # margin capped at 30 s
    cache.put(key, "t3", 60.0, now=0.0)
    cache.invalidate(key, "other")
    assert cache.get(key, 1.0) == "t3"
    cache.invalidate(key, "t3")
    assert cache.get(key, 1.0) is None
    assert "t3" not in repr(cache)


def test_content_range() -> None:
    assert parse_content_range("bytes 0-99/1000") == (0, 100, 1000)
    assert parse_content_range("bytes 5-5/*") == (5, 6, None)
    assert parse_content_range("bytes 9-5/10") is None
    assert parse_content_range("items 0-1/2") is None


# -- client logic over a MockTransport (no sockets) --------------------------------------

Handler = Callable[[httpx.Request], httpx.Response]


def R(
    status: int,
    *,
    headers: dict[str, str] | None = None,
    content: bytes = b"",
    json: Any = None,
) -> httpx.Response:
    """A response whose body is a stream, as on the wire (``content=`` is pre-read)."""
    if json is not None:
        content = _json_dumps(json).encode()
    hdrs = {"Content-Length": str(len(content)), **(headers or {})}
    return httpx.Response(status, headers=hdrs, stream=httpx.ByteStream(content))


FAST = RetryPolicy(attempts=4, base=0.0, cap=0.0)


def _client(handler: Handler, **kw: Any) -> RegistryClient:
    cfg = kw.pop("config", None) or RegistryConfig(host="127.0.0.1:5999")
    return RegistryClient(
        cfg,
        transport=httpx.MockTransport(handler),
        retry=kw.pop("retry", FAST),
        docker_config=kw.pop("docker_config", Path("/nonexistent/config.json")),
        **kw,
    )


async def test_mock_bearer_flow_caches_token() -> None:
    seen: list[str] = []
    token_calls: list[httpx.Request] = []

    def handler(req: httpx.Request) -> httpx.Response:
        if req.url.path == "/token":
            token_calls.append(req)
            return R(200, json={"token": "T1", "expires_in": 300})
        seen.append(req.headers.get("authorization", ""))
        if req.headers.get("authorization") != "Bearer T1":
            return R(
                401,
                headers={
                    "WWW-Authenticate": 'Bearer realm="http://127.0.0.1:5999/token",'
                    'service="reg",scope="repository:app:pull"'
                },
            )
        return R(200, headers={"Content-Length": "7"}, content=b"1234567")

    async with _client(
        handler, config=RegistryConfig(host="127.0.0.1:5999", username="u", password="pw")
    ) as reg:
        for _ in range(3):
            assert await reg.blob_size("app", D1) == 7
    assert len(token_calls) == 1
    q = token_calls[0].url.params
    assert q["service"] == "reg" and q["scope"] == "repository:app:pull"
    assert token_calls[0].headers["authorization"] == "Basic " + _b64("u:pw")
    assert seen == ["", "Bearer T1", "Bearer T1", "Bearer T1"]


async def test_mock_basic_wrong_password() -> None:
    def handler(req: httpx.Request) -> httpx.Response:
        return R(401, headers={"WWW-Authenticate": 'Basic realm="r"'})

    async with _client(
        handler, config=RegistryConfig(host="127.0.0.1:5999", username="u", password="secretpw")
    ) as reg:
        with pytest.raises(Unauthorized) as info:
            await reg.ping()
    assert "secretpw" not in str(info.value) and "credentials refused" in str(info.value)
    async with _client(handler) as reg:
        with pytest.raises(Unauthorized, match="no credentials"):
            await reg.ping()


async def test_mock_manifest_digest_checks() -> None:
    body = json.dumps(_image()).encode()
    good = sha256_digest(body)

    def handler(req: httpx.Request) -> httpx.Response:
        hdrs = {"Content-Type": MEDIA_OCI_MANIFEST}
        if req.url.path.endswith("/lying"):
            hdrs["Docker-Content-Digest"] = str(D1)
        return R(200, headers=hdrs, content=body)

    async with _client(handler) as reg:
        m = await reg.get_manifest("app", "v1")
        assert m.digest == good and m.media_type == MEDIA_OCI_MANIFEST
        assert (await reg.get_manifest("app", str(good))).data == body
        with pytest.raises(DigestMismatch):
            await reg.get_manifest("app", str(D1))
        with pytest.raises(DigestMismatch):
            await reg.get_manifest("app", "lying")


async def test_mock_404_names_code_and_is_not_retried() -> None:
    calls = 0

    def handler(req: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return R(404, json={"errors": [{"code": "MANIFEST_UNKNOWN", "message": "x\ny"}]})

    async with _client(handler) as reg:
        with pytest.raises(NotFound) as info:
            await reg.get_manifest("app", "v9")
    msg = str(info.value)
    assert "app:v9" in msg and "MANIFEST_UNKNOWN" in msg and "\n" not in msg
    assert calls == 1


async def test_mock_retries_then_gives_up() -> None:
    calls = 0

    def handler(req: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return R(503)

    async with _client(handler) as reg:
        with pytest.raises(UpstreamError, match="503"):
            await reg.blob_size("app", D1)
    assert calls == FAST.attempts

    def broken(req: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=req)

    async with _client(broken) as reg:
        with pytest.raises(NetworkError, match="ConnectError"):
            await reg.ping()


async def test_mock_redirect_drops_authorization_cross_origin() -> None:
    got: dict[str, str | None] = {}

    def handler(req: httpx.Request) -> httpx.Response:
        if req.url.host == "127.0.0.2":
            got["other"] = req.headers.get("authorization")
            got["range"] = req.headers.get("range")
            return R(206, headers={"Content-Range": "bytes 2-4/10"}, content=b"abc")
        got["registry"] = req.headers.get("authorization")
        return R(307, headers={"Location": "http://127.0.0.2:9/blob?sig=1"})

    cfg = RegistryConfig(host="127.0.0.1:5999", token="statictoken")
    async with (
        _client(handler, config=cfg) as reg,
        reg.blob_source("app", D1).open_range(2, 5) as it,
    ):
        data = b"".join([c async for c in it])
    assert data == b"abc"
    assert got == {"registry": "Bearer statictoken", "other": None, "range": "bytes=2-4"}


async def test_mock_range_checks() -> None:
    mode = {"v": ""}

    def handler(req: httpx.Request) -> httpx.Response:
        v = mode["v"]
        if v == "wrong-range":
            return R(206, headers={"Content-Range": "bytes 0-2/10"}, content=b"abc")
        if v == "ignored":
            return R(200, content=b"0123456789")
        if v == "short":
            return R(
                206,
                headers={"Content-Range": "bytes 2-4/10", "Content-Length": "3"},
                content=b"ab",
            )
        raise AssertionError(v)

    async def fetch(start: int, end: int | None) -> bytes:
        async with src.open_range(start, end) as it:
            return b"".join([c async for c in it])

    async with _client(handler) as reg:
        src = reg.blob_source("app", D1, size=10)
        mode["v"] = "wrong-range"
        with pytest.raises(UpstreamError):
            await fetch(2, 5)
        mode["v"] = "ignored"
        with pytest.raises(UpstreamError, match="ignored the Range"):
            await fetch(2, 5)
        assert await fetch(0, 4) == b"0123"  # a 200 to a range from 0 is cut
        assert await fetch(0, None) == b"0123456789"
        assert await fetch(3, 3) == b""
        mode["v"] = "short"
        with pytest.raises(NetworkError, match="short"):
            await fetch(2, 5)


async def test_mock_url_source_probe_fallback() -> None:
    def handler(req: httpx.Request) -> httpx.Response:
        if req.method == "HEAD":
            return R(405)
        assert req.headers["range"] == "bytes=0-0"
        return R(206, headers={"Content-Range": "bytes 0-0/1234"}, content=b"x")

    async with make_http_client(transport=httpx.MockTransport(handler)) as client:
        src = UrlSource(client, "http://u:pw@127.0.0.1:1/f.bin?token=secret")
        assert "secret" not in src.description and "pw" not in src.description
        info = await src.probe()
    assert (info.size, info.accepts_ranges) == (1234, True)


async def test_mock_cancellation_is_not_swallowed() -> None:
    def handler(req: httpx.Request) -> httpx.Response:
        return R(503, headers={"Retry-After": "30"})

    reg = _client(handler, retry=RetryPolicy(attempts=5, base=0.0, cap=0.0))
    with trio.move_on_after(0.2) as scope:
        await reg.ping()
    assert scope.cancelled_caught
    await reg.aclose()


def test_make_http_client_tls_options(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="CA file"):
        make_http_client(ca_file=str(tmp_path / "missing.pem"))
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate")
    with pytest.raises(ConfigError):
        make_http_client(ca_file=str(bad))
    # insecure and default both construct (no network).
    make_http_client(insecure=True)
    make_http_client()


def test_registry_client_repr_hides_secrets() -> None:
    cfg = RegistryConfig(host="127.0.0.1:5999", username="u", password="pw-123", token="tk-456")
    reg = RegistryClient(cfg, docker_config=Path("/nonexistent/config.json"))
    text = repr(reg) + repr(reg._auth) + repr(cfg)
    assert "pw-123" not in text and "tk-456" not in text
    with pytest.raises(ConfigError, match="platform"):
        RegistryClient(cfg, platform="amd64")
