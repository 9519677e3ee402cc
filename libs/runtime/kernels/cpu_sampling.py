"""The sampler's whole-vocabulary passes on the CPU, by the C kernels of cpu/sampling.c (compiled
at first use by cpu/build.py): the repetition penalty and the draw (softmax over temperature,
inverse CDF, top_p by rejection), each one pass a row on torch.get_num_threads() threads.

They compute what sampling_logits.py computes in torch (the penalty to the bit; the draw from the
same uniforms, with probabilities equal to float32 rounding), in one pass over each row instead
of a dozen batch-wide ops: ~4x less time at batch 32 over a 49k vocabulary. `load_sampling_kernels`
returns None where they cannot be built; the sampler keeps its torch path for that case.
"""

import ctypes
import functools
import itertools
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from duetserve.runtime.errors import InvalidTokenError, ShapeError
from duetserve.runtime.kernels.cpu.build import CompilerOptions, KernelUnavailable, load_library

SOURCE = Path(__file__).parent / "cpu" / "sampling.c"
DEFAULT_OPTIONS = CompilerOptions()
_OK, _BAD_TOKEN, _NO_MEMORY = 0, 2, 3  # the C side's statuses; any other: refused arguments
# scores, vocab, count, rows, penalties, offsets, tokens, threads
_PENALTY_ARGTYPES = (
    [ctypes.c_void_p] + [ctypes.c_int64] * 2 + [ctypes.c_void_p] * 4 + [ctypes.c_int32]
)
# scores, rows, vocab, temperatures, top_p, uniforms, rounds, winners, threads
_DRAW_ARGTYPES = (
    [ctypes.c_void_p]
    + [ctypes.c_int64] * 2
    + [ctypes.c_void_p] * 3
    + [ctypes.c_int64]
    + [ctypes.c_void_p]
    + [ctypes.c_int32]
)

_log = logging.getLogger(__name__)


class SamplingKernels:
    """The two entry points of one loaded library."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._penalty = library.repetition_penalty
        self._penalty.argtypes = _PENALTY_ARGTYPES
        self._penalty.restype = ctypes.c_int
        self._draw = library.draw
        self._draw.argtypes = _DRAW_ARGTYPES
        self._draw.restype = ctypes.c_int

    def repetition_penalty(
        self,
        scores: torch.Tensor,
        rows: Sequence[int],
        penalties: Sequence[float],
        histories: Sequence[Sequence[Sequence[int]]],
    ) -> None:
        """In place on contiguous float32 CPU scores [B, V]: row rows[c] penalised by
        penalties[c] over the tokens of the parts of histories[c] (its prompt and output; a
        token once however often it appears). Raises InvalidTokenError, before touching a
        score, for a token outside the vocabulary."""
        _check_scores(scores)
        if len(penalties) != len(rows) or len(histories) != len(rows):
            raise ShapeError(
                f"{len(rows)} rows, {len(penalties)} penalties, {len(histories)} histories"
            )
        if any(not 0 <= r < scores.shape[0] for r in rows):
            raise ShapeError(f"a penalised row outside the batch of {scores.shape[0]}")
        lengths = [sum(len(part) for part in parts) for parts in histories]
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        flat = itertools.chain.from_iterable(itertools.chain.from_iterable(histories))
        # numpy reads the ints in C: 4x faster than torch.tensor(list) at a batch's 20k tokens.
        tokens = np.fromiter(flat, dtype=np.int64, count=int(offsets[-1]))
        row_ids = np.asarray(rows, dtype=np.int64)
        values = np.asarray(penalties, dtype=np.float32)
        status = self._penalty(
            scores.data_ptr(),
            scores.shape[1],
            len(rows),
            row_ids.ctypes.data,
            values.ctypes.data,
            offsets.ctypes.data,
            tokens.ctypes.data,
            torch.get_num_threads(),
        )
        if status == _BAD_TOKEN:
            raise InvalidTokenError(
                f"a prompt or output token id outside vocabulary [0, {scores.shape[1]})"
            )
        _check_status(status)

    def draw(
        self,
        scores: torch.Tensor,
        temperatures: Sequence[float],
        top_p: Sequence[float],
        uniforms: torch.Tensor,
    ) -> tuple[torch.Tensor, list[int]]:
        """Token ids [R] drawn from softmax(scores / temperature) within each row's top_p
        nucleus, one round a column of uniforms (float64 [R, K] in [0, 1)), and the rows no round
        settled, whose scores are left as their probabilities (for `nucleus_race`) and whose
        winner is -1. Consumes contiguous float32 CPU scores [R, V]."""
        _check_scores(scores)
        num_rows = scores.shape[0]
        if not (
            uniforms.dtype == torch.float64
            and uniforms.dim() == 2
            and uniforms.shape[0] == num_rows
            and uniforms.shape[1] > 0
            and uniforms.is_contiguous()
            and uniforms.device.type == "cpu"
        ):
            raise ShapeError(f"uniforms: float64 CPU [{num_rows}, K > 0], got {uniforms.shape}")
        if len(temperatures) != num_rows or len(top_p) != num_rows:
            raise ShapeError(
                f"{len(temperatures)} temperatures, {len(top_p)} top_p, {num_rows} rows"
            )
        temperature_values = np.asarray(temperatures, dtype=np.float32)
        top_p_values = np.asarray(top_p, dtype=np.float64)
        winners = torch.empty(num_rows, dtype=torch.int64)
        status = self._draw(
            scores.data_ptr(),
            num_rows,
            scores.shape[1],
            temperature_values.ctypes.data,
            top_p_values.ctypes.data,
            uniforms.data_ptr(),
            uniforms.shape[1],
            winners.data_ptr(),
            torch.get_num_threads(),
        )
        _check_status(status)
        unsettled = (winners < 0).nonzero()[:, 0].tolist() if num_rows else []
        return winners, unsettled


@functools.cache
def load_sampling_kernels(options: CompilerOptions = DEFAULT_OPTIONS) -> SamplingKernels | None:
    """The compiled kernels, built on the first call for these options, or None where they
    cannot be built (logged once, with the reason)."""
    try:
        library = load_library(SOURCE, options)
    except KernelUnavailable as error:
        _log.warning("CPU sampling kernels unavailable, sampling in torch: %s", error)
        return None
    _log.info("CPU sampling kernels loaded from %s", library._name)
    return SamplingKernels(library)


def _check_scores(scores: torch.Tensor) -> None:
    if not (
        scores.dtype == torch.float32
        and scores.dim() == 2
        and scores.is_contiguous()
        and scores.device.type == "cpu"
    ):
        raise ShapeError(
            f"scores: contiguous float32 CPU [B, V], got {scores.dtype} {tuple(scores.shape)} "
            f"on {scores.device}"
        )


def _check_status(status: int) -> None:
    if status == _NO_MEMORY:
        raise MemoryError("the CPU sampling kernel could not allocate its scratch")
    if status != _OK:
        raise ShapeError(f"the CPU sampling kernel refused its arguments (status {status})")
