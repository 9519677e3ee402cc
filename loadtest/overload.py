"""Overload: the stack at multiples of a rate it sustains, and what admission makes of it.

    python -m duetserve.loadtest.overload --base-rate 1 --multiples 1,2,5,10 \\
        --write docs/reliability.md

One stack (the launcher, as `make run` starts it, on a free port) takes, in turn, a Poisson
load of ShareGPT-like requests at each multiple of `--base-rate` (a rate it holds at 90%
attainment: docs/benchmarks.md). Every request carries the default latency SLO. For each
multiple: requests sent; refused with 429 (each must carry Retry-After: the stack's tests
check that); admitted; the admitted ones' attainment (the share meeting their SLO: the target
is >= 90% at every multiple); failed otherwise; hung (still running when the drain timeout
ran out: must be 0). Bounded: `--requests` per multiple and a time limit; it stops by itself.
"""

import argparse
import asyncio
import os
import platform
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from duetserve.common.nats_server import free_port
from duetserve.loadtest.arrivals import poisson
from duetserve.loadtest.bench_report import write_section
from duetserve.loadtest.client import CANCELLED, fetch_model, run_requests
from duetserve.loadtest.faults import RELIABILITY_HEADER
from duetserve.loadtest.metrics import attainment_flags
from duetserve.loadtest.servers import running_server
from duetserve.loadtest.spec import RequestResult, SloSpec
from duetserve.loadtest.workloads import assign_arrivals, sharegpt_like, with_slo

TTFT_MS, TPOT_MS = 1000.0, 100.0  # ingress's default SLO
REFUSED = "HTTP 429"


@dataclass(frozen=True, slots=True)
class OverloadRow:
    multiple: float
    rate: float
    sent: int
    refused: int
    admitted: int
    attained: int  # of the admitted
    failed: int  # admitted, then ended with an error
    hung: int

    @property
    def attainment(self) -> float | None:
        return self.attained / self.admitted if self.admitted else None


def tally(multiple: float, rate: float, results: Sequence[RequestResult]) -> OverloadRow:
    slo = SloSpec("latency", ttft_ms=TTFT_MS, tpot_ms=TPOT_MS)
    flags = attainment_flags(results, slo)
    refused = [r for r in results if r.error is not None and r.error.startswith(REFUSED)]
    hung = [r for r in results if r.error == CANCELLED]
    admitted = [(r, f) for r, f in zip(results, flags, strict=True) if r not in refused]
    failed = [r for r, _ in admitted if r.error is not None and r not in hung]
    return OverloadRow(
        multiple,
        rate,
        sent=len(results),
        refused=len(refused),
        admitted=len(admitted),
        attained=sum(f for _, f in admitted),
        failed=len(failed),
        hung=len(hung),
    )


async def one_load(
    base_url: str, rate: float, requests: int, seed: int, limit_s: float
) -> list[RequestResult]:
    model = await fetch_model(base_url)
    specs = sharegpt_like(requests, seed=seed)
    specs = with_slo(specs, SloSpec("latency", ttft_ms=TTFT_MS, tpot_ms=TPOT_MS))
    specs = assign_arrivals(specs, poisson(rate, len(specs), seed))
    return await run_requests(
        base_url,
        model,
        specs,
        duration_limit_s=limit_s,
        drain_timeout_s=120.0,
        progress=False,
    )


def run(
    base_rate: float,
    multiples: Sequence[float],
    requests: int,
    env: dict[str, str],
    log: Path,
) -> list[OverloadRow]:
    port = free_port()
    rows = []
    with tempfile.TemporaryDirectory() as var:
        environment = {
            **os.environ,
            "DUET_PORT": str(port),
            "DUET_NATS_PORT": "0",
            "DUET_VAR_DIR": var,
            **env,
        }
        command = [sys.executable, "-m", "duetserve.services.launcher"]
        base_url = f"http://127.0.0.1:{port}/v1"
        with running_server(command, environment, log, f"{base_url}/models", 600):
            for number, multiple in enumerate(multiples):
                rate = base_rate * multiple
                limit_s = requests / rate + 30
                results = asyncio.run(one_load(base_url, rate, requests, number, limit_s))
                rows.append(tally(multiple, rate, results))
                print(_line(rows[-1]), flush=True)
    return rows


def _line(r: OverloadRow) -> str:
    share = "-" if r.attainment is None else f"{100 * r.attainment:.0f}%"
    return (
        f"{r.multiple:g}x ({r.rate:g} req/s): sent {r.sent}, refused {r.refused}, admitted "
        f"{r.admitted}, of which within SLO {r.attained} ({share}), failed {r.failed}, "
        f"hung {r.hung}"
    )


def markdown(rows: Sequence[OverloadRow], base_rate: float, requests: int, command: str) -> str:
    lines = [
        f"Machine: {platform.machine()}, {os.cpu_count()} cores; the default stack "
        f"(the launcher's default model and configuration); {requests} ShareGPT-like "
        f"requests per load, Poisson arrivals, each with the default SLO (TTFT "
        f"{TTFT_MS:g} ms, TPOT {TPOT_MS:g} ms); {base_rate:g} req/s is the base rate. "
        "Regenerate with:",
        "",
        f"    {command}",
        "",
        "| load | rate (req/s) | sent | refused (429 + Retry-After) | admitted | "
        "admitted within SLO | failed | **hung** |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        share = "-" if r.attainment is None else f"{100 * r.attainment:.0f}%"
        lines.append(
            f"| {r.multiple:g}x | {r.rate:g} | {r.sent} | {r.refused} | {r.admitted} | "
            f"{r.attained} ({share}) | {r.failed} | **{r.hung}** |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-rate", type=float, required=True, help="req/s it sustains")
    parser.add_argument("--multiples", default="1,2,5,10")
    parser.add_argument("--requests", type=int, default=100, help="per load")
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE for the stack")
    parser.add_argument("--log", type=Path, default=Path(".var/overload/launcher.log"))
    parser.add_argument("--write", type=Path, default=None, help="update this report")
    args = parser.parse_args(argv)
    env = dict(item.split("=", 1) for item in args.env)
    multiples = [float(m) for m in args.multiples.split(",")]
    rows = run(args.base_rate, multiples, args.requests, env, args.log)
    if args.write is not None:
        command = (
            f"python -m duetserve.loadtest.overload --base-rate {args.base_rate:g} "
            f"--multiples {args.multiples} --requests {args.requests} --write {args.write}"
        )
        body = markdown(rows, args.base_rate, args.requests, command)
        title = "Overload: refused cleanly, the admitted served"
        write_section(args.write, "overload", title, body, RELIABILITY_HEADER)
    return 0 if all(r.hung == 0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
