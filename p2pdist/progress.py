"""Progress for a terminal: a one-line bar (bytes, bytes/s, ETA) redrawn at most ~10×/s,
and :class:`LineProgress`, one line per item (the layers of ``p2pdist pull``)."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import TextIO

__all__ = ["LineProgress", "ProgressBar", "format_bytes", "format_rate"]


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


class LineProgress:
    """One line per item, ``<label>: <state>``.  Live (a terminal): every line is redrawn
    in place, at most ~10×/s, with a bar for items in flight.  Not live (a log, a pipe):
    a line is printed once, when its item finishes."""

    def __init__(
        self,
        labels: Sequence[str],
        *,
        stream: TextIO | None = None,
        live: bool | None = None,
        width: int = 24,
    ) -> None:
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self.labels = list(labels)
        self.width = width
        self._states = ["waiting"] * len(self.labels)
        self._drawn_lines = 0
        self._last_draw = 0.0

    def update(self, i: int, done: int, total: int | None) -> None:
        if total:
            frac = min(1.0, done / total)
            filled = int(frac * self.width)
            bar = "#" * filled + "." * (self.width - filled)
            self._states[i] = f"downloading [{bar}] {format_bytes(done)}/{format_bytes(total)}"
        else:
            self._states[i] = f"downloading {format_bytes(done)}"
        self._redraw(force=False)

    def finish(self, i: int, text: str) -> None:
        self._states[i] = text
        if self.live:
            self._redraw(force=True)
        else:
            self.stream.write(f"{self.labels[i]}: {text}\n")
            self.stream.flush()

    def _redraw(self, *, force: bool) -> None:
        if not self.live:
            return
        now = time.monotonic()
        if not force and now - self._last_draw < 0.1:
            return
        self._last_draw = now
        out = [f"\x1b[{self._drawn_lines}F"] if self._drawn_lines else []
        lines = zip(self.labels, self._states, strict=True)
        out += [f"\x1b[2K{label}: {state}\n" for label, state in lines]
        self.stream.write("".join(out))
        self.stream.flush()
        self._drawn_lines = len(self.labels)
