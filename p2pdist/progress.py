"""A one-line progress bar for a terminal: bytes, bytes/s and ETA, redrawn at most ~10×/s."""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["ProgressBar", "format_bytes", "format_rate"]


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_rate(bytes_per_second: float) -> str:
    return f"{bytes_per_second / 1e6:.1f} MB/s"


def _format_eta(seconds: float) -> str:
    if seconds < 0 or seconds > 99 * 3600:
        return "--:--"
    m, s = divmod(int(seconds + 0.5), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class ProgressBar:
    """Draws ``label [#####.....]  45%  120.0 MiB/256.0 MiB  310.2 MB/s  ETA 00:01``."""

    def __init__(self, label: str, *, stream: TextIO | None = None, width: int = 24) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self.width = width
        self.started = time.monotonic()
        self._last_draw = 0.0
        self._done = 0
        self._total: int | None = None
        self._drawn = False

    def __call__(self, done: int, total: int | None) -> None:
        self._done, self._total = done, total
        now = time.monotonic()
        if now - self._last_draw >= 0.1:
            self._last_draw = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        elapsed = max(now - self.started, 1e-6)
        rate = self._done / elapsed
        if self._total:
            frac = min(1.0, self._done / self._total)
            filled = int(frac * self.width)
            bar = "#" * filled + "." * (self.width - filled)
            eta = (self._total - self._done) / rate if rate > 0 else -1
            text = (
                f"{self.label} [{bar}] {frac * 100:3.0f}%  {format_bytes(self._done)}/"
                f"{format_bytes(self._total)}  {format_rate(rate)}  ETA {_format_eta(eta)}"
            )
        else:
            text = f"{self.label} {format_bytes(self._done)}  {format_rate(rate)}"
        self.stream.write("\r\x1b[2K" + text)
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        if self._drawn:
            self._draw(time.monotonic())
            self.stream.write("\n")
            self.stream.flush()
