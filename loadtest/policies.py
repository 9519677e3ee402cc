"""Scheduling policies against each other on mixed SLO kinds: goodput of FCFS, shortest
predicted first, JITServe, and JITServe told the true lengths (oracle), one server at a time.

    python -m duetserve.loadtest.policies run --model models/SmolLM2-135M-Instruct \\
        --rates 3,5,7,9 --out docs/bench/policies_smollm2.json
    python -m duetserve.loadtest.policies report docs/bench/policies_smollm2.json \\
        --write docs/benchmarks.md

The workload keeps the true lengths from the server: ShareGPT first questions through the chat
endpoint (the model's own chat template), every request the same `max_tokens` and no
ignore_eos, so each answer ends where the model ends it. Requests are seeded (seed = index), so
an answer's length is the same under every policy; the oracle run sends each request the length
its answer had under FCFS (`duet.expected_output_tokens`). SLO kinds in equal thirds, in turn:
latency (TTFT and TPOT, the server's defaults), deadline (the whole answer), compound (three
calls in a row sharing one deadline from the first's arrival). Each rate is one Poisson run of
`--requests` requests, drawn afresh per rate and the same for every policy.

Goodput both ways (JITServe's): requests that met their SLO per second, and their prompt +
output tokens per second.
"""

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from duetserve.loadtest import arrivals
from duetserve.loadtest.autotune import token_counter
from duetserve.loadtest.bench_report import write_section
from duetserve.loadtest.length_train import held_out
from duetserve.loadtest.metrics import summarize
from duetserve.loadtest.modes_live import add_stack_arguments, serving
from duetserve.loadtest.sharegpt import sharegpt
from duetserve.loadtest.spec import RequestResult, RequestSpec, SloSpec
from duetserve.loadtest.sweep import Target, measure
from duetserve.loadtest.workloads import CountTokens, assign_arrivals

POLICIES = ("fcfs", "spf", "jitserve", "jitserve-oracle")
LATENCY = SloSpec("latency", ttft_ms=1000.0, tpot_ms=100.0)  # the server's default SLO
GROUP_SIZE = 3
SHAREGPT_DRAWS = 15_000  # of the package's 15,292 usable conversations


@dataclass(slots=True)
class Point:
    rate: float
    attainment: float
    goodput: float  # requests that met their SLO, per second
    token_goodput: float  # their prompt + output tokens, per second
    by_kind: dict[str, float]  # attainment of each SLO kind
    failed: int
    mean_output_tokens: float


@dataclass(slots=True)
class PolicyRun:
    machine: str
    started: str
    command: str
    model: str
    requests: int
    max_tokens: int
    deadline_ms: float
    group_deadline_ms: float
    policies: dict[str, list[Point]] = field(default_factory=dict)


def workload(
    model: Path, n: int, rate: float, seed: int, args: argparse.Namespace
) -> list[RequestSpec]:
    """`n` ShareGPT questions at `rate`, a third of each SLO kind, all with one max_tokens;
    only questions the length predictor was not trained on (its held-out fifth)."""
    specs = slo_workload(
        token_counter(model), n, rate, seed, args.deadline_ms, args.group_deadline_ms
    )
    return [replace(s, output_tokens=args.max_tokens) for s in specs]


def slo_workload(
    count_tokens: CountTokens | None,
    n: int,
    rate: float,
    seed: int,
    deadline_ms: float,
    group_deadline_ms: float,
    repeat: bool = False,
) -> list[RequestSpec]:
    """The workload with each request's output_tokens its reference answer's length (where
    the simulator ends it; a live run asks every request for one max_tokens instead). With
    `repeat`, more requests than there are held-out questions (~3,000) ask them again."""
    drawn = sharegpt(None, min(8 * n, SHAREGPT_DRAWS), seed, count_tokens)
    questions = [s for s in drawn if isinstance(s.prompt, str) and held_out(s.prompt.strip())]
    if len(questions) < n and not repeat:
        raise ValueError(f"only {len(questions)} held-out ShareGPT questions among {len(drawn)}")
    specs = [questions[i % len(questions)] for i in range(n)]
    deadline = SloSpec("deadline", deadline_ms=deadline_ms)
    out = []
    for i, spec in enumerate(specs):
        kind = i % 3
        if kind == 0:
            slo = LATENCY
        elif kind == 1:
            slo = deadline
        else:  # the compound thirds, GROUP_SIZE in a row by arrival form one group
            group = i // 3 // GROUP_SIZE
            slo = SloSpec("compound", deadline_ms=group_deadline_ms, group=f"g{seed}-{group}")
            slo = replace(slo, group_size=_group_members(n, group))
        out.append(replace(spec, index=i, slo=slo, seed=i))
    return assign_arrivals(out, arrivals.poisson(rate, n, seed))


