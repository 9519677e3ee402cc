"""The token stream of one request, published on subjects.tokens(request_id)."""

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
