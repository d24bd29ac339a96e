"""The OCI registry client: the back-to-source path.

::

    async with RegistryClient(RegistryConfig(host="127.0.0.1:5000")) as reg:
        image = await reg.resolve_image("app", "v1")          # index → linux/amd64
        source = reg.blob_source("app", image.layers[0].digest, size=image.layers[0].size)
        async with source.open_range(0, 1 << 20) as chunks:
            async for chunk in chunks: ...

Manifests by tag or digest (checked against the digest), blobs with ``Range`` over one
pooled keep-alive client, anonymous / Basic / Bearer-token auth (credentials from the
config, the environment or ``~/.docker/config.json``), redirects without leaking
``Authorization`` to other hosts, and jittered retries on connection errors, 5xx and 429.
Every error is from :mod:`p2pdist.errors`.
"""

from ._auth import (
    Credentials,
    TokenCache,
    default_docker_config_path,
    docker_config_credentials,
    parse_token_response,
    parse_www_authenticate,
    resolve_credentials,
)
from ._client import RegistryBlobSource, RegistryClient
from ._http import make_http_client, parse_content_range
from ._manifest import (
    ALL_MANIFEST_TYPES,
    IMAGE_MANIFEST_TYPES,
    INDEX_TYPES,
    MAX_MANIFEST_SIZE,
    MEDIA_DOCKER_LIST,
    MEDIA_DOCKER_MANIFEST,
    MEDIA_OCI_INDEX,
    MEDIA_OCI_MANIFEST,
    Descriptor,
    ImageManifest,
    Index,
    Manifest,
    Platform,
    parse_manifest,
    parse_platform,
    select_platform,
)
from ._retry import RetryPolicy, parse_retry_after

__all__ = [
    "ALL_MANIFEST_TYPES",
    "IMAGE_MANIFEST_TYPES",
    "INDEX_TYPES",
    "MAX_MANIFEST_SIZE",
    "MEDIA_DOCKER_LIST",
    "MEDIA_DOCKER_MANIFEST",
    "MEDIA_OCI_INDEX",
    "MEDIA_OCI_MANIFEST",
    "Credentials",
    "Descriptor",
    "ImageManifest",
    "Index",
    "Manifest",
    "Platform",
    "RegistryBlobSource",
    "RegistryClient",
    "RetryPolicy",
    "TokenCache",
    "default_docker_config_path",
    "docker_config_credentials",
    "make_http_client",
    "parse_content_range",
    "parse_manifest",
    "parse_platform",
    "parse_retry_after",
    "parse_token_response",
    "parse_www_authenticate",
    "resolve_credentials",
    "select_platform",
]
