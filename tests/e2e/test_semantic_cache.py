"""The semantic response cache served (DUET_SEMANTIC_CACHE) on SmolLM2, through the official
openai client: an answer that finished normally serves a reworded question after it, streamed
as valid SSE with usage and `x-duet-cache: semantic`; never to another tenant, another
conversation, or a request that opts out; and the SQLite store keeps it across a restart of
the stack."""

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import openai
import pytest

from duetserve.proto import codec, semantic, subjects
from duetserve.proto.common import ErrorReply
from duetserve.services.ingress.api_models import ChatCompletionRequest
from duetserve.services.ingress.semantic import context_key
from tests.e2e.conftest import Stack, assert_stops_cleanly, start_stack

KEYS = {"tenant-a": "key-of-a", "tenant-b": "key-of-b"}
MODEL = "SmolLM2-135M-Instruct"
QUESTION = "What is the capital of France?"
REWORDED = "Tell me the capital of France."


def launch(smollm2_dir: Path, var_dir: Path, **env: str) -> Stack:
    return start_stack(
        smollm2_dir,
        var_dir,
        DUET_API_KEYS=",".join(f"{key}:{tenant}" for tenant, key in KEYS.items()),
        DUET_SEMANTIC_CACHE="true",
        # Generous for a loaded CI machine: a lookup not answered in time is only a miss.
        DUET_SEMANTIC_LOOKUP_TIMEOUT_S="2",
        DUET_KV_CACHE_MB="256",
        **env,
    )


@pytest.fixture(scope="module")
def var_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("var")


@pytest.fixture(scope="module")
def cache_stack(smollm2_dir: Path, var_dir: Path) -> Iterator[Stack]:
    stack = launch(smollm2_dir, var_dir)
    yield stack
    if stack.process.poll() is None:  # the restart test stops it itself
        assert_stops_cleanly(stack)


def client(stack: Stack, tenant: str = "tenant-a") -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.base_url, api_key=KEYS[tenant], max_retries=0)


