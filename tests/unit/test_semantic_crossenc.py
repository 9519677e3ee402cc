"""The cross-encoder experiment's arithmetic: AUC, the tuned cut, and the per-category report
(tuned on the tuning split, bounded on the test split) on hand-built scores."""

import math

import numpy as np

from duetserve.loadtest.semantic_crossenc import auc, evaluate, tuned_cut
from duetserve.loadtest.semantic_eval import Scored


def row(split: str, label: str, cosine: float = 0.9, vetoed: bool = False) -> Scored:
    return Scored("chat", split, label, "scope", cosine, "chat", vetoed)


def test_auc_counts_ties_as_half() -> None:
    assert auc(np.array([0.9, 0.8]), np.array([0.1, 0.2])) == 1.0
    assert auc(np.array([0.1]), np.array([0.9])) == 0.0
    assert auc(np.array([0.5]), np.array([0.5])) == 0.5
    assert math.isnan(auc(np.array([]), np.array([0.5])))


def test_the_tuned_cut_lets_through_at_most_the_allowed_near_misses() -> None:
    negatives = np.array([0.2, 0.9, 0.5, 0.7])
    assert tuned_cut(negatives, 1) == 0.7  # pass: score > cut; only 0.9 passes
    assert tuned_cut(negatives, 0) == 0.9
    assert tuned_cut(negatives, 4) == 0.0  # fewer near misses than allowed: no cut


def test_the_report_holds_the_test_split_to_cuts_tuned_elsewhere() -> None:
    rows = [row("tune", "near_miss"), row("tune", "near_miss"), row("tune", "paraphrase")]
    scores = [0.6, 0.3, 0.9]
    # Test: two paraphrases (0.95 passes, 0.4 does not), a near miss above the tuned cut, one
    # below it, a vetoed paraphrase, and one under the cosine floor.
    rows += [row("test", "paraphrase"), row("test", "paraphrase"), row("test", "near_miss")]
    scores += [0.95, 0.4, 0.7]
    rows += [row("test", "near_miss"), row("test", "paraphrase", vetoed=True)]
    scores += [0.1, 0.99]
    rows += [row("test", "paraphrase", cosine=0.3)]
    scores += [0.99]
    out = evaluate(rows, np.array(scores))
    chat = out["categories"]["chat"]
    # Tuned cut 0.3 (one tuning near miss may pass): 0.95 and 0.4 pass, as do 0.7 and the
    # vetoed 0.99 without vetoes; the one under the floor never does.
    assert chat["with_vetoes"]["recall"] == 2 / 4 and chat["with_vetoes"]["false_hits"] == 0.5
    assert chat["without_vetoes"]["recall"] == 3 / 4
    # The bound: no near miss may pass at 1% of two, so the cut is 0.7: only 0.95 (and 0.99
    # without vetoes) pass.
    assert chat["with_vetoes"]["bound_recall_at_1pct"] == 1 / 4
    assert chat["without_vetoes"]["bound_recall_at_1pct"] == 2 / 4
    assert out["auc_tune_out_of_fold"] == 1.0
