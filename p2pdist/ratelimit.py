"""Bandwidth limits: a token bucket (pure) and its trio wrapper.

::

    limit = RateLimiter(12_500_000)          # 100 Mbit/s
    await limit.take(len(chunk))            # after receiving / before sending a chunk

The bucket lends: a ``take`` larger than what is in the bucket is granted at once and
the *next* takers wait for the debt to be repaid, so the rate over any stretch of time
longer than ``burst / rate`` holds to within one chunk, whatever the chunk sizes, and
concurrent takers are served in turn.  A daemon has three (``download_rate``,
``upload_rate``, ``source_rate`` in its config), bundled as :class:`Bandwidth`.

A limiter's rate can change while transfers run (``SIGHUP`` reloads the daemon's config):
:meth:`RateLimiter.set_rate` re-times the takers already waiting (the bytes they still owe
are repaid at the new rate) and ``None`` makes it unlimited.
"""

from __future__ import annotations

from dataclasses import dataclass

import trio

__all__ = ["Bandwidth", "RateLimiter", "Slots", "TokenBucket"]

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
    """A :class:`TokenBucket` on trio's clock; ``rate=None``: unlimited (``take`` returns
    at once).  :meth:`set_rate` changes it for the transfers that are running."""

    __slots__ = ("_burst", "_changed", "bucket")

    def __init__(self, rate: float | None, burst: int | None = None) -> None:
        self._burst = burst
        self.bucket = TokenBucket(rate, burst) if rate else None
        self._changed: trio.Event | None = None

    @property
    def rate(self) -> float | None:
        return self.bucket.rate if self.bucket is not None else None

    @property
    def limited(self) -> bool:
        return self.bucket is not None

    def set_rate(self, rate: float | None) -> None:
        """The new rate (None: unlimited) for every transfer, also those waiting now."""
        old = self.bucket
        if not rate:
            self.bucket = None
        elif old is None:
            self.bucket = TokenBucket(rate, self._burst)
        elif rate != old.rate:
            now = trio.current_time()
            old.reserve(0, now)  # bring the tokens up to now at the old rate
            new = TokenBucket(rate, self._burst)
            new._tokens = min(new.burst, old._tokens)  # debts carry over, in bytes
            new._stamp = now
            self.bucket = new
        else:
            return
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def refund(self, n: int) -> None:
        """Give back ``n`` bytes taken but not used."""
        if self.bucket is not None:
            self.bucket.reserve(-n, trio.current_time())

    async def take(self, n: int) -> None:
        bucket = self.bucket
        if bucket is None:
            return
        now = trio.current_time()
        delay = bucket.reserve(n, now)
        if delay <= 0:
            await trio.lowlevel.checkpoint()
            return
        deadline = now + delay
        while True:
            if self._changed is None:
                self._changed = trio.Event()
            changed = self._changed
            with trio.move_on_at(deadline):
                await changed.wait()
                # The rate changed: what is left of the wait is bytes still owed, repaid
                # at the new rate (or at once when it is now unlimited).
                now = trio.current_time()
                owed = max(0.0, deadline - now) * bucket.rate
                bucket = self.bucket
                if bucket is None:
                    return
                deadline = now + owed / bucket.rate
                continue
            return


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

    @classmethod
    def adjustable(
        cls, *, download: float | None, upload: float | None, source: float | None
    ) -> Bandwidth:
        """Three limiters (each may be unlimited) whose rates :meth:`set_rates` changes
        while transfers run: a daemon's."""
        return cls(RateLimiter(download), RateLimiter(upload), RateLimiter(source))

    def set_rates(
        self, *, download: float | None, upload: float | None, source: float | None
    ) -> None:
        """New rates for an :meth:`adjustable` bundle (also for running transfers)."""
        for limiter, rate in (
            (self.download, download),
            (self.upload, upload),
            (self.source, source),
        ):
            if limiter is None:
                raise ValueError("set_rates needs a Bandwidth made by Bandwidth.adjustable")
            limiter.set_rate(rate)

    async def received(self, n: int, *, from_source: bool) -> None:
        if from_source and self.source is not None:
            await self.source.take(n)
        if self.download is not None:
            await self.download.take(n)


UNLIMITED = Bandwidth()


class Slots:
    """At most ``limit`` things at once (a daemon's uploads), taken without waiting.
    The limit can change while slots are held: lowering it refuses new takers until
    enough are given back."""

    __slots__ = ("in_use", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_use = 0

    def try_acquire(self) -> bool:
        if self.in_use >= self.limit:
            return False
        self.in_use += 1
        return True

    def release(self) -> None:
        if self.in_use <= 0:
            raise RuntimeError("Slots.release without an acquire")
        self.in_use -= 1
