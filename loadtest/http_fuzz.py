"""HTTP fuzzing: ingress's OpenAPI document turned into requests, valid and invalid, against
the whole stack; every answer checked.

    python -m duetserve.loadtest.http_fuzz --cases 10000 --write docs/reliability.md
                                                                          (make fuzz-http)

One stack (the launcher, as `make run` starts it, on a free port) serves a tiny generated
model with a short context, so that a valid request costs a few tokens at most. The cases
(http_fuzz_cases.py) go out `--concurrency` at a time. Every answer must hold to the API's
contract:

- never a 5xx, except a 503 that carries Retry-After; a 429 carries Retry-After too;
- every error (4xx, 503) is OpenAI's shape, {"error": {"message", "type", "param", "code"}};
- every success is the documented body, and a stream is `data:` events of the documented
  chunks (or one error event), ending with `data: [DONE]`;
- every request is answered within `--timeout-s` (a hang is a failure).

Afterwards no service has restarted or died (the launcher's children are the same processes)
and a greedy completion answers what it answered before the fuzzing. Bounded in count and
time, loopback only; it stops by itself.
"""

import argparse
import asyncio
import json
import os
import platform
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from duetserve.common.nats_server import free_port
from duetserve.common.processes import launcher_children
from duetserve.loadtest.bench_report import write_section
from duetserve.loadtest.faults import RELIABILITY_HEADER
from duetserve.loadtest.http_fuzz_cases import VALID, FuzzCase, schema_cases, written_cases
from duetserve.loadtest.servers import running_server
from duetserve.runtime.generator.spec import PRESETS

# The tiny model with a context of a few dozen tokens: no valid request generates many.
FUZZ_MODEL = PRESETS["tiny"].with_(name="fuzz", max_context_len=32)
GREEDY = {
    "prompt": "The quick brown fox jumps over the lazy dog",
    "max_tokens": 8,
    "temperature": 0,
}
HANG = "hang"


@dataclass
class FuzzTally:
    """What the run sent and what came back."""

    cases: Counter[tuple[str, str]] = field(default_factory=Counter)  # (route, kind)
    statuses: Counter[tuple[str, str]] = field(default_factory=Counter)  # (route, status)
    failures: list[str] = field(default_factory=list)  # one line per broken answer
    server_errors: int = 0  # 500s, and 5xx that are not a 503 with Retry-After
    hangs: int = 0
    elapsed_s: float = 0.0
    # Why requests were turned away or could not be served: (status, error code) of each
    # 429 and 503, from its body.
    refusals: Counter[tuple[int, str]] = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return sum(self.cases.values())


class ResponseChecker:
    """The contract of one answer, from the OpenAPI document."""

    def __init__(self, document: dict[str, Any]) -> None:
        from jsonschema import Draft202012Validator

        self._paths = document["paths"]
        components = {"components": document["components"]}

        def validator(name: str) -> Any:
            return Draft202012Validator({"$ref": f"#/components/schemas/{name}", **components})

        self._validators = {name: validator(name) for name in document["components"]["schemas"]}

    def problems(
        self, case: FuzzCase, status: int, headers: dict[str, str], body: bytes
    ) -> list[str]:
        if status >= 500 and not (status == 503 and "Retry-After" in headers):
            return [f"{status} without being a 503 with Retry-After"]
        if status in (429, 503) and "Retry-After" not in headers:
            return [f"{status} without Retry-After"]
        content_type = headers.get("Content-Type", "").split(";")[0]
        if status >= 400:
            name = "Health" if case.path == "/health" and status == 503 else "Error"
            return self._json_problems(name, body)
        operation = self._paths.get(case.path, {}).get(case.method.lower())
        if status != 200 or operation is None:
            return [f"unexpected {status} for {case.method} {case.path}"]
        content = operation["responses"]["200"]["content"]
        if content_type not in content:
            return [f"200 as {content_type!r}, documented {sorted(content)}"]
        if content_type == "text/event-stream":
            return self._stream_problems(case.path, body)
        if content_type == "application/json":
            return self._json_problems(content[content_type]["schema"].get("$ref", ""), body)
        return []

    def _json_problems(self, ref: str, body: bytes) -> list[str]:
        name = ref.rsplit("/", 1)[-1]
        try:
            payload = json.loads(body)
        except ValueError:
            return [f"not JSON where {name} was due: {body[:80]!r}"]
        if name not in self._validators:
            return []
        return [f"{name}: {e.message[:160]}" for e in self._validators[name].iter_errors(payload)]

    def _stream_problems(self, path: str, body: bytes) -> list[str]:
        chunk = "ChatCompletionChunk" if "chat" in path else "Completion"
        events = [e for e in body.decode("utf-8", "replace").split("\n\n") if e.strip()]
        if not events or events[-1] != "data: [DONE]":
            return [f"stream does not end with [DONE]: {body[-80:]!r}"]
        problems: list[str] = []
        for event in events[:-1]:
            if not event.startswith("data: "):
                return [f"not an SSE data event: {event[:80]!r}"]
            data = event.removeprefix("data: ").encode()
            name = "Error" if b'"error"' in data[:10] else chunk
            problems += self._json_problems(name, data)
        return problems


