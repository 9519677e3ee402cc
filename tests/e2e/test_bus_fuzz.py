"""Every subject the services listen on, fed garbage and inconsistent messages: no service
crashes or restarts, no block is leaked or freed twice, and the stack answers as before.

The short form (`make test`): a few hundred messages. Bounded and loopback only."""

import asyncio
import random
from collections.abc import Iterator

import msgpack
import openai
import pytest
from nats.aio.msg import Msg

from duetserve.common.nats_bus import Bus
from duetserve.proto import codec, compute, kv, scheduling, subjects, supervision, tokens, workers
from duetserve.proto.cache import CachedSpan, EvictQuery, PrefixInsert, PrefixMatchQuery
from duetserve.proto.common import HealthQuery
from tests.conftest import ModelDirs
from tests.e2e.conftest import Stack, assert_stops_cleanly, start_stack
from tests.e2e.kv_probe import allocated_blocks, kv_stats
from tests.model_specs import TINY

UNIT = "unit0"
KV_VERBS = ("alloc", "retain", "release", "heartbeat", "storage", "stats", "shared")
SAMPLING = scheduling.Sampling(max_tokens=4)
STATE = workers.SamplingState((5, 6, 7), (8,), SAMPLING, "fuzz-stream")


@pytest.fixture(scope="module")
def fuzzed_stack(
    model_dirs: ModelDirs, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    stack = start_stack(model_dirs.get(TINY), tmp_path_factory.mktemp("var"))
    yield stack
    assert_stops_cleanly(stack)


def listened_subjects(stream: str) -> list[str]:
    """Every subject some service of a semi-pd unit subscribes to."""
    return [
        *(subjects.kv(UNIT, verb) for verb in KV_VERBS),
        *subjects.scheduler_subjects(subjects.DEFAULT_UNIT),
        *subjects.cache_subjects(subjects.DEFAULT_UNIT),
        subjects.TOKENS_REPLAY,
        subjects.tokens(stream),
        workers.prefill_batch_subject(UNIT),
        workers.decode_admit_subject(UNIT),
        workers.decode_control_subject(UNIT),
        workers.worker_events_subject(UNIT),
        compute.compute_split_subject(UNIT),
        compute.compute_applied_subject(UNIT),
        compute.replace_worker_subject(UNIT),
        compute.handover_subject(UNIT),
        supervision.LAUNCHER_REPORT,
        *(subjects.health(s) for s in ("ingress", "scheduler", "kv_manager", "cache_index")),
        *(subjects.health(s) for s in ("prefill_worker", "decode_worker")),
    ]


def garbage(rng: random.Random) -> list[bytes]:
    """Bytes no service can take: random, msgpack of the wrong shape, unknown names, other
    versions, known names with missing or mistyped fields."""
    known = sorted(codec._REGISTRY)
    payloads = [
        b"",
        b"\x00",
        b"\xc1",
        bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300))),
    ]
    payloads += [msgpack.packb(x) for x in (None, 7, "text", [1, 2], {"a": 1}, [None, None, None])]
    payloads += [msgpack.packb(["no.such.message", 1, {}]), msgpack.packb([known[0], 99, {}])]
    for name in rng.sample(known, 8):
        payloads.append(msgpack.packb([name, 1, {}]))  # every field missing
        payloads.append(msgpack.packb([name, 1, {"request_id": 5, "owner": [], "seq": "x"}]))
    return payloads


