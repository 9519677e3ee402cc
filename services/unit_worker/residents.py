"""The requests resident on a decode worker, and one decode step over them."""

from dataclasses import dataclass, field

import torch

from duetserve.proto.scheduling import Sampling
from duetserve.proto.tokens import FinishReason, TokenChunk
from duetserve.proto.workers import DecodeItem, EventKind, SamplingState, WorkerEvent
from duetserve.runtime.batch import ForwardBatch, SequenceChunk
from duetserve.runtime.kv_reuse import RecheckSequence, recheck_many
from duetserve.runtime.sampling import SamplingParams, SequenceSamplingState
from duetserve.services.unit_worker.model_host import ModelHost
from duetserve.services.unit_worker.sequences import finish_of, token_chunk


@dataclass(slots=True)
class Resident:
    request_id: str
    owner: str  # this worker's kv_manager owner for the request's blocks
    block_table: list[int]
    state: SequenceSamplingState
    sampling: Sampling  # as admitted: what a hand-over passes on
    stream: str  # where its tokens go (SamplingState.stream)
    stalled_since: float | None = None  # kv_manager had no block for its next token
    traceparent: str = ""  # the request's trace
    host_kept: int = 0  # its first blocks the host tier holds a copy of (DecodeItem.host_kept)
    # KVShare: prompt positions whose placed K/V still stand (DecodeItem.reused), for the
    # decode stage's re-checks (`recheck_residents`)
    reused: list[int] = field(default_factory=list)

    def preempted_event(self) -> WorkerEvent:
        """Stopped here, its blocks given back: the scheduler recomputes it from its output so
        far (and the output stays what it would have been)."""
        return WorkerEvent(
            EventKind.PREEMPTED, self.request_id, output_token_ids=tuple(self.output)
        )

    def handover_item(self) -> DecodeItem:
        """This request as another decode worker admits it: same blocks, output so far."""
        state = SamplingState(
            tuple(self.state.prompt_token_ids), tuple(self.output), self.sampling, self.stream
        )
        return DecodeItem(
            self.request_id,
            tuple(self.block_table),
            state,
            self.traceparent,
            from_worker=True,
            host_kept=self.host_kept,
            reused=ranges_of(self.reused),
        )

    @property
    def params(self) -> SamplingParams:
        return self.state.params

    @property
    def num_computed(self) -> int:
        """Tokens whose KV is in the pool: prompt + output except the newest token."""
        return len(self.state.prompt_token_ids) + len(self.state.output_token_ids) - 1

    @property
    def output(self) -> list[int]:
        return self.state.output_token_ids  # type: ignore[return-value]


def positions_of(ranges: tuple[int, ...]) -> list[int]:
    """DecodeItem.reused's [start, end) pairs as positions."""
    return [
        p for start, end in zip(ranges[::2], ranges[1::2], strict=True) for p in range(start, end)
    ]


def ranges_of(positions: list[int]) -> tuple[int, ...]:
    """Increasing positions as DecodeItem.reused's flattened [start, end) pairs."""
    out: list[int] = []
    for p in positions:
        if out and out[-1] == p:
            out[-1] = p + 1
        else:
            out.extend((p, p + 1))
    return tuple(out)


@dataclass(frozen=True, slots=True)
class RecheckParams:
    """KVShare's decode stage (the worker's span_recheck_* settings)."""

    interval: int
    top: int
    threshold: float
    layer: int


def recheck_due(residents: list[Resident], interval: int) -> list[Resident]:
    """Residents whose decode stage runs after this step: reused K/V left to check, and a
    multiple of `interval` tokens generated."""
    if interval <= 0:
        return []
    return [r for r in residents if r.reused and len(r.output) % interval == 0]


def recheck_residents(host: ModelHost, residents: list[Resident], params: RecheckParams) -> int:
    """Run the decode stage for them all at once (runtime/kv_reuse.py's `recheck_many`); the
    tokens recomputed in every layer, which are checked no more."""
    layer = params.layer if params.layer >= 0 else host.config.num_layers * 2 // 3
    layer = min(layer, host.config.num_layers - 1)
    sequences = [
        RecheckSequence(
            [*r.state.prompt_token_ids, *r.output[:-1]],  # the tokens whose K/V are in the pool
            r.block_table,
            r.reused,
        )
        for r in residents
    ]
    done = recheck_many(host.model, host.pool, sequences, params.top, params.threshold, layer)
    recomputed = 0
    for resident, result in zip(residents, done, strict=True):
        if result.recomputed:
            again = set(result.recomputed)
            resident.reused = [p for p in resident.reused if p not in again]
            recomputed += len(again)
    return recomputed


@dataclass(frozen=True, slots=True)
class StepOutcome:
    tokens: tuple[TokenChunk, ...]
    finished: tuple[Resident, ...]


def decode_chunks(residents: list[Resident]) -> list[SequenceChunk]:
    """Each resident's newest token, at the position after its computed KV."""
    return [SequenceChunk([r.output[-1]], r.num_computed, r.block_table) for r in residents]


def decode_step(host: ModelHost, residents: list[Resident]) -> StepOutcome:
    """Feed each resident's newest token, sample the next, decide who finished."""
    batch = ForwardBatch.build(decode_chunks(residents), host.config, host.pool)
    logits = host.model.forward(batch, host.pool)  # [B, V]
    return decode_outcome(host, residents, logits)


def decode_outcome(host: ModelHost, residents: list[Resident], logits: torch.Tensor) -> StepOutcome:
    """Sample each resident's next token from its logits row and decide who finished."""
    sampled = host.sampler.sample(logits, [r.state for r in residents])
    tokens, finished = [], []
    for resident, token in zip(residents, sampled, strict=True):
        index = len(resident.output)
        resident.output.append(token.token_id)
        finish = finish_of(resident.params, host.eos_token_ids, resident.output)
        if finish is None and resident.num_computed + 1 >= host.config.max_context_len:
            finish = FinishReason.LENGTH  # the context window is full
        wants_logprobs = resident.params.logprobs is not None
        tokens.append(token_chunk(resident.request_id, index, token, wants_logprobs, finish))
        if finish is not None:
            finished.append(resident)
    return StepOutcome(tuple(tokens), tuple(finished))
