"""Prefill and decode over reused KV (KVShare), against plain prefills of the same prompts."""

import pytest
import torch

from duetserve.runtime.batch import ForwardBatch, SequenceChunk
from duetserve.runtime.kv_pool import KVPool
from duetserve.runtime.kv_reuse import (
    RecheckSequence,
    ReusedSpan,
    prefill_with_reuse,
    recheck,
    recheck_many,
)
from duetserve.runtime.loader import load_model
from duetserve.runtime.models.llama import LlamaForCausalLM
from tests.conftest import ModelDirs
from tests.model_specs import TINY_LLAMA3, TINY_QWEN2

BLOCK = 16
DOC_A = [(13 * i + 5) % 4000 + 10 for i in range(40)]
DOC_B = [(29 * i + 3) % 4000 + 10 for i in range(30)]
HEAD = [(7 * i + 1) % 4000 + 10 for i in range(12)]
QUESTION = [(17 * i + 11) % 4000 + 10 for i in range(9)]


@pytest.fixture(scope="module", params=[TINY_QWEN2, TINY_LLAMA3], ids=lambda s: s.name)
def model(request: pytest.FixtureRequest, model_dirs: ModelDirs) -> LlamaForCausalLM:
    return load_model(model_dirs.get(request.param), "float32")


def new_pool(model: LlamaForCausalLM) -> KVPool:
    return KVPool.allocate(model.config, num_blocks=64, block_size=BLOCK)


