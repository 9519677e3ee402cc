"""The committed workload for reuse of similar prompts (loadtest/reuse_workload.py): documents
recur at different positions, some edited by a few words, and prompts render from it alone."""

from pathlib import Path

from duetserve.loadtest.reuse_workload import (
    DOCS_PER_REQUEST,
    WORDS_EDITED,
    edited,
    read,
    render,
    write,
)

COMMITTED = Path(__file__).parents[2] / "docs" / "bench" / "reuse_workload.json"


def test_the_committed_workload_moves_and_edits_its_documents(tmp_path: Path) -> None:
    workload = read(COMMITTED)
    assert len(workload.docs) == 6 and len(workload.requests) == 200
    positions: dict[int, set[int]] = {}
    edits = 0
    for request in workload.requests:
        docs = [p.doc for p in request.docs]
        assert DOCS_PER_REQUEST[0] <= len(docs) <= DOCS_PER_REQUEST[1]
        assert len(set(docs)) == len(docs)
        assert 0 <= request.question < len(workload.questions)
        for n, placed in enumerate(request.docs):
            positions.setdefault(placed.doc, set()).add(n)
            assert len(placed.edits) <= WORDS_EDITED[1]
            edits += bool(placed.edits)
    assert all(len(p) >= 2 for p in positions.values())  # every document moves
    assert 0.15 < edits / sum(len(r.docs) for r in workload.requests) < 0.35
    again = tmp_path / "again.json"
    write(workload, again)
    assert read(again) == workload


def test_a_prompt_holds_its_documents_in_order_and_its_question() -> None:
    workload = read(COMMITTED)
    request = workload.requests[7]
    prompt = render(workload, 7)
    at = [prompt.index(edited(workload.docs[p.doc], p.edits)) for p in request.docs]
    assert at == sorted(at)
    assert prompt.endswith(workload.questions[request.question])


def test_an_edit_swaps_only_the_words_it_names() -> None:
    text = "The quick brown fox jumps over the lazy dog"
    # Words of four letters or more, counted from 0: quick, brown, jumps, over, lazy.
    assert edited(text, {0: "slow", 4: "tired"}) == "The slow brown fox jumps over the tired dog"
    assert edited(text, {}) == text
