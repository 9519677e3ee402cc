"""A one-line progress bar on stderr: redrawn in place on a terminal, a line now and then
elsewhere (logs, CI), nothing at all when disabled."""

import sys
import time
from typing import TextIO

BAR_WIDTH = 30
TERMINAL_INTERVAL_S = 0.1
LOG_INTERVAL_S = 5.0


class Progress:
    def __init__(self, total: int, enabled: bool = True, stream: TextIO | None = None) -> None:
        self.total = total
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.is_terminal = self.stream.isatty()
        self.started = time.monotonic()
        self.last_drawn = float("-inf")
        self.done = self.errors = self.in_flight = 0

    def sent(self) -> None:
        self.in_flight += 1
        self._draw()

    def finished(self, failed: bool) -> None:
        self.in_flight -= 1
        self.done += 1
        self.errors += int(failed)
        self._draw()

    def close(self) -> None:
        self._draw(force=True)
        if self.enabled and self.is_terminal:
            self.stream.write("\n")
            self.stream.flush()

    def line(self) -> str:
        filled = BAR_WIDTH * self.done // max(self.total, 1)
        bar = "#" * filled + "." * (BAR_WIDTH - filled)
        elapsed = time.monotonic() - self.started
        return (
            f"[{bar}] {self.done}/{self.total} done, {self.in_flight} in flight, "
            f"{self.errors} errors, {elapsed:.1f}s"
        )

    def _draw(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        interval = TERMINAL_INTERVAL_S if self.is_terminal else LOG_INTERVAL_S
        if not force and now - self.last_drawn < interval:
            return
        self.last_drawn = now
        if self.is_terminal:
            self.stream.write("\r" + self.line())
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()
