"""The semantic cache benchmark's own logic (loadtest/semantic_serving.py): its workload of
repeated questions, and how it tells a wrong hit from a right one."""

import random

from duetserve.loadtest.semantic_serving import (
    Answer,
    cacheable_repeats,
    reword,
    summarize,
    workload,
)

POOL = [f"Question number {i} about something?" for i in range(50)]


def test_repeats_ask_again_what_was_asked_before() -> None:
    asks = workload(POOL, 120, repeat=0.4, seed=3)
    assert asks == workload(POOL, 120, repeat=0.4, seed=3)
    asked: set[int] = set()
    for ask in asks:
        if ask.repeat:
            assert ask.base in asked
        else:
            assert ask.base not in asked and ask.text == POOL[ask.base]
            asked.add(ask.base)
    repeats = sum(a.repeat for a in asks)
    assert 30 <= repeats <= 70
    assert any(a.repeat and a.text != POOL[a.base] for a in asks)  # some reworded


def test_rewordings_keep_the_question() -> None:
    rng = random.Random(0)
    for _ in range(20):
        text = reword("How do I sort a list in Python?", rng)
        assert "sort a list in python" in text.lower()


def answer(base: int, text: str, hit: bool, repeat: bool = False) -> Answer:
    header = "semantic" if hit else None
    return Answer(base, repeat, header, text, "stop", 10.0, 20.0, 3)


def test_a_hit_is_wrong_only_when_its_answer_belongs_to_another_question() -> None:
    answers = [
        answer(1, "Paris.", hit=False),
        answer(1, "Paris.", hit=True, repeat=True),  # generated for question 1: right
        answer(2, "Paris.", hit=True, repeat=True),  # question 2's hit got question 1's answer
        answer(3, "Rome.", hit=True, repeat=True),  # stored for question 3 (stored below)
        answer(4, "Oslo.", hit=True, repeat=True),  # nowhere: wrong
    ]
    result = summarize(answers, seconds=10.0, stored={"Rome.": {3}})
    assert result["hits"] == 4
    assert result["wrong_hits"] == 2
    assert result["hit_rate_of_repeats"] == 1.0


def test_cacheable_repeats_count_questions_whose_answer_finished() -> None:
    rows = [
        {"base": 1, "repeat": False, "hit": False, "finish": "stop"},
        {"base": 2, "repeat": False, "hit": False, "finish": "length"},
        {"base": 1, "repeat": True, "hit": True, "finish": "stop"},
        {"base": 1, "repeat": True, "hit": False, "finish": "stop"},
        {"base": 2, "repeat": True, "hit": False, "finish": "length"},
    ]
    assert cacheable_repeats(rows) == (2, 1)
