"""The frozen query pairs for the semantic cache (loadtest/semantic_pairs.py): the committed file
is the generator's output, and it holds the invariants the cache's measurement relies on."""

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from duetserve.loadtest.semantic_pairs import (
    CATEGORIES,
    INTENTS,
    KINDS,
    LABELS,
    MIN_KINDS,
    REQUIRED_KINDS,
    build,
    main,
    render,
)

ROOT = Path(__file__).parents[2]
FROZEN = ROOT / "docs" / "bench" / "semantic_pairs.json"
EXAMPLES = ROOT / "services" / "cache_index" / "semantic_categories.json"
MIN_PER_LABEL = 200
MIN_INTENTS = 24


@pytest.fixture(scope="module")
def frozen() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(FROZEN.read_text(encoding="utf-8"))
    return data


def test_the_frozen_file_is_a_fresh_build() -> None:
    # Byte-equal: the file was not edited by hand after it was generated.
    assert FROZEN.read_text(encoding="utf-8") == render(build())


def test_check_flags_a_file_that_differs(tmp_path: Path) -> None:
    main(["--check", str(FROZEN)])
    edited = tmp_path / "pairs.json"
    edited.write_text(FROZEN.read_text(encoding="utf-8").replace("Python", "Pyton", 1))
    with pytest.raises(SystemExit) as exit_:
        main(["--check", str(edited)])
    assert exit_.value.code == 1


def test_each_category_has_enough_intents_and_pairs_of_each_label(frozen: dict[str, Any]) -> None:
    intents = Counter(i.category for i in INTENTS)
    counts = Counter((p["category"], p["label"]) for p in frozen["pairs"])
    for category in CATEGORIES:
        assert intents[category] >= MIN_INTENTS
        for label in LABELS:
            assert counts[(category, label)] >= MIN_PER_LABEL, (category, label)


def test_splits_are_disjoint_by_intent_and_each_holds_both_labels(
    frozen: dict[str, Any],
) -> None:
    split_of: dict[str, set[str]] = {}
    for p in frozen["pairs"]:
        split_of.setdefault(p["intent"], set()).add(p["split"])
    assert all(len(s) == 1 for s in split_of.values())
    present = {(p["category"], p["split"], p["label"]) for p in frozen["pairs"]}
    for category in CATEGORIES:
        for split in ("tune", "test"):
            for label in LABELS:
                assert (category, split, label) in present
    tune = sum(s == {"tune"} for s in split_of.values())
    assert 0.3 < tune / len(split_of) < 0.5


def test_near_miss_kinds_cover_each_category(frozen: dict[str, Any]) -> None:
    for category in CATEGORIES:
        kinds = {
            p["kind"]
            for p in frozen["pairs"]
            if p["category"] == category and p["label"] == "near_miss"
        }
        assert kinds <= set(KINDS)
        assert len(kinds) >= MIN_KINDS, category
        assert set(REQUIRED_KINDS[category]) <= kinds, category
    assert {p["kind"] for p in frozen["pairs"] if p["label"] == "paraphrase"} == {"paraphrase"}


def test_pairs_are_unique_non_empty_and_never_identical(frozen: dict[str, Any]) -> None:
    pairs = frozen["pairs"]
    assert len({p["id"] for p in pairs}) == len(pairs)
    assert len({frozenset((p["a"], p["b"])) for p in pairs}) == len(pairs)
    for p in pairs:
        assert p["a"].strip() and p["b"].strip() and p["a"] != p["b"]


def test_category_examples_are_fresh_queries(frozen: dict[str, Any]) -> None:
    examples = json.loads(EXAMPLES.read_text(encoding="utf-8"))
    assert examples["version"] == 1 and set(examples["categories"]) == set(CATEGORIES)
    dataset = {s for p in frozen["pairs"] for s in (p["a"], p["b"])}
    seen: set[str] = set()
    for category in CATEGORIES:
        queries = examples["categories"][category]["examples"]
        assert 30 <= len(queries) <= 40
        for q in queries:
            assert q.strip() and q not in seen and q not in dataset, q
            seen.add(q)
