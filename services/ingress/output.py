"""Token ids to the text a client sees: incremental detokenization, then stop strings.

Pure (no I/O). Each in-order TokenChunk becomes one Piece: the text it completes, the tokens it
consumed (for logprobs and usage) and, on the last piece, why the output ended. The pieces of a
request join to exactly the text of the whole output (less any stop string and what follows),
however its tokens were chunked: the detokenizer holds a character split across tokens back
until it is whole, the stop matcher holds back what might begin a stop string.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field

from duetserve.proto.tokens import FinishReason, TokenChunk, TokenLogprob
from duetserve.runtime.errors import InvalidTokenError
from duetserve.runtime.tokenizer import IncrementalDetokenizer, Tokenizer
from duetserve.services.ingress.stop_strings import StopStringMatcher


@dataclass(slots=True)
class Piece:
    text: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    # A stop string ended the output before the scheduler finished it: cancel it there.
    stopped_by_string: bool = False


class OutputAssembler:
    """The output text of one request, piece by piece."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], stops: Sequence[str]):
        self._detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids)
        self._stops = StopStringMatcher(stops)
        self.num_tokens = 0

    def add(self, chunk: TokenChunk) -> Piece:
        """The piece of text `chunk` completes; a last piece when it, or a stop string, ends."""
        piece = Piece("")
        parts = []
        for position, token_id in enumerate(chunk.token_ids):
            self.num_tokens += 1
            piece.token_ids.append(token_id)
            if chunk.logprobs:
                piece.logprobs.append(chunk.logprobs[position])
            check = self._stops.feed(self._detokenizer.feed(token_id))
            parts.append(check.text)
            if check.stopped:
                piece.text = "".join(parts)
                piece.finish_reason = FinishReason.STOP.value
                piece.stopped_by_string = chunk.finish_reason is None
                return piece
        if chunk.finish_reason is not None:
            check = self._stops.feed(self._detokenizer.flush())  # held back: no more tokens come
            parts.append(check.text if check.stopped else check.text + self._stops.flush())
            reason = FinishReason.STOP if check.stopped else chunk.finish_reason
            piece.finish_reason = reason.value
        piece.text = "".join(parts)
        return piece


@dataclass(frozen=True, slots=True)
class LogprobTexts:
    """The text of each token and of each of its top alternatives, as logprobs report them."""

    tokens: list[str]
    tops: list[list[str]]


def logprob_texts(tokenizer: Tokenizer, logprobs: Sequence[TokenLogprob]) -> LogprobTexts:
    return LogprobTexts(
        tokens=[token_text(tokenizer, lp.token_id) for lp in logprobs],
        tops=[[token_text(tokenizer, top.token_id) for top in lp.top] for lp in logprobs],
    )


def token_text(tokenizer: Tokenizer, token_id: int) -> str:
    """One token alone, special tokens shown; "" for an id the tokenizer does not know (a model
    may pad its vocabulary beyond the tokenizer's)."""
    try:
        return tokenizer.decode([token_id], skip_special_tokens=False)
    except InvalidTokenError:
        return ""
