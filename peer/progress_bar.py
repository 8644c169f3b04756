"""A progress bar for long CLI operations (chunking a disk image, verifying one).

On a terminal it redraws one line; in a log or a pipe it prints a line every 10 %, so a
CI log or `ssh host pxepeer image add ... | tee` still shows that work is moving.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

MIB = 1024 * 1024


class ProgressBar:
    WIDTH = 30

    def __init__(self, label: str, total: int, stream: TextIO | None = None):
        self.label, self.total = label, max(total, 1)
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.started = time.monotonic()
        self._last_decile = -1
        self._last_draw = 0.0

    def _line(self, done: int) -> str:
        frac = min(done / self.total, 1.0)
        filled = int(frac * self.WIDTH)
        elapsed = max(time.monotonic() - self.started, 1e-6)
        rate = done / MIB / elapsed
        return (
            f"{self.label:<8} [{'#' * filled}{'.' * (self.WIDTH - filled)}] {frac * 100:5.1f}% "
            f"{done / MIB:8.1f}/{self.total / MIB:.1f} MiB {rate:7.1f} MiB/s"
        )

    def update(self, done: int) -> None:
        if self.tty:
            now = time.monotonic()
            if now - self._last_draw >= 0.1 or done >= self.total:
                self._last_draw = now
                self.stream.write("\r" + self._line(done))
                self.stream.flush()
            return
        decile = min(done * 10 // self.total, 10)
        if decile != self._last_decile:
            self._last_decile = decile
            self.stream.write(self._line(done) + "\n")
            self.stream.flush()

    def finish(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
