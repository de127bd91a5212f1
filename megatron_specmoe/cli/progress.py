"""Text progress bars on stderr for the long steps of the command-line tools.

Notation
    done, total: units of work finished and in all (layers, usually).

``ProgressBar(label, total)`` prints ``[label] |#####-----| 12/31 layers 40.1 s, ~33 s left`` and
redraws it in place (carriage return) on a terminal; elsewhere (a log file, a pipe) it prints one
line per tenth of the work so that logs stay short. ``finish()`` ends the line.
"""

from __future__ import annotations

import sys
import time
from typing import Optional, TextIO

__all__ = ["ProgressBar"]


class ProgressBar:
    """One stage's bar.

    Args:
        label: the stage, printed first.   total: units of work (>= 1).
        unit: what a unit is ("layers").   width: characters of the bar.
        stream: where to print (default stderr).
    """

    def __init__(self, label: str, total: int, *, unit: str = "layers", width: int = 24,
                 stream: Optional[TextIO] = None) -> None:
        if total < 1:
            raise ValueError(f"ProgressBar: total must be >= 1, got {total}")
        self.label, self.total, self.unit, self.width = label, int(total), unit, width
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.start = time.perf_counter()
        self.done = 0
        self._last_tenth = -1

    def line(self) -> str:
        filled = self.width * self.done // self.total
        elapsed = time.perf_counter() - self.start
        left = elapsed * (self.total - self.done) / self.done if self.done else float("nan")
        eta = f", ~{left:.0f} s left" if self.done and self.done < self.total else ""
        return (f"[{self.label}] |{'#' * filled}{'-' * (self.width - filled)}| {self.done}/{self.total} "
                f"{self.unit} {elapsed:.1f} s{eta}")

    def update(self, done: int, total: Optional[int] = None) -> None:
        """Record ``done`` units finished (a ``progress(done, total)`` callback)."""
        if total is not None and total >= 1:
            self.total = int(total)
        self.done = min(int(done), self.total)
        if self.tty:
            print("\r" + self.line(), end="", file=self.stream, flush=True)
            return
        tenth = 10 * self.done // self.total
        if tenth != self._last_tenth:
            self._last_tenth = tenth
            print(self.line(), file=self.stream, flush=True)

    def finish(self) -> None:
        """Mark everything done and end the line."""
        self.update(self.total)
        if self.tty:
            print(file=self.stream, flush=True)
