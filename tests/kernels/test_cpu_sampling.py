"""The C sampling kernels (kernels/cpu/sampling.c) against the torch path of sampling_logits.py
and against hand-computed answers: the repetition penalty to the bit, draws from the same
uniforms equal to the torch path's, the edges (tokens of probability 0, infinite and NaN rows,
vocabularies that fill no vector or chunk), and the kernels built without AVX-512, the path of
CPUs without it."""

import math
import platform

import pytest
import torch

from duetserve.runtime.errors import InvalidTokenError, ShapeError
from duetserve.runtime.kernels.cpu.build import DEFAULT_FLAGS, CompilerOptions
from duetserve.runtime.kernels.cpu_sampling import SamplingKernels, load_sampling_kernels
from duetserve.runtime.sampling import SamplingParams, SequenceSamplingState
from duetserve.runtime.sampling_logits import (
    CDF_CHUNK,
    _apply_repetition_penalty,
    nucleus_draw,
    sampling_probs,
)

AS_BUILT = CompilerOptions()
# Without AVX-512 GCC splits the 16-float vectors: the path of CPUs without it.
SPLIT_VECTORS = CompilerOptions(flags=(*DEFAULT_FLAGS, "-mno-avx512f"))
on_x86 = pytest.mark.skipif(
    platform.machine() not in ("x86_64", "AMD64"), reason="-mno-avx512f is an x86 flag"
)
needs_kernel = pytest.mark.skipif(
    load_sampling_kernels() is None, reason="no C compiler for the CPU sampling kernels"
)
BUILDS = pytest.mark.parametrize(
    "options",
    [AS_BUILT, pytest.param(SPLIT_VECTORS, marks=on_x86)],
    ids=["as-built", "without-avx512"],
)


def kernels(options: CompilerOptions) -> SamplingKernels:
    loaded = load_sampling_kernels(options)
    assert loaded is not None
    return loaded


def uniforms(rows: int, rounds: int, seed: int) -> torch.Tensor:
    return torch.rand(
        rows, rounds, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)
    )


@needs_kernel
@BUILDS
def test_repetition_penalty_equals_the_torch_path_bit_for_bit(options: CompilerOptions) -> None:
    generator = torch.Generator().manual_seed(4)
    vocab = 1003
    logits = torch.randn(6, vocab, generator=generator) * 4
    logits[2, 17] = 0.0  # a zero score stays zero, even under a vanishing penalty
    penalties = [1.3, 0.7, 1e-300, 2.0, 1.0, 1.1]
    histories = [
        (torch.randint(vocab, (n,), generator=generator).tolist(), [5, 5, 9, 17])
        for n in (40, 0, 300, 7, 3, 1000)
    ]
    histories[2] = ([17, 17, 3, 3], [17])
    rows = [
        SequenceSamplingState(SamplingParams(repetition_penalty=p), prompt, output)
        for p, (prompt, output) in zip(penalties, histories, strict=True)
    ]
    expected = logits.clone()
    _apply_repetition_penalty(expected, rows)
    scores = logits.clone()
    penalised = [i for i, p in enumerate(penalties) if p != 1.0]
    kernels(options).repetition_penalty(
        scores, penalised, [penalties[i] for i in penalised], [histories[i] for i in penalised]
    )
    torch.testing.assert_close(scores, expected, rtol=0, atol=0, equal_nan=True)
    assert not scores.isnan().any()


@needs_kernel
def test_a_token_outside_the_vocabulary_is_refused_before_any_score_changes() -> None:
    scores = torch.randn(2, 50)
    before = scores.clone()
    with pytest.raises(InvalidTokenError, match="outside vocabulary"):
        kernels(AS_BUILT).repetition_penalty(
            scores, [0, 1], [1.5, 1.5], [([1, 2], []), ([3], [50])]
        )
    with pytest.raises(InvalidTokenError):
        kernels(AS_BUILT).repetition_penalty(scores, [0], [1.5], [([-1], [])])
    assert torch.equal(scores, before)


@needs_kernel
def test_arguments_are_checked() -> None:
    loaded = kernels(AS_BUILT)
    with pytest.raises(ShapeError, match="float32"):
        loaded.draw(torch.zeros(2, 8, dtype=torch.float64), [1.0] * 2, [1.0] * 2, uniforms(2, 1, 0))
    with pytest.raises(ShapeError, match="uniforms"):
        loaded.draw(torch.zeros(2, 8), [1.0] * 2, [1.0] * 2, uniforms(3, 1, 0))
    with pytest.raises(ShapeError, match="temperatures"):
        loaded.draw(torch.zeros(2, 8), [1.0], [1.0] * 2, uniforms(2, 1, 0))
    with pytest.raises(ShapeError, match="outside the batch"):
        loaded.repetition_penalty(torch.zeros(2, 8), [2], [1.5], [([1], [])])


