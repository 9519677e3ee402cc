"""Which chat requests take part in the semantic cache, and their context keys
(ingress/semantic.py): everything besides the last user message that decides the answer is in
the key; what does not change the answer is not."""

from typing import Any

import pytest

from duetserve.services.ingress.api_models import ChatCompletionRequest
from duetserve.services.ingress.semantic import context_key, plan, stream_pieces

QUESTION = {"role": "user", "content": "What is the capital of France?"}


def request(**fields: Any) -> ChatCompletionRequest:
    body: dict[str, Any] = {"model": "m", "messages": [QUESTION]}
    body.update(fields)
    return ChatCompletionRequest.model_validate(body)


def key(**fields: Any) -> str:
    return context_key(request(**fields), "m")


def test_a_plain_question_is_looked_up_and_stored() -> None:
    found = plan(request(), "m", None)
    assert found is not None
    assert found.query == QUESTION["content"]
    assert found.lookup and found.store


@pytest.mark.parametrize(
    ("fields", "cache_control"),
    [
        ({"duet": {"cache": {"semantic": False}}}, None),
        ({"logprobs": True}, None),  # a cached answer has no logprobs
        ({"messages": [QUESTION, {"role": "assistant", "content": "Paris"}]}, None),
        ({"messages": [{"role": "user", "content": "   "}]}, None),
        ({}, "no-cache, no-store"),
    ],
)
def test_requests_that_do_not_take_part(fields: dict[str, Any], cache_control: str | None) -> None:
    assert plan(request(**fields), "m", cache_control) is None


def test_cache_control_opts_out_of_one_side_each() -> None:
    no_cache = plan(request(), "m", "No-Cache")
    assert no_cache is not None and not no_cache.lookup and no_cache.store
    no_store = plan(request(), "m", "max-age=0, no-store")
    assert no_store is not None and no_store.lookup and not no_store.store


@pytest.mark.parametrize(
    "fields",
    [
        {"messages": [{"role": "system", "content": "Answer in French."}, QUESTION]},
        {
            "messages": [
                {"role": "user", "content": "Let's talk about Texas."},
                {"role": "assistant", "content": "Sure."},
                QUESTION,
            ]
        },
        {"temperature": 0.0},
        {"top_p": 0.5},
        {"top_k": 5},
        {"seed": 7},
        {"stop": ["\n"]},
        {"stop_token_ids": [2]},
        {"presence_penalty": 0.5},
        {"frequency_penalty": 0.5},
        {"repetition_penalty": 1.2},
        {"min_tokens": 3},
        {"ignore_eos": True},
        {"add_generation_prompt": False},
    ],
)
def test_what_changes_the_answer_changes_the_key(fields: dict[str, Any]) -> None:
    assert key(**fields) != key()


def test_what_does_not_change_the_answer_keeps_the_key() -> None:
    base = key()
    assert key(max_tokens=7) == base  # served to any budget the cached answer fits in
    assert key(stream=True, stream_options={"include_usage": True}) == base
    assert key(top_k=-1) == key(top_k=0) == base  # both mean "off"
    assert key(stop=["a", "b"]) == key(stop=["b", "a"])
    # The last message is the query, not the context.
    assert key(messages=[{"role": "user", "content": "Something else"}]) == base
    assert context_key(request(), "other-model") != base


def test_stream_pieces_join_to_the_answer() -> None:
    text = "The capital of France is Paris.\n\nIt lies on the Seine.  "
    pieces = stream_pieces(text, words=3)
    assert "".join(pieces) == text
    assert len(pieces) > 1
    assert stream_pieces("") == [""]
