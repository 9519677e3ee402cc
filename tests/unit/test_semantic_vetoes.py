"""The semantic cache's vetoes (cache_index/semantic_vetoes.py): each one keeps apart a pair
of queries that embed close together but need different answers, and lets reworded
paraphrases through."""

import pytest

from duetserve.services.cache_index.semantic_vetoes import (
    QueryFeatures,
    Veto,
    features,
    vetoes,
)


def why(a: str, b: str) -> list[Veto]:
    return vetoes(features(a), features(b))


@pytest.mark.parametrize(
    ("a", "b", "veto"),
    [
        (
            "compound interest on $1,000 at 5% for 10 years",
            "same at 7% for 10 years on $1,000",
            Veto.NUMBERS,
        ),
        (
            "how many years until my money doubles at 6%",
            "years until money triples at 6%",
            Veto.NUMBERS,
        ),
        ("top 10 rows of a pandas dataframe", "top 20 rows of a pandas dataframe", Veto.NUMBERS),
        ("is coffee safe during pregnancy", "is coffee not safe during pregnancy", Veto.NEGATION),
        (
            "export a dataframe to csv with the index",
            "export a dataframe to csv without the index",
            Veto.NEGATION,
        ),
        ("gluten-free bread recipe for beginners", "bread recipe for beginners", Veto.NEGATION),
        ("weather in Paris today", "weather in Lyon today", Veto.ENTITIES),
        ("weather in Paris today", "weather in lyon today", Veto.ENTITIES),
        ("current price of AAPL stock", "current price of MSFT stock", Veto.ENTITIES),
        ("sort a list in ascending order in python", "python sort list descending", Veto.CONTRAST),
        ("who wrote Moby-Dick", "when was Moby-Dick written", Veto.CONTRAST),
        ("sunrise time in Oslo tomorrow", "sunset time in Oslo tomorrow", Veto.CONTRAST),
        (
            "take-home pay per year on a salary",
            "take-home pay per month on a salary",
            Veto.SUBSTITUTION,
        ),
    ],
)
def test_each_veto_keeps_a_near_miss_apart(a: str, b: str, veto: Veto) -> None:
    assert veto in why(a, b)
    assert veto in why(b, a)  # whichever of the two was cached first


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("How do I reverse a list in Python?", "python: what's the idiomatic way to invert a list"),
        ("merge two dictionaries in python", "How do I combine 2 dicts into one in Python?"),
        ("how do i revrese a list in python quickly", "how do i reverse a list in python quickly"),
        ("name the second-largest ocean on earth", "Which ocean is the 2nd largest in the world?"),
        (
            "JS: wait for all promises to finish",
            "javascript: await all of the promises in an array",
        ),
        # Greetings, thanks and framing words change no answer (and "Please" is no name).
        ("How do I sort a list in Python?", "Hey, how do I sort a list in Python?"),
        ("How do I sort a list in Python?", "How do I sort a list in Python? Thanks in advance."),
        ('What does "ls -la" print?', 'What does "ls -la" print? Please explain.'),
        ("Compare Rust and Go", "Quick question: compare Rust and Go, I'm curious"),
    ],
)
def test_reworded_paraphrases_pass(a: str, b: str) -> None:
    assert why(a, b) == []


def test_identical_queries_pass_and_features_survive_the_wire() -> None:
    text = "Convert 100 USD to EUR without fees, not by card"
    f = features(text)
    assert why(text, text) == []
    assert QueryFeatures.from_wire(f.to_wire()) == f
    assert f.negated and "100" in f.numbers and "usd" in f.names


def test_filler_words_never_hide_a_real_change() -> None:
    assert Veto.ENTITIES in why("Hey, compare Rust and Go", "Hey, compare Rust and Zig")
    assert Veto.NUMBERS in why("Thanks! top 10 movies", "Thanks! top 20 movies")
    assert Veto.SUBSTITUTION in why(
        "help me delete a git branch please", "help me rename a git branch please"
    )


def test_a_paraphrase_worded_almost_alike_is_vetoed_which_costs_a_miss_only() -> None:
    # One content word apart with the rest the same: the veto cannot tell a synonym from a
    # deliberate change ("per year" / "per month"), so it fails safe.
    assert why("how do I delete a git branch", "how do I remove a git branch") == [
        Veto.SUBSTITUTION
    ]
