"""The fault suite: the stack under a steady load while, in turn, one of its processes dies,
freezes or loses NATS; what became of every request, and of every KV block.

    python -m duetserve.loadtest.faults --write docs/reliability.md     (make faults)

One stack (the launcher, as `make run` starts it, with DUET_KV_POISON=1 so that a block written
while free is counted) serves every fault of the run, the launcher's own SIGKILL last. First an
undisturbed pass over the load's requests records each one's answer (seeded, EOS ignored: the
reference). Then for each fault: `clients` clients send those requests back to back for
`duration_s`; the fault strikes `fault_at_s` in; a prober sends a short request every 0.25 s
from then until one is answered. Afterwards every request is one of:

- completed: answered in full (and compared with its reference answer);
- failed: ended with an error that says why (an HTTP error in OpenAI's shape);
- hung: no answer within `hang_s` (this must never happen).

"In flight" are those sent before the fault and still running when it struck. Leaked blocks
are block references still held (by anything but the prefix cache) once the load has ended and
settled; stale writes, blocks written while free (kv_manager's poison check); records left,
requests the scheduler still holds once settled (each one a request it would wait on for
ever). Streams asked again counts the streams ingress asked the producers for again during the
fault, having found token batches lost on the bus (duet_ingress_token_replays_total, causes
gap and lost_batch).

Bounded in count and time, loopback only; it stops by itself.
"""

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from duetserve.common.nats_auth import operator_url
from duetserve.common.nats_bus import Bus
from duetserve.common.nats_server import free_port
from duetserve.common.processes import launcher_children, running
from duetserve.loadtest.bench_report import write_section
from duetserve.proto import kv, subjects
from duetserve.proto.codec import decode, encode
from duetserve.proto.scheduling import SchedulerStats, SchedulerStatsQuery

SERVICES = ("kv_manager", "cache_index", "scheduler", "prefill_worker", "decode_worker", "ingress")
PROMPTS = (
    "The history of the lighthouse on the northern cape",
    "A recipe for bread, written by a sailor",
    "Notes on the migration of birds over the mountains",
    "A letter from a clockmaker to her apprentice",
)
RELIABILITY_HEADER = (
    "# Reliability\n\nEach section is written by the benchmark it names; regenerate it with "
    "its command.\n"
)
LEASE_S = 5.0  # kv_manager's default lease: a freeze must outlast it
RETRY_AFTER_S = 0.5  # a client's pause after a failed request


@dataclass(frozen=True, slots=True)
class Fault:
    name: str
    what: str
    # (pids of the stack's processes by name) -> strikes; returns when the fault has struck
    strike: Callable[[dict[str, int]], None]
    target: str = ""  # the process it strikes (absent in some modes: the fault is skipped)


def _kill(target: str) -> Callable[[dict[str, int]], None]:
    def strike(pids: dict[str, int]) -> None:
        os.kill(pids[target], signal.SIGKILL)

    return strike


def _freeze(target: str, for_s: float) -> Callable[[dict[str, int]], None]:
    def strike(pids: dict[str, int]) -> None:
        os.kill(pids[target], signal.SIGSTOP)
        time.sleep(for_s)
        with contextlib.suppress(ProcessLookupError):  # kv_manager may have stopped it
            os.kill(pids[target], signal.SIGCONT)

    return strike


FAULTS = (
    Fault(
        "kill-decode-worker",
        "SIGKILL of the decode worker",
        _kill("decode_worker"),
        "decode_worker",
    ),
    Fault(
        "kill-prefill-worker",
        "SIGKILL of the prefill worker",
        _kill("prefill_worker"),
        "prefill_worker",
    ),
    Fault("kill-scheduler", "SIGKILL of the scheduler", _kill("scheduler"), "scheduler"),
    Fault("kill-kv-manager", "SIGKILL of kv_manager", _kill("kv_manager"), "kv_manager"),
    Fault("kill-cache-index", "SIGKILL of the cache index", _kill("cache_index"), "cache_index"),
    Fault("kill-nats-server", "SIGKILL of nats-server", _kill("nats-server"), "nats-server"),
    Fault(
        "stop-decode-worker",
        f"SIGSTOP of the decode worker for {2 * LEASE_S:g} s (past its lease), then SIGCONT",
        _freeze("decode_worker", 2 * LEASE_S),
        "decode_worker",
    ),
    Fault(
        "stop-prefill-worker",
        f"SIGSTOP of the prefill worker for {2 * LEASE_S:g} s (past its lease), then SIGCONT",
        _freeze("prefill_worker", 2 * LEASE_S),
        "prefill_worker",
    ),
    Fault("kill-launcher", "SIGKILL of the launcher", lambda pids: None),  # done by the runner
)
FAULT_NAMES = tuple(f.name for f in FAULTS)


