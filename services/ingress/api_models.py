"""OpenAI request bodies, validated strictly: a known field of the wrong type or out of range is
a 400 naming it; unknown fields are accepted and ignored, as vLLM does, so benchmark clients
that send extras keep working."""

from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from duetserve.proto.scheduling import Sampling, Slo, SloKind

MAX_STOP_STRINGS = 8
MAX_LOGPROBS = 20
# No count or token id a client sends means anything past this; bounded, each one fits the
# wire's (msgpack's) 64-bit integers with room to spare, so none can fail a request mid-way.
MAX_COUNT = 2**31 - 1


def _absent(value: Any) -> bool:
    return value is None


def _empty(value: Any) -> bool:
    return value is None or value == [] or value == {}


# Fields that change what a correct answer is, which Duet does not implement yet. Unknown fields
# are ignored (as vLLM does), but ignoring one of these would answer a different question, so
# a request that uses one gets a 400 naming it. Each entry says which values are the no-op
# default that clients send anyway (`response_format: {"type": "text"}`, `best_of: 1`, ...).
UNSUPPORTED_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "response_format": (
        lambda v: v is None or v == {"type": "text"},
        'only {"type": "text"} is supported (no JSON mode or JSON schema yet)',
    ),
    "tools": (_empty, "tool calling is not supported yet"),
    "tool_choice": (lambda v: v in (None, "none"), "tool calling is not supported yet"),
    "functions": (_empty, "function calling is not supported yet"),
    "function_call": (lambda v: v in (None, "none"), "function calling is not supported yet"),
    "logit_bias": (_empty, "logit_bias is not supported yet"),
    "best_of": (lambda v: v in (None, 1), "only best_of=1 is supported"),
    "prompt_logprobs": (_absent, "prompt logprobs are not supported yet"),
    "min_p": (lambda v: v in (None, 0, 0.0), "min_p is not supported yet"),
    "use_beam_search": (lambda v: v in (None, False), "beam search is not supported"),
    "guided_json": (_absent, "structured outputs are not supported yet"),
    "guided_regex": (_absent, "structured outputs are not supported yet"),
    "guided_choice": (_absent, "structured outputs are not supported yet"),
    "guided_grammar": (_absent, "structured outputs are not supported yet"),
    "structured_outputs": (_absent, "structured outputs are not supported yet"),
    "audio": (_absent, "audio output is not supported"),
    "modalities": (lambda v: v in (None, ["text"]), 'only ["text"] is supported'),
}


def refuse_unsupported(body: Any, fields: dict[str, tuple[Callable[[Any], bool], str]]) -> None:
    """Raise ValueError("<field>: ...") for the first of `fields` that asks for what Duet
    cannot do."""
    if not isinstance(body, dict):
        return
    for name, (harmless, why) in fields.items():
        if name in body and not harmless(body[name]):
            raise ValueError(f"{name}: {why}")