def _group_members(n: int, group: int) -> int:
    """How many of the compound requests (every third, from index 2) fall in `group`."""
    compound = len(range(2, n, 3))
    return min(GROUP_SIZE, compound - group * GROUP_SIZE)


def run_policy(
    policy: str, model: Path, args: argparse.Namespace, oracle: dict[float, dict[int, int]]
) -> list[Point]:
    name = "jitserve" if policy == "jitserve-oracle" else policy
    env = {
        "DUET_MODEL": str(model.resolve()),
        "DUET_POLICY": name,
        "DUET_DEFAULT_TTFT_MS": str(LATENCY.ttft_ms),
        "DUET_DEFAULT_TPOT_MS": str(LATENCY.tpot_ms),
    }
    points = []
    with serving(env, args.var_dir / policy, args.port, args.ready_timeout_s) as url:
        for number, rate in enumerate(args.rates):
            specs = workload(model, args.requests, rate, args.seed + number, args)
            if policy == "jitserve-oracle":
                lengths = oracle[rate]
                specs = [replace(s, expected_output_tokens=lengths.get(s.index)) for s in specs]
            target = Target(
                url,
                model.name,
                endpoint="chat",
                force_length=False,
                progress=False,
                duration_limit_s=args.requests / rate + args.drain_timeout_s,
                drain_timeout_s=args.drain_timeout_s,
            )
            measured = asyncio.run(measure(target, specs))
            if policy == "fcfs":
                oracle[rate] = {r.spec.index: r.output_tokens for r in measured.results if r.ok}
            points.append(point(rate, measured.results, measured.duration_s))
            print(f"{policy} @ {rate:g} req/s: {_line(points[-1])}", flush=True)
            time.sleep(args.pause_s)
    return points


def point(rate: float, results: list[RequestResult], duration_s: float) -> Point:
    summary = summarize(results, duration_s)
    by_kind = {}
    for kind in ("latency", "deadline", "compound"):
        mine = [r for r in results if r.spec.slo is not None and r.spec.slo.kind == kind]
        if mine:
            by_kind[kind] = summarize(mine, duration_s).slo_attainment  # a group is all compound
    outputs = [r.output_tokens for r in results if r.ok]
    return Point(
        rate,
        summary.slo_attainment,
        summary.goodput,
        summary.token_goodput,
        by_kind,
        summary.failed,
        sum(outputs) / max(len(outputs), 1),
    )


def _line(p: Point) -> str:
    kinds = ", ".join(f"{k} {v:.0%}" for k, v in p.by_kind.items())
    return (
        f"{p.attainment:.1%} within SLO ({kinds}); goodput {p.goodput:.2f} req/s, "
        f"{p.token_goodput:.0f} tok/s; {p.failed} failed; mean answer {p.mean_output_tokens:.0f}"
    )


def run(args: argparse.Namespace) -> PolicyRun:
    model = args.model
    result = PolicyRun(
        machine=f"{platform.machine()}, {_cores()} cores",
        started=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        command="python -m duetserve.loadtest.policies " + " ".join(args.argv),
        model=model.name,
        requests=args.requests,
        max_tokens=args.max_tokens,
        deadline_ms=args.deadline_ms,
        group_deadline_ms=args.group_deadline_ms,
    )
    oracle: dict[float, dict[int, int]] = {}
    for policy in args.policies:  # fcfs first: the oracle's lengths are its answers'
        result.policies[policy] = run_policy(policy, model, args, oracle)
        args.out.write_text(json.dumps(asdict(result), indent=1) + "\n")
    return result


def _cores() -> int:
    return len(os.sched_getaffinity(0))


