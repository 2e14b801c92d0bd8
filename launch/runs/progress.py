"""A plain-text progress bar for rank 0 (no dependencies).

On a terminal it redraws one line with ``\\r``; when the output is a pipe or a file (a torchrun
child whose output is captured) it prints a fresh line every tenth of the run instead, so logs
stay readable.
"""

from __future__ import annotations

import sys
import time

__all__ = ["ProgressBar"]


class ProgressBar:
    """``bar.update(step, **fields)`` after each step; ``bar.close()`` at the end."""

    def __init__(self, total: int, *, label: str = "", width: int = 30, stream=None, enabled: bool = True):
        self.total = max(1, int(total))
        self.label = label
        self.width = width
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.interactive = bool(getattr(self.stream, "isatty", lambda: False)())
        self.start = time.perf_counter()
        self._last_decile = -1

    def _line(self, step: int, fields: dict) -> str:
        done = min(step, self.total)
        filled = int(self.width * done / self.total)
        bar = "#" * filled + "-" * (self.width - filled)
        elapsed = time.perf_counter() - self.start
        extra = " ".join(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"
                         for key, value in fields.items())
        return f"{self.label} [{bar}] {done}/{self.total} {elapsed:5.1f}s {extra}".rstrip()

    def update(self, step: int, **fields) -> None:
        """Show that ``step`` of ``total`` steps is done."""
        if not self.enabled:
            return
        if self.interactive:
            self.stream.write("\r" + self._line(step, fields))
            self.stream.flush()
            return
        decile = 10 * min(step, self.total) // self.total
        if decile != self._last_decile:
            self._last_decile = decile
            self.stream.write(self._line(step, fields) + "\n")
            self.stream.flush()

    def close(self) -> None:
        """End the bar's line."""
        if self.enabled and self.interactive:
            self.stream.write("\n")
            self.stream.flush()
