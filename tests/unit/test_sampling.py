"""The sampler against independent references: argmax, chi-square against softmax(logits / T),
hand-computed top_k and top_p sets, transformers' RepetitionPenaltyLogitsProcessor, the OpenAI
penalty formula written out by hand, and torch.log_softmax for logprobs.

Every sampler here has a fixed seed, so the statistical tests are deterministic; their
thresholds are the 0.1% critical values, far from where a correct sampler lands. Every test runs
twice: with the C kernels for CPU scores (kernels/cpu_sampling.py), and in torch alone."""

import math
import random
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor

from duetserve.runtime import sampling
from duetserve.runtime.errors import InvalidTokenError, ShapeError
from duetserve.runtime.kernels.cpu_sampling import load_sampling_kernels
from duetserve.runtime.sampling import (
    FinishReason,
    Sampler,
    SamplingParams,
    SamplingParamsError,
    SequenceSamplingState,
    draw_seed,
    finish_reason,
)
from duetserve.runtime.sampling_logits import apply_penalties, nucleus_draw, nucleus_race


@pytest.fixture(autouse=True, params=["c-kernels", "torch"])
def sampling_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Samplers made in the test take the C passes, or torch alone."""
    if request.param == "torch":
        monkeypatch.setattr(sampling, "load_sampling_kernels", lambda: None)
    elif load_sampling_kernels() is None:
        pytest.skip("no C compiler for the CPU sampling kernels")


EOS = 2
EOS_IDS = frozenset({EOS})
NUM_DRAWS = 20_000
CHI_SQUARE_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 7: 24.32}  # by degrees


def row(
    params: SamplingParams, prompt: Sequence[int] = (0, 1), output: Sequence[int] = ()
) -> SequenceSamplingState:
    return SequenceSamplingState(params, list(prompt), list(output))


def draw_counts(
    logits: torch.Tensor, params: SamplingParams, num_draws: int = NUM_DRAWS
) -> Counter[int]:
    """How often each token wins over num_draws copies of one row, drawn as one batch."""
    sampler = Sampler(logits.shape[-1], EOS_IDS, seed=7)
    batch = logits[None].expand(num_draws, -1)
    tokens = sampler.sample(batch, [row(params)] * num_draws)
    return Counter(token.token_id for token in tokens)


def chi_square(counts: Counter[int], probs: Sequence[float]) -> float:
    """Pearson's statistic of counts against probs, over the tokens of nonzero probability."""
    total = sum(counts.values())
    return sum((counts[t] - total * p) ** 2 / (total * p) for t, p in enumerate(probs) if p > 0)


def nucleus_by_hand(probs: Sequence[float], top_p: float) -> set[int]:
    """The most likely tokens, in order, until their mass reaches top_p."""
    kept: set[int] = set()
    mass = 0.0
    for token in sorted(range(len(probs)), key=lambda t: -probs[t]):
        if mass >= top_p:
            break
        kept.add(token)
        mass += probs[token]
    return kept


def renormalised(probs: Sequence[float], kept: set[int]) -> list[float]:
    mass = sum(probs[t] for t in kept)
    return [p / mass if t in kept else 0.0 for t, p in enumerate(probs)]


# Token probabilities with no ties, scattered over the ids so vocabulary order means nothing.
SHUFFLED_PROBS = [0.05, 0.3, 0.0, 0.15, 0.4, 0.1]  # token 2 is EOS and impossible
SHUFFLED_LOGITS = torch.tensor([math.log(p) if p > 0 else -math.inf for p in SHUFFLED_PROBS])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_is_the_argmax_of_the_logits(dtype: torch.dtype) -> None:
    logits = torch.randn(8, 300, generator=torch.Generator().manual_seed(0)).to(dtype)
    tokens = Sampler(300, EOS_IDS).sample(logits, [row(SamplingParams(temperature=0.0))] * 8)
    assert [t.token_id for t in tokens] == logits.float().argmax(dim=-1).tolist()


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.5])
def test_draws_follow_softmax_of_logits_over_temperature(temperature: float) -> None:
    logits = torch.tensor([1.0, -0.5, 0.3, 2.0, 0.0, -1.2, 0.8, 1.5])
    counts = draw_counts(logits, SamplingParams(temperature=temperature))
    probs = torch.softmax(logits / temperature, dim=-1).tolist()
    assert chi_square(counts, probs) < CHI_SQUARE_999[7]


