"""Ingress's pure parts around the HTTP shell: chunk ordering, token ids to text with stop
strings, prompt preparation and context checks, settings, the /health body."""

from pathlib import Path
from typing import Any

import pytest

from duetserve.common.lengths import LengthPredictor
from duetserve.proto.common import HealthReply, HealthStatus
from duetserve.proto.scheduling import SloKind
from duetserve.proto.tokens import FinishReason, TokenChunk
from duetserve.runtime.tokenizer import Tokenizer
from duetserve.services.ingress.api_models import ChatCompletionRequest, CompletionRequest
from duetserve.services.ingress.errors import ApiError
from duetserve.services.ingress.handlers import health_body
from duetserve.services.ingress.output import OutputAssembler
from duetserve.services.ingress.prompts import (
    ModelLimits,
    default_slo,
    output_budget,
    prepare_chat,
    prepare_completion,
    question_text,
)
from duetserve.services.ingress.settings import DEFAULT_HEALTH_SERVICES, IngressSettings
from duetserve.services.ingress.streams import ChunkOrderer
from tests.conftest import ModelDirs
from tests.model_specs import TINY

TEXT = "Hi 世界 🎉 café, naïve 😀!"
LIMITS = ModelLimits(context_len=64, vocab_size=TINY.vocab_size, default_slo=default_slo(500, 50))


@pytest.fixture(scope="module")
def tokenizer(model_dirs: ModelDirs) -> Tokenizer:
    return Tokenizer.from_dir(model_dirs.get(TINY))


def chunk(index: int, ids: tuple[int, ...], finish: FinishReason | None = None) -> TokenChunk:
    error = "boom" if finish == FinishReason.ERROR else None
    return TokenChunk("r", index, ids, finish_reason=finish, error=error)


def test_chunks_come_out_in_index_order_without_repeats() -> None:
    orderer = ChunkOrderer("r")
    assert orderer.push(chunk(2, (7,))) == []
    assert orderer.push(chunk(3, (8,), FinishReason.LENGTH)) == []
    first = chunk(0, (5, 6))
    assert orderer.push(first) == [first, chunk(2, (7,)), chunk(3, (8,), FinishReason.LENGTH)]
    assert orderer.push(chunk(1, (6,))) == []  # already handed out
    assert orderer.next_index == 4


def test_a_replayed_chunk_gives_only_what_the_stream_lacks() -> None:
    """A replay may cover tokens the stream had (a decode worker sends the output it was
    handed as one chunk): the part past next_index is handed out, the rest dropped."""
    orderer = ChunkOrderer("r")
    assert orderer.push(chunk(0, (5, 6))) == [chunk(0, (5, 6))]
    assert orderer.push(chunk(3, (8,))) == []
    assert orderer.has_gap  # index 2 is missing
    assert orderer.push(chunk(0, (5, 6, 7))) == [chunk(2, (7,)), chunk(3, (8,))]
    assert not orderer.has_gap
    assert orderer.push(chunk(3, (8,), FinishReason.STOP)) == [chunk(4, (), FinishReason.STOP)]
    assert orderer.push(chunk(4, (), FinishReason.STOP)) == []  # ended: a second end is dropped
    assert orderer.next_index == 4


def test_an_error_chunk_ends_the_stream_at_once() -> None:
    orderer = ChunkOrderer("r")
    assert orderer.push(chunk(5, (1,))) == []
    error = chunk(9, (), FinishReason.ERROR)
    assert orderer.push(error) == [error]


def pieces_of(
    tokenizer: Tokenizer, ids: list[int], stops: tuple[str, ...], size: int, finish: bool = True
) -> list[tuple[str, str | None]]:
    assembler = OutputAssembler(tokenizer, tokenizer.encode("prompt"), stops)
    out = []
    for start in range(0, len(ids), size):
        last = finish and start + size >= len(ids)
        reason = FinishReason.LENGTH if last else None
        piece = assembler.add(chunk(start, tuple(ids[start : start + size]), reason))
        out.append((piece.text, piece.finish_reason))
        if piece.finish_reason is not None:
            break
    return out


@pytest.mark.parametrize("size", [1, 2, 3, 100])
def test_pieces_join_to_the_text_however_tokens_are_chunked(
    tokenizer: Tokenizer, size: int
) -> None:
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    pieces = pieces_of(tokenizer, ids, (), size)
    assert "".join(text for text, _ in pieces) == TEXT
    assert all("\ufffd" not in text for text, _ in pieces)
    assert pieces[-1][1] == "length"


