"""The two response shapes, /v1/completions and /v1/chat/completions, behind one interface, so
the HTTP shell runs one generation loop for both (responses.py builds the bodies)."""

from collections.abc import Sequence
from typing import Any, Protocol

from duetserve.proto.tokens import TokenLogprob
from duetserve.runtime.tokenizer import Tokenizer
from duetserve.services.ingress import responses
from duetserve.services.ingress.output import Piece, logprob_texts
from duetserve.services.ingress.responses import ResponseHead, Usage


class ResponseFormat(Protocol):
    id_prefix: str

    def body(
        self,
        head: ResponseHead,
        text: str,
        finish_reason: str,
        usage: Usage,
        logprobs: dict[str, Any] | None,
    ) -> dict[str, Any]: ...

    def stream_start(self, head: ResponseHead) -> list[dict[str, Any]]: ...

    def stream_chunk(
        self, head: ResponseHead, piece: Piece, logprobs: dict[str, Any] | None
    ) -> dict[str, Any]: ...

    def usage_chunk(self, head: ResponseHead, usage: Usage) -> dict[str, Any]: ...

    def logprobs(
        self, tokenizer: Tokenizer, logprobs: Sequence[TokenLogprob], text_offset: int
    ) -> dict[str, Any]: ...


class CompletionFormat:
    id_prefix = "cmpl"

    def body(
        self,
        head: ResponseHead,
        text: str,
        finish_reason: str,
        usage: Usage,
        logprobs: dict[str, Any] | None,
    ) -> dict[str, Any]:
        return responses.completion_body(head, text, finish_reason, usage, logprobs)

    def stream_start(self, head: ResponseHead) -> list[dict[str, Any]]:
        return []

    def stream_chunk(
        self, head: ResponseHead, piece: Piece, logprobs: dict[str, Any] | None
    ) -> dict[str, Any]:
        return responses.completion_body(
            head, piece.text, piece.finish_reason, None, logprobs, stream=True
        )

    def usage_chunk(self, head: ResponseHead, usage: Usage) -> dict[str, Any]:
        return responses.completion_usage_chunk(head, usage)

    def logprobs(
        self, tokenizer: Tokenizer, logprobs: Sequence[TokenLogprob], text_offset: int
    ) -> dict[str, Any]:
        texts = logprob_texts(tokenizer, logprobs)
        body = responses.completion_logprobs(texts.tokens, logprobs, texts.tops)
        body["text_offset"] = [offset + text_offset for offset in body["text_offset"]]
        return body


class ChatFormat:
    id_prefix = "chatcmpl"

    def body(
        self,
        head: ResponseHead,
        text: str,
        finish_reason: str,
        usage: Usage,
        logprobs: dict[str, Any] | None,
    ) -> dict[str, Any]:
        return responses.chat_body(head, text, finish_reason, usage, logprobs)

    def stream_start(self, head: ResponseHead) -> list[dict[str, Any]]:
        """The first chunk names the role, as OpenAI's does."""
        return [responses.chat_chunk(head, {"role": "assistant", "content": ""})]

    def stream_chunk(
        self, head: ResponseHead, piece: Piece, logprobs: dict[str, Any] | None
    ) -> dict[str, Any]:
        delta = {"content": piece.text} if piece.text else {}
        return responses.chat_chunk(head, delta, piece.finish_reason, logprobs)

    def usage_chunk(self, head: ResponseHead, usage: Usage) -> dict[str, Any]:
        return responses.chat_usage_chunk(head, usage)

    def logprobs(
        self, tokenizer: Tokenizer, logprobs: Sequence[TokenLogprob], text_offset: int
    ) -> dict[str, Any]:
        texts = logprob_texts(tokenizer, logprobs)
        return responses.chat_logprobs(texts.tokens, logprobs, texts.tops)
