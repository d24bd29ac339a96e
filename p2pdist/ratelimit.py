"""Bandwidth limits: a token bucket (pure) and its trio wrapper.

::

    limit = RateLimiter(12_500_000)          # 100 Mbit/s
    await limit.take(len(chunk))            # after receiving / before sending a chunk

The bucket lends: a ``take`` larger than what is in the bucket is granted at once and
the *next* takers wait for the debt to be repaid, so the rate over any stretch of time
longer than ``burst / rate`` holds to within one chunk, whatever the chunk sizes, and
concurrent takers are served in turn.  A daemon has three (``download_rate``,
``upload_rate``, ``source_rate`` in its config), bundled as :class:`Bandwidth`.
"""

from __future__ import annotations

from dataclasses import dataclass

import trio

__all__ = ["Bandwidth", "RateLimiter", "TokenBucket"]

MIN_BURST = 64 << 10


class TokenBucket:
    """``rate`` bytes per second, at most ``burst`` bytes saved up.  Pure: the caller
    passes the clock."""

    __slots__ = ("_stamp", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: int | None = None) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else max(MIN_BURST, rate / 20))
        self._tokens = self.burst
        self._stamp: float | None = None

    def reserve(self, n: int, now: float) -> float:
        """Take ``n`` bytes' worth; return how long to wait before using them (0: now)."""
        if self._stamp is not None:
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        self._tokens -= n
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate


class RateLimiter:
    """A :class:`TokenBucket` on trio's clock."""

    __slots__ = ("bucket",)

    def __init__(self, rate: float, burst: int | None = None) -> None:
        self.bucket = TokenBucket(rate, burst)

    @property
    def rate(self) -> float:
        return self.bucket.rate

    async def take(self, n: int) -> None:
        delay = self.bucket.reserve(n, trio.current_time())
        if delay > 0:
            await trio.sleep(delay)
        else:
            await trio.lowlevel.checkpoint()


@dataclass(frozen=True, slots=True)
class Bandwidth:
    """A node's limits (None: unlimited).  ``download`` counts every byte received
    (peers and registry), ``source`` the registry's alone, ``upload`` what peers get."""

    download: RateLimiter | None = None
    upload: RateLimiter | None = None
    source: RateLimiter | None = None

    @classmethod
    def from_rates(
        cls, *, download: float | None, upload: float | None, source: float | None
    ) -> Bandwidth:
        def make(rate: float | None) -> RateLimiter | None:
            return RateLimiter(rate) if rate else None

        return cls(make(download), make(upload), make(source))

    async def received(self, n: int, *, from_source: bool) -> None:
        if from_source and self.source is not None:
            await self.source.take(n)
        if self.download is not None:
            await self.download.take(n)


UNLIMITED = Bandwidth()