def ask(
    stack: Stack,
    content: str,
    tenant: str = "tenant-a",
    history: list[dict[str, str]] | None = None,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> tuple[str | None, Any]:
    """(x-duet-cache, the completion) of a whole answer."""
    raw = client(stack, tenant).chat.completions.with_raw_response.create(
        model=MODEL,
        messages=[*(history or []), {"role": "user", "content": content}],  # type: ignore[list-item]
        extra_headers=headers,
        **{"temperature": 0, "max_tokens": 48, **extra},
    )
    return raw.headers.get("x-duet-cache"), raw.parse()


def cached_answer(stack: Stack, content: str, **kw: Any) -> Any:
    """Ask until the cache answers (the insert of the first answer travels on its own);
    Cache-Control: no-store keeps the misses' own answers out of the cache meanwhile."""
    deadline = time.monotonic() + 30
    while True:
        header, done = ask(stack, content, headers={"Cache-Control": "no-store"}, **kw)
        if header == "semantic" or time.monotonic() > deadline:
            return header, done
        time.sleep(0.3)


def text_of(done: Any) -> str:
    return str(done.choices[0].message.content)


def test_a_reworded_question_is_answered_from_the_cache(cache_stack: Stack) -> None:
    header, first = ask(cache_stack, QUESTION)
    assert header is None
    assert first.choices[0].finish_reason == "stop"
    assert "Paris" in text_of(first)

    header, again = cached_answer(cache_stack, REWORDED)
    assert header == "semantic"
    assert text_of(again) == text_of(first)
    assert again.choices[0].finish_reason == "stop"
    assert again.usage.completion_tokens == first.usage.completion_tokens
    assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens

    # Streamed: a valid SSE stream the client reads, whole answer, finish reason and usage.
    raw = client(cache_stack).chat.completions.with_raw_response.create(
        model=MODEL,
        messages=[{"role": "user", "content": REWORDED}],
        temperature=0,
        max_tokens=48,
        stream=True,
        stream_options={"include_usage": True},
    )
    assert raw.headers.get("x-duet-cache") == "semantic"
    chunks = list(raw.parse())
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text_of(first)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop" and all(f is None for f in finishes[:-1])
    assert len({c.id for c in chunks}) == 1
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == first.usage.completion_tokens


def test_only_its_own_tenant_and_context_get_a_cached_answer(cache_stack: Stack) -> None:
    cached_answer(cache_stack, QUESTION)  # a's answer is in the cache
    header, _ = ask(cache_stack, REWORDED, tenant="tenant-b")
    assert header is None

    # The same last message in a conversation about something else is not a hit.
    history = [
        {"role": "user", "content": "Let's talk about Texas."},
        {"role": "assistant", "content": "Sure, what would you like to know about Texas?"},
    ]
    header, _ = ask(cache_stack, QUESTION, history=history)
    assert header is None
    header, _ = ask(cache_stack, QUESTION, extra_body={"top_k": 5})  # other sampling settings
    assert header is None
    header, _ = ask(cache_stack, "What is the capital of Germany?")  # another entity: vetoed
    assert header is None


def test_a_request_can_opt_out(cache_stack: Stack) -> None:
    header, _ = cached_answer(cache_stack, QUESTION)
    assert header == "semantic"
    header, _ = ask(cache_stack, QUESTION, extra_body={"duet": {"cache": {"semantic": False}}})
    assert header is None
    header, _ = ask(cache_stack, QUESTION, headers={"Cache-Control": "no-cache"})
    assert header is None


def test_answers_that_did_not_finish_are_not_stored(cache_stack: Stack) -> None:
    question = "Write a long story about a dragon who learns to bake bread."
    header, cut = ask(cache_stack, question, max_tokens=4)
    assert header is None and cut.choices[0].finish_reason == "length"
    time.sleep(1.0)  # an insert, had one been sent, would have landed by now
    header, _ = ask(cache_stack, question, max_tokens=4)
    assert header is None


def test_broken_and_forged_messages_on_the_bus_are_refused(cache_stack: Stack) -> None:
    cut_short, finished = "What is the largest ocean on Earth?", "What is the longest river?"

    def key_of(question: str) -> str:
        body = {"model": MODEL, "messages": [{"role": "user", "content": question}]}
        return context_key(ChatCompletionRequest.model_validate({**body, "temperature": 0}), MODEL)

    async def send() -> list[object]:
        bus = await nats.connect(cache_stack.nats_url)
        try:
            answers = []
            wrong_type = codec.encode(semantic.SemanticHit("x", 1, "stop", "", 1))
            for payload in (b"\x93garbage", wrong_type):
                reply = await bus.request(subjects.SEMANTIC_LOOKUP, payload, timeout=10)
                answers.append(codec.decode(reply.data, ErrorReply))
            for question, finish in ((cut_short, "length"), (finished, "stop")):
                entry = semantic.SemanticInsert(
                    "tenant-a", MODEL, key_of(question), question, "Forged.", 2, finish
                )
                await bus.publish(subjects.SEMANTIC_INSERT, codec.encode(entry))
            await bus.publish(subjects.SEMANTIC_INSERT, b"not msgpack at all")
            await bus.flush()
            return answers
        finally:
            await bus.close()

    answers = asyncio.run(send())
    assert all(isinstance(a, ErrorReply) for a in answers)
    # An answer that did not finish normally is never stored, whoever sends it ...
    header, done = cached_answer(cache_stack, finished)
    assert header == "semantic" and text_of(done) == "Forged."  # (the same path stores this)
    header, done = ask(cache_stack, cut_short, headers={"Cache-Control": "no-store"})
    assert header is None and text_of(done) != "Forged."


def test_a_cached_answer_is_served_while_the_scheduler_takes_no_requests(
    cache_stack: Stack,
) -> None:
    header, _ = cached_answer(cache_stack, QUESTION)
    assert header == "semantic"
    scheduler = cache_stack.service_pids()["scheduler"]
    os.kill(scheduler, signal.SIGSTOP)  # submits go unanswered (DUET_SUBMIT_TIMEOUT_S)
    try:
        header, served = ask(cache_stack, REWORDED)
        assert header == "semantic" and "Paris" in text_of(served)
        with pytest.raises(openai.APIStatusError) as refused:
            ask(cache_stack, "What is the tallest mountain in Africa?")
        assert refused.value.status_code == 503
    finally:
        os.kill(scheduler, signal.SIGCONT)


def test_the_cache_outlives_a_restart(cache_stack: Stack, smollm2_dir: Path, var_dir: Path) -> None:
    header, before = cached_answer(cache_stack, QUESTION)
    assert header == "semantic"
    assert (var_dir / "semantic.sqlite").exists()
    assert_stops_cleanly(cache_stack)
    again = launch(smollm2_dir, var_dir)
    try:
        header, after = ask(again, REWORDED)
        assert header == "semantic"
        assert text_of(after) == text_of(before)
    finally:
        assert_stops_cleanly(again)


def test_a_cluster_store_in_jetstream_serves_what_another_stack_stored(
    smollm2_dir: Path, tmp_path: Path
) -> None:
    """DUET_SEMANTIC_BACKEND=jetstream: the answers live in the bus's buckets (one per
    category), with the stack's own bus permissions; a stack that starts later on a bus that
    kept them (the same NATS store) serves them."""
    var_dir = tmp_path / "var"
    first = launch(smollm2_dir, var_dir, DUET_SEMANTIC_BACKEND="jetstream")
    try:
        header, answer = ask(first, QUESTION)
        assert header is None and answer.choices[0].finish_reason == "stop"
        header, again = cached_answer(first, REWORDED)
        assert header == "semantic" and text_of(again) == text_of(answer)
    finally:
        assert_stops_cleanly(first)  # no permission the backend needed was refused
    assert not (var_dir / "semantic.sqlite").exists()
    second = launch(smollm2_dir, var_dir, DUET_SEMANTIC_BACKEND="jetstream")
    try:
        header, later = ask(second, REWORDED)
        assert header == "semantic" and text_of(later) == text_of(answer)
    finally:
        assert_stops_cleanly(second)
