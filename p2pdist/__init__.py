"""p2pdist: peer-to-peer distribution of container image blobs, sha256-verified per piece."""

from .config import NodeConfig, RegistryConfig, load_node_config, parse_duration, parse_size
from .digest import Digest, sha256_digest
from .errors import (
    ConfigError,
    DigestMismatch,
    DockerError,
    Forbidden,
    InvalidDigest,
    InvalidReference,
    ManifestInvalid,
    NetworkError,
    NotFound,
    P2PDistError,
    PieceMismatch,
    PlanConflict,
    PreheatFailed,
    RegistryError,
    StoreError,
    StoreFull,
    StorePermission,
    Unauthorized,
    UpstreamError,
    UsageError,
    VerificationError,
)
from .gc import CacheEntry, Eviction, GCPlan, GCPolicy, plan_gc
from .pieces import DEFAULT_PIECE_SIZE, PiecePlan, piece_size_for
from .reference import Reference, parse_reference

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_PIECE_SIZE",
    "CacheEntry",
    "ConfigError",
    "Digest",
    "DigestMismatch",
    "DockerError",
    "Eviction",
    "Forbidden",
    "GCPlan",
    "GCPolicy",
    "InvalidDigest",
    "InvalidReference",
    "ManifestInvalid",
    "NetworkError",
    "NodeConfig",
    "NotFound",
    "P2PDistError",
    "PieceMismatch",
    "PiecePlan",
    "PlanConflict",
    "PreheatFailed",
    "Reference",
    "RegistryConfig",
    "RegistryError",
    "StoreError",
    "StoreFull",
    "StorePermission",
    "Unauthorized",
    "UpstreamError",
    "UsageError",
    "VerificationError",
    "__version__",
    "load_node_config",
    "parse_duration",
    "parse_reference",
    "parse_size",
    "piece_size_for",
    "plan_gc",
    "sha256_digest",
]
