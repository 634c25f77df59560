"""A one-line progress bar on stderr: done/total, percentage, rate, ETA (rate only when the total is unknown).

Ours rather than tqdm: it is ~40 lines, imports nothing (tqdm adds ~25 ms of imports to every CLI start) and is
all the CLI needs. Redraws at most every `every` seconds, and always at the end.
"""
from __future__ import annotations

import sys
import time


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60:02d}:{seconds % 60:02d}"


class Progress:
    def __init__(self, total: int | None, unit: str = "it", *, start: int = 0, every: float = 0.2,
                 stream=None, enabled: bool = True):
        self.total, self.unit, self.done, self.every = total, unit, start, every
        self.first = start                            # rate counts this run's work only (a resume skips lines)
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.started = self.shown = time.perf_counter()

    def update(self, n: int = 1, note: str = "") -> None:
        self.done += n
        now = time.perf_counter()
        if self.enabled and (now - self.shown >= self.every or self.done == self.total):
            self.shown = now
            self.stream.write("\r" + self.line(now, note))
            self.stream.flush()

    def line(self, now: float | None = None, note: str = "") -> str:
        elapsed = (now or time.perf_counter()) - self.started
        rate = (self.done - self.first) / elapsed if elapsed > 0 else 0.0
        speed = f"{rate:.1f} {self.unit}/s"
        if not self.total:
            text = f"{self.done} {self.unit}  {speed}  {_clock(elapsed)}"
        else:
            frac = min(self.done / self.total, 1.0)
            eta = (self.total - self.done) / rate if rate > 0 else float("nan")
            bar = "#" * int(24 * frac)
            text = (f"{100 * frac:3.0f}% [{bar:<24}] {self.done}/{self.total} {self.unit}  {speed}  "
                    f"{_clock(elapsed)}<{_clock(eta) if eta == eta else '?'}")
        return f"{text}  {note}".rstrip()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\r" + self.line() + "\n")
            self.stream.flush()