async def send_all(
    base_url: str,
    cases: Sequence[FuzzCase],
    checker: ResponseChecker,
    concurrency: int,
    timeout_s: float,
) -> FuzzTally:
    tally, queue = FuzzTally(), iter(cases)
    started = time.monotonic()
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(base_url, timeout=timeout) as session:

        async def worker() -> None:
            for case in queue:
                await _send_one(session, case, checker, tally)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    tally.elapsed_s = time.monotonic() - started
    return tally


async def _send_one(
    session: aiohttp.ClientSession, case: FuzzCase, checker: ResponseChecker, tally: FuzzTally
) -> None:
    tally.cases[case.route, case.kind] += 1
    try:
        async with session.request(
            case.method, case.path, data=case.body, headers=case.headers, params=case.query
        ) as response:
            body = await response.read()
            status, headers = response.status, dict(response.headers)
    except TimeoutError:
        tally.hangs += 1
        tally.statuses[case.route, HANG] += 1
        tally.failures.append(f"{case.method} {case.path}: no answer; {_shown(case)}")
        return
    except aiohttp.ClientError as err:  # the server cut the connection or broke the stream
        tally.statuses[case.route, "cut"] += 1
        tally.failures.append(f"{case.method} {case.path}: {err!r}; {_shown(case)}")
        return
    tally.statuses[case.route, str(status)] += 1
    if status in (429, 503):
        tally.refusals[status, _error_code(body)] += 1
    problems = checker.problems(case, status, headers, body)
    if status >= 500 and problems:
        tally.server_errors += 1
    for problem in problems:
        tally.failures.append(f"{case.method} {case.path} -> {status}: {problem}; {_shown(case)}")