@needs_kernel
@BUILDS
@pytest.mark.parametrize("vocab", [7, 16, 300, 49152 + 5], ids=lambda v: f"V{v}")
def test_draws_equal_the_torch_paths_from_the_same_uniforms(
    options: CompilerOptions, vocab: int
) -> None:
    """Same uniforms, same tokens: the two paths' probabilities differ by float32 rounding, so
    a uniform within that of a boundary between tokens may split them, almost never."""
    num_rows, rounds = 256, 4
    generator = torch.Generator().manual_seed(vocab)
    scores = torch.randn(num_rows, vocab, generator=generator) * 3
    scores[::5, : vocab // 3] = -math.inf  # masked tokens (min_tokens, top_k)
    temperatures = [0.5 + (i % 7) * 0.25 for i in range(num_rows)]
    top_p = [1.0 if i % 3 == 0 else 0.5 + (i % 5) * 0.1 for i in range(num_rows)]
    draws = uniforms(num_rows, rounds, vocab)
    params = [SamplingParams(temperature=t) for t in temperatures]
    probs = sampling_probs(scores.clone(), params)
    expected, expected_unsettled = nucleus_draw(probs, draws, top_p)
    winners, unsettled = kernels(options).draw(scores.clone(), temperatures, top_p, draws)
    settled = [i for i in range(num_rows) if i not in unsettled and i not in expected_unsettled]
    differ = [i for i in settled if winners[i] != expected[i]]
    assert len(differ) <= 1, differ
    assert abs(len(unsettled) - len(expected_unsettled)) <= 1
    assert (winners[unsettled] == -1).all()
    drawn = winners[settled]
    assert not torch.isinf(scores[settled, drawn]).any()  # never a masked token


@needs_kernel
@BUILDS
def test_unsettled_rows_are_left_as_their_probabilities(options: CompilerOptions) -> None:
    probs = torch.tensor([[0.1, 0.6, 0.3]] * 3)  # nucleus at top_p 0.5: token 1 alone
    draws = torch.tensor(
        [[0.05, 0.2, 0.3, 0.4], [0.05, 0.95, 0.05, 0.95], [0.9, 0.05, 0.05, 0.05]],
        dtype=torch.float64,
    )
    scores = probs.log()
    winners, unsettled = kernels(options).draw(scores, [1.0] * 3, [0.5, 0.5, 1.0], draws)
    assert winners.tolist() == [1, -1, 2]  # row 0 in its 2nd round; row 1 never; row 2 no top_p
    assert unsettled == [1]
    torch.testing.assert_close(scores[1], probs[1])


@needs_kernel
@BUILDS
def test_tokens_of_probability_zero_are_never_drawn_at_the_uniforms_edges(
    options: CompilerOptions,
) -> None:
    vocab = 2 * CDF_CHUNK + 3  # a partial chunk and a partial vector at the end
    scores = torch.full((4, vocab), -math.inf)
    scores[:, 1], scores[:, CDF_CHUNK + 7] = 0.0, 0.0  # two tokens, half the mass each
    highest = 1.0 - 2.0**-53
    draws = torch.tensor([[0.0], [0.5 - 2.0**-53], [0.5], [highest]], dtype=torch.float64)
    winners, unsettled = kernels(options).draw(scores, [1.0] * 4, [1.0] * 4, draws)
    assert winners.tolist() == [1, 1, CDF_CHUNK + 7, CDF_CHUNK + 7] and unsettled == []


@needs_kernel
def test_a_token_below_float32_resolution_at_one_is_still_drawn() -> None:
    scores = torch.full((2, 1000), -math.inf)
    scores[:, 0], scores[:, 700] = 0.0, math.log(1e-9)
    total = 1.0 + 1e-9
    draws = torch.tensor([[(1.0 + 0.5e-9) / total], [0.999 / total]], dtype=torch.float64)
    winners, _ = kernels(AS_BUILT).draw(scores, [1.0] * 2, [1.0] * 2, draws)
    assert winners.tolist() == [700, 0]


@needs_kernel
@BUILDS
def test_infinite_scores_share_the_draw_and_nan_rows_stay_in_range(
    options: CompilerOptions,
) -> None:
    vocab = 40
    scores = torch.zeros(5, vocab)
    scores[0, [3, 30]] = math.inf  # 3 and 30 share the mass
    scores[1, [3, 30]] = math.inf
    scores[2, 11] = math.nan
    scores[3] = -math.inf  # nothing drawable
    scores[4, 39] = math.inf
    draws = torch.tensor([[0.2], [0.7], [0.5], [0.5], [0.0]], dtype=torch.float64)
    winners, unsettled = kernels(options).draw(scores, [1.0] * 5, [0.9] * 5, draws)
    assert winners.tolist() == [3, 30, vocab - 1, vocab - 1, 39] and unsettled == []


@needs_kernel
def test_draws_follow_the_distribution_in_every_chunk() -> None:
    """20,000 draws of one row whose mass spreads over three chunks and the tail."""
    vocab = 3 * CDF_CHUNK + 40
    probs = torch.zeros(vocab)
    picks = [0, 15, 16, CDF_CHUNK - 1, CDF_CHUNK, 2 * CDF_CHUNK + 100, vocab - 1]
    probs[picks] = torch.tensor([0.05, 0.1, 0.2, 0.15, 0.25, 0.05, 0.2])
    num_draws = 20_000
    scores = probs.log()[None].expand(num_draws, -1).contiguous()
    winners, _ = kernels(AS_BUILT).draw(
        scores, [1.0] * num_draws, [1.0] * num_draws, uniforms(num_draws, 1, 11)
    )
    counts = torch.bincount(winners, minlength=vocab)
    assert set(counts.nonzero()[:, 0].tolist()) == set(picks)
    expected = probs[picks] * num_draws
    statistic = float(((counts[picks] - expected) ** 2 / expected).sum())
    assert statistic < 22.46  # chi-square, 6 degrees, 0.1%