def test_top_k_keeps_exactly_the_k_best_tokens_renormalised() -> None:
    logits = torch.tensor([0.1, 1.3, -0.4, 0.9, 2.2, 0.5, -1.0, 1.8, 0.0, 0.7])
    counts = draw_counts(logits, SamplingParams(temperature=1.5, top_k=4))
    best_four = {4, 7, 1, 3}
    assert set(counts) == best_four
    probs = torch.softmax(logits / 1.5, dim=-1).tolist()
    assert chi_square(counts, renormalised(probs, best_four)) < CHI_SQUARE_999[3]


@pytest.mark.parametrize("top_p", [0.3, 0.65, 0.75, 0.9, 0.96])
def test_top_p_keeps_the_smallest_set_reaching_top_p(top_p: float) -> None:
    counts = draw_counts(SHUFFLED_LOGITS, SamplingParams(top_p=top_p))
    kept = nucleus_by_hand(SHUFFLED_PROBS, top_p)
    assert set(counts) == kept
    if len(kept) > 1:
        expected = renormalised(SHUFFLED_PROBS, kept)
        assert chi_square(counts, expected) < CHI_SQUARE_999[len(kept) - 1]


@pytest.mark.timeout(20)
@pytest.mark.parametrize("top_p", [5e-324, 1e-46, 1e-30])
def test_a_top_p_below_what_float32_holds_keeps_the_most_likely_token(top_p: float) -> None:
    """5e-324 is a valid top_p (> 0) that is 0 in float32: the race ran for ever, and one
    such request stopped a worker's every step."""
    counts = draw_counts(SHUFFLED_LOGITS, SamplingParams(top_p=top_p))
    assert set(counts) == {max(range(len(SHUFFLED_PROBS)), key=SHUFFLED_PROBS.__getitem__)}


@pytest.mark.parametrize("temperature", [1e-300, 5e-324, 1e-6])
def test_a_temperature_too_small_to_divide_by_is_greedy(temperature: float) -> None:
    """Scores over 1e-300 are infinite, and softmax of infinities is NaN: such a request
    answered the first token of the vocabulary, over and over."""
    counts = draw_counts(SHUFFLED_LOGITS, SamplingParams(temperature=temperature), 50)
    assert counts == Counter({int(SHUFFLED_LOGITS.argmax()): 50})


def test_a_vanishing_repetition_penalty_draws_among_the_seen_tokens_it_exalts() -> None:
    """1e-300 is a valid penalty (> 0) that is 0 in float32 (0/0 was NaN). A seen token's
    positive score over it is enormous, or infinite: the draw is among those tokens alone."""
    sampler = Sampler(5, EOS_IDS, seed=3)
    params = SamplingParams(repetition_penalty=1e-300)
    seen = (0, 2, 3, 4)  # 1 is not seen

    def drawn(logits: list[float], params: SamplingParams, n: int = 200) -> set[int]:
        batch = torch.tensor(logits)[None].expand(n, -1)
        return {t.token_id for t in sampler.sample(batch, [row(params, prompt=seen)] * n)}

    # Finite still (1 and 0.5 over the smallest float32): the larger wins, as in the limit.
    assert drawn([1.0, 2.0, -1.0, 0.0, 0.5], params) == {0}
    # Infinite (10 and 30 over it): they share the draw.
    assert drawn([10.0, 20.0, -1.0, 0.0, 30.0], params) == {0, 4}
    greedy = SamplingParams(temperature=0.0, repetition_penalty=1e-300)
    assert drawn([10.0, 20.0, -1.0, 0.0, 30.0], greedy, 1) <= {0, 4}


def test_top_p_applies_to_the_renormalised_top_k_distribution() -> None:
    # top_k=3 keeps {4: .4, 1: .3, 3: .15}; renormalised they are .47, .35, .18, so 0.8 is
    # reached by the first two. Without renormalisation token 3 would stay in.
    counts = draw_counts(SHUFFLED_LOGITS, SamplingParams(top_k=3, top_p=0.8))
    assert set(counts) == {4, 1}