@dataclass(frozen=True)
class Load:
    clients: int = 4
    max_tokens: int = 48
    duration_s: float = 20.0
    fault_at_s: float = 5.0
    hang_s: float = 90.0  # an answer later than this counts as hung


@dataclass(slots=True)
class Outcome:
    key: int  # which of the load's requests (prompt and seed)
    sent: float
    ended: float = 0.0
    status: str = "hung"  # completed, failed, hung
    reason: str = ""
    text: str = ""


@dataclass(slots=True)
class FaultResult:
    fault: str
    what: str
    requests: int = 0
    in_flight: int = 0
    completed: int = 0
    in_flight_completed: int = 0
    failed: int = 0
    hung: int = 0
    equal_to_reference: int = 0  # of the completed
    differing: int = 0
    leaked_blocks: int = 0
    stale_writes: int = 0
    records_left: int = 0
    replays: int = 0
    serves_again_s: float | None = None
    orphans: list[str] = field(default_factory=list)  # kill-launcher: processes left running
    reasons: dict[str, int] = field(default_factory=dict)


class RunningStack:
    """The launcher and its children, as `make run` starts them."""

    def __init__(self, var_dir: Path, model: Path | None, env: dict[str, str]) -> None:
        self.port = free_port()
        self.var_dir = var_dir
        environment = {
            **os.environ,
            "DUET_PORT": str(self.port),
            "DUET_NATS_PORT": "0",
            "DUET_VAR_DIR": str(var_dir),
            "DUET_KV_POISON": "1",
            **env,
        }
        if model is not None:
            environment["DUET_MODEL"] = str(model)
        var_dir.mkdir(parents=True, exist_ok=True)
        self.log = (var_dir / "launcher.log").open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "duetserve.services.launcher"],
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.nats_url = ""
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.log.write(line)
            if line.startswith("NATS on "):  # the suite asks the bus as its operator
                self.nats_url = operator_url(line.split()[-1], var_dir / "credentials")
            if line.startswith("Duet is serving"):
                break
        else:
            raise RuntimeError(f"the stack did not start; see {var_dir}/logs")
        self.log.flush()
        self.base_url = f"http://127.0.0.1:{self.port}"
        # The launcher keeps logging (restarts above all): read it all, or its pipe fills.
        self._reader = threading.Thread(target=self._copy_output, daemon=True)
        self._reader.start()

    def _copy_output(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.log.write(line)
            self.log.flush()

    def pids(self) -> dict[str, int]:
        """The launcher's children by name: the services and nats-server."""
        return launcher_children(self.process.pid)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._reader.join(5)
        self.log.close()


class LoadRunner:
    def __init__(self, stack: RunningStack, model_id: str, load: Load) -> None:
        self.stack, self.model_id, self.load = stack, model_id, load

    def body(self, key: int, max_tokens: int | None = None) -> dict[str, object]:
        return {
            "model": self.model_id,
            "prompt": PROMPTS[key % len(PROMPTS)],
            "max_tokens": max_tokens or self.load.max_tokens,
            "seed": key,
            "temperature": 0.8,
            "ignore_eos": True,
        }

    async def one(self, http: aiohttp.ClientSession, key: int) -> Outcome:
        outcome = Outcome(key, time.monotonic())
        url = f"{self.stack.base_url}/v1/completions"
        try:
            async with asyncio.timeout(self.load.hang_s):
                async with http.post(url, json=self.body(key)) as response:
                    answer = await response.json(content_type=None)
            if response.status == 200:
                outcome.status, outcome.text = "completed", answer["choices"][0]["text"]
            else:
                outcome.status = "failed"
                outcome.reason = _reason(response.status, answer)
        except TimeoutError:
            outcome.status = "hung"
        except (aiohttp.ClientError, ValueError) as err:  # cut off: not an answer in shape
            outcome.status, outcome.reason = "failed", f"connection: {type(err).__name__}"
        outcome.ended = time.monotonic()
        return outcome

    async def references(self, keys: int) -> dict[int, str]:
        async with aiohttp.ClientSession() as http:
            outcomes = await asyncio.gather(*(self.one(http, k) for k in range(keys)))
        bad = [o for o in outcomes if o.status != "completed"]
        if bad:
            raise RuntimeError(f"the undisturbed pass failed: {bad[0]}")
        return {o.key: o.text for o in outcomes}

    async def under_fault(
        self, fault: Fault, keys: int
    ) -> tuple[list[Outcome], float, float | None]:
        """Outcomes of the load, when the fault struck, when the stack served again."""
        load, started = self.load, time.monotonic()
        stop_at = started + load.duration_s
        outcomes: list[Outcome] = []
        counter = iter(range(10**9))

        async def client(http: aiohttp.ClientSession) -> None:
            while time.monotonic() < stop_at:
                outcome = await self.one(http, next(counter) % keys)
                outcomes.append(outcome)
                if outcome.status != "completed":
                    await asyncio.sleep(RETRY_AFTER_S)  # as a client would, not in a hot loop

        async with aiohttp.ClientSession() as http:
            clients = [asyncio.create_task(client(http)) for _ in range(load.clients)]
            try:
                await asyncio.sleep(load.fault_at_s)
                pids = self.stack.pids()
                struck = time.monotonic()
                await asyncio.to_thread(fault.strike, pids)
                serves_again = await self.probe(http, struck, stop_at + load.hang_s)
            finally:
                await asyncio.gather(*clients)
        return outcomes, struck, serves_again

    async def probe(self, http: aiohttp.ClientSession, since: float, until: float) -> float | None:
        """Seconds from `since` until a short request is answered (None: not by `until`)."""
        url = f"{self.stack.base_url}/v1/completions"
        while time.monotonic() < until:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with asyncio.timeout(5):
                    async with http.post(url, json=self.body(0, max_tokens=2)) as response:
                        await response.read()
                        if response.status == 200:
                            return time.monotonic() - since
            await asyncio.sleep(0.25)
        return None


def _reason(status: int, answer: object) -> str:
    error = answer.get("error", {}) if isinstance(answer, dict) else {}
    message = str(error.get("message", "")) if isinstance(error, dict) else ""
    code = error.get("code") if isinstance(error, dict) else None
    return f"{status} {code or ''}: {_generic(message)}".strip()


def _generic(message: str) -> str:
    """A reason without its instance names and numbers, so that like reasons count together."""
    words = []
    for word in message.split():
        if any(ch.isdigit() for ch in word):
            word = "…"
        words.append(word)
    return " ".join(words)[:120]


async def kv_health(nats_url: str, settle_s: float) -> tuple[int, int]:
    """(block references still held by anything but the prefix cache, stale writes) once the
    references have settled (or whatever is left after `settle_s`)."""
    bus = await Bus.connect(nats_url, "fault-suite")
    leaked, stale = -1, 0
    try:
        deadline = time.monotonic() + settle_s
        while True:
            try:
                reply = await bus.request(
                    subjects.kv("unit0", "stats"), encode(kv.KvStatsQuery()), timeout=2
                )
                stats = decode(reply.data, kv.KvStats)
                held = stats.references_by_holder.items()
                leaked = sum(n for h, n in held if not h.startswith("cache_index"))
                stale = stats.stale_writes
            except Exception:  # kv_manager is starting again: ask again
                pass
            if leaked == 0 or time.monotonic() > deadline:
                if leaked > 0:  # who holds them: what the next look at a leak starts from
                    holders = {h: n for h, n in held if not h.startswith("cache_index")}
                    print(f"block references held after {settle_s:g}s: {holders}", flush=True)
                return leaked, stale
            await asyncio.sleep(0.25)
    finally:
        await bus.close()


async def scheduler_records(nats_url: str, settle_s: float) -> int:
    """Requests the scheduler still holds (queued, prefilling, decoding) once they have
    settled, or whatever it holds after `settle_s` (-1: it never answered)."""
    bus = await Bus.connect(nats_url, "fault-suite")
    left = -1
    try:
        deadline = time.monotonic() + settle_s
        while True:
            with contextlib.suppress(Exception):  # restarting: ask again
                query = encode(SchedulerStatsQuery())
                subject = subjects.sched(subjects.DEFAULT_UNIT, "stats")
                reply = await bus.request(subject, query, timeout=2)
                stats = decode(reply.data, SchedulerStats)
                left = stats.waiting + stats.prefilling + stats.decoding
            if left == 0 or time.monotonic() > deadline:
                return left
            await asyncio.sleep(0.25)
    finally:
        await bus.close()


async def token_replays(base_url: str) -> int:
    """Streams ingress has asked again for since it started, having found a token batch lost
    (a hole in a stream, a batch number skipped; not the quiet-stream watch's routine asks)."""
    async with aiohttp.ClientSession() as http, http.get(f"{base_url}/metrics") as response:
        text = await response.text()
    total = 0.0
    for line in text.splitlines():
        lost = ('cause="gap"', 'cause="lost_batch"')
        if line.startswith("duet_ingress_token_replays_total{") and any(c in line for c in lost):
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


def summarize(
    fault: Fault, outcomes: list[Outcome], struck: float, references: dict[int, str]
) -> FaultResult:
    result = FaultResult(fault.name, fault.what, requests=len(outcomes))
    reasons: Counter[str] = Counter()
    for o in outcomes:
        in_flight = o.sent < struck < o.ended or (o.status == "hung" and o.sent < struck)
        result.in_flight += in_flight
        if o.status == "completed":
            result.completed += 1
            result.in_flight_completed += in_flight
            if o.text == references[o.key]:
                result.equal_to_reference += 1
            else:
                result.differing += 1
        elif o.status == "failed":
            result.failed += 1
            reasons[o.reason] += 1
        else:
            result.hung += 1
    result.reasons = dict(reasons.most_common())
    return result


def run_suite(
    faults: Sequence[str],
    load: Load,
    var_dir: Path,
    model: Path | None,
    log: Callable[[str], None],
    env: dict[str, str] | None = None,
) -> list[FaultResult]:
    """Every fault of `faults` in turn on one stack (started with `env` added)."""
    stack = RunningStack(var_dir, model, env or {})
    results: list[FaultResult] = []
    try:
        model_id = _model_id(stack.base_url)
        runner = LoadRunner(stack, model_id, load)
        keys = 4 * load.clients
        references = asyncio.run(runner.references(keys))
        log(f"reference answers of {keys} requests recorded")
        for fault in (f for f in FAULTS if f.name in faults):
            if fault.target and fault.target not in stack.pids():
                log(f"{fault.name}: skipped, no {fault.target} runs in this mode")
                continue
            if fault.name == "kill-launcher":
                results.append(kill_launcher(stack, fault))
            else:
                replays = asyncio.run(token_replays(stack.base_url))
                outcomes, struck, again = asyncio.run(runner.under_fault(fault, keys))
                result = summarize(fault, outcomes, struck, references)
                result.serves_again_s = again
                result.leaked_blocks, result.stale_writes = asyncio.run(
                    kv_health(stack.nats_url, settle_s=20.0)
                )
                result.records_left = asyncio.run(scheduler_records(stack.nats_url, 40.0))
                result.replays = asyncio.run(token_replays(stack.base_url)) - replays
                results.append(result)
            log(_line(results[-1]))
    finally:
        stack.stop()
    return results


def kill_launcher(stack: RunningStack, fault: Fault) -> FaultResult:
    """SIGKILL of the launcher: every process it started must be gone within 10 s."""
    pids = stack.pids()
    stack.process.kill()
    stack.process.wait()
    deadline = time.monotonic() + 10
    left = dict(pids)
    while left and time.monotonic() < deadline:
        left = {name: pid for name, pid in left.items() if running(pid)}
        time.sleep(0.1)
    return FaultResult(fault.name, fault.what, orphans=sorted(left))


def _model_id(base_url: str) -> str:
    async def ask() -> str:
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{base_url}/v1/models") as response,
        ):
            return str((await response.json())["data"][0]["id"])

    return asyncio.run(ask())