class _Lenient(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


class DuetSlo(_Lenient):
    kind: Literal["latency", "deadline", "compound"]
    ttft_ms: Annotated[float, Field(gt=0)] | None = None
    tpot_ms: Annotated[float, Field(gt=0)] | None = None
    deadline_ms: Annotated[float, Field(gt=0)] | None = None
    group: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    group_size: Annotated[int, Field(ge=1, le=MAX_COUNT)] | None = None

    def to_proto(self) -> Slo:
        try:
            return Slo(
                SloKind(self.kind),
                self.ttft_ms,
                self.tpot_ms,
                self.deadline_ms,
                self.group,
                self.group_size,
            )
        except ValueError as err:
            raise ValueError(f"duet.slo: {err}") from None


class DuetCache(_Lenient):
    public_prefix_tokens: Annotated[int, Field(ge=0, le=MAX_COUNT)] = 0
    # Spans of this prompt may serve every tenant's prompts (KVShare's reuse of similar
    # prompts, with DUET_SPAN_REUSE): declare it only for content that is public anyway.
    public_spans: bool = False
    # false: this request is neither answered from the semantic response cache nor stored in
    # it (DUET_SEMANTIC_CACHE; Cache-Control: no-cache / no-store opt out of one each).
    semantic: bool = True


class DuetExtension(_Lenient):
    """Duet's own request extension (DESIGN.md): SLO and cache hints."""

    slo: DuetSlo | None = None
    cache: DuetCache | None = None
    # The client's own estimate of its answer's tokens (an agent that knows its tool's output
    # format, a benchmark with oracle lengths): the scheduler's bound, in place of ingress's
    # prediction, within [min_tokens, max_tokens].
    expected_output_tokens: Annotated[int, Field(ge=1, le=MAX_COUNT)] | None = None


class StreamOptions(_Lenient):
    include_usage: bool = False


class _SamplingFields(_Lenient):
    model: Annotated[str, Field(min_length=1)]
    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    top_k: Annotated[int, Field(le=MAX_COUNT)] | None = None  # vLLM: -1 or 0 mean off
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] = 0.0
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] = 0.0
    repetition_penalty: Annotated[float, Field(gt=0, le=10)] = 1.0
    stop: str | list[str] | None = None
    stop_token_ids: list[Annotated[int, Field(ge=0, le=MAX_COUNT)]] | None = None
    seed: Annotated[int, Field(ge=0, lt=2**63)] | None = None
    n: Annotated[int, Field(ge=1)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    min_tokens: Annotated[int, Field(ge=0, le=MAX_COUNT)] = 0
    duet: DuetExtension | None = None

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, body: Any) -> Any:
        refuse_unsupported(body, UNSUPPORTED_FIELDS)
        return body

    @model_validator(mode="after")
    def _check_common(self) -> "_SamplingFields":
        if self.n != 1:
            raise ValueError("n: only n=1 is supported (one choice per request)")
        if self.top_k is not None and self.top_k < -1:
            raise ValueError("top_k: must be -1 (off), 0 (off) or a positive integer")
        if len(self.stop_strings) > MAX_STOP_STRINGS:
            raise ValueError(f"stop: at most {MAX_STOP_STRINGS} stop strings")
        if any(not s for s in self.stop_strings):
            raise ValueError("stop: stop strings must not be empty")
        return self

    @property
    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def sampling(self, max_tokens: int, logprobs: int | None) -> Sampling:
        return Sampling(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k if self.top_k is not None and self.top_k > 0 else None,
            repetition_penalty=self.repetition_penalty,
            frequency_penalty=self.frequency_penalty,
            presence_penalty=self.presence_penalty,
            min_tokens=self.min_tokens,
            ignore_eos=self.ignore_eos,
            stop_token_ids=tuple(self.stop_token_ids or ()),
            logprobs=logprobs,
            seed=self.seed,
        )


class CompletionRequest(_SamplingFields):
    prompt: (
        Annotated[str, Field(min_length=1)]
        | Annotated[list[Annotated[int, Field(ge=0, le=MAX_COUNT)]], Field(min_length=1)]
        | Annotated[list[str], Field(min_length=1, max_length=1)]
    )
    max_tokens: Annotated[int, Field(ge=1, le=MAX_COUNT)] = 16
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    echo: bool = False
    suffix: str | None = None

    @model_validator(mode="after")
    def _check_unsupported(self) -> "CompletionRequest":
        if self.echo:
            raise ValueError("echo: echoing the prompt is not supported yet")
        if self.suffix:
            raise ValueError("suffix: insertion (suffix) is not supported")
        return self

    @property
    def prompt_text_or_ids(self) -> str | list[int]:
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str):
            return str(self.prompt[0])
        return self.prompt  # type: ignore[return-value]


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


# vLLM's chat extension `echo` (the last message's text prepended to the answer).
CHAT_ONLY_UNSUPPORTED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "echo": (lambda v: v in (None, False), "echoing the last message is not supported yet"),
}


class ChatCompletionRequest(_SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1, le=MAX_COUNT)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1, le=MAX_COUNT)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    add_generation_prompt: bool = True

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported_chat(cls, body: Any) -> Any:
        refuse_unsupported(body, CHAT_ONLY_UNSUPPORTED)
        return body

    @model_validator(mode="after")
    def _check_logprobs(self) -> "ChatCompletionRequest":
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs to be true")
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def logprobs_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def template_messages(self) -> list[dict[str, str]]:
        """Messages as chat templates expect them: content flattened to a string."""
        out = []
        for m in self.messages:
            item = {"role": m.role, "content": m.text()}
            if m.name is not None:
                item["name"] = m.name
            out.append(item)
        return out
