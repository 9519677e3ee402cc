"""Would a cross-encoder second stage let the semantic cache meet its false-hit target? An
experiment, not a served component: all-MiniLM-L6-v2 fine-tuned to read both queries together
(BERT's sentence-pair input, a linear head on [CLS]) and say whether they want the same answer.

It trains on the frozen pairs' tuning split only (both orders of each pair), scores the tuning
split out of fold (five folds by intent, so no intent is scored by a model that saw it) to
choose each category's cut as `semantic_eval` chooses thresholds (the loosest at which at most
one tuning near miss passes), and measures the test split at those cuts, with and without the
vetoes, above a cosine floor. It also reports the best the scores could do: each category's cut
chosen on the test split itself at 1% false hits (an upper bound no tuning can beat).

    python -m duetserve.loadtest.semantic_crossenc --json docs/bench/semantic_crossenc.json

Needs transformers (the test extra); about ten minutes on two cores.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from duetserve.loadtest import semantic_eval as ev
from duetserve.runtime.embedding import SentenceEncoder, bundled_model_dir
from duetserve.services.cache_index.semantic_categories import Categories

FOLDS = 5
BATCH = 16
COSINE_FLOOR = 0.6  # candidates: what the embedding index would return at all
TARGET_FALSE_HITS = 0.01


class _PairModel(torch.nn.Module):
    def __init__(self, model_dir: Path) -> None:
        from transformers import AutoTokenizer, BertModel

        super().__init__()
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.bert = BertModel.from_pretrained(model_dir, add_pooling_layer=False)
        self.head = torch.nn.Linear(self.bert.config.hidden_size, 1)

    def forward(self, a: Sequence[str], b: Sequence[str]) -> torch.Tensor:
        x = self.tokenizer(
            list(a), list(b), padding=True, truncation=True, max_length=96, return_tensors="pt"
        )
        return self.head(self.bert(**x).last_hidden_state[:, 0]).squeeze(-1)


def _train(pairs: list[dict[str, Any]], epochs: int, lr: float, seed: int) -> _PairModel:
    torch.manual_seed(seed)
    model = _PairModel(bundled_model_dir())
    data = [(p["a"], p["b"], float(p["label"] == "paraphrase")) for p in pairs]
    data += [(b, a, y) for a, b, y in data]
    steps = epochs * -(-len(data) // BATCH)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * max(0.0, 1 - s / steps)
    )
    rng = np.random.default_rng(seed)
    model.train()
    for _ in range(epochs):
        order = rng.permutation(len(data))
        for lo in range(0, len(order), BATCH):
            batch = [data[j] for j in order[lo : lo + BATCH]]
            logits = model([x[0] for x in batch], [x[1] for x in batch])
            target = torch.tensor([x[2] for x in batch])
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    return model


@torch.no_grad()
def _score(model: _PairModel, pairs: list[dict[str, Any]]) -> np.ndarray:
    """The probability that the two want the same answer, averaged over both orders."""
    out: list[float] = []
    for lo in range(0, len(pairs), 64):
        chunk = pairs[lo : lo + 64]
        a, b = [p["a"] for p in chunk], [p["b"] for p in chunk]
        out += ((torch.sigmoid(model(a, b)) + torch.sigmoid(model(b, a))) / 2).tolist()
    return np.array(out)


def auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """The chance that a random positive outscores a random negative (ties count half)."""
    if not len(positive) or not len(negative):
        return float("nan")
    diff = positive[:, None] - negative[None, :]
    return float((diff > 0).mean() + 0.5 * (diff == 0).mean())


def tuned_cut(negative_scores: np.ndarray, allowed: int) -> float:
    """The lowest cut (pass: score > cut) that at most `allowed` of these near misses pass."""
    ranked = np.sort(negative_scores)[::-1]
    return float(ranked[allowed]) if len(ranked) > allowed else 0.0


def evaluate(rows: list[ev.Scored], scores: np.ndarray) -> dict[str, Any]:
    """Per category of the test split: recall and false hits at cuts tuned on the out-of-fold
    tuning scores (by the asker's category, as the cache holds each query to its category),
    and at a cut chosen on the test split itself at TARGET_FALSE_HITS (the upper bound)."""
    y = np.array([r.label == "paraphrase" for r in rows])
    cosine = np.array([r.cosine for r in rows])
    vetoed = np.array([r.vetoed for r in rows])
    assigned = np.array([r.assigned for r in rows])
    own = np.array([r.category for r in rows])
    test = np.array([r.split == "test" for r in rows])
    out: dict[str, Any] = {
        "auc_test": auc(scores[test & y], scores[test & ~y]),
        "auc_tune_out_of_fold": auc(scores[~test & y], scores[~test & ~y]),
        "categories": {},
    }
    for use_vetoes in (True, False):
        candidate = (cosine >= COSINE_FLOOR) & (~vetoed if use_vetoes else True)
        cuts = {
            c: tuned_cut(scores[~test & (assigned == c) & candidate & ~y], ev.TUNE_MAX_FALSE_HITS)
            for c in sorted(set(assigned))
        }
        passed = candidate & (scores > np.array([cuts[c] for c in assigned]))
        for c in sorted(set(own)):
            mine = test & (own == c)
            near = mine & ~y
            allowed = int(TARGET_FALSE_HITS * near.sum())
            best = tuned_cut(scores[near & candidate], allowed)
            bound = mine & candidate & (scores > best)
            key = "with_vetoes" if use_vetoes else "without_vetoes"
            out["categories"].setdefault(c, {})[key] = {
                "recall": float((passed & mine & y).sum() / (mine & y).sum()),
                "false_hits": float((passed & near).sum() / near.sum()),
                "bound_recall_at_1pct": float((bound & y).sum() / (mine & y).sum()),
            }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=3e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    started = time.perf_counter()
    encoder = SentenceEncoder(dtype=torch.float32)
    rows = ev.score_pairs(encoder, Categories.load(encoder))
    pairs = json.loads(ev.PAIRS.read_text())["pairs"]
    tune = [i for i, p in enumerate(pairs) if p["split"] == "tune"]
    test = [i for i, p in enumerate(pairs) if p["split"] == "test"]
    intents = sorted({pairs[i]["intent"] for i in tune})
    np.random.default_rng(args.seed).shuffle(intents)
    scores = np.zeros(len(pairs))
    for fold in range(FOLDS):
        held = set(intents[fold::FOLDS])
        model = _train(
            [pairs[i] for i in tune if pairs[i]["intent"] not in held],
            args.epochs,
            args.lr,
            args.seed,
        )
        scored = [i for i in tune if pairs[i]["intent"] in held]
        scores[scored] = _score(model, [pairs[i] for i in scored])
        print(f"fold {fold}: {time.perf_counter() - started:.0f} s", flush=True)
    model = _train([pairs[i] for i in tune], args.epochs, args.lr, args.seed)
    scores[test] = _score(model, [pairs[i] for i in test])
    result = evaluate(rows, scores)
    print(
        f"AUC test {result['auc_test']:.3f},"
        f" tuning out of fold {result['auc_tune_out_of_fold']:.3f}"
    )
    for c, row in result["categories"].items():
        for key, r in row.items():
            print(
                f"{c:>9} {key:>14}: recall {r['recall']:.1%} false hits {r['false_hits']:.2%}"
                f"; best cut on test at 1%: recall {r['bound_recall_at_1pct']:.1%}"
            )
    if args.json:
        out = {
            "command": "python -m duetserve.loadtest.semantic_crossenc --json " + args.json,
            "machine": platform.machine(),
            "epochs": args.epochs,
            "lr": args.lr,
            "seed": args.seed,
            "cosine_floor": COSINE_FLOOR,
            "seconds": round(time.perf_counter() - started),
            **result,
        }
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
