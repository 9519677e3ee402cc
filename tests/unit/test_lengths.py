"""Output-length bounds (common/lengths.py): the features, the refinement as tokens come, and the
shipped model's coverage on held-out ShareGPT pairs, measured here, not read from its card."""

from pathlib import Path

import numpy as np
import pytest

from duetserve.common import lengths
from duetserve.common.lengths import LengthPredictor, prompt_features, remaining_tokens
from duetserve.loadtest import length_train
from duetserve.loadtest.sharegpt import packaged_path
from duetserve.services.scheduler.state import SeqState


def test_features_are_the_same_in_every_process_and_count_words() -> None:
    text = "Write a Python function.\n- one\n- two\nWhy? ```code```"
    features = prompt_features(text)
    assert features.shape == (lengths.NUM_FEATURES,) and features.dtype == np.float32
    assert np.array_equal(features, prompt_features(text))
    assert features[2] == 3 and features[3] == 1 and features[4] == 2 and features[8] == 2
    twice = prompt_features(text + " python python")
    # crc32 buckets, not hash(): fixed across processes, so a trained model stays valid.
    bucket = lengths._DENSE + 0xA4D4B8B8 % lengths.WORD_BUCKETS  # crc32(b"python")
    assert twice[bucket] == features[bucket] + 2


def test_what_remains_shrinks_then_the_bound_doubles_never_past_max_tokens() -> None:
    assert remaining_tokens(100, 0, 1000) == 100
    assert remaining_tokens(100, 60, 1000) == 40
    assert remaining_tokens(100, 100, 1000) == 100  # reached: 200 now
    assert remaining_tokens(100, 450, 1000) == 350  # 800
    assert remaining_tokens(100, 900, 1000) == 100  # capped at max_tokens
    assert remaining_tokens(100, 999, 1000) == 1
    assert remaining_tokens(5000, 0, 300) == 300  # a bound past max_tokens is max_tokens


def test_a_request_without_a_bound_has_what_max_tokens_leaves() -> None:
    seq = SeqState("r", 0.0, prompt_len=10, max_tokens=500, num_output=120)
    assert seq.remaining_output == 380
    seq.output_bound = 100
    assert seq.remaining_output == 80  # past its bound of 100: bounded at 200 now


def test_the_shipped_model_reads_its_card_and_bounds_within_max_tokens() -> None:
    predictor = LengthPredictor()
    assert predictor.card.features == lengths.FEATURES
    assert 0.9 <= predictor.card.coverage <= 1.0
    short = predictor.bound("Hi", max_tokens=4096)
    essay = predictor.bound("Write a detailed 2000-word essay on the history of Rome.", 4096)
    assert 1 <= short < essay <= 4096
    assert predictor.bound("Write a detailed essay on Rome.", max_tokens=7) <= 7
    assert predictor.bound("Hi", max_tokens=4096, min_tokens=3000) >= 3000


def test_a_model_for_other_features_is_refused(tmp_path: Path) -> None:
    card = lengths.MODEL_PATH.with_suffix(".json").read_text()
    (tmp_path / "m.txt").write_text(lengths.MODEL_PATH.read_text())
    (tmp_path / "m.json").write_text(card.replace(lengths.FEATURES, "text-v0"))
    with pytest.raises(ValueError, match="rebuild it"):
        LengthPredictor(tmp_path / "m.txt")


def test_the_shipped_model_covers_held_out_answers_better_than_one_constant(
    smollm2_dir: Path,
) -> None:
    pairs = length_train.load_pairs(packaged_path(), smollm2_dir)
    test = np.array([length_train.held_out(p) for p in pairs.prompts])
    answers = pairs.answer_tokens[test]
    predictor = LengthPredictor()
    quantile = predictor.card.quantile
    bounds = predictor.bounds([p for p, t in zip(pairs.prompts, test, strict=True) if t])
    fit = length_train.fit_of(bounds, answers)
    assert len(answers) == predictor.card.held_out_pairs > 1000
    assert quantile - 0.03 <= fit.coverage <= quantile + 0.03
    # What a scheduler without a predictor can do: the training answers' same quantile.
    constant = np.quantile(pairs.answer_tokens[~test], quantile)
    flat = length_train.fit_of(np.full(answers.shape, constant), answers)
    assert fit.mean_over_tokens < flat.mean_over_tokens
