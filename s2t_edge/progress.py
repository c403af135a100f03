"""A one-line progress bar on stderr with rate and ETA (a plain line per update when not a tty)."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, label: str = "", enabled: bool = True) -> None:
        self.total, self.label, self.enabled = total, label, enabled
        self.done = 0
        self.start = time.monotonic()
        self.tty = sys.stderr.isatty()

    def update(self, n: int = 1, note: str = "") -> None:
        self.done += n
        if not self.enabled:
            return
        elapsed = time.monotonic() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        width = 24
        fill = int(width * self.done / self.total) if self.total else width
        line = (
            f"{self.label} [{'#' * fill}{'.' * (width - fill)}] {self.done}/{self.total} "
            f"{rate * 60:.1f}/min ETA {int(eta // 60)}m{int(eta % 60):02d}s {note}"
        )
        if self.tty:
            print("\r" + line, end="", file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled and self.tty:
            print(file=sys.stderr, flush=True)
