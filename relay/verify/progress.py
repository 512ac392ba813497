"""Progress of long runs on stderr: one rewritten line on a terminal, a line every few s off it."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(
        self, stream: TextIO | None = None, quiet: bool = False, every: float = 5.0
    ) -> None:
        self.stream = stream or sys.stderr
        self.every = every  # seconds between lines when the stream is not a terminal
        self.tty = self.stream.isatty()
        self.quiet = quiet
        self._last = 0.0
        self._open = False

    def note(self, text: str) -> None:
        """A line that stays (phase started, phase result)."""
        if self.quiet:
            return
        self._end_line()
        print(text, file=self.stream, flush=True)

    def update(self, text: str) -> None:
        """A transient status: rewritten in place on a terminal, throttled otherwise."""
        if self.quiet:
            return
        now = time.monotonic()
        if self.tty:
            if now - self._last >= 0.2:
                self.stream.write("\r\x1b[K" + text)
                self.stream.flush()
                self._open = True
                self._last = now
        elif now - self._last >= self.every:
            print("  " + text, file=self.stream, flush=True)
            self._last = now

    def _end_line(self) -> None:
        if self._open:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._open = False


def bar(done: int, total: int, width: int = 24) -> str:
    fraction = min(1.0, done / total) if total else 1.0
    filled = int(fraction * width)
    return f"[{'#' * filled}{'.' * (width - filled)}] {done:,}/{total:,}"
