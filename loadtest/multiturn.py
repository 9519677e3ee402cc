"""Multi-turn conversations under preemption by swap, live: does a conversation's KV that is
still in the host tier come back without being copied or computed again (FastSwitch)?

    python -m duetserve.loadtest.multiturn run --kv-cache-mb 64 --host-kv-mb 512 \\
        --conversations 24 --turns 4 --rate 0.5 --out docs/bench/multiturn_smollm2.json
    python -m duetserve.loadtest.multiturn report docs/bench/multiturn_smollm2.json \\
        --write docs/benchmarks.md

Multi-round ShareGPT dialogues (their human turns, each with the recorded answer as history
for the next), conversations starting as a Poisson process, each turn sent when the previous
one's answer is in; answers end at EOS under one max_tokens. The KV pool is too small for the
load, so decoding requests are preempted (by swap, to the host tier). Twice, the same turns:
with the host tier's prefix index (`DUET_HOST_CACHE_SHARE`, its default) and without it
(0: a swapped request's host blocks go back when it ends). Reported: the host tier's blocks
(copied out by swaps, not copied because the host tier held them, loaded back for a later
turn), the prompt tokens not computed, TTFT of first and later turns, TPOT.
"""

import argparse
import asyncio
import json
import os
import platform
import re
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from duetserve.loadtest import arrivals
from duetserve.loadtest.autotune import token_counter
from duetserve.loadtest.bench_report import write_section
from duetserve.loadtest.client import run_requests
from duetserve.loadtest.metrics import tpot_ms, ttft_ms
from duetserve.loadtest.modes_live import add_stack_arguments, serving
from duetserve.loadtest.sharegpt import packaged_path, read_dialogues
from duetserve.loadtest.spec import RequestSpec
from duetserve.loadtest.text import CountTokens

WAYS = {"host index": "0.5", "no host index": "0"}  # DUET_HOST_CACHE_SHARE
MAX_TURN_TOKENS = 384  # a human turn or a recorded answer longer than this: dialogue skipped
MAX_DIALOGUE_TOKENS = 1536  # the whole conversation, every turn included


@dataclass(slots=True)
class WayRun:
    turns: int
    failed: int
    ttft_first_ms: dict[str, float]  # first turns
    ttft_later_ms: dict[str, float]  # turns after the first
    tpot_ms: dict[str, float]
    metrics: dict[str, float]  # from /metrics at the end


@dataclass(slots=True)
class MultiTurnRun:
    machine: str
    started: str
    command: str
    model: str
    kv_cache_mb: float
    host_kv_mb: float
    conversations: int
    turns: int
    rate: float
    max_tokens: int
    ways: dict[str, WayRun] = field(default_factory=dict)


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    return {f"p{q}": float(np.percentile(values, q)) for q in (50, 90, 99)}


def workload(
    conversations: int, turns: int, rate: float, max_tokens: int, seed: int, count: CountTokens
) -> tuple[list[RequestSpec], dict[int, int]]:
    """The turns of `conversations` dialogues with at least `turns` exchanges (their first
    `turns`), as chat requests; and each spec's turn number (0: the first)."""
    dialogues = read_dialogues(packaged_path())
    order = np.random.default_rng(seed).permutation(len(dialogues))
    chosen = []
    for i in order:
        exchanges = dialogues[i][:turns]
        if len(exchanges) < turns:
            continue
        sizes = [count(text) for exchange in exchanges for text in exchange]
        if max(sizes) > MAX_TURN_TOKENS or sum(sizes) > MAX_DIALOGUE_TOKENS or min(sizes) < 2:
            continue
        chosen.append(exchanges)
        if len(chosen) == conversations:
            break
    if len(chosen) < conversations:
        raise ValueError(f"only {len(chosen)} usable dialogues of {turns} turns")
    starts = arrivals.poisson(rate, conversations, seed)
    specs: list[RequestSpec] = []
    turn_of: dict[int, int] = {}
    for chat, (exchanges, start) in enumerate(zip(chosen, starts, strict=True)):
        history: list[dict[str, str]] = []
        for turn, (question, answer) in enumerate(exchanges):
            messages = [*history, {"role": "user", "content": question}]
            tokens = sum(count(m["content"]) for m in messages)
            spec = RequestSpec(
                len(specs), messages, tokens, max_tokens, start, conversation=f"chat-{chat}"
            )
            turn_of[spec.index] = turn
            specs.append(spec)
            history = [*messages, {"role": "assistant", "content": answer}]
    return specs, turn_of


_METRICS = {
    "preemptions": r"^duet_scheduler_preemptions ([0-9.e+]+)$",
    "swaps_out": r'^duet_scheduler_swaps\{direction="out"\} ([0-9.e+]+)$',
    "blocks_swapped": r'^duet_kv_host_tier_blocks\{kind="swapped"\} ([0-9.e+]+)$',
    "blocks_kept": r'^duet_kv_host_tier_blocks\{kind="kept"\} ([0-9.e+]+)$',
    "blocks_loaded": r'^duet_kv_host_tier_blocks\{kind="loaded"\} ([0-9.e+]+)$',
    "prompt_tokens": r'^duet_ingress_tokens_total\{kind="prompt"\} ([0-9.e+]+)$',
    "cached_tokens": r'^duet_ingress_tokens_total\{kind="cached"\} ([0-9.e+]+)$',
}


def scrape(base_url: str) -> dict[str, float]:
    root = base_url.rsplit("/v1", 1)[0]
    with urllib.request.urlopen(f"{root}/metrics", timeout=10) as response:
        text = response.read().decode()
    out = {}
    for name, pattern in _METRICS.items():
        found = re.search(pattern, text, re.M)
        out[name] = float(found.group(1)) if found else float("nan")
    return out


