"""An optional record of every model step a worker runs, one JSON line each, for fitting the
simulator's CPU profile to the live system (`python -m duetserve.loadtest.sim measure
--step-logs DIR`) and for seeing where a worker's time goes.

    {"kind": "decode", "tokens": 12, "context": 4410, "forward_s": 0.031, "cycle_s": 0.034,
     "threads": 1, "cores": 2, "at": 1796481363.2431}

`tokens` are prompt tokens computed (prefill) or sequences stepped (decode); `context` the keys
attended (prefill) or KV tokens read (decode), as the simulator's cost model counts them;
`forward_s` the forward pass and sampling; `cycle_s` the worker's whole iteration around it
(message handling, token publishing, block bookkeeping); `at` the wall-clock time (Unix
seconds) it ended, so that the gaps between steps, and a client's view of the same run, line up."""

import json
import os
import time
from pathlib import Path
from typing import IO, Literal


def attended_keys(start: int, tokens: int) -> int:
    """Keys attended by a causal chunk of `tokens` tokens starting at position `start`."""
    return tokens * start + tokens * (tokens + 1) // 2


class StepLog:
    """Appends to `<directory>/<role>-<pid>.jsonl`; a no-op without a directory."""

    def __init__(self, directory: Path | None, role: Literal["prefill", "decode"]) -> None:
        self._file: IO[str] | None = None
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)
            self._file = (directory / f"{role}-{os.getpid()}.jsonl").open("a", buffering=1)
        self.kind = role

    def record(
        self, tokens: int, context: int, forward_s: float, cycle_s: float, threads: int
    ) -> None:
        """`threads`: the torch threads the step ran on (the model thread's: OpenMP's count is
        per calling thread, and this runs on the event loop's)."""
        if self._file is None:
            return
        row = {
            "kind": self.kind,
            "tokens": tokens,
            "context": context,
            "forward_s": round(forward_s, 6),
            "cycle_s": round(cycle_s, 6),
            "threads": threads,
            "cores": os.cpu_count() or 1,
            "at": round(time.time(), 4),
        }
        self._file.write(json.dumps(row) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
