"""OpenAI request bodies, validated strictly: a known field of the wrong type or out of range is
a 400 naming it; unknown fields are accepted and ignored, as vLLM does, so benchmark clients
that send extras keep working."""

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from duetserve.proto.scheduling import Sampling, Slo, SloKind

MAX_STOP_STRINGS = 8
MAX_LOGPROBS = 20


class _Lenient(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


class DuetSlo(_Lenient):
    kind: Literal["latency", "deadline", "compound"]
    ttft_ms: Annotated[float, Field(gt=0)] | None = None
    tpot_ms: Annotated[float, Field(gt=0)] | None = None
    deadline_ms: Annotated[float, Field(gt=0)] | None = None
    group: Annotated[str, Field(min_length=1, max_length=256)] | None = None

    def to_proto(self) -> Slo:
        try:
            return Slo(SloKind(self.kind), self.ttft_ms, self.tpot_ms, self.deadline_ms, self.group)
        except ValueError as err:
            raise ValueError(f"duet.slo: {err}") from None


class DuetCache(_Lenient):
    public_prefix_tokens: Annotated[int, Field(ge=0)] = 0


class DuetExtension(_Lenient):
    """Duet's own request extension (DESIGN.md): SLO and cache hints."""

    slo: DuetSlo | None = None
    cache: DuetCache | None = None


class StreamOptions(_Lenient):
    include_usage: bool = False


class _SamplingFields(_Lenient):
    model: Annotated[str, Field(min_length=1)]
    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    top_k: int | None = None  # vLLM: -1 or 0 mean off
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] = 0.0
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] = 0.0
    repetition_penalty: Annotated[float, Field(gt=0, le=10)] = 1.0
    stop: str | list[str] | None = None
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None
    seed: Annotated[int, Field(ge=0, lt=2**63)] | None = None
    n: Annotated[int, Field(ge=1)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    min_tokens: Annotated[int, Field(ge=0)] = 0
    duet: DuetExtension | None = None

    @model_validator(mode="after")
    def _check_common(self) -> "_SamplingFields":
        if self.n != 1:
            raise ValueError("n: only n=1 is supported")
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
        | Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
        | Annotated[list[str], Field(min_length=1, max_length=1)]
    )
    max_tokens: Annotated[int, Field(ge=1)] = 16
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    echo: bool = False
    suffix: str | None = None

    @model_validator(mode="after")
    def _check_unsupported(self) -> "CompletionRequest":
        if self.echo:
            raise ValueError("echo: not supported")
        if self.suffix:
            raise ValueError("suffix: not supported")
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


class ChatCompletionRequest(_SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    add_generation_prompt: bool = True

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
