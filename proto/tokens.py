"""The token streams: workers and the scheduler -> the ingress that holds each request's client.

Every request has a stream of TokenChunks, numbered by output token index: chunk `index` holds
tokens index .. index + len(token_ids) - 1. The first token comes from a prefill worker, the rest
from a decode worker (or, after a migration, from another); the scheduler adds errors and
migrating notices. A request names its ingress's stream when it is submitted
(SubmitRequest.stream), and that name travels with it to every worker (SamplingState.stream).

Producers send chunks in TokenBatches on subjects.tokens(stream): one message per producer step
per ingress, whatever the number of requests in it. Core NATS delivers at most once, so:

- each producer numbers its batches to a stream 1, 2, 3, ... (`seq`); a number skipped is a
  batch lost, and ingress asks again for everything it is waiting on;
- a request's chunks are numbered too (`index`); a stream that has chunks past a hole, or has
  been quiet a while, is asked again from the index it lacks;
- asking is a ReplayQuery on subjects.TOKENS_REPLAY, heard by every producer; each sends what
  it still has of those requests from those indexes (a bounded replay buffer of recent chunks)
  as a TokenBatch with seq 0 on the stream. The stream drops what it already has, so asking
  twice, or two producers answering, costs nothing but the message.

A stream is thereby resumed from any index a producer still holds; what no producer holds any
more (their buffers are bounded in time and size) the ingress's stream watch recovers by
resubmitting the request from the output its client has (services/ingress/watch.py).
"""

from dataclasses import dataclass
from enum import StrEnum

from duetserve.proto.codec import message


class FinishReason(StrEnum):
    STOP = "stop"  # EOS, a stop token id, or a stop string (ingress)
    LENGTH = "length"  # max_tokens or the context window
    ABORT = "abort"  # cancelled: the client went away
    ERROR = "error"  # failed; `error` says why


@dataclass(frozen=True, slots=True)
class TopLogprob:
    token_id: int
    logprob: float


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[TopLogprob, ...] = ()


@message("tokens.chunk")
@dataclass(frozen=True, slots=True)
class TokenChunk:
    """Output tokens index .. index + len(token_ids) - 1 of a request, in order. A chunk with a
    finish_reason is the last one; one with reason ERROR carries the error and may hold no
    tokens. The first chunk also reports how many prompt tokens came from a cache."""

    request_id: str
    index: int
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: FinishReason | None = None
    error: str | None = None
    cached_tokens: int | None = None
    # The worker producing this stream was lost (no tokens, no finish): the subscriber answers
    # with a ResumeRequest naming the output it has, and the request goes on elsewhere from
    # there, its sampling unchanged (seeded), so the stream continues as if nothing happened.
    migrating: bool = False

    def __post_init__(self) -> None:
        if self.index < 0:
            raise ValueError("index must be >= 0")
        if self.migrating and (self.token_ids or self.finish_reason is not None):
            raise ValueError("a migrating notice carries no tokens and no finish")
        if self.logprobs and len(self.logprobs) != len(self.token_ids):
            raise ValueError("logprobs, when present, must have one entry per token")
        if (self.error is not None) != (self.finish_reason == FinishReason.ERROR):
            raise ValueError("error is set exactly when finish_reason is 'error'")


@message("tokens.batch")
@dataclass(frozen=True, slots=True)
class TokenBatch:
    """One producer's chunks for one stream: those of one step, or a replay (seq 0)."""

    producer: str  # the sending process, unique to one run of it
    seq: int  # 1, 2, ... per (producer, stream); 0: a replay, outside the numbering
    chunks: tuple[TokenChunk, ...]

    def __post_init__(self) -> None:
        if self.seq < 0:
            raise ValueError("seq must be >= 0")


@dataclass(frozen=True, slots=True)
class ReplayFrom:
    request_id: str
    index: int  # the first output token index the stream lacks


@message("tokens.replay")
@dataclass(frozen=True, slots=True)
class ReplayQuery:
    """Send again what these requests' streams lack, from each one's index, on `stream`."""

    stream: str
    requests: tuple[ReplayFrom, ...]