def test_a_nucleus_most_draws_miss_follows_its_renormalised_distribution() -> None:
    """Nucleus {0, 1} weighs 0.09: four inverse-CDF rounds all miss it ~69% of the time and the
    race settles those rows, so both ways of drawing are in the counts."""
    probs = [0.05, 0.04] + [0.01] * 91
    logits = torch.tensor([math.log(p) for p in probs])
    counts = draw_counts(logits, SamplingParams(top_p=0.06))
    assert set(counts) == {0, 1}
    assert chi_square(counts, renormalised(probs, {0, 1})) < CHI_SQUARE_999[1]


def test_inverse_cdf_never_draws_a_token_of_zero_probability() -> None:
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0]])
    lowest, highest = 0.0, 1.0 - 2.0**-53  # the ends of a float64 uniform in [0, 1)
    for uniform, expected in ((lowest, 1), (0.5 - 2.0**-53, 1), (0.5, 3), (highest, 3)):
        uniforms = torch.tensor([[uniform]], dtype=torch.float64)
        winners, unsettled = nucleus_draw(probs, uniforms, [1.0])
        assert (winners.tolist(), unsettled) == ([expected], [])


def test_a_token_below_float32_resolution_at_one_is_still_drawn() -> None:
    """1 + 1e-9 is 1 in float32: a plain float32 cumulative sum gives token 700 no interval."""
    probs = torch.zeros(1, 1000)
    probs[0, 0], probs[0, 700] = 1.0, 1e-9
    total = 1.0 + float(probs[0, 700])
    inside = torch.tensor([[(1.0 + float(probs[0, 700]) / 2) / total]], dtype=torch.float64)
    winners, _ = nucleus_draw(probs, inside, [1.0])
    assert winners.tolist() == [700]
    below = torch.tensor([[0.999 / total]], dtype=torch.float64)
    assert nucleus_draw(probs, below, [1.0])[0].tolist() == [0]


def test_draws_outside_the_nucleus_are_drawn_again_with_the_next_uniform() -> None:
    probs = torch.tensor([[0.1, 0.6, 0.3]] * 3)  # nucleus at top_p 0.5: token 1 alone
    uniforms = torch.tensor(
        [[0.05, 0.2, 0.3, 0.4], [0.05, 0.95, 0.05, 0.95], [0.9, 0.05, 0.05, 0.05]],
        dtype=torch.float64,
    )
    winners, unsettled = nucleus_draw(probs, uniforms, [0.5, 0.5, 1.0])
    assert winners.tolist()[0] == 1  # round 1 drew token 0, round 2 token 1
    assert unsettled == [1]  # tokens 0, 2, 0, 2: no round landed in the nucleus
    assert winners.tolist()[2] == 2  # no top_p: the first draw stands


def test_repetition_penalty_equals_transformers() -> None:
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 40, generator=generator) * 3
    penalties = [1.3, 0.7, 1.0, 2.0]
    histories = [([3, 5, 5, 9], [9, 11]), ([0, 39], [1, 1, 2]), ([4], [4]), ([], [7, 8, 7])]
    rows = [
        row(SamplingParams(repetition_penalty=p), prompt, output)
        for p, (prompt, output) in zip(penalties, histories, strict=True)
    ]
    scores = logits.clone()
    apply_penalties(scores, rows)
    for i, (penalty, (prompt, output)) in enumerate(zip(penalties, histories, strict=True)):
        processor = RepetitionPenaltyLogitsProcessor(penalty=penalty)
        expected = processor(torch.tensor([prompt + output]), logits[i : i + 1].clone())
        torch.testing.assert_close(scores[i], expected[0], rtol=0, atol=0)
    greedy = [row(SamplingParams(temperature=0.0, repetition_penalty=1.3), *histories[0])]
    assert Sampler(40, EOS_IDS).sample(logits[:1], greedy)[0].token_id == scores[0].argmax()


def test_frequency_and_presence_penalties_follow_the_openai_formula() -> None:
    logits = torch.randn(3, 20, generator=torch.Generator().manual_seed(2))
    settings = [(0.5, 0.0), (0.0, 1.5), (-0.7, 0.4)]  # (frequency, presence)
    outputs = [[1, 1, 1, 4], [4, 6, 6], [0, 19, 19, 3, 19]]
    rows = [
        row(SamplingParams(frequency_penalty=f, presence_penalty=p), [5, 7, 4], output)
        for (f, p), output in zip(settings, outputs, strict=True)
    ]
    scores = logits.clone()
    apply_penalties(scores, rows)
    for i, ((frequency, presence), output) in enumerate(zip(settings, outputs, strict=True)):
        counts = Counter(output)  # output tokens only: the prompt's 5 and 7 stay untouched
        expected = [
            value - counts[t] * frequency - (presence if counts[t] else 0.0)
            for t, value in enumerate(logits[i].tolist())
        ]
        torch.testing.assert_close(scores[i], torch.tensor(expected))


