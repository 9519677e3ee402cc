"""The token path's cost per decode step: one NATS message per request (the protocol before
proto/tokens.py) against one TokenBatch per step per ingress (TokenOutbox and StreamRouter).

    python -m duetserve.loadtest.token_path_bench --write docs/benchmarks.md

A real nats-server on loopback (started here, stopped at the end). For each batch size, a
producer publishes `steps` decode steps of `rows` one-token chunks, each step as soon as the
last was published, and a consumer in a second process receives them as ingress does: decoded
and put in order per request. Measured, for each protocol in the same run: the producer's time
publishing one step (what the decode loop pays between two forward passes), and the
consumer's CPU seconds per token (ingress's event loop). Bounded: a few thousand messages per
size; it stops by itself.
"""

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from nats.aio.msg import Msg

from duetserve.common.nats_bus import Bus
from duetserve.common.nats_server import NatsServer
from duetserve.common.token_outbox import TokenOutbox
from duetserve.loadtest.bench_report import write_section
from duetserve.proto import codec
from duetserve.proto.tokens import TokenChunk
from duetserve.services.ingress.streams import ChunkOrderer, StreamRouter

STREAM = "bench-ingress"
DONE = "bench.done"
PROTOCOLS = ("per-request", "batched")


def _request_subject(request_id: str) -> str:
    return f"bench.tokens.{request_id}"


async def consume(url: str, protocol: str, rows: int, steps: int) -> None:
    """The ingress side: every chunk decoded and ordered; reports its CPU time on DONE."""
    bus = await Bus.connect(url, "bench-consumer")
    expected, received = rows * steps, 0
    finished = asyncio.Event()
    cpu_start = time.process_time()
    if protocol == "batched":
        router = StreamRouter(bus, STREAM)
        await router.start()
        streams = [router.open(f"r{i}") for i in range(rows)]

        async def drain() -> None:
            nonlocal received
            for stream in streams:
                while received < expected:
                    await stream.next()
                    received += 1
                    if received % steps == 0:
                        break
            finished.set()

        waiter = asyncio.create_task(drain())
    else:
        orderers = {f"r{i}": ChunkOrderer(f"r{i}") for i in range(rows)}

        async def on_chunk(msg: Msg) -> None:
            nonlocal received
            chunk = codec.decode(msg.data, TokenChunk)
            received += len(orderers[chunk.request_id].push(chunk))
            if received == expected:
                finished.set()

        for request_id in orderers:
            await bus.subscribe(_request_subject(request_id), on_chunk)

        async def all_received() -> None:
            await finished.wait()

        waiter = asyncio.create_task(all_received())
    await bus.flush()
    print("ready", flush=True)
    await asyncio.wait_for(waiter, 120)
    cpu = time.process_time() - cpu_start
    await bus.publish(DONE, json.dumps({"cpu_s": cpu, "received": received}).encode())
    await bus.flush()
    await bus.close()


async def produce(url: str, protocol: str, rows: int, steps: int) -> dict[str, float]:
    bus = await Bus.connect(url, "bench-producer")
    outbox = TokenOutbox(bus, "bench-producer")
    done: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def on_done(msg: Msg) -> None:
        if not done.done():
            done.set_result(msg.data)

    await bus.subscribe(DONE, on_done)
    consumer = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "duetserve.loadtest.token_path_bench",
        "--consume",
        protocol,
        "--url",
        url,
        "--rows",
        str(rows),
        "--steps",
        str(steps),
        stdout=asyncio.subprocess.PIPE,
    )
    assert consumer.stdout is not None
    await asyncio.wait_for(consumer.stdout.readline(), 60)  # subscribed
    step_times = []
    started = time.perf_counter()
    for step in range(steps):
        chunks = [TokenChunk(f"r{i}", step, (1000 + step,)) for i in range(rows)]
        t0 = time.perf_counter()
        if protocol == "batched":
            for chunk in chunks:
                outbox.add(STREAM, chunk)
            await outbox.flush()
        else:
            for chunk in chunks:
                await bus.publish(_request_subject(chunk.request_id), codec.encode(chunk))
        step_times.append(time.perf_counter() - t0)
        await asyncio.sleep(0)  # the decode loop yields between steps
    report = json.loads(await asyncio.wait_for(done, 120))
    wall = time.perf_counter() - started
    await consumer.wait()
    await bus.close()
    return {
        "publish_ms_per_step": 1000 * statistics.median(step_times),
        "consumer_us_per_token": 1e6 * report["cpu_s"] / (rows * steps),
        "tokens_per_s": rows * steps / wall,
    }


def run(sizes: Sequence[int], steps: int) -> list[dict[str, object]]:
    rows_out: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as store, NatsServer(Path(store)) as server:
        for rows in sizes:
            for protocol in PROTOCOLS:
                figures = asyncio.run(produce(server.url, protocol, rows, steps))
                rows_out.append({"rows": rows, "protocol": protocol, **figures})
                print(rows, protocol, figures, flush=True)
    return rows_out


def markdown(results: list[dict[str, object]], steps: int, command: str) -> str:
    lines = [
        f"Machine: {platform.machine()}, {os.cpu_count()} cores; nats-server on loopback; "
        f"{steps} decode steps per size, one token per request per step; producer and consumer "
        "in two processes, as a decode worker and ingress are. Regenerate with:",
        "",
        f"    {command}",
        "",
        "| requests per step | protocol | publish per step (producer) | consumer CPU per token "
        "| tokens/s end to end |",
        "|---|---|---|---|---|",
    ]
    by_size: dict[object, dict[object, dict[str, object]]] = {}
    for r in results:
        by_size.setdefault(r["rows"], {})[r["protocol"]] = r
        lines.append(
            f"| {r['rows']} | {r['protocol']} | {r['publish_ms_per_step']:.3f} ms | "
            f"{r['consumer_us_per_token']:.1f} µs | {r['tokens_per_s']:,.0f} |"
        )
    lines += ["", "Ratios (per-request / batched), same run:", ""]
    for rows, pair in by_size.items():
        old, new = pair["per-request"], pair["batched"]
        publish = float(old["publish_ms_per_step"]) / float(new["publish_ms_per_step"])  # type: ignore[arg-type]
        consumer = float(old["consumer_us_per_token"]) / float(new["consumer_us_per_token"])  # type: ignore[arg-type]
        lines.append(
            f"- {rows} requests per step: publishing {publish:.1f}x faster, ingress "
            f"{consumer:.1f}x less CPU per token."
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="8,32,128", help="requests per step, comma-separated")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--write", type=Path, default=None, help="update this benchmarks file")
    parser.add_argument("--consume", choices=PROTOCOLS, help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.consume:
        asyncio.run(consume(args.url, args.consume, args.rows, args.steps))
        return 0
    sizes = [int(s) for s in args.sizes.split(",")]
    results = run(sizes, args.steps)
    if args.write is not None:
        command = "python -m duetserve.loadtest.token_path_bench --write docs/benchmarks.md"
        body = markdown(results, args.steps, command)
        write_section(
            args.write, "token-path", "Token path: one message per step per ingress", body
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