def inconsistent() -> list[tuple[str, object]]:
    """Valid messages that make no sense now: blocks not owned, requests unknown or twice,
    a hand-over from a worker that does not exist."""
    item = workers.DecodeItem("fuzz-r", (0, 1), STATE, owner="nobody/fuzz-r")
    prefill = workers.PrefillItem("fuzz-p", (5, 6, 7), 0, (0,), STATE, owner="nobody/fuzz-p")
    # Reusing spans from blocks nobody holds: the worker must not read them, nor write.
    span = CachedSpan(1, 2, 0, (3,))
    reusing = workers.PrefillItem(
        "fuzz-s", (5, 6, 7), 0, (0,), STATE, owner="nobody/fuzz-s", reuse=(span,), recompute=0.5
    )
    return [
        (workers.prefill_batch_subject(UNIT), workers.PrefillBatch(10**6 + 1, (reusing,))),
        (
            subjects.cache(subjects.DEFAULT_UNIT, "match"),
            PrefixMatchQuery("fuzz/s", "t", tuple(range(400)), spans=True),
        ),
        (
            subjects.cache(subjects.DEFAULT_UNIT, "match"),
            PrefixMatchQuery("", "t", tuple(range(400)), spans=True, peek=True),
        ),
        (subjects.kv(UNIT, "release"), kv.ReleaseBlocks("nobody/r", (0, 1, 2))),
        (subjects.kv(UNIT, "release"), kv.ReleaseBlocks("cache_index/never")),
        (subjects.kv(UNIT, "retain"), kv.RetainBlocks("fuzz/r", (0, 1, 2), ("nobody/r",))),
        (subjects.kv(UNIT, "retain"), kv.RetainBlocks("fuzz/r", (10**9,))),
        (subjects.kv(UNIT, "alloc"), kv.AllocateBlocks("fuzz/r", 10**9)),
        (workers.decode_admit_subject(UNIT), workers.DecodeAdmit((item, item))),
        (workers.prefill_batch_subject(UNIT), workers.PrefillBatch(10**6, (prefill,))),
        (
            workers.decode_control_subject(UNIT),
            workers.DecodeControl(workers.ControlKind.PREEMPT, ("no-such-request",)),
        ),
        (
            workers.worker_events_subject(UNIT),
            workers.WorkerEvents(
                "fuzz",
                (
                    workers.WorkerEvent(workers.EventKind.FINISHED, "no-such-request"),
                    workers.WorkerEvent(workers.EventKind.LEASES_EXPIRED, "batch-99999"),
                    workers.WorkerEvent(workers.EventKind.NEEDS_BLOCKS, "ghost", blocks_needed=9),
                ),
                roll_call=True,
            ),
        ),
        (
            subjects.sched(subjects.DEFAULT_UNIT, "cancel"),
            scheduling.CancelRequest("ghost", scheduling.CancelReason.CLIENT_GONE),
        ),
        (
            subjects.sched(subjects.DEFAULT_UNIT, "resume"),
            scheduling.ResumeRequest("ghost", (1, 2)),
        ),
        (
            subjects.sched(subjects.DEFAULT_UNIT, "status"),
            scheduling.RequestStatusQuery(tuple(f"r{i}" for i in range(2000))),
        ),
        (
            subjects.TOKENS_REPLAY,
            tokens.ReplayQuery("fuzz-stream", (tokens.ReplayFrom("ghost", 0),)),
        ),
        (compute.handover_subject(UNIT), compute.HandOverReady("no-such-worker", "fuzz")),
        (
            subjects.cache(subjects.DEFAULT_UNIT, "insert"),
            PrefixInsert("t", tuple(range(32)), (0, 1)),
        ),
        (
            subjects.cache(subjects.DEFAULT_UNIT, "match"),
            PrefixMatchQuery("fuzz/m", "t", tuple(range(40))),
        ),
        (subjects.cache(subjects.DEFAULT_UNIT, "evict"), EvictQuery(10**6)),
        (subjects.health("scheduler"), HealthQuery()),
    ]


async def fuzz(stack: Stack, seed: int) -> None:
    rng = random.Random(seed)
    bus = await Bus.connect(stack.nats_url, "fuzzer", request_timeout_s=2.0)
    try:
        stream = await ingress_stream(stack, bus)
        targets = listened_subjects(stream)
        for subject in targets:  # each payload published, and sent as a request
            payloads = garbage(rng)
            for payload in payloads:
                await bus.publish(subject, payload)
            asks = [bus.request(subject, payload, timeout=1.0) for payload in payloads]
            await asyncio.gather(*asks, return_exceptions=True)
        for subject, message in inconsistent():
            for _ in range(2):  # twice: what was refused once is refused again, no more
                await asyncio.gather(
                    bus.request(subject, codec.encode(message), timeout=1.0),
                    return_exceptions=True,
                )
        await bus.flush()
    finally:
        await bus.close()


async def ingress_stream(stack: Stack, bus: Bus) -> str:
    """The token stream subject of the stack's ingress (seen on one real request)."""
    seen: asyncio.Queue[str] = asyncio.Queue()

    async def note(msg: Msg) -> None:
        seen.put_nowait(msg.subject.removeprefix(f"{subjects.ROOT}.tokens."))

    subscription = await bus.subscribe(f"{subjects.ROOT}.tokens.>", note)
    await bus.flush()
    api = openai.AsyncOpenAI(base_url=stack.base_url, api_key="x", max_retries=0, timeout=60)
    await api.completions.create(model=stack.model_dir.name, prompt="Hi", max_tokens=2)
    await api.close()
    stream = await asyncio.wait_for(seen.get(), 10)
    await subscription.unsubscribe()
    return stream


def test_garbage_on_every_subject_crashes_nothing_and_leaks_nothing(fuzzed_stack: Stack) -> None:
    stack = fuzzed_stack
    api = openai.OpenAI(base_url=stack.base_url, api_key="x", max_retries=0, timeout=60)
    prompt = "The quick brown fox jumps over the lazy dog"

    def greedy() -> str:
        answer = api.completions.create(
            model=stack.model_dir.name, prompt=prompt, max_tokens=16, temperature=0
        )
        return str(answer.choices[0].text)

    before_text, before_pids = greedy(), stack.service_pids()
    asyncio.run(fuzz(stack, seed=11))
    assert stack.service_pids() == before_pids  # nothing crashed, nothing restarted
    for log in (stack.var_dir / "logs").glob("*.log"):  # each refused, none raised
        assert '"handler failed"' not in log.read_text(), log.name
    assert greedy() == before_text
    held = asyncio.run(allocated_blocks(stack.nats_url, settle_s=15.0))  # fuzz leases lapse
    assert all(h.startswith("cache_index") for h in held), held
    stats = asyncio.run(kv_stats(stack.nats_url))
    cached = sum(stats.references_by_holder.values())  # the prefix cache's, one a block
    assert stats.num_free == stats.num_total - cached  # none leaked, none freed twice