def report(run: PolicyRun) -> str:
    policies = list(run.policies)
    rates = [p.rate for p in run.policies[policies[0]]]
    head = "| req/s | " + " | ".join(policies) + " |"
    lines = [head, "|---|" + "---|" * len(policies)]
    for i, rate in enumerate(rates):
        cells = []
        for policy in policies:
            p = run.policies[policy][i]
            kinds = " / ".join(
                f"{p.by_kind.get(k, 0):.0%}" for k in ("latency", "deadline", "compound")
            )
            cells.append(
                f"{p.attainment:.0%} ({kinds}); {p.goodput:.2f} req/s, {p.token_goodput:.0f} tok/s"
            )
        lines.append(f"| {rate:g} | " + " | ".join(cells) + " |")
    answers = [p.mean_output_tokens for p in run.policies[policies[0]]]
    intro = (
        f"Measured {run.started} on {run.machine}; {run.model}, {run.requests} requests a rate "
        f"(held-out ShareGPT questions, chat endpoint, max_tokens {run.max_tokens} for all, "
        f"answers ending at EOS: {min(answers):.0f}-{max(answers):.0f} tokens on average). "
        f"SLOs in thirds: latency TTFT <= {LATENCY.ttft_ms:g} ms and TPOT <= {LATENCY.tpot_ms:g} "
        f"ms; deadline {run.deadline_ms / 1000:g} s; compound, {GROUP_SIZE} calls sharing "
        f"{run.group_deadline_ms / 1000:g} s. Command: `{run.command}`.\n\n"
        "Each cell: attainment (latency / deadline / compound); goodput in requests and in "
        "tokens per second."
    )
    return intro + "\n\n" + "\n".join(lines)


def plot_goodput(
    curves: dict[str, list[tuple[float, float, float]]], path: Path, title: str
) -> Path:
    """Goodput (requests per second that met their SLO) and attainment against the offered
    rate, one line per policy; `curves`: policy -> [(rate, goodput, attainment)]."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4))
    FigureCanvasAgg(figure)
    goodput, attainment = figure.subplots(1, 2)
    for policy, points in curves.items():
        rates = [p[0] for p in points]
        goodput.plot(rates, [p[1] for p in points], marker="o", label=policy)
        attainment.plot(rates, [100 * p[2] for p in points], marker="o", label=policy)
    goodput.set_ylabel("goodput (req/s within SLO)")
    attainment.set_ylabel("SLO attainment (%)")
    for axes in (goodput, attainment):
        axes.set_xlabel("offered rate (req/s)")
        axes.grid(alpha=0.3)
    goodput.legend()
    figure.suptitle(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    go = sub.add_parser("run")
    add_stack_arguments(go, port=8321, var_dir="/tmp/duet-policies", drain_timeout_s=60.0)
    go.add_argument("--policies", type=lambda s: s.split(","), default=list(POLICIES))
    go.add_argument("--rates", type=lambda s: [float(x) for x in s.split(",")], required=True)
    go.add_argument("--requests", type=int, default=150)
    go.add_argument("--max-tokens", type=int, default=512)
    go.add_argument("--deadline-ms", type=float, default=10_000.0)
    go.add_argument("--group-deadline-ms", type=float, default=20_000.0)
    show = sub.add_parser("report")
    show.add_argument("json", type=Path)
    show.add_argument("--write", type=Path, default=None)
    show.add_argument("--plot", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.command == "run":
        args.argv = sys.argv[1:] if argv is None else argv
        if "fcfs" not in args.policies[:1] and "jitserve-oracle" in args.policies:
            parser.error("jitserve-oracle needs fcfs first (its lengths are FCFS's answers')")
        text = report(run(args))
    else:
        data = json.loads(args.json.read_text())
        policies = {k: [Point(**p) for p in v] for k, v in data.pop("policies").items()}
        text = report(PolicyRun(**data, policies=policies))
        if args.plot is not None:
            curves = {
                k: [(p.rate, p.goodput, p.attainment) for p in v] for k, v in policies.items()
            }
            plot_goodput(curves, args.plot, f"Policies live: {data['model']}, {data['machine']}")
            where = args.write.parent if args.write is not None else Path.cwd()
            text += f"\n\n![goodput against rate]({os.path.relpath(args.plot, where)})"
        if args.write is not None:
            write_section(args.write, "policies", "Scheduling policies on mixed SLO kinds", text)
    print(text)


if __name__ == "__main__":
    main()
