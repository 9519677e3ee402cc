"""The semantic cache at work: what a lookup costs, and what the cache does for a workload of
ShareGPT questions asked again in other words.

    python -m duetserve.loadtest.semantic_serving lookup --out docs/bench/semantic_lookup.json
    python -m duetserve.loadtest.semantic_serving live --out docs/bench/semantic_serving.json \\
        [--write docs/benchmarks.md]

`lookup`: the cache of cache_index (semantic_service.py) filled with --entries ShareGPT
questions, asked --queries others (misses, the cost every request pays): in process, the
embedding and the search apart; and over a real nats-server as ingress asks (SemanticLookup
request/reply, the added TTFT of a miss), one at a time and --burst at once.

`live`: one stack with the cache off and one with it on (DUET_SEMANTIC_CACHE), the same
requests: first user turns of ShareGPT conversations (at most --max-chars long), each either a
new question or, with probability --repeat, one asked before: verbatim a third of the time,
else reworded the way people reword (a greeting, thanks, "can you help me with this?", other
case) by `reword`. They go as streamed chat completions at temperature 0 from --concurrency
clients. Hits are told by `x-duet-cache`; a hit is wrong when its text is no answer the model
generated for the same question (in any wording) in that run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import sqlite3
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp

from duetserve.loadtest.bench_report import write_section
from duetserve.loadtest.metrics import Percentiles
from duetserve.loadtest.modes_live import add_stack_arguments, serving
from duetserve.loadtest.sharegpt import packaged_path, read_conversations

ROOT = Path(__file__).resolve().parents[1]
SECTION_TITLE = (
    "Semantic cache served: lookup cost, hit rate and TTFT on reworded ShareGPT questions"
)
# Written with the figures; kept here so that a re-run rewrites the whole section.
NOTES = """
Measured 2026-12-06 17:15-18:42 UTC. What the figures say:

- **A lookup** costs one embedding (the query's length decides it: ShareGPT questions of up to
  300 characters take 3.2 ms p50, 9.4 ms p99 on one core) plus 0.3-0.5 ms of search, context
  filter and vetoes at 10,000 entries; over NATS, as ingress asks, **4.4 ms p50 / 10.0 ms p99**
  on an idle machine. Eight at once are embedded as one batch but still take 22 / 45 ms: the
  batch is padded to its longest question and one core does it all.
