"""Stop strings over a stream of text pieces.

Text that might be the start of a stop string is held back until the next piece decides it, so
a client never sees part of a stop string; the stop string itself is never emitted (OpenAI)."""

from collections.abc import Sequence
from typing import NamedTuple


class StopCheck(NamedTuple):
    text: str  # safe to send now
    stopped: bool  # a stop string ended the output; nothing after `text` is sent


class StopStringMatcher:
    def __init__(self, stops: Sequence[str]) -> None:
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        self.stops = tuple(stops)
        self._held = ""
        self.stopped = False

    def feed(self, piece: str) -> StopCheck:
        if self.stopped:
            return StopCheck("", True)
        text = self._held + piece
        cut = self._earliest_stop(text)
        if cut is not None:
            self._held, self.stopped = "", True
            return StopCheck(text[:cut], True)
        keep = self._partial_suffix(text)
        self._held = text[len(text) - keep :] if keep else ""
        return StopCheck(text[: len(text) - keep], False)

    def flush(self) -> str:
        """At the end of the output: whatever was held back was not a stop string after all."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _earliest_stop(self, text: str) -> int | None:
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        return min(found) if found else None

    def _partial_suffix(self, text: str) -> int:
        """Length of the longest end of `text` that begins some stop string."""
        longest = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:size]):
                    longest = size
                    break
        return longest