def test_repetition_penalty_comes_before_frequency_and_presence() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 0.25]])
    params = SamplingParams(repetition_penalty=2.0, frequency_penalty=1.0, presence_penalty=0.5)
    scores = logits.clone()
    apply_penalties(scores, [row(params, prompt=[0], output=[1, 1])])
    # 0: 2 / 2 (prompt only); 1: -1 * 2 - 2 * 1 - 0.5; 2 and 3 untouched
    torch.testing.assert_close(scores, torch.tensor([[1.0, -4.5, 0.5, 0.25]]))


def test_min_tokens_masks_eos_and_stop_ids_until_reached() -> None:
    logits = torch.tensor([[0.0, 0.0, 9.0, 0.0, 5.0, 8.0, 0.0, 3.0]] * 5)  # EOS, then stop id 5
    sampler = Sampler(8, frozenset({EOS, 4}))  # two EOS ids: 2 and 4
    params = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=(5,))
    rows = [row(params, output=[0] * n) for n in range(5)]
    assert [t.token_id for t in sampler.sample(logits, rows)] == [7, 7, 7, EOS, EOS]


@pytest.mark.parametrize(("ignore_eos", "expected"), [(True, [EOS, EOS]), (False, [7, 7])])
def test_ignore_eos_leaves_eos_unmasked_below_min_tokens_but_not_stop_ids(
    ignore_eos: bool, expected: list[int]
) -> None:
    # Row 0 prefers EOS, row 1 the stop id 5, then EOS; token 7 comes after both.
    logits = torch.tensor(
        [[0.0, 0.0, 9.0, 0.0, 0.0, 8.0, 0.0, 3.0], [0, 0, 3.0, 0, 0, 9.0, 0, 1.0]]
    )
    params = SamplingParams(
        temperature=0.0, min_tokens=3, ignore_eos=ignore_eos, stop_token_ids=(5,)
    )
    tokens = Sampler(8, EOS_IDS).sample(logits, [row(params), row(params)])
    assert [t.token_id for t in tokens] == expected


@pytest.mark.parametrize(
    ("params", "output", "expected"),
    [
        (SamplingParams(max_tokens=4), [], None),
        (SamplingParams(max_tokens=4), [7, 8], None),
        (SamplingParams(max_tokens=4), [7, EOS], FinishReason.STOP),
        (SamplingParams(max_tokens=4), [7, 8, 9, 10], FinishReason.LENGTH),
        (SamplingParams(max_tokens=4), [7, 8, 9, EOS], FinishReason.STOP),
        (SamplingParams(max_tokens=4, ignore_eos=True), [7, EOS], None),
        (SamplingParams(max_tokens=4, ignore_eos=True), [7, 8, 9, EOS], FinishReason.LENGTH),
        (SamplingParams(max_tokens=4, stop_token_ids=(9,)), [7, 9], FinishReason.STOP),
        (SamplingParams(ignore_eos=True, stop_token_ids=(9,)), [9], FinishReason.STOP),
        (SamplingParams(max_tokens=4, min_tokens=3), [EOS, EOS], None),
        (SamplingParams(max_tokens=4, min_tokens=3), [7, 8, EOS], FinishReason.STOP),
        (SamplingParams(max_tokens=1), [EOS], FinishReason.STOP),
    ],
)
def test_finish_reason(
    params: SamplingParams, output: list[int], expected: FinishReason | None
) -> None:
    assert finish_reason(params, EOS_IDS, output) == expected


