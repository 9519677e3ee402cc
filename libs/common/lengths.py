"""How long an answer will be, before it is written (JITServe): a conservative upper bound of a
prompt's output tokens, and its refinement as the tokens come.

The bound is a quantile regression (LightGBM's `quantile` objective, the 0.95 quantile unless the
model's card says otherwise) over features of the prompt's TEXT, calibrated (split conformal) so
that it covers that share of unseen answers, trained offline on ShareGPT prompt/answer pairs by
`python -m duetserve.loadtest.length_train` (`make length-model`), which writes LightGBM's text
model and a card (what it was trained on, its calibration offset, its coverage on held-out
pairs) beside this file. It predicts log1p(tokens); a quantile of log1p(tokens) is log1p of
the same quantile of tokens, and the log keeps the long tail from dominating the fit.

Features are of the text, not of token ids, so ingress (which holds the text) predicts, and one
model serves every tokenizer; its unit is tokens of the tokenizer it was trained with (the
card's `tokenizer`), within ~15% of any other BPE's count for English text.

Refinement (`remaining_tokens`): while the answer is shorter than its bound, what remains is
the bound minus what was produced; once it reaches the bound, the bound doubles (an answer past
its p95 is in the long tail, where the length so far is the best guide to the rest), and never
passes max_tokens. The scheduler refines a request's estimate each time its policy ranks
requests, from the output count it knows then.
"""

import json
import math
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
MODEL_PATH = HERE / "length_model.txt"  # its card: the same name with .json
FEATURES = "text-v1"  # the feature set below; a model trained on another one is refused
WORD_BUCKETS = 256  # words hashed into this many counts
_WORD = re.compile(r"[a-z0-9']+")
_LIST_ITEM = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s", re.MULTILINE)
_DENSE = 11  # features before the word counts
NUM_FEATURES = _DENSE + WORD_BUCKETS


def prompt_features(text: str) -> np.ndarray:
    """The predictor's view of a prompt: its size and shape, then word counts by hash."""
    # features: [NUM_FEATURES] float32
    features = np.zeros(NUM_FEATURES, dtype=np.float32)
    lowered = text.lower()
    words = _WORD.findall(lowered)
    chars = max(len(text), 1)
    features[0] = math.log1p(len(text))
    features[1] = math.log1p(len(words))
    features[2] = text.count("\n")
    features[3] = text.count("?")
    features[4] = text.count("```")
    features[5] = text.count("{") + text.count("}") + text.count(";")
    features[6] = sum(c.isdigit() for c in text) / chars
    features[7] = sum(c.isupper() for c in text) / chars
    features[8] = len(_LIST_ITEM.findall(text))
    features[9] = sum(not c.isascii() for c in text) / chars
    features[10] = lowered.count("http")
    for word in words:  # crc32, not hash(): the same bucket in every process
        features[_DENSE + zlib.crc32(word.encode()) % WORD_BUCKETS] += 1.0
    return features


def remaining_tokens(bound: int, produced: int, max_tokens: int) -> int:
    """Output tokens still to come for a request predicted at `bound` that has `produced`
    (module docstring: the bound doubles once reached, capped at max_tokens); at least 1 while
    it runs."""
    bound = min(bound, max_tokens)
    while bound <= produced and bound < max_tokens:
        bound = min(2 * bound, max_tokens)
    return max(bound - produced, 1)


@dataclass(frozen=True, slots=True)
class LengthCard:
    """What a length model was trained on and how well it bounds held-out answers."""

    features: str
    quantile: float
    tokenizer: str
    trained_pairs: int
    held_out_pairs: int
    coverage: float  # share of held-out answers at or under their bound
    mean_over_tokens: float  # mean (bound - answer) over the covered held-out answers
    log_offset: float  # added to the trees' log1p(tokens): the calibration (length_train.py)

    @classmethod
    def read(cls, path: Path) -> "LengthCard":
        data = json.loads(path.read_text())
        return cls(**{name: data[name] for name in cls.__dataclass_fields__})


class LengthPredictor:
    """Output-length bounds from a LightGBM text model (never a pickle)."""

    def __init__(self, model_path: Path = MODEL_PATH) -> None:
        import lightgbm  # here: its import (with scipy) takes ~0.3 s, paid only where it predicts

        self.card = LengthCard.read(model_path.with_suffix(".json"))
        if self.card.features != FEATURES:
            raise ValueError(
                f"{model_path} was trained on features {self.card.features!r}, these are "
                f"{FEATURES!r}: rebuild it (make length-model)"
            )
        self._booster = lightgbm.Booster(model_file=str(model_path))
        if self._booster.num_feature() != NUM_FEATURES:
            raise ValueError(f"{model_path} expects {self._booster.num_feature()} features")

    def predict_tokens(self, features: np.ndarray) -> np.ndarray:
        """Bounds, unrounded and uncapped, for rows of features ([N, NUM_FEATURES])."""
        log_tokens = np.asarray(self._booster.predict(features, num_threads=1))
        return np.expm1(np.maximum(log_tokens + self.card.log_offset, 0.0))

    def bound(self, text: str, max_tokens: int, min_tokens: int = 0) -> int:
        """The bound of one prompt's answer, within [max(1, min_tokens), max_tokens]."""
        tokens = float(self.predict_tokens(prompt_features(text)[None, :])[0])
        return max(1, min_tokens, min(max_tokens, math.ceil(tokens)))

    def bounds(self, texts: Sequence[str]) -> np.ndarray:
        """Bounds of many prompts at once, uncapped (for evaluation)."""
        return self.predict_tokens(np.stack([prompt_features(t) for t in texts]))