@pytest.mark.parametrize("size", [1, 4])
def test_a_stop_string_across_tokens_ends_the_output_before_it(
    tokenizer: Tokenizer, size: int
) -> None:
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    pieces = pieces_of(tokenizer, ids, ("🎉 ca", "zzz"), size, finish=False)
    assert "".join(text for text, _ in pieces) == "Hi 世界 "
    assert pieces[-1][1] == "stop"


def test_a_stop_string_in_the_held_back_tail_still_stops(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("say ab", add_special_tokens=False)
    pieces = pieces_of(tokenizer, ids, ("ab",), 100)
    assert pieces == [("say ", "stop")]


def test_completion_prompt_text_ids_and_budgets(tokenizer: Tokenizer) -> None:
    req = CompletionRequest.model_validate({"model": "m", "prompt": "Hello there"})
    prepared = prepare_completion(req, tokenizer, LIMITS)
    assert prepared.prompt_ids == tuple(tokenizer.encode("Hello there"))
    assert prepared.sampling.max_tokens == 16
    assert prepared.slo.kind == SloKind.LATENCY and prepared.slo.ttft_ms == 500
    # An omitted max_tokens shrinks to what the context leaves; an explicit one is checked.
    long_prompt = CompletionRequest.model_validate({"model": "m", "prompt": [3] * 60})
    assert prepare_completion(long_prompt, tokenizer, LIMITS).sampling.max_tokens == 4
    explicit = long_prompt.model_copy(update={"max_tokens": 5})
    explicit.model_fields_set.add("max_tokens")
    with pytest.raises(ApiError) as info:
        prepare_completion(explicit, tokenizer, LIMITS)
    assert info.value.message.startswith("This model's maximum context length is 64 tokens.")
    assert "you requested 65 tokens (60 in the prompt, 5 in the completion)" in info.value.message


def test_out_of_vocabulary_ids_and_overlong_prompts_are_400s(tokenizer: Tokenizer) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"prompt": [1, TINY.vocab_size]}, "prompt"),
        ({"prompt": [1], "stop_token_ids": [TINY.vocab_size + 5]}, "stop_token_ids"),
        ({"prompt": [1] * 64}, "prompt"),
        ({"prompt": "x", "duet": {"slo": {"kind": "deadline"}}}, "duet.slo"),
    ]
    for fields, param in cases:
        req = CompletionRequest.model_validate({"model": "m", **fields})
        with pytest.raises(ApiError) as info:
            prepare_completion(req, tokenizer, LIMITS)
        assert (info.value.status, info.value.param) == (400, param), info.value


def test_min_tokens_beyond_the_completion_budget_is_a_400(tokenizer: Tokenizer) -> None:
    """It reached the worker, which refused it: a 503 for the client's mistake (the HTTP
    fuzzer found it). Beyond max_tokens as given, or as the context shrank it."""
    explicit = CompletionRequest.model_validate(
        {"model": "m", "prompt": "hi", "max_tokens": 4, "min_tokens": 5}
    )
    shrunk = CompletionRequest.model_validate({"model": "m", "prompt": [3] * 60, "min_tokens": 8})
    chat = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "min_tokens": 999}
    )
    for prepare, req in ((prepare_completion, explicit), (prepare_completion, shrunk),
                         (prepare_chat, chat)):  # fmt: skip
        with pytest.raises(ApiError) as info:
            prepare(req, tokenizer, LIMITS)  # type: ignore[operator]
        assert (info.value.status, info.value.param) == (400, "min_tokens")
        assert "must be at most max_tokens" in info.value.message
    fits = explicit.model_copy(update={"min_tokens": 4})
    assert prepare_completion(fits, tokenizer, LIMITS).sampling.min_tokens == 4


def test_chat_prompt_cache_hint_and_default_budget(tokenizer: Tokenizer) -> None:
    messages = [{"role": "user", "content": "hi 😀"}]
    body = {"model": "m", "messages": messages, "duet": {"cache": {"public_prefix_tokens": 999}}}
    prepared = prepare_chat(ChatCompletionRequest.model_validate(body), tokenizer, LIMITS)
    assert prepared.prompt_ids == tuple(tokenizer.encode_chat(messages))
    assert prepared.sampling.max_tokens == 64 - len(prepared.prompt_ids)
    assert prepared.public_prefix_tokens == len(prepared.prompt_ids)  # clamped to the prompt


