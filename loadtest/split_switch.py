"""How long a compute-split change takes and what it costs a unit under load.

    python -m duetserve.loadtest.split_switch --splits 0.7,0.3,0.5 --hold-s 6 \\
        --concurrency 16 --output-tokens 400 --tokenizer models/small

Keeps `--concurrency` long streamed requests decoding against a Duet server (a closed loop of
fixed-size requests, each with its own prompt), publishes each split on the unit's compute
subject after `--hold-s` seconds of the previous one, and reports per split:
- switch time: from the publish to each worker's report that it applied its part (the
  worker finishes the iteration in hand first);
- the unit's output token rate over the `--window-s` before the switch, the lowest rate of
  any `--bin-s` bin in the `--window-s` after it (the dip), and the rate once it settled
  (from `--window-s` after the switch to the next one);
- failed requests over the whole run (a switch must fail none).
"""

import argparse
import asyncio
import itertools
import time
from dataclasses import dataclass

import nats
import numpy as np
from nats.aio.msg import Msg

from duetserve.loadtest.client import fetch_model, run_requests
from duetserve.loadtest.spec import RequestResult
from duetserve.loadtest.text import token_counter
from duetserve.loadtest.workloads import fixed
from duetserve.proto.codec import decode, encode
from duetserve.proto.compute import (
    ComputeShareApplied,
    SetComputeSplit,
    compute_applied_subject,
    compute_split_subject,
)


@dataclass(frozen=True, slots=True)
class SwitchReport:
    split: float
    published_s: float  # on the load's clock
    switch_ms: dict[str, float]  # role -> publish to applied report
    backend: str
    rate_before: float  # output tokens/s
    dip_rate: float
    rate_after: float


def token_rate(times: np.ndarray, start: float, end: float) -> float:
    if end <= start:
        return float("nan")
    return float(((times >= start) & (times < end)).sum() / (end - start))


def lowest_bin_rate(times: np.ndarray, start: float, end: float, bin_s: float) -> float:
    edges = np.arange(start, end + 1e-9, bin_s)
    return min(token_rate(times, a, b) for a, b in itertools.pairwise(edges))


async def measure(args: argparse.Namespace) -> tuple[list[SwitchReport], list[RequestResult]]:
    model = args.model or await fetch_model(args.base_url)
    count = token_counter(args.tokenizer) if args.tokenizer else None
    total_s = args.hold_s * (len(args.splits) + 1)
    specs = fixed(args.max_requests, args.prompt_tokens, args.output_tokens, 0, count)
    client = await nats.connect(args.nats_url)
    applied: list[tuple[float, ComputeShareApplied]] = []

    async def on_applied(msg: Msg) -> None:
        applied.append((time.monotonic(), decode(msg.data, ComputeShareApplied)))

    await client.subscribe(compute_applied_subject(args.unit), cb=on_applied)
    started = time.monotonic()
    load = asyncio.create_task(
        run_requests(
            args.base_url,
            model,
            specs,
            max_concurrency=args.concurrency,
            duration_limit_s=total_s,
            drain_timeout_s=120,
            progress=False,
        )
    )
    published: list[tuple[float, int, float]] = []
    for sequence, split in enumerate(args.splits, start=args.first_sequence):
        await asyncio.sleep(args.hold_s)
        message = SetComputeSplit(split, sequence, "split_switch benchmark")
        published.append((time.monotonic(), sequence, split))
        await client.publish(compute_split_subject(args.unit), encode(message))
    results = await load
    await client.close()
    times = np.array(sorted(t for r in results for t in r.token_times_s))
    reports = []
    for index, (at, sequence, split) in enumerate(published):
        moment = at - started
        following = published[index + 1][0] - started if index + 1 < len(published) else total_s
        answers = [(t, a) for t, a in applied if a.sequence == sequence]
        reports.append(
            SwitchReport(
                split,
                moment,
                {a.role: 1000 * (t - at) for t, a in answers},
                answers[0][1].backend if answers else "-",
                token_rate(times, moment - args.window_s, moment),
                lowest_bin_rate(times, moment, moment + args.window_s, args.bin_s),
                token_rate(times, moment + args.window_s, following),
            )
        )
    return reports, results


def format_reports(reports: list[SwitchReport], results: list[RequestResult]) -> str:
    lines = [
        "| split (prefill) | backend | switch, prefill (ms) | switch, decode (ms) | "
        "tok/s before | lowest bin after | tok/s settled |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        prefill = r.switch_ms.get("prefill", float("nan"))
        decode_ms = r.switch_ms.get("decode", float("nan"))
        lines.append(
            f"| {r.split:.2f} | {r.backend} | {prefill:.1f} | {decode_ms:.1f} | "
            f"{r.rate_before:.1f} | {r.dip_rate:.1f} | {r.rate_after:.1f} |"
        )
    failed = sum(1 for r in results if r.error is not None)
    lines.append(f"\n{len(results)} requests, {failed} failed")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m duetserve.loadtest.split_switch",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--nats-url", default="nats://127.0.0.1:4222")
    parser.add_argument("--unit", default="unit0")
    parser.add_argument("--model", help="model name (default: the first of /models)")
    parser.add_argument("--tokenizer", help="model directory to count prompt tokens with")
    parser.add_argument(
        "--splits",
        type=lambda text: [float(v) for v in text.split(",")],
        default=[0.7, 0.3, 0.5],
        help="prefill shares to publish, in order",
    )
    parser.add_argument("--first-sequence", type=int, default=1000)
    parser.add_argument("--hold-s", type=float, default=6.0, help="seconds per split")
    parser.add_argument("--window-s", type=float, default=1.5)
    parser.add_argument("--bin-s", type=float, default=0.25)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-requests", type=int, default=400, help="bound on requests")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--output-tokens", type=int, default=400)
    args = parser.parse_args()
    reports, results = asyncio.run(measure(args))
    print(format_reports(reports, results))


if __name__ == "__main__":
    main()
