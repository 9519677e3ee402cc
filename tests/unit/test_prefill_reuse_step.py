"""A prefill item that reuses cached spans (KVShare), through the worker's prefill step: the
answer it samples, the counts it reports, a bad item refused alone and before any write."""

from types import SimpleNamespace

import pytest
import torch

from duetserve.proto.cache import CachedSpan
from duetserve.proto.scheduling import Sampling
from duetserve.proto.workers import PrefillBatch, PrefillItem, SamplingState
from duetserve.runtime.batch import ForwardBatch, SequenceChunk
from duetserve.runtime.kv_pool import KVPool
from duetserve.runtime.loader import load_model
from duetserve.runtime.models.llama import LlamaForCausalLM
from duetserve.runtime.sampling import Sampler
from duetserve.services.unit_worker.prefill_step import mixed_step
from duetserve.services.unit_worker.residents import (
    RecheckParams,
    Resident,
    positions_of,
    ranges_of,
    recheck_due,
    recheck_residents,
)
from duetserve.services.unit_worker.sequences import runtime_state, sampling_params
from tests.conftest import ModelDirs
from tests.model_specs import TINY

BS = 16
DOC = [(13 * i + 5) % 4000 + 10 for i in range(48)]
HEAD = [(7 * i + 1) % 4000 + 10 for i in range(20)]
QUESTION = [(17 * i + 11) % 4000 + 10 for i in range(9)]
GREEDY = Sampling(max_tokens=4, temperature=0.0)


@pytest.fixture(scope="module")
def model(model_dirs: ModelDirs) -> LlamaForCausalLM:
    return load_model(model_dirs.get(TINY), "float32")


def host_of(model: LlamaForCausalLM) -> SimpleNamespace:
    pool = KVPool.allocate(model.config, num_blocks=32, block_size=BS)
    sampler = Sampler(model.config.vocab_size, frozenset(), seed=1)
    return SimpleNamespace(
        config=model.config, pool=pool, model=model, sampler=sampler, eos_token_ids=frozenset()
    )


def cache_doc(host: SimpleNamespace) -> tuple[int, ...]:
    """DOC computed at the start of blocks 20..22, as an earlier prompt left it."""
    source = (20, 21, 22)
    chunk = SequenceChunk(DOC, 0, source)
    host.model.forward(ForwardBatch.build([chunk], host.config, host.pool), host.pool)
    return source


def reuse_item(source: tuple[int, ...], fraction: float, **changes: object) -> PrefillItem:
    prompt = (*HEAD, *DOC, *QUESTION)
    span = CachedSpan(len(HEAD), len(DOC), 0, source)
    fields = {
        "request_id": "r-1",
        "token_ids": prompt,
        "num_cached_tokens": 0,
        "block_table": (0, 1, 2, 3, 4),
        "sample": SamplingState(prompt, (), GREEDY, "ingress-1", cached_tokens=0),
        "reuse": (span,),
        "recompute": fraction,
        **changes,
    }
    return PrefillItem(**fields)  # type: ignore[arg-type]


def test_a_reuse_item_samples_what_a_full_prefill_would_at_full_recompute(
    model: LlamaForCausalLM,
) -> None:
    host = host_of(model)
    source = cache_doc(host)
    prompt = (*HEAD, *DOC, *QUESTION)
    plain = PrefillItem("r-2", prompt, 0, (5, 6, 7, 8, 9), reuse_item(source, 1.0).sample)
    batch = PrefillBatch(1, (reuse_item(source, 1.0), plain))
    output, _ = mixed_step(host, batch, [])  # type: ignore[arg-type]
    reused, computed = output.results
    assert reused.error is None and reused.token == computed.token
    assert (reused.reused, reused.recomputed, reused.first_kept) == (len(DOC), len(DOC), -1)
    assert [t.cached_tokens for t in output.tokens] == [0, 0]


def test_placed_tokens_count_as_cached_and_the_first_kept_one_is_reported(
    model: LlamaForCausalLM,
) -> None:
    host = host_of(model)
    source = cache_doc(host)
    batch = PrefillBatch(1, (reuse_item(source, 0.25),))
    output, _ = mixed_step(host, batch, [])  # type: ignore[arg-type]
    (result,) = output.results
    assert result.error is None and result.token is not None
    assert (result.reused, result.recomputed) == (48, 12)
    assert len(HEAD) <= result.first_kept < len(HEAD) + len(DOC) and result.deviation > 0
    (chunk,) = output.tokens
    assert chunk.cached_tokens == 48 - 12


@pytest.mark.parametrize(
    ("changes", "why"),
    [
        ({"recompute": 1.5}, "recompute"),
        ({"check_layer": 99}, "check_layer"),
        ({"reuse": (CachedSpan(40, 48, 0, (20, 21, 22)),)}, "past the prompt"),
        ({"reuse": (CachedSpan(20, 48, 0, (20, 21)),)}, "source blocks"),
        ({"reuse": (CachedSpan(20, 48, 0, (20, 21, 999)),)}, "outside the pool"),
        ({"sample": None}, "complete the prompt"),
    ],
)
def test_a_bad_reuse_item_fails_alone_before_any_write(
    model: LlamaForCausalLM, changes: dict[str, object], why: str
) -> None:
    host = host_of(model)
    source = cache_doc(host)
    before = host.pool.tensor.clone()
    batch = PrefillBatch(1, (reuse_item(source, 0.15, **changes),))
    output, _ = mixed_step(host, batch, [])  # type: ignore[arg-type]
    (result,) = output.results
    assert result.error is not None and why in result.error
    assert torch.equal(host.pool.tensor, before)


def test_the_decode_stage_rechecks_a_residents_placed_tokens(model: LlamaForCausalLM) -> None:
    host = host_of(model)
    source = cache_doc(host)
    item = reuse_item(source, 0.0)
    output, _ = mixed_step(host, PrefillBatch(1, (item,)), [])  # type: ignore[arg-type]
    (result,) = output.results
    assert result.token is not None and result.first_kept == len(HEAD)
    sampling = item.sample
    assert sampling is not None
    params = sampling_params(sampling.sampling, model.config.vocab_size)
    state = runtime_state(sampling, params)
    state.output_token_ids.append(result.token.token_id)
    resident = Resident("r-1", "w/r-1", list(item.block_table), state, GREEDY, "ingress-1")
    resident.reused = positions_of((len(HEAD), len(HEAD) + len(DOC)))
    assert ranges_of(resident.reused) == (len(HEAD), len(HEAD) + len(DOC))
    assert recheck_due([resident], 2) == [] and recheck_due([resident], 1) == [resident]
    everything = RecheckParams(interval=1, top=1000, threshold=-1.0, layer=-1)
    assert recheck_residents(host, [resident], everything) == len(DOC)  # type: ignore[arg-type]
    assert resident.reused == [] and recheck_due([resident], 1) == []
    nothing = RecheckParams(interval=1, top=8, threshold=1e9, layer=1)
    resident.reused = [len(HEAD) + 3]
    assert recheck_residents(host, [resident], nothing) == 0  # type: ignore[arg-type]
    assert resident.reused == [len(HEAD) + 3]