def run(args: argparse.Namespace) -> MultiTurnRun:
    result = MultiTurnRun(
        machine=f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores",
        started=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        command="python -m duetserve.loadtest.multiturn " + " ".join(args.argv),
        model=args.model.name,
        kv_cache_mb=args.kv_cache_mb,
        host_kv_mb=args.host_kv_mb,
        conversations=args.conversations,
        turns=args.turns,
        rate=args.rate,
        max_tokens=args.max_tokens,
    )
    count = token_counter(args.model)
    specs, turn_of = workload(
        args.conversations, args.turns, args.rate, args.max_tokens, args.seed, count
    )
    for way in args.ways:
        env = {
            "DUET_MODEL": str(args.model.resolve()),
            "DUET_KV_CACHE_MB": str(args.kv_cache_mb),
            "DUET_HOST_KV_MB": str(args.host_kv_mb),
            "DUET_HOST_CACHE_SHARE": WAYS[way],
        }
        var_dir = args.var_dir / way.replace(" ", "-")
        with serving(env, var_dir, args.port, args.ready_timeout_s) as url:
            results = asyncio.run(
                run_requests(
                    url,
                    args.model.name,
                    specs,
                    endpoint="chat",
                    force_length=False,
                    send_duet_slo=False,
                    drain_timeout_s=args.drain_timeout_s,
                    progress=False,
                )
            )
            metrics = scrape(url)
        ok = [r for r in results if r.ok]
        first = [v for r in ok if turn_of[r.spec.index] == 0 and (v := ttft_ms(r)) is not None]
        later = [v for r in ok if turn_of[r.spec.index] > 0 and (v := ttft_ms(r)) is not None]
        result.ways[way] = WayRun(
            turns=len(results),
            failed=len(results) - len(ok),
            ttft_first_ms=_percentiles(first),
            ttft_later_ms=_percentiles(later),
            tpot_ms=_percentiles([v for r in ok if (v := tpot_ms(r)) is not None]),
            metrics=metrics,
        )
        print(f"{way}: {json.dumps(asdict(result.ways[way]))}", flush=True)
        args.out.write_text(json.dumps(asdict(result), indent=1) + "\n")
        time.sleep(args.pause_s)
    return result


def read(path: Path) -> MultiTurnRun:
    data = json.loads(path.read_text())
    ways = {name: WayRun(**w) for name, w in data.pop("ways").items()}
    return MultiTurnRun(**data, ways=ways)


def report(run: MultiTurnRun) -> str:
    lines = [
        "| run | turns (failed) | swaps out | blocks copied out / not copied again / loaded "
        "back | prompt tokens not computed | TTFT p50 / p99, first turns | later turns "
        "| TPOT p50 / p99 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for way, w in run.ways.items():
        m = w.metrics
        cached = m["cached_tokens"] / max(m["prompt_tokens"], 1)
        lines.append(
            f"| {way} | {w.turns} ({w.failed}) | {m['swaps_out']:.0f} | "
            f"{m['blocks_swapped']:.0f} / {m['blocks_kept']:.0f} / {m['blocks_loaded']:.0f} | "
            f"{m['cached_tokens']:.0f} ({cached:.0%}) | "
            f"{w.ttft_first_ms.get('p50', 0):.0f} / {w.ttft_first_ms.get('p99', 0):.0f} ms | "
            f"{w.ttft_later_ms.get('p50', 0):.0f} / {w.ttft_later_ms.get('p99', 0):.0f} ms | "
            f"{w.tpot_ms.get('p50', 0):.0f} / {w.tpot_ms.get('p99', 0):.0f} ms |"
        )
    intro = (
        f"Measured {run.started} on {run.machine}; {run.model}, a KV pool of "
        f"{run.kv_cache_mb:g} MiB (too small for the load: decoding requests are preempted, "
        f"by swap), host tier {run.host_kv_mb:g} MiB. {run.conversations} multi-round "
        f"ShareGPT dialogues of {run.turns} turns (the recorded answers as history), starting "
        f"at {run.rate:g}/s (Poisson), each turn sent when the previous answer is in; chat, "
        f"max_tokens {run.max_tokens}, answers ending at EOS; the same turns both ways. "
        f"Command: `{run.command}`."
    )
    return intro + "\n\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    go = sub.add_parser("run")
    add_stack_arguments(go, port=8324, var_dir="/tmp/duet-multiturn", drain_timeout_s=180.0)
    go.add_argument("--ways", type=lambda s: s.split(","), default=list(WAYS))
    go.add_argument("--kv-cache-mb", type=float, default=64.0)
    go.add_argument("--host-kv-mb", type=float, default=512.0)
    go.add_argument("--conversations", type=int, default=24)
    go.add_argument("--turns", type=int, default=4)
    go.add_argument("--rate", type=float, default=0.5)
    go.add_argument("--max-tokens", type=int, default=128)
    show = sub.add_parser("report")
    show.add_argument("json", type=Path)
    show.add_argument("--write", type=Path, default=None)
    show.add_argument("--plot", type=Path, default=None, help="p50/p90/p99 bars, each way")
    args = parser.parse_args(argv)
    if args.command == "run":
        args.argv = sys.argv[1:] if argv is None else argv
        print(report(run(args)))
        return
    result = read(args.json)
    text = report(result)
    if args.plot is not None:
        from duetserve.loadtest.plots import way_plot_link

        text += way_plot_link(
            result.ways,
            ("ttft_first_ms", "ttft_later_ms", "tpot_ms"),
            "Multi-turn conversations with and without the host index",
            args.plot,
            args.write,
        )
    if args.write is not None:
        write_section(args.write, "multiturn", "Multi-turn conversations and the host tier", text)
    print(text)


if __name__ == "__main__":
    main()