@pytest.mark.parametrize("num_logprobs", [None, 0, 3, 20])
def test_logprobs_are_the_log_softmax_of_the_raw_logits(num_logprobs: int | None) -> None:
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(3)) * 2
    params = SamplingParams(temperature=0.7, repetition_penalty=1.5, logprobs=num_logprobs)
    rows = [row(params, prompt=[1, 2, 3], output=[4]) for _ in range(4)]
    rows[1] = row(SamplingParams(temperature=0.0))  # a row that asks for nothing
    tokens = Sampler(50, EOS_IDS).sample(logits.to(torch.bfloat16), rows)
    reference = torch.log_softmax(logits.to(torch.bfloat16).float(), dim=-1).tolist()
    assert tokens[1].logprob is None and tokens[1].top_logprobs == ()
    for i in (0, 2, 3):
        token = tokens[i]
        if num_logprobs is None:
            assert token.logprob is None and token.top_logprobs == ()
            continue
        assert token.logprob is not None and token.logprob.token_id == token.token_id
        assert token.logprob.logprob == pytest.approx(reference[i][token.token_id], abs=1e-5)
        # bf16 logits tie often: compare the values in order, then each id against its value.
        expected = sorted(reference[i], reverse=True)[:num_logprobs]
        assert [t.logprob for t in token.top_logprobs] == pytest.approx(expected, abs=1e-5)
        for top in token.top_logprobs:
            assert top.logprob == pytest.approx(reference[i][top.token_id], abs=1e-5)
        assert len({top.token_id for top in token.top_logprobs}) == num_logprobs


def test_logprobs_wider_than_the_vocabulary_list_every_token() -> None:
    logits = torch.tensor([[0.5, 0.1, 2.0, -1.0]])
    token = Sampler(4, EOS_IDS).sample(logits, [row(SamplingParams(logprobs=20))])[0]
    assert [t.token_id for t in token.top_logprobs] == [2, 0, 1, 3]


Batch = tuple[torch.Tensor, list[SequenceSamplingState], int]  # logits, rows, the request's row
BatchMaker = Callable[[int, SequenceSamplingState], Batch]
VOCAB = 1000


def generate(
    make_batch: BatchMaker, sampler: Sampler, params: SamplingParams, steps: int
) -> list[int]:
    """Tokens of one request over several steps, its row placed by make_batch each step."""
    output: list[int] = []
    for step in range(steps):
        logits, rows, at = make_batch(step, row(params, prompt=[1, 2, 3, 4, 5], output=output))
        output.append(sampler.sample(logits, rows)[at].token_id)
    return output


def request_logits(step: int) -> torch.Tensor:
    """A flat-ish distribution, so a draw carries ~9 bits of randomness."""
    return torch.randn(VOCAB, generator=torch.Generator().manual_seed(100 + step)) * 0.5


def alone(step: int, request: SequenceSamplingState) -> Batch:
    return request_logits(step)[None], [request], 0


def in_a_batch(step: int, request: SequenceSamplingState) -> Batch:
    """Row 11 of 16, among unseeded, greedy, other-seed and top_p rows with their own logits."""
    neighbours = random.Random(step)
    logits = torch.randn(16, VOCAB, generator=torch.Generator().manual_seed(step)) * 2
    rows = [
        row(SamplingParams(seed=neighbours.choice([None, 1, 2]), top_p=0.9 if i % 2 else 1.0))
        for i in range(16)
    ]
    rows[5] = row(SamplingParams(temperature=0.0))
    logits[11], rows[11] = request_logits(step), request
    return logits, rows, 11


def test_a_seeded_request_draws_the_same_tokens_alone_and_in_any_batch() -> None:
    params = SamplingParams(seed=1234, top_p=0.95)
    by_itself = generate(alone, Sampler(VOCAB, EOS_IDS, seed=0), params, steps=8)
    batched = generate(in_a_batch, Sampler(VOCAB, EOS_IDS, seed=99), params, steps=8)
    assert batched == by_itself
    assert len(set(by_itself)) > 4  # the draws vary from position to position
    other_seed = generate(alone, Sampler(VOCAB, EOS_IDS), SamplingParams(seed=4321), steps=8)
    assert other_seed != by_itself


def test_a_seeded_request_the_race_settles_draws_the_same_alone_and_in_any_batch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """top_p 0.01 keeps a nucleus of a few tokens of ~1% mass: the rounds miss it and the race
    draws, from the row's own seeded stream."""
    raced: list[int] = []

    def counting_race(probs: torch.Tensor, noise: torch.Tensor, top_p: list[float]) -> Any:
        raced.append(len(top_p))
        return nucleus_race(probs, noise, top_p)

    monkeypatch.setattr(sampling, "nucleus_race", counting_race)
    params = SamplingParams(seed=77, top_p=0.01)
    by_itself = generate(alone, Sampler(VOCAB, EOS_IDS, seed=0), params, steps=8)
    assert len(raced) >= 6  # the race drew most of the request's tokens
    batched = generate(in_a_batch, Sampler(VOCAB, EOS_IDS, seed=5), params, steps=8)
    assert batched == by_itself
    assert len(set(by_itself)) > 4