def _error_code(body: bytes) -> str:
    try:
        return str(json.loads(body)["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return "(no error code)"


def _shown(case: FuzzCase) -> str:
    body = case.body or b""
    more = f"... ({len(body)} bytes)" if len(body) > 200 else ""
    return f"headers {case.headers}, body {body[:200]!r}{more}"


def fuzz_cases(document: dict[str, Any], model_id: str, count: int, seed: int) -> list[FuzzCase]:
    """About `count` cases: the written ones, the rest drawn from the schema, split evenly
    between the generation routes' valid and invalid bodies."""
    written = written_cases(model_id, random.Random(seed))
    per_operation = max(1, (count - len(written)) // 4)
    cases = schema_cases(document, per_operation, seed) + written
    random.Random(seed).shuffle(cases)  # valid and invalid interleaved
    return cases


async def greedy_text(base_url: str, model_id: str) -> str:
    async with aiohttp.ClientSession() as session:
        body = {**GREEDY, "model": model_id}
        async with session.post(f"{base_url}/v1/completions", json=body) as response:
            answer = await response.json()
            if response.status != 200:
                return f"HTTP {response.status}: {answer}"
            return str(answer["choices"][0]["text"])


async def fetch_document(base_url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, session.get(f"{base_url}/openapi.json") as got:
        document: dict[str, Any] = await got.json()
        return document


@dataclass(frozen=True, slots=True)
class FuzzRun:
    tally: FuzzTally
    restarted: list[str]  # services whose process is not the one from before
    answers_as_before: bool


def run_fuzz(
    base_url: str, launcher_pid: int, model_id: str, count: int, seed: int, concurrency: int = 4
) -> FuzzRun:
    """Fuzz the stack at `base_url`, then check it serves as before."""
    before_pids = launcher_children(launcher_pid)
    before_text = asyncio.run(greedy_text(base_url, model_id))
    document = asyncio.run(fetch_document(base_url))
    cases = fuzz_cases(document, model_id, count, seed)
    checker = ResponseChecker(document)
    tally = asyncio.run(send_all(base_url, cases, checker, concurrency, timeout_s=60.0))
    after_pids = launcher_children(launcher_pid)
    restarted = sorted(n for n, pid in before_pids.items() if after_pids.get(n) != pid)
    answers_as_before = asyncio.run(greedy_text(base_url, model_id)) == before_text
    return FuzzRun(tally, restarted, answers_as_before)


@contextmanager
def fuzz_stack(var_dir: Path, env: dict[str, str], log: Path) -> Iterator[tuple[str, int, str]]:
    """The launcher serving the fuzz model: (base URL, launcher pid, model id)."""
    from duetserve.runtime.generator.build import write_model

    model_dir = write_model(FUZZ_MODEL, var_dir / "model", progress=lambda _: None)
    port = free_port()
    environment = {
        **os.environ,
        "DUET_MODEL": str(model_dir),
        "DUET_PORT": str(port),
        "DUET_NATS_PORT": "0",
        "DUET_VAR_DIR": str(var_dir / "var"),
        "DUET_KV_CACHE_MB": "64",
        **env,
    }
    base_url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "duetserve.services.launcher"]
    with running_server(command, environment, log, f"{base_url}/health", 300) as process:
        yield base_url, process.pid, model_dir.name


def markdown(run: FuzzRun, command: str, seed: int) -> str:
    tally = run.tally
    routes = sorted({route for route, _ in tally.cases})
    statuses = sorted({status for _, status in tally.statuses}, key=lambda s: (len(s), s))
    lines = [
        f"Machine: {platform.machine()}, {os.cpu_count()} cores; the launcher's default "
        f"configuration serving a tiny generated model (context {FUZZ_MODEL.max_context_len} "
        f"tokens); {tally.total} requests (seed {seed}) in {tally.elapsed_s:.0f} s. Valid: "
        "drawn by schemathesis from /openapi.json; invalid: schemathesis's negative cases plus "
        "written ones (not JSON, not UTF-8, nested 100,000 deep, wrong content types and "
        "methods, huge strings and numbers, unpaired surrogates). Regenerate with:",
        "",
        f"    {command}",
        "",
        "| route | valid | invalid | " + " | ".join(statuses) + " |",
        "|---|---|---|" + "---|" * len(statuses),
    ]
    for route in routes:
        counts = " | ".join(str(tally.statuses[route, s]) for s in statuses)
        valid, invalid = tally.cases[route, VALID], tally.cases[route, "invalid"]
        lines.append(f"| `{route}` | {valid} | {invalid} | {counts} |")
    lines += [
        "",
        f"- cases run: **{tally.total}**",
        f"- 500s (any 5xx but a 503 with Retry-After): **{tally.server_errors}**",
        f"- answers off the contract (shape, headers, schema): **{len(tally.failures)}**",
        f"- hangs (no answer in 60 s): **{tally.hangs}**",
        f"- crashes (services restarted or gone): **{len(run.restarted)}**",
        f"- the same greedy answer afterwards: **{'yes' if run.answers_as_before else 'no'}**",
    ]
    if tally.refusals:
        why = ", ".join(f"{n} x {s} `{code}`" for (s, code), n in tally.refusals.most_common())
        lines.append(f"- the 429s and 503s (each with Retry-After), by error code: {why}")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE for the stack")
    parser.add_argument("--log", type=Path, default=Path(".var/http_fuzz/launcher.log"))
    parser.add_argument("--keep", type=Path, default=None, help="keep model and logs here")
    parser.add_argument("--write", type=Path, default=None, help="update this report")
    args = parser.parse_args(argv)
    env = dict(item.split("=", 1) for item in args.env)
    with tempfile.TemporaryDirectory() as temporary:
        var = args.keep or Path(temporary)
        with fuzz_stack(var, env, args.log) as stack:
            run = run_fuzz(*stack, args.cases, args.seed, args.concurrency)
    print(f"greedy answer as before: {run.answers_as_before}; restarted: {run.restarted}")
    for line in run.tally.failures[:50]:
        print(line, flush=True)
    command = f"python -m duetserve.loadtest.http_fuzz --cases {args.cases} --seed {args.seed}"
    if args.write is not None:
        command += f" --write {args.write}"
    report = markdown(run, command, args.seed)
    print(report)
    if args.write is not None:
        write_section(args.write, "http_fuzz", "HTTP fuzzing", report, RELIABILITY_HEADER)
    clean = not run.tally.failures and not run.restarted and run.answers_as_before
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
