"""Retry schedule: jittered exponential backoff, honouring ``Retry-After``.  Pure."""

from __future__ import annotations

import datetime
import email.utils
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["RETRYABLE_STATUS", "RetryPolicy", "is_retryable_status", "parse_retry_after"]

RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})


def is_retryable_status(status: int) -> bool:
    """429 and every 5xx (except 501 Not Implemented, which will not change on a retry)."""
    return status == 429 or (status >= 500 and status != 501)


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """How often and how patiently to retry opening a request.

    ``attempts`` counts every try, the first included (``attempts=1``: never retry).
    The delay before retry *n* (0-based) is drawn from ``[d/2, d]`` with
    ``d = min(cap, base * 2**n)`` ("equal jitter"), and is at least a server's
    ``Retry-After``.  A ``Retry-After`` longer than ``max_retry_after`` is not waited
    for: the request fails at once (the caller's deadline is a better judge).
    """

    attempts: int = 5
    base: float = 0.2
    cap: float = 5.0
    max_retry_after: float = 60.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("attempts must be >= 1")
        if self.base < 0 or self.cap < 0 or self.max_retry_after < 0:
            raise ValueError("delays must be >= 0")

    def delay(
        self,
        retry: int,
        *,
        retry_after: float | None = None,
        rand: Callable[[], float] = random.random,
    ) -> float:
        """Seconds to sleep before retry number ``retry`` (0 = the first retry)."""
        d = min(self.cap, self.base * (2.0 ** min(retry, 62)))
        wait = d / 2 + rand() * d / 2
        if retry_after is not None and retry_after > wait:
            wait = retry_after
        return wait

    def should_retry(self, attempt: int, *, retry_after: float | None = None) -> bool:
        """After failed attempt number ``attempt`` (0-based), is another one allowed?"""
        if attempt + 1 >= self.attempts:
            return False
        return retry_after is None or retry_after <= self.max_retry_after

    def schedule(self, *, rand: Callable[[], float] = random.random) -> list[float]:
        """Every delay a request failing each time would sleep (``attempts - 1`` of them)."""
        return [self.delay(i, rand=rand) for i in range(self.attempts - 1)]


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """``Retry-After`` as seconds from now: delta-seconds or an HTTP-date.  ``None`` when
    absent or unreadable; never negative."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    if value.isdigit():
        return float(int(value))
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)