def _line(r: FaultResult) -> str:
    if r.fault == "kill-launcher":
        return f"{r.fault}: orphans {r.orphans or 'none'}"
    again = "never" if r.serves_again_s is None else f"{r.serves_again_s:.1f}s"
    return (
        f"{r.fault}: {r.requests} requests, {r.in_flight} in flight; completed {r.completed} "
        f"({r.in_flight_completed} of those in flight), failed {r.failed}, hung {r.hung}; "
        f"outputs equal {r.equal_to_reference}/{r.completed}; leaked {r.leaked_blocks}, "
        f"stale writes {r.stale_writes}, records left {r.records_left}; streams asked again "
        f"{r.replays}; serving again after {again}"
        + "".join(f"\n    {n}x {why}" for why, n in r.reasons.items())
    )


def markdown(results: list[FaultResult], load: Load, command: str, model: str) -> str:
    rows = [
        "| fault | requests | in flight | completed (of in flight) | failed | **hung** | "
        "outputs equal | leaked blocks | stale writes | records left | streams asked again | "
        "serving again |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if r.fault == "kill-launcher":
            orphans = ", ".join(r.orphans) or "none"
            rows.append(f"| {r.what} | | | | | | | | | | | orphans: {orphans} |")
            continue
        again = "never" if r.serves_again_s is None else f"{r.serves_again_s:.1f} s"
        rows.append(
            f"| {r.what} | {r.requests} | {r.in_flight} | {r.completed} "
            f"({r.in_flight_completed}) | {r.failed} | **{r.hung}** | "
            f"{r.equal_to_reference}/{r.completed} | {r.leaked_blocks} | {r.stale_writes} | "
            f"{r.records_left} | {r.replays} | {again} |"
        )
    reasons = [
        f"- {r.fault}: " + "; ".join(f"{n}× `{why}`" for why, n in r.reasons.items())
        for r in results
        if r.reasons
    ]
    return "\n".join(
        [
            "Generated by `loadtest/faults.py`; do not edit by hand. Regenerate with:",
            "",
            f"    {command}",
            "",
            f"Machine: {platform.machine()}, {os.cpu_count()} cores, {platform.system()}; "
            f"served: {model}; {load.clients} clients sending seeded completions of "
            f"{load.max_tokens} tokens (EOS ignored) back to back for {load.duration_s:g} s, "
            f"the fault {load.fault_at_s:g} s in. What each column means is in the module's "
            "docstring; `hung` must be 0.",
            "",
            *rows,
            "",
            "Why the failed ones failed:",
            "",
            *(reasons or ["- none failed"]),
            "",
        ]
    )


def _print(line: str) -> None:
    print(line, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m duetserve.loadtest.faults", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--faults", default=",".join(FAULT_NAMES), help="comma-separated")
    parser.add_argument("--model", type=Path, default=None, help="default: the launcher's")
    parser.add_argument(
        "--mode", default="semi-pd", help="DUET_MODE (semi-pd, the default, runs every process)"
    )
    parser.add_argument(
        "--dtype",
        default="float32",
        help="DUET_DTYPE; float32 by default: its answers do not depend on how requests were "
        "batched, so each can be compared with its undisturbed answer",
    )
    parser.add_argument("--clients", type=int, default=Load.clients)
    parser.add_argument("--max-tokens", type=int, default=Load.max_tokens)
    parser.add_argument("--duration", type=float, default=Load.duration_s)
    parser.add_argument("--fault-at", type=float, default=Load.fault_at_s)
    parser.add_argument("--var-dir", type=Path, default=Path(".var/faults"))
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--write", type=Path, default=None, help="write this markdown report")
    args = parser.parse_args(argv)
    faults = [f.strip() for f in args.faults.split(",") if f.strip()]
    unknown = set(faults) - set(FAULT_NAMES)
    if unknown:
        parser.error(f"unknown fault(s) {sorted(unknown)}; known: {', '.join(FAULT_NAMES)}")
    load = Load(args.clients, args.max_tokens, args.duration, args.fault_at)
    # Faults, not SLOs: no request is refused for its SLO (the queue bound alone).
    env = {"DUET_MODE": args.mode, "DUET_DTYPE": args.dtype, "DUET_ADMISSION": "queue"}
    results = run_suite(faults, load, args.var_dir, args.model, _print, env)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        body = {
            "load": dataclasses.asdict(load),
            "results": [dataclasses.asdict(r) for r in results],
        }
        args.json.write_text(json.dumps(body, indent=2) + "\n")
    if args.write is not None:
        command = "python -m duetserve.loadtest.faults " + " ".join(argv or sys.argv[1:])
        model = args.model.name if args.model else "SmolLM2-135M-Instruct (the default)"
        served = f"{model}, {args.mode}, {args.dtype}"
        report = markdown(results, load, command.strip(), served)
        write_section(args.write, "faults", "The fault suite", report, RELIABILITY_HEADER)
    bad = [r for r in results if r.hung or r.leaked_blocks or r.stale_writes or r.orphans]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
