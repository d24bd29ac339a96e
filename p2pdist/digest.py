"""Content digests (``sha256:<64 hex>``), the names of every blob and manifest."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from .errors import InvalidDigest

__all__ = ["Digest", "sha256_digest"]

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
# The OCI grammar admits other algorithms; we only ever verify sha256 (and sha512), so any
# other algorithm is refused up front rather than silently left unchecked.
_HEX_LEN = {"sha256": 64, "sha512": 128}


@dataclass(frozen=True, slots=True)
class Digest:
    """A verified-format content digest.  ``str(d)`` is the canonical ``alg:hex`` form."""

    algorithm: str
    hex: str

    @classmethod
    def parse(cls, text: str) -> Digest:
        alg, sep, hexpart = text.partition(":")
        if not sep:
            raise InvalidDigest(f"invalid digest {text[:80]!r}: expected 'sha256:<64 hex digits>'")
        want = _HEX_LEN.get(alg)
        if want is None:
            raise InvalidDigest(f"invalid digest {text[:80]!r}: unsupported algorithm {alg!r}")
        if len(hexpart) != want or re.fullmatch(r"[0-9a-f]+", hexpart) is None:
            raise InvalidDigest(
                f"invalid digest {text[:80]!r}: expected {want} lowercase hex digits after '{alg}:'"
            )
        return cls(alg, hexpart)

    def hasher(self) -> hashlib._Hash:
        return hashlib.new(self.algorithm)

    def matches(self, data: bytes | bytearray | memoryview) -> bool:
        h = self.hasher()
        h.update(data)
        return h.hexdigest() == self.hex

    @property
    def encoded(self) -> str:
        return self.hex

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"


def sha256_digest(data: bytes | bytearray | memoryview) -> Digest:
    return Digest("sha256", hashlib.sha256(data).hexdigest())