def test_different_seeds_and_positions_give_independent_draws() -> None:
    sampler = Sampler(VOCAB, EOS_IDS)
    flat = torch.zeros(200, VOCAB)
    by_seed = sampler.sample(flat, [row(SamplingParams(seed=s)) for s in range(200)])
    by_position = sampler.sample(
        flat, [row(SamplingParams(seed=5), output=[0] * n) for n in range(200)]
    )
    # 200 uniform draws over 1000 tokens hit ~181 distinct ones; a broken mix hits a handful.
    assert len({t.token_id for t in by_seed}) > 150
    assert len({t.token_id for t in by_position}) > 150


def test_seeded_draws_follow_the_distribution() -> None:
    logits = torch.tensor([1.0, -0.5, 0.3, 2.0, 0.0, -1.2, 0.8, 1.5])
    rows = [row(SamplingParams(seed=seed)) for seed in range(NUM_DRAWS)]
    tokens = Sampler(8, EOS_IDS).sample(logits[None].expand(NUM_DRAWS, -1), rows)
    counts = Counter(token.token_id for token in tokens)
    assert chi_square(counts, torch.softmax(logits, dim=-1).tolist()) < CHI_SQUARE_999[7]


def test_draw_seed_mixes_seed_and_position_into_32_bits() -> None:
    seeds = {draw_seed(seed, position) for seed in range(30) for position in range(30)}
    assert len(seeds) == 900
    assert all(0 <= s < 2**32 for s in seeds)
    assert draw_seed(1, 0) != draw_seed(1 + 2**32, 0)  # high bits of the seed matter too


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 2.5}, "max_tokens"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"max_tokens": 4, "min_tokens": 5}, "min_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"top_k": 0}, "top_k"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_penalty": math.inf}, "repetition_penalty"),
        ({"frequency_penalty": 2.5}, "frequency_penalty"),
        ({"presence_penalty": -2.01}, "presence_penalty"),
        ({"logprobs": -1}, "logprobs"),
        ({"logprobs": 21}, "logprobs"),
        ({"stop_token_ids": (3, 100)}, "stop_token_ids"),
        ({"stop_token_ids": (-1,)}, "stop_token_ids"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**63}, "seed"),
        ({"seed": True}, "seed"),
    ],
)
def test_validate_names_the_bad_field(fields: dict[str, Any], named: str) -> None:
    params = SamplingParams(**fields)
    with pytest.raises(SamplingParamsError, match=rf"^{named} must be"):
        params.validate(vocab_size=100)


def test_validate_accepts_the_edges_of_every_range() -> None:
    SamplingParams().validate(vocab_size=100)
    SamplingParams(
        max_tokens=3,
        min_tokens=3,
        temperature=0.0,
        top_p=1.0,
        top_k=1,
        repetition_penalty=0.01,
        frequency_penalty=-2.0,
        presence_penalty=2.0,
        stop_token_ids=(0, 99),
        logprobs=20,
        seed=2**63 - 1,
    ).validate(vocab_size=100)


def test_sampler_refuses_logits_of_the_wrong_shape_and_leaves_them_untouched() -> None:
    sampler = Sampler(10, EOS_IDS)
    with pytest.raises(ShapeError):
        sampler.sample(torch.zeros(2, 11), [row(SamplingParams())] * 2)
    with pytest.raises(ShapeError):
        sampler.sample(torch.zeros(3, 10), [row(SamplingParams())] * 2)
    logits = torch.randn(2, 10)
    before = logits.clone()
    params = SamplingParams(repetition_penalty=2.0, frequency_penalty=1.0, top_k=3, top_p=0.5)
    sampler.sample(logits, [row(params, output=[1, 2])] * 2)
    assert torch.equal(logits, before)


def test_penalised_tokens_outside_the_vocabulary_are_refused() -> None:
    params = SamplingParams(repetition_penalty=1.2)
    with pytest.raises(InvalidTokenError):
        Sampler(10, EOS_IDS).sample(torch.zeros(2, 10), [row(params), row(params, output=[10])])
