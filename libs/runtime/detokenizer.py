"""Streaming text of generated tokens, one token at a time, never a partial character.

Imports no torch, and not the Tokenizer either: anything with its decode will do.
"""

from collections.abc import Sequence
from typing import Protocol

# Prompt tokens kept as context for the first streamed piece (vLLM keeps the same number).
_PROMPT_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


class Decoder(Protocol):
    """What the detokenizer needs of a tokenizer (duetserve.runtime.tokenizer.Tokenizer is one)."""

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    """Text of one request's tokens as they arrive, never a partial character.

    vLLM's scheme: text is decoded over a short window of ids, ids[prefix_offset:], and only
    what lies past ids[prefix_offset:read_offset] is new. Decoding with that left context keeps
    the spacing decoders give a word in mid-sentence; holding back while the window ends in
    U+FFFD keeps a character split over several tokens whole. Without prompt_ids the pieces of
    feed then flush join to exactly tokenizer.decode(all ids).
    """

    def __init__(
        self,
        tokenizer: Decoder,
        prompt_ids: Sequence[int] = (),
        skip_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        # Only a few prompt ids matter, as left context for the first generated ones.
        self._ids: list[int] = list(prompt_ids[max(len(prompt_ids) - _PROMPT_CONTEXT_TOKENS, 0) :])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)

    def feed(self, token_id: int) -> str:
        """The text that token_id completes; "" while a character is still incomplete."""
        self._ids.append(token_id)
        return self._emit(hold_incomplete=True)

    def flush(self) -> str:
        """What is still held back (an incomplete character at the end, as U+FFFD)."""
        return self._emit(hold_incomplete=False)

    def _emit(self, hold_incomplete: bool) -> str:
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        window_text = self._decode(self._ids[self._prefix_offset :])
        if len(window_text) <= len(prefix_text):
            return ""
        if hold_incomplete and window_text.endswith(_REPLACEMENT_CHAR):
            return ""
        # The window's left context is no longer needed: keep ids from the old read offset on.
        del self._ids[: self._read_offset]
        self._prefix_offset, self._read_offset = 0, len(self._ids)
        return window_text[len(prefix_text) :]

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)