- **Added TTFT on a miss.** Ingress asks the cache while it submits the request, not before
  (services/ingress/handlers.py): the answer (or the lookup's timeout, 50 ms) is awaited only
  after the scheduler accepted the request, and a hit cancels it; a query embedded for its
  lookup is not embedded again for its insert. On this 2-core machine with both cores
  generating, first asks still start later with the cache on: **+9 ms at p50** (58.1 against
  48.9 ms in the run above; +10 ms in an earlier run of the same design). The p99 of ~120 first
  asks is their one or two slowest and moves between runs: +11 ms in that earlier run, +132 ms
  in the one above (217 against 85 ms); asked before the submit, it was +13 ms p50 and +44 ms
  p99. What is added is CPU: cache_index's embeddings run on the cores the worker generates
  on. The issue's target (<= 10 ms p99 added) holds for the lookup itself on an idle machine
  (10.0 ms) and is **not shown to hold under full load here**; on a GPU unit the embedding
  runs on a CPU the model does not use. What would close it here: embedding on a core kept
  from the workers (the compute split could reserve one), or a smaller embedder.
- **Hit rate.** A repeat can only hit when its question's earlier answer finished normally
  (only those are stored): 47 of the 78 repeats were of such questions (with max_tokens 512,
  43% of SmolLM2's answers to ShareGPT questions end by themselves), and 38 of those 47 hit
  (81%). The misses among them are rewordings that came before the first answer had finished
  (four clients at once), and rewordings vetoed or under the threshold. Of all 200 requests
  19% were answered from the cache, with **0 wrong answers** (a hit is checked against the
  answers generated and stored for the same question in the run).
- **Served from the cache**, an answer's first token comes after 12 ms (p50; 27 ms p99)
  instead of 47 ms, and the whole answer at once instead of after ~7 s of decoding; the run
  completes 13% more requests per second (0.794 against 0.702; +17% in the earlier run) with
  the same generation throughput (252-257 tokens/s): the hits are requests the unit did not
  have to generate.
- **Rewordings are synthetic** (`reword`: a greeting, thanks, "can you help me with this?",
  another case): ShareGPT holds no paraphrase pairs and no model here writes good ones. They
  are the easy kind; how the cache does on hard paraphrases and near misses is the previous
  section's measurement, and why the cache ships off by default.
- **A second-stage judge from the served model does not work**: asked whether two questions
  of the tuning split want the same answer (its log-odds of "yes" against "no", both orders),
  SmolLM2-135M separates paraphrases from near misses no better than chance (AUC 0.49 over
  the 245 tuning pairs above cosine 0.7 that no veto stops).
"""
REWORDINGS = (
    lambda q: "Hey, " + q[0].lower() + q[1:],
    lambda q: q.rstrip("?.! ") + "? Thanks in advance.",
    lambda q: "Can you help me with this? " + q,
    lambda q: "Quick question: " + q,
    lambda q: q.lower(),
    lambda q: q + " Please explain.",
)


def questions(max_chars: int) -> list[str]:
    """Distinct first user turns of ShareGPT, 20 to max_chars characters, one line each."""
    seen: dict[str, None] = {}
    for conversation in read_conversations(packaged_path()):
        text = " ".join(conversation.prompt.split())
        if 20 <= len(text) <= max_chars:
            seen.setdefault(text, None)
    return list(seen)


def reword(question: str, rng: random.Random) -> str:
    return rng.choice(REWORDINGS)(question)


@dataclass(frozen=True, slots=True)
class Ask:
    base: int  # which question (its index among the run's bases)
    text: str
    repeat: bool  # asked before (verbatim or reworded)


def workload(pool: list[str], n: int, repeat: float, seed: int) -> list[Ask]:
    rng = random.Random(seed)
    order = rng.sample(range(len(pool)), len(pool))
    asks: list[Ask] = []
    asked: list[int] = []
    for _ in range(n):
        if asked and (rng.random() < repeat or len(asked) == len(pool)):  # or all were asked
            base = rng.choice(asked)
            text = pool[base] if rng.random() < 1 / 3 else reword(pool[base], rng)
            asks.append(Ask(base, text, True))
        else:
            base = order[len(asked)]
            asked.append(base)
            asks.append(Ask(base, pool[base], False))
    return asks


# ---- lookup cost ----------------------------------------------------------------------------


def percentiles(values: list[float]) -> dict[str, float]:
    """Count, mean, p50, p90 and p99 in ms (the harness's own Percentiles); {} for none."""
    found = Percentiles.of(values)
    return {} if found is None else asdict(found)


def lookup_cost(entries: int, queries: int, burst: int, seed: int) -> dict[str, Any]:
    import torch

    from duetserve.common.nats_bus import Bus
    from duetserve.common.nats_server import NatsServer
    from duetserve.proto import codec, semantic, subjects
    from duetserve.services.cache_index.semantic_cache import Ask as CacheAsk
    from duetserve.services.cache_index.semantic_service import SemanticConfig, SemanticService

    pool = questions(300)
    rng = random.Random(seed)
    rng.shuffle(pool)
    stored, asked = pool[:entries], pool[entries : entries + queries]
    torch.set_num_threads(1)

    async def measure(url: str) -> dict[str, Any]:
        bus = await Bus.connect(url, "semantic-bench")
        service = SemanticService(bus, SemanticConfig())
        await service.start()
        cache, encoder = service.cache, service._encoder
        assert cache is not None
        started = time.perf_counter()
        for i in range(0, len(stored), 64):
            batch = stored[i : i + 64]
            for text, vector in zip(batch, encoder.encode(batch).float().numpy(), strict=True):
                cache.insert(
                    tenant="t",
                    model="m",
                    context_key="k",
                    query=text,
                    answer="x",
                    completion_tokens=1,
                    finish_reason="stop",
                    vector=vector,
                )
        fill_s = time.perf_counter() - started
        embed_ms, search_ms = [], []
        for text in asked:
            t0 = time.perf_counter()
            vector = encoder.encode([text]).float().numpy()[0]
            t1 = time.perf_counter()
            cache.lookup(CacheAsk("t", "m", "k", text, 10_000, 0.0), vector)
            t2 = time.perf_counter()
            embed_ms.append(1000 * (t1 - t0))
            search_ms.append(1000 * (t2 - t1))
        await bus.subscribe(subjects.SEMANTIC_LOOKUP, service.lookup)
        client = await Bus.connect(url, "semantic-bench-client")

        async def one(text: str) -> float:
            ask = semantic.SemanticLookup("t", "m", "k", text, 10_000, 0.0)
            t0 = time.perf_counter()
            await client.request(subjects.SEMANTIC_LOOKUP, codec.encode(ask), timeout=5)
            return 1000 * (time.perf_counter() - t0)

        for text in asked[:20]:
            await one(text)  # warm
        sequential = [await one(text) for text in asked]
        bursts: list[float] = []
        for i in range(0, len(asked) - burst + 1, burst):
            bursts += await asyncio.gather(*(one(t) for t in asked[i : i + burst]))
        await client.close()
        await service.stop()
        await bus.close()
        return {
            "entries": cache.size(),
            "fill_s": fill_s,
            "embed_ms": percentiles(embed_ms),
            "search_ms": percentiles(search_ms),
            "bus_round_trip_ms": percentiles(sequential),
            f"bus_round_trip_ms_burst_{burst}": percentiles(bursts),
        }

    with tempfile.TemporaryDirectory() as store, NatsServer(Path(store)) as server:
        return asyncio.run(measure(server.url))


# ---- live -----------------------------------------------------------------------------------


@dataclass(slots=True)
class Answer:
    base: int
    repeat: bool
    header: str | None
    text: str
    finish: str | None
    ttft_ms: float
    e2e_ms: float
    completion_tokens: int
    error: str = ""


async def chat(
    session: aiohttp.ClientSession, url: str, model: str, ask: Ask, max_tokens: int
) -> Answer:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": ask.text}],
        "temperature": 0,
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first, parts, finish, tokens = None, [], None, 0
    async with session.post(f"{url}/chat/completions", json=body) as response:
        header = response.headers.get("x-duet-cache")
        if response.status != 200:
            text = await response.text()
            return Answer(ask.base, ask.repeat, header, "", None, 0, 0, 0, text[:200])
        async for raw in response.content:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices", ()):
                content = choice["delta"].get("content")
                if content:
                    first = first or time.perf_counter()
                    parts.append(content)
                finish = choice.get("finish_reason") or finish
    end = time.perf_counter()
    ttft = 1000 * ((first or end) - start)
    return Answer(
        ask.base, ask.repeat, header, "".join(parts), finish, ttft, 1000 * (end - start), tokens
    )


async def drive(
    url: str, model: str, asks: list[Ask], concurrency: int, max_tokens: int
) -> tuple[list[Answer], float]:
    queue: asyncio.Queue[tuple[int, Ask]] = asyncio.Queue()
    for item in enumerate(asks):
        queue.put_nowait(item)
    answers: list[Answer | None] = [None] * len(asks)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)

    async def client(session: aiohttp.ClientSession) -> None:
        while not queue.empty():
            i, ask = queue.get_nowait()
            try:
                answers[i] = await chat(session, url, model, ask, max_tokens)
            except (aiohttp.ClientError, TimeoutError) as err:
                answers[i] = Answer(ask.base, ask.repeat, None, "", None, 0, 0, 0, str(err))

    started = time.perf_counter()
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
    return [a for a in answers if a is not None], time.perf_counter() - started


def stored_answers(path: Path, asks: list[Ask]) -> dict[str, set[int]]:
    """Answer text -> the questions (bases) it was stored for, from the cache's own store."""
    base_of = {ask.text: ask.base for ask in asks}
    found: dict[str, set[int]] = {}
    if path.exists():
        with contextlib.closing(sqlite3.connect(path)) as db:
            for query, answer in db.execute("SELECT query, answer FROM answers"):
                if query in base_of:
                    found.setdefault(answer, set()).add(base_of[query])
    return found


def summarize(
    answers: list[Answer], seconds: float, stored: dict[str, set[int]] | None = None
) -> dict[str, Any]:
    """`stored`: what the cache held at the end (answer -> questions). A hit is right when its
    answer was generated, or stored, for the same question (in any wording) in this run."""
    done = [a for a in answers if not a.error]
    hits = [a for a in done if a.header == "semantic"]
    generated = [a for a in done if a.header != "semantic"]
    by_text: dict[str, set[int]] = {}
    for a in generated:
        by_text.setdefault(a.text, set()).add(a.base)
    for text, bases in (stored or {}).items():
        by_text.setdefault(text, set()).update(bases)
    wrong = [a for a in hits if a.base not in by_text.get(a.text, set())]
    repeats = [a for a in done if a.repeat]

    def ttft(group: list[Answer]) -> dict[str, float]:
        return percentiles([a.ttft_ms for a in group])

    return {
        "requests": len(answers),
        "failed": len(answers) - len(done),
        "seconds": seconds,
        "requests_per_s": len(done) / seconds,
        "generated_tokens_per_s": sum(a.completion_tokens for a in generated) / seconds,
        "finished_normally": sum(a.finish == "stop" for a in generated) / max(len(generated), 1),
        "hits": len(hits),
        "hit_rate": len(hits) / max(len(done), 1),
        "hit_rate_of_repeats": sum(a.header == "semantic" for a in repeats) / max(len(repeats), 1),
        "wrong_hits": len(wrong),
        "ttft_ms_all": ttft(done),
        "ttft_ms_misses_that_looked_up": ttft([a for a in generated if not a.repeat]),
        "ttft_ms_hits": ttft(hits),
        "ttft_ms_generated": ttft(generated),
        "ttft_ms_first_asks": ttft([a for a in done if not a.repeat]),
        "e2e_ms_all": percentiles([a.e2e_ms for a in done]),
    }


def live(args: argparse.Namespace) -> dict[str, Any]:
    pool = questions(args.max_chars)
    asks = workload(pool, args.requests, args.repeat, args.seed)
    runs: dict[str, Any] = {}
    for way, switch in (("cache off", "false"), ("cache on", "true")):
        var_dir = args.var_dir / way.replace(" ", "-")
        store = var_dir / "semantic.sqlite"
        for leftover in var_dir.glob("semantic.sqlite*"):  # every run starts with it empty
            leftover.unlink()
        env = {"DUET_SEMANTIC_CACHE": switch, "DUET_MODEL": str(args.model.resolve())}
        with serving(env, var_dir, args.port, args.ready_timeout_s) as url:
            answers, seconds = asyncio.run(
                drive(url, args.model.name, asks, args.concurrency, args.max_tokens)
            )
        runs[way] = summarize(answers, seconds, stored_answers(store, asks))
        runs[way]["answers"] = [
            {
                "base": a.base,
                "repeat": a.repeat,
                "hit": a.header == "semantic",
                "finish": a.finish,
                "ttft_ms": round(a.ttft_ms, 1),  # the tail of ~120 first asks is a few of them
            }
            for a in answers
        ]
        print(way, json.dumps(runs[way]), flush=True)
        time.sleep(args.pause_s)
    return {
        "command": "python -m duetserve.loadtest.semantic_serving live " + " ".join(args.argv),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "model": args.model.name,
        "requests": args.requests,
        "repeat": args.repeat,
        "repeats": sum(a.repeat for a in asks),
        "concurrency": args.concurrency,
        "max_tokens": args.max_tokens,
        "runs": runs,
    }


def cacheable_repeats(answers: list[dict[str, Any]]) -> tuple[int, int]:
    """(repeats of a question whose generated answer finished normally in the run, how many of
    them were hits): the hit rate a cache can reach here, only such answers being stored."""
    cacheable = {a["base"] for a in answers if not a["hit"] and a["finish"] == "stop"}
    repeats = [a for a in answers if a["repeat"] and a["base"] in cacheable]
    return len(repeats), sum(a["hit"] for a in repeats)


def markdown(lookup: dict[str, Any] | None, served: dict[str, Any] | None) -> str:
    lines: list[str] = []
    if lookup is not None:
        lines += [
            f"**Lookup cost** (`{lookup['command']}`; {lookup['machine']}): the cache filled with "
            f"{lookup['entries']:,} ShareGPT questions, {lookup['queries']} others asked (misses).",
            "",
            "| step | p50 | p99 |",
            "|---|---|---|",
        ]
        for key, name in (
            ("embed_ms", "embedding one query (bfloat16, one thread)"),
            ("search_ms", "search, context filter, vetoes"),
            (
                "bus_round_trip_ms",
                "over NATS as ingress asks, one at a time (added TTFT of a miss)",
            ),
            (
                f"bus_round_trip_ms_burst_{lookup['burst']}",
                f"over NATS, {lookup['burst']} at once (batched)",
            ),
        ):
            p = lookup[key]
            lines.append(f"| {name} | {p['p50']:.2f} ms | {p['p99']:.2f} ms |")
        lines.append("")
    if served is not None:
        runs = served["runs"]
        lines += [
            f"**Served** (`{served['command']}`; {served['machine']}; {served['model']}): "
            f"{served['requests']} streamed chat requests from {served['concurrency']} clients, "
            f"{served['repeats']} of them repeats (a third verbatim, the rest reworded), "
            f"max_tokens {served['max_tokens']}, temperature 0.",
            "",
            "| | requests/s | hits: all / repeats / cacheable repeats | wrong hits "
            "| TTFT p50 / p99: all | first asks | hits | generated tok/s |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for way, r in runs.items():
            hits, first, ttft = r["ttft_ms_hits"], r["ttft_ms_first_asks"], r["ttft_ms_all"]
            hit_ttft = f"{hits['p50']:.1f} / {hits['p99']:.1f} ms" if hits else "-"
            cacheable, caught = cacheable_repeats(r["answers"])
            lines.append(
                f"| {way} | {r['requests_per_s']:.3f} | {r['hit_rate']:.1%} / "
                f"{r['hit_rate_of_repeats']:.1%} / {caught}/{cacheable} | {r['wrong_hits']} | "
                f"{ttft['p50']:.0f} / {ttft['p99']:.0f} ms | {first['p50']:.1f} / "
                f"{first['p99']:.1f} ms | {hit_ttft} | {r['generated_tokens_per_s']:.0f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    look = commands.add_parser("lookup")
    look.add_argument("--entries", type=int, default=10_000)
    look.add_argument("--queries", type=int, default=500)
    look.add_argument("--burst", type=int, default=8)
    look.add_argument("--seed", type=int, default=0)
    look.add_argument("--out", type=Path, required=True)
    run = commands.add_parser("live")
    add_stack_arguments(run, 8640, ".var/semantic-serving", 120.0)
    run.add_argument("--requests", type=int, default=150)
    run.add_argument("--repeat", type=float, default=0.4)
    run.add_argument("--concurrency", type=int, default=4)
    run.add_argument("--max-tokens", type=int, default=192)
    run.add_argument("--max-chars", type=int, default=200)
    show = commands.add_parser("report", help="write the section of docs/benchmarks.md")
    show.add_argument("--lookup", type=Path, default=ROOT / "docs/bench/semantic_lookup.json")
    show.add_argument("--served", type=Path, default=ROOT / "docs/bench/semantic_serving.json")
    show.add_argument("--write", type=Path, default=ROOT / "docs/benchmarks.md")
    args = parser.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])[1:]
    if args.command == "report":
        lookup = json.loads(args.lookup.read_text()) if args.lookup.exists() else None
        served = json.loads(args.served.read_text()) if args.served.exists() else None
        body = markdown(lookup, served)
        print(body)
        write_section(args.write, "semantic-serving", SECTION_TITLE, body + NOTES)
        return 0
    if args.command == "lookup":
        result = lookup_cost(args.entries, args.queries, args.burst, args.seed)
        result.update(
            command="python -m duetserve.loadtest.semantic_serving lookup " + " ".join(args.argv),
            machine=f"{platform.machine()}, {os.cpu_count()} cores",
            queries=args.queries,
            burst=args.burst,
        )
    else:
        result = live(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