def slots(table: list[int], start: int, count: int) -> list[int]:
    return [table[p // BLOCK] * BLOCK + p % BLOCK for p in range(start, start + count)]


def prefill(
    model: LlamaForCausalLM, pool: KVPool, tokens: list[int], table: list[int], cached: int = 0
) -> torch.Tensor:
    """Every new position's logits [len(tokens) - cached, V]."""
    chunk = SequenceChunk(tokens[cached:], cached, table, all_logits=True)
    return model.forward(ForwardBatch.build([chunk], model.config, pool), pool)


def close(a: torch.Tensor, b: torch.Tensor, tolerance: float = 1e-4) -> bool:
    return (a - b).abs().max().item() <= tolerance * b.abs().max().item()


def cached_docs(model: LlamaForCausalLM, pool: KVPool) -> tuple[list[int], list[int]]:
    """An earlier prompt holding both documents, computed into blocks 40..: (tokens, table)."""
    tokens = HEAD[:5] + DOC_B + DOC_A
    table = list(range(40, 40 + -(-len(tokens) // BLOCK)))
    prefill(model, pool, tokens, table)
    return tokens, table


def moved_spans(source_table: list[int], at_a: int, at_b: int) -> list[ReusedSpan]:
    """DOC_A and DOC_B of cached_docs placed at new positions at_a and at_b."""
    source_a, source_b = 5 + len(DOC_B), 5
    return [
        ReusedSpan(at_a, slots(source_table, source_a, len(DOC_A)), source_a),
        ReusedSpan(at_b, slots(source_table, source_b, len(DOC_B)), source_b),
    ]


def test_recomputing_every_reused_token_equals_no_reuse(model: LlamaForCausalLM) -> None:
    pool = new_pool(model)
    _, source_table = cached_docs(model, pool)
    prompt = HEAD + DOC_A + DOC_B + QUESTION  # the documents reordered and moved
    table = list(range(0, 8))
    spans = moved_spans(source_table, len(HEAD), len(HEAD) + len(DOC_A))
    result = prefill_with_reuse(model, pool, prompt, table, 0, spans, fraction=1.0)
    assert result.recomputed == result.reused == list(range(12, 82))
    assert result.computed == len(prompt) * model.config.num_layers
    expected = prefill(model, new_pool(model), prompt, table)[-1]
    assert close(result.logits, expected)


@pytest.mark.parametrize("num_cached", [0, 32])
def test_no_recomputation_of_an_exact_prefix_equals_the_prefix_cache(
    model: LlamaForCausalLM, num_cached: int
) -> None:
    # The span is the earlier prompt's own tokens at their own positions: its K/V are exact.
    pool = new_pool(model)
    source, source_table = cached_docs(model, pool)
    prompt = source + QUESTION
    table = source_table[:2] + list(range(0, 6))  # 2 blocks shared in place, as prefix caching
    if num_cached == 0:
        table = list(range(0, 8))
    span = ReusedSpan(
        num_cached, slots(source_table, num_cached, len(source) - num_cached), num_cached
    )
    result = prefill_with_reuse(
        model, pool, prompt[num_cached:], table, num_cached, [span], fraction=0.0
    )
    assert result.recomputed == [] and len(result.kept) == len(source) - num_cached
    assert result.deviation.max().item() < 1e-6
    # The prefix cache: the earlier prompt's full blocks in place, the rest computed.
    shared = (len(source) // BLOCK) * BLOCK
    expected_table = source_table[: shared // BLOCK] + list(range(20, 24))
    expected = prefill(model, pool, prompt, expected_table, cached=shared)[-1]
    assert close(result.logits, expected)


def test_partial_recomputation_picks_the_most_deviating_tokens(model: LlamaForCausalLM) -> None:
    pool = new_pool(model)
    _, source_table = cached_docs(model, pool)
    prompt = HEAD + DOC_A + DOC_B + QUESTION
    spans = moved_spans(source_table, len(HEAD), len(HEAD) + len(DOC_A))
    result = prefill_with_reuse(model, pool, prompt, list(range(0, 8)), 0, spans, fraction=0.25)
    assert len(result.recomputed) == 18  # ceil(0.25 x 70)
    deviation = dict(zip(result.reused, result.deviation.tolist(), strict=True))
    floor = min(deviation[p] for p in result.recomputed)
    assert all(deviation[p] <= floor for p in result.kept)
    layers = model.config.num_layers
    new_tokens = len(HEAD) + len(QUESTION)
    expected = len(prompt) * 2 + (new_tokens + 18) * (layers - 2)
    assert result.computed == expected
    # Reuse moves the answer less than leaving the documents out would.
    full = prefill(model, new_pool(model), prompt, list(range(0, 8)))[-1]
    assert torch.isfinite(result.logits).all()
    assert (result.logits - full).abs().max() < (
        full - prefill(model, new_pool(model), HEAD + QUESTION, list(range(0, 2)))[-1]
    ).abs().max()


def test_placed_keys_turned_to_their_new_positions(model: LlamaForCausalLM) -> None:
    # Layer 0's K/V of a token depend on the token and its position alone: placed anywhere,
    # they equal a fresh computation there, which the check layer's deviation sees as zero.
    pool = new_pool(model)
    _, source_table = cached_docs(model, pool)
    prompt = HEAD + DOC_A + DOC_B + QUESTION
    spans = moved_spans(source_table, len(HEAD), len(HEAD) + len(DOC_A))
    result = prefill_with_reuse(
        model, pool, prompt, list(range(0, 8)), 0, spans, fraction=0.0, check_layer=0
    )
    assert result.deviation.max().item() < 1e-8 * len(result.reused) + 1e-6


def test_recheck_of_every_reused_token_restores_the_full_prefill_kv(
    model: LlamaForCausalLM,
) -> None:
    pool = new_pool(model)
    _, source_table = cached_docs(model, pool)
    prompt = HEAD + DOC_A + DOC_B + QUESTION
    table = list(range(0, 8))
    spans = moved_spans(source_table, len(HEAD), len(HEAD) + len(DOC_A))
    result = prefill_with_reuse(model, pool, prompt, table, 0, spans, fraction=0.0)
    checked = recheck(model, pool, prompt, table, result.kept, top=1000, threshold=-1.0,
                      check_layer=2)  # fmt: skip
    assert checked.checked == checked.recomputed == result.kept
    reference = new_pool(model)
    prefill(model, reference, prompt, table)
    positions = torch.tensor(slots(table, len(HEAD), len(DOC_A) + len(DOC_B)))
    for index in range(model.config.num_layers):
        ours, theirs = pool.layer(index), reference.layer(index)
        for mine, expected in zip(ours, theirs, strict=True):
            flat = (-1, *mine.shape[2:])
            got, want = mine.view(flat)[positions], expected.view(flat)[positions]
            assert close(got, want), index


def test_recheck_keeps_what_does_not_deviate(model: LlamaForCausalLM) -> None:
    pool = new_pool(model)
    _, source_table = cached_docs(model, pool)
    prompt = HEAD + DOC_A + DOC_B + QUESTION
    table = list(range(0, 8))
    spans = moved_spans(source_table, len(HEAD), len(HEAD) + len(DOC_A))
    result = prefill_with_reuse(model, pool, prompt, table, 0, spans, fraction=0.0)
    checked = recheck(model, pool, prompt, table, result.kept, top=8, threshold=1e9,
                      check_layer=2)  # fmt: skip
    assert len(checked.checked) == 8 and set(checked.checked) <= set(result.kept)
    assert checked.recomputed == [] and all(d > 0 for d in checked.deviation)


def test_spans_must_stay_inside_the_prompt_and_apart(model: LlamaForCausalLM) -> None:
    pool = new_pool(model)
    table = list(range(0, 8))
    prompt = HEAD + DOC_A
    with pytest.raises(ValueError, match="overlaps"):
        prefill_with_reuse(model, pool, prompt[16:], table, 16, [ReusedSpan(10, [600, 601], 0)])
    with pytest.raises(ValueError, match="past"):
        prefill_with_reuse(model, pool, prompt, table, 0, [ReusedSpan(50, [600] * 5, 0)])
    with pytest.raises(ValueError, match="check_layer"):
        prefill_with_reuse(model, pool, prompt, table, 0, [], check_layer=99)


def test_scattered_chunks_are_checked_before_anything_is_written(model: LlamaForCausalLM) -> None:
    pool = new_pool(model)
    before = pool.tensor.clone()
    cases = [
        (SequenceChunk([5, 6, 7], 18, [0, 1], positions=[3, 3, 20]), "increasing"),
        (SequenceChunk([5, 6], 19, [0, 1], positions=[3, 20, 21]), "positions for"),
        (SequenceChunk([5, 6], 10, [0, 1], positions=[3, 20]), "use SequenceChunk.scattered"),
        (SequenceChunk.scattered([5, 6], [3, 40], [0, 1]), "blocks"),
    ]
    for chunk, message in cases:
        with pytest.raises(Exception, match=message):
            ForwardBatch.build([chunk], model.config, pool)
    assert torch.equal(pool.tensor, before)


def test_a_batched_recheck_equals_one_recheck_per_sequence(model: LlamaForCausalLM) -> None:
    pool = new_pool(model)
    _, source_table = cached_docs(model, pool)
    prompts = [HEAD + DOC_A + DOC_B + QUESTION, HEAD[:4] + DOC_B + DOC_A + QUESTION[:5]]
    tables = [list(range(0, 8)), list(range(8, 16))]
    sequences = []
    for prompt, table, at in zip(prompts, tables, (12, 4), strict=True):
        spans = moved_spans(source_table, at, at + len(DOC_A))
        if prompt[at] == DOC_B[0]:
            spans = moved_spans(source_table, at + len(DOC_B), at)
        done = prefill_with_reuse(model, pool, prompt, table, 0, spans, fraction=0.0)
        sequences.append(RecheckSequence(prompt, table, done.kept))
    alone_pool = KVPool(pool.tensor.clone())  # the same cache, rechecked one sequence at a time
    expected = [
        recheck(model, alone_pool, q.token_ids, q.block_table, q.candidates, 12, 0.001, 2)
        for q in sequences
    ]
    together = recheck_many(model, pool, sequences, top=12, threshold=0.001, check_layer=2)
    for ours, theirs in zip(together, expected, strict=True):
        assert ours.checked == theirs.checked and ours.recomputed == theirs.recomputed
        assert ours.checked and len(ours.checked) == 12
    assert torch.allclose(pool.tensor, alone_pool.tensor, atol=1e-5)
