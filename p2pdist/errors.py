"""The one exception tree of p2pdist.

::

    P2PDistError                      every error p2pdist raises on purpose
     ├── UsageError                   bad input from the user (exit 2)
     │    ├── InvalidDigest
     │    ├── InvalidReference
     │    └── ConfigError
     ├── VerificationError            bytes did not match their hash (exit 1)
     │    ├── PieceMismatch
     │    └── DigestMismatch
     ├── RegistryError                an upstream answered, but not with what we asked for
     │    ├── NotFound                404 (exit 3)
     │    ├── Unauthorized            401 (exit 3)
     │    ├── Forbidden               403 (exit 3)
     │    ├── ManifestInvalid         a manifest we cannot parse or use (exit 1)
     │    └── UpstreamError           any other unexpected status, after retries (exit 4)
     ├── NetworkError                 connection refused/reset, timeouts, TLS (exit 4)
     │    └── PlanConflict            the swarm cuts this blob at another piece size
     ├── DockerError                  the Docker engine is unreachable or refused (exit 4)
     ├── PreheatFailed                a preheat job failed on a node, or timed out (the
     │                                node's exit code, else 4)
     └── StoreError                   the local piece store failed (exit 4)
          ├── StoreFull               ENOSPC / EDQUOT
          └── StorePermission         EACCES / EPERM / EROFS

Every class carries ``exit_code``: the CLI's exit status for it.  Messages are one line,
meant for a human, and never contain credentials.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DigestMismatch",
    "DockerError",
    "Forbidden",
    "InvalidDigest",
    "InvalidReference",
    "ManifestInvalid",
    "NetworkError",
    "NotFound",
    "P2PDistError",
    "PieceMismatch",
    "PlanConflict",
    "PreheatFailed",
    "RegistryError",
    "StoreError",
    "StoreFull",
    "StorePermission",
    "Unauthorized",
    "UpstreamError",
    "UsageError",
    "VerificationError",
]

EXIT_OK = 0
EXIT_VERIFY = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_NETWORK = 4


class P2PDistError(Exception):
    """Base of every error p2pdist raises on purpose."""

    exit_code: int = EXIT_NETWORK


class UsageError(P2PDistError):
    exit_code = EXIT_USAGE


class InvalidDigest(UsageError):
    pass


class InvalidReference(UsageError):
    pass


class ConfigError(UsageError):
    pass


class VerificationError(P2PDistError):
    exit_code = EXIT_VERIFY


class PieceMismatch(VerificationError):
    def __init__(self, message: str, *, index: int = -1) -> None:
        super().__init__(message)
        self.index = index


class DigestMismatch(VerificationError):
    pass


class RegistryError(P2PDistError):
    """An upstream answered, but not with what we asked for."""

    exit_code = EXIT_NETWORK

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class NotFound(RegistryError):
    exit_code = EXIT_NOT_FOUND


class Unauthorized(RegistryError):
    exit_code = EXIT_NOT_FOUND


class Forbidden(RegistryError):
    exit_code = EXIT_NOT_FOUND


class ManifestInvalid(RegistryError):
    exit_code = EXIT_VERIFY


class UpstreamError(RegistryError):
    exit_code = EXIT_NETWORK


class NetworkError(P2PDistError):
    exit_code = EXIT_NETWORK


class PlanConflict(NetworkError):
    """The scheduler already plans this blob with another piece size (``piece_size``):
    a node joins the swarm by cutting the blob the same way."""

    def __init__(self, message: str, *, piece_size: int) -> None:
        super().__init__(message)
        self.piece_size = piece_size


class DockerError(P2PDistError):
    """The Docker engine could not be reached, or refused an image."""

    exit_code = EXIT_NETWORK


class PreheatFailed(P2PDistError):
    """A preheat job failed on a node (``exit_code``: that node's error's) or did not
    finish in time."""

    def __init__(self, message: str, *, exit_code: int = EXIT_NETWORK) -> None:
        super().__init__(message)
        self.exit_code = exit_code if exit_code in (1, 2, 3, 4) else EXIT_NETWORK


class StoreError(P2PDistError):
    exit_code = EXIT_NETWORK


class StoreFull(StoreError):
    pass


class StorePermission(StoreError):
    pass


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        out: list[BaseException] = []
        for inner in exc.exceptions:
            out.extend(_leaves(inner))
        return out
    return [exc]


class collapse_groups:
    """Turn an exception group made only of p2pdist errors (what a trio nursery raises
    when one of its tasks fails) back into its first error, so that callers can catch
    :class:`P2PDistError` and the CLI can map it to an exit code.  Anything else — a bug,
    ``KeyboardInterrupt``, a mix — passes through untouched."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, typ: object, exc: BaseException | None, tb: object) -> None:
        if isinstance(exc, BaseExceptionGroup):
            leaves = _leaves(exc)
            if leaves and all(isinstance(e, P2PDistError) for e in leaves):
                raise leaves[0] from None