def test_each_prompt_gets_an_output_bound_from_its_question(tokenizer: Tokenizer) -> None:
    lengths = LengthPredictor()
    plain = prepare_completion(CompletionRequest(model="tiny", prompt="hi"), tokenizer, LIMITS)
    assert plain.output_bound is None  # no predictor: max_tokens bounds it
    req = CompletionRequest(model="tiny", prompt="Write a long story.", max_tokens=40)
    bounded = prepare_completion(req, tokenizer, LIMITS, lengths)
    assert bounded.output_bound == lengths.bound("Write a long story.", 40)
    # ignore_eos: the length is known, max_tokens exactly.
    exact = CompletionRequest(model="tiny", prompt="hi", max_tokens=30, ignore_eos=True)
    assert prepare_completion(exact, tokenizer, LIMITS, lengths).output_bound == 30
    ids = CompletionRequest(model="tiny", prompt=tokenizer.encode("Hi there", False))
    from_ids = prepare_completion(ids, tokenizer, LIMITS, lengths)
    assert from_ids.output_bound == lengths.bound("Hi there", from_ids.sampling.max_tokens)
    # A chat's bound is its last question's.
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Write a long story."},
        {"role": "assistant", "content": "Once."},
        {"role": "user", "content": "Thanks!"},
    ]
    chat = ChatCompletionRequest.model_validate({"model": "tiny", "messages": messages})
    prepared = prepare_chat(chat, tokenizer, LIMITS, lengths)
    assert prepared.output_bound == lengths.bound("Thanks!", prepared.sampling.max_tokens)
    assert question_text([{"role": "system", "content": "a"}]) == "a"
    # A client's own estimate goes in place of the prediction, within max_tokens.
    for stated, bound in ((12, 12), (500, 40)):
        body = {"model": "tiny", "prompt": "hi", "max_tokens": 40}
        req = CompletionRequest.model_validate({**body, "duet": {"expected_output_tokens": stated}})
        assert prepare_completion(req, tokenizer, LIMITS, lengths).output_bound == bound
        assert prepare_completion(req, tokenizer, LIMITS).output_bound == bound


def test_output_budget_words_like_vllm() -> None:
    assert output_budget(10, None, 64, "messages", fit=True) == 54
    assert output_budget(10, 20, 64, "messages", fit=False) == 20
    with pytest.raises(ApiError) as info:
        output_budget(64, None, 64, "messages", fit=True)
    assert info.value.code == "context_length_exceeded" and info.value.param == "messages"


def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("DUET_PORT", "DUET_HOST", "DUET_SERVED_MODEL_NAME", "DUET_HEALTH_SERVICES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DUET_MODEL", str(tmp_path / "tiny-model"))
    settings = IngressSettings()
    assert (settings.host, settings.port) == ("127.0.0.1", 8000)
    assert settings.model_id == "tiny-model"
    assert settings.health_services == DEFAULT_HEALTH_SERVICES
    monkeypatch.setenv("DUET_PORT", "8123")
    monkeypatch.setenv("DUET_SERVED_MODEL_NAME", "duet-tiny")
    monkeypatch.setenv("DUET_HEALTH_SERVICES", "scheduler, kv_manager")
    settings = IngressSettings()
    assert (settings.port, settings.model_id) == (8123, "duet-tiny")
    assert settings.health_services == ("scheduler", "kv_manager")
    monkeypatch.setenv("DUET_HEALTH_SERVICES", "bad.name")
    with pytest.raises(ValueError):
        IngressSettings()
    monkeypatch.delenv("DUET_HEALTH_SERVICES")
    monkeypatch.setenv("DUET_MODE", "unified")  # one worker: /health needs no decode worker
    assert "decode_worker" not in IngressSettings().health_services
    assert "prefill_worker" in IngressSettings().health_services


def test_health_body_is_503_unless_every_service_is_ready() -> None:
    own = HealthReply("ingress", "ingress-0", HealthStatus.READY)
    ready = HealthReply("scheduler", "s-0", HealthStatus.READY)
    assert health_body(own, {"scheduler": ready})[0] == 200
    status, body = health_body(own, {"scheduler": ready, "kv_manager": "no responders"})
    assert status == 503 and body["status"] == "unavailable"
    assert body["services"]["kv_manager"] == {"status": "unreachable", "detail": "no responders"}
    draining = HealthReply("ingress", "ingress-0", HealthStatus.DRAINING)
    assert health_body(draining, {})[0] == 503
