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

With `--replace decode` (or prefill) it moves no split: it asks the unit's kv_manager for a
replacement of that worker every `--hold-s` seconds, the path a cuda-mps split change takes
(and a rolling restart), and reports per replacement the start-up (request to the replacement
serving), the hand-over (announcement to the old worker's report), the requests handed over,
and the same three token rates around it.

    python -m duetserve.loadtest.split_switch --replace decode --replacements 2 --hold-s 20 \
        --concurrency 16 --output-tokens 400 --tokenizer models/small
"""

import argparse
import asyncio
import itertools
import time
from dataclasses import dataclass
from pathlib import Path

import nats
import numpy as np
from nats.aio.msg import Msg

from duetserve.common.health import query_health
from duetserve.common.nats_auth import operator_url
from duetserve.common.nats_bus import Bus
from duetserve.loadtest.client import fetch_model, run_requests
from duetserve.loadtest.spec import RequestResult, RequestSpec
from duetserve.loadtest.text import token_counter
from duetserve.loadtest.workloads import fixed
from duetserve.proto.codec import decode, encode
from duetserve.proto.common import ErrorReply, HealthReply
from duetserve.proto.compute import (
    ComputeShareApplied,
    HandedOver,
    HandOverReady,
    SetComputeSplit,
    compute_applied_subject,
    compute_split_subject,
    handover_subject,
)
from duetserve.services.unit_worker.handover import request_replacement


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


def start_load(
    args: argparse.Namespace, model: str, specs: list[RequestSpec], total_s: float
) -> "asyncio.Task[list[RequestResult]]":
    """The closed loop of long requests the switches happen under, running from now on."""
    return asyncio.create_task(
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
    load = start_load(args, model, specs, total_s)
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


@dataclass(frozen=True, slots=True)
class ReplaceReport:
    requested_s: float  # on the load's clock
    startup_ms: float  # request to the replacement announcing it serves
    handover_ms: float  # the old worker's hand-over, as it reported it
    handed_over: int
    preempted: int
    rate_before: float
    dip_rate: float  # the lowest bin from the request to a window after the hand-over
    rate_after: float


async def measure_replacements(
    args: argparse.Namespace,
) -> tuple[list[ReplaceReport], list[RequestResult]]:
    model = args.model or await fetch_model(args.base_url)
    count = token_counter(args.tokenizer) if args.tokenizer else None
    total_s = args.hold_s * (args.replacements + 1)
    specs = fixed(args.max_requests, args.prompt_tokens, args.output_tokens, 0, count)
    bus = await Bus.connect(args.nats_url, "split-switch")
    seen: list[tuple[float, HandOverReady | HandedOver]] = []

    async def on_handover(msg: Msg) -> None:
        seen.append((time.monotonic(), decode(msg.data, HandOverReady, HandedOver)))

    await bus.subscribe(handover_subject(args.unit), on_handover)
    started = time.monotonic()
    load = start_load(args, model, specs, total_s)
    service = f"{args.replace}_worker"
    requested: list[tuple[float, str]] = []
    for _ in range(args.replacements):
        await asyncio.sleep(args.hold_s)
        reply = (await query_health(bus, [service], timeout=2.0))[service]
        if not isinstance(reply, HealthReply):
            raise RuntimeError(f"no {service} answers: {reply}")
        requested.append((time.monotonic(), reply.instance))
        answer = await request_replacement(
            bus, args.unit, args.replace, reply.instance, {}, "split_switch benchmark"
        )
        if isinstance(answer, ErrorReply):
            raise RuntimeError(f"no replacement: {answer.message}")
    results = await load
    await bus.close()
    times = np.array(sorted(t for r in results for t in r.token_times_s))
    reports = []
    for index, (at, old) in enumerate(requested):
        ready = [t for t, m in seen if isinstance(m, HandOverReady) and m.replaces == old]
        done = [(t, m) for t, m in seen if isinstance(m, HandedOver) and m.instance == old]
        if not ready or not done:
            raise RuntimeError(f"{old} was not replaced within the run")
        done_at, report = done[0]
        moment, end = at - started, done_at - started
        following = requested[index + 1][0] - started if index + 1 < len(requested) else total_s
        reports.append(
            ReplaceReport(
                moment,
                1000 * (ready[0] - at),
                1000 * report.seconds,
                report.handed_over,
                report.preempted,
                token_rate(times, moment - args.window_s, moment),
                lowest_bin_rate(times, moment, end + args.window_s, args.bin_s),
                token_rate(times, end + args.window_s, following),
            )
        )
    return reports, results


def format_replacements(reports: list[ReplaceReport], results: list[RequestResult]) -> str:
    lines = [
        "| at (s) | start-up (ms) | hand-over (ms) | handed over | preempted | tok/s before | "
        "lowest bin | tok/s settled |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        lines.append(
            f"| {r.requested_s:.1f} | {r.startup_ms:,.0f} | {r.handover_ms:.1f} | "
            f"{r.handed_over} | {r.preempted} | {r.rate_before:.1f} | {r.dip_rate:.1f} | "
            f"{r.rate_after:.1f} |"
        )
    failed = sum(1 for r in results if r.error is not None)
    lines.append(f"\n{len(results)} requests, {failed} failed")
    return "\n".join(lines)


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
    parser.add_argument(
        "--credentials",
        type=Path,
        default=Path(".var/credentials"),
        help="the stack's NATS credentials (used as its operator when the directory exists)",
    )
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
    parser.add_argument(
        "--replace",
        choices=("prefill", "decode"),
        help="replace this worker instead of moving the split (the cuda-mps path)",
    )
    parser.add_argument("--replacements", type=int, default=2)
    args = parser.parse_args()
    if args.credentials.is_dir():
        args.nats_url = operator_url(args.nats_url, args.credentials)
    if args.replace is not None:
        replaced, results = asyncio.run(measure_replacements(args))
        print(format_replacements(replaced, results))
        return
    reports, results = asyncio.run(measure(args))
    print(format_reports(reports, results))


if __name__ == "__main__":
    main()
