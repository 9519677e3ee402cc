"""The JITServe policy live (DUET_POLICY=jitserve): with every place taken by answers that will
miss their deadline anyway, requests that can still meet their SLO run first and the others are
preempted for them; every request, preempted or not, ends with exactly the tokens it gets
alone, and says whether it met its SLO. With a host tier, a swapped answer's KV stays there
when it ends, and the conversation's next turn loads it back instead of recomputing it."""

import asyncio
import re
import time
from pathlib import Path
from typing import Any

import openai
import pytest

from duetserve.proto import kv
from tests.conftest import ModelDirs
from tests.e2e.conftest import alone_outputs, start_stack, stop_stack
from tests.e2e.kv_probe import allocated_blocks, kv_stats, scheduler_stats
from tests.model_specs import TINY

LONG_TOKENS = 1500  # seconds of decoding on `tiny`: the short ones arrive while it runs
SHORT_TOKENS = 8
TEMPERATURE = 0.9
HOPELESS = {"kind": "deadline", "deadline_ms": 50}
LOOSE = {"kind": "latency", "ttft_ms": 60_000, "tpot_ms": 10_000}


@pytest.mark.parametrize("host_kv_mb", ["0", "16"], ids=["recompute", "swap"])
def test_jitserve_preempts_hopeless_answers_for_ones_that_can_still_make_it(
    model_dirs: ModelDirs, tmp_path: Path, host_kv_mb: str
) -> None:
    """With a host tier, the preempted answers' KV is swapped out and back instead of
    recomputed (FastSwitch), with the same outputs, and every block of both tiers returns."""
    model_dir = model_dirs.get(TINY)
    longs = ["Story 0: once upon a time", "Story 1: once upon a time"]
    shorts = [f"Note {i}: remember the" for i in range(4)]
    stack = start_stack(
        model_dir,
        tmp_path,
        DUET_POLICY="jitserve",
        DUET_MAX_RUNNING="2",
        DUET_HOST_KV_MB=host_kv_mb,
    )
    try:
        api = openai.AsyncOpenAI(base_url=stack.base_url, api_key="x", max_retries=0, timeout=120)
        finished: dict[str, float] = {}

        async def one(name: str, prompt: str, seed: int, tokens: int, slo: dict[str, Any]) -> Any:
            answer = await api.completions.create(
                model=model_dir.name,
                prompt=prompt,
                max_tokens=tokens,
                temperature=TEMPERATURE,
                seed=seed,
                extra_body={"ignore_eos": True, "duet": {"slo": slo}},
            )
            finished[name] = time.monotonic()
            return answer

        async def run() -> list[Any]:
            hopeless = [one(f"long{i}", p, i, LONG_TOKENS, HOPELESS) for i, p in enumerate(longs)]
            started = [asyncio.ensure_future(c) for c in hopeless]
            await asyncio.sleep(0.5)  # both decoding: every place is taken
            rest = [one(f"short{i}", p, i, SHORT_TOKENS, LOOSE) for i, p in enumerate(shorts)]
            try:
                return list(await asyncio.gather(*started, *rest))
            finally:
                await api.close()

        answers = asyncio.run(run())
        if host_kv_mb != "0":
            # The conversation of a long answer that was swapped out goes on (which of them
            # were depends on when the short ones arrived: one place or both).
            out = _swapped_out(stack.var_dir / "logs" / "scheduler.log")
            which = next(i for i, a in enumerate(answers[:2]) if a.id in out)
            turn, turn_answer = asyncio.run(_next_turn(stack, longs[which], answers[which], which))
            # Asked of the scheduler itself: /metrics leaves the figure at 0 when the scheduler
            # takes longer than its 0.5 s to answer (as it can on a loaded machine).
            loaded = asyncio.run(scheduler_stats(stack.nats_url)).host_blocks_loaded
        held = asyncio.run(allocated_blocks(stack.nats_url, settle_s=5.0))
        assert all(h.startswith("cache_index") for h in held), held
        if host_kv_mb != "0":  # what is left there is the host tier's index's
            host = asyncio.run(kv_stats(stack.nats_url, pool=kv.HOST_POOL))
            assert all(h.startswith("cache_index") for h in host.references_by_holder), host
    finally:
        assert stop_stack(stack) == 0
    alone = alone_outputs(model_dir, longs, LONG_TOKENS, TEMPERATURE)
    alone += alone_outputs(model_dir, shorts, SHORT_TOKENS, TEMPERATURE)
    assert [a.choices[0].text for a in answers] == alone
    assert max(finished[f"short{i}"] for i in range(4)) < min(finished["long0"], finished["long1"])
    verdicts = [a.usage.model_extra["duet"]["slo"]["met"] for a in answers]
    assert verdicts == [False, False, True, True, True, True]
    log = (stack.var_dir / "logs" / "scheduler.log").read_text()
    assert "preempting for the policy" in log and "policy jitserve" in log
    swapped = "swapped out" in log and "swapped back in" in log
    assert swapped == (host_kv_mb != "0"), log[-3000:]
    if host_kv_mb != "0":
        # The next turn's prompt holds the first turn's swapped-out KV in its first blocks:
        # loaded from the host tier (not recomputed), and the answer is the one it gets alone.
        assert loaded >= 1
        from duetserve.runtime.tokenizer import Tokenizer

        alone_turn = _alone_ids(model_dir, turn, NEXT_TURN_TOKENS, seed=which)
        assert turn_answer == Tokenizer.from_dir(model_dir).decode(alone_turn)


NEXT_TURN_TOKENS = 6


def _swapped_out(log: Path) -> set[str]:
    """The requests the scheduler's log says it swapped out."""
    return set(re.findall(r"swapped out (\S+):", log.read_text()))


async def _next_turn(stack: Any, prompt: str, answer: Any, seed: int) -> tuple[list[int], str]:
    """A long answer's conversation goes on: its prompt and answer as token ids (as the
    runtime produced them alone with its seed), and a few more; the new answer."""
    from duetserve.runtime.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(stack.model_dir)
    first = tokenizer.encode(prompt)
    earlier = _alone_ids(stack.model_dir, first, LONG_TOKENS, seed=seed)
    assert tokenizer.decode(earlier) == answer.choices[0].text
    turn = [*first, *earlier, *tokenizer.encode(" and then")]
    api = openai.AsyncOpenAI(base_url=stack.base_url, api_key="x", max_retries=0, timeout=120)
    try:
        reply = await api.completions.create(
            model=stack.model_dir.name,
            prompt=turn,
            max_tokens=NEXT_TURN_TOKENS,
            temperature=TEMPERATURE,
            seed=seed,
            extra_body={"ignore_eos": True, "duet": {"slo": LOOSE}},
        )
    finally:
        await api.close()
    return turn, reply.choices[0].text


def _alone_ids(model_dir: Path, prompt: list[int], max_tokens: int, seed: int) -> list[int]:
    from duetserve.runtime.kv_pool import KVPool
    from duetserve.runtime.loader import load_model
    from duetserve.runtime.offline import OfflineEngine
    from duetserve.runtime.sampling import SamplingParams

    model = load_model(model_dir)
    blocks = max(64, -(-(len(prompt) + max_tokens) // 16))
    engine = OfflineEngine(model, KVPool.allocate(model.config, blocks, 16), frozenset())
    params = SamplingParams(
        max_tokens=max_tokens, temperature=TEMPERATURE, seed=seed, ignore_eos=True
    )
    [out] = engine.generate([prompt], params)
    return list(out.token_ids)


FAIR_TOKENS = 300  # about a second of decoding on `tiny`, two at a time


def test_vtc_serves_a_light_tenant_before_a_heavy_tenants_backlog(
    model_dirs: ModelDirs, tmp_path: Path
) -> None:
    """Two places; the heavy tenant queues six answers, the light one two, a moment later.
    In arrival order the light ones would end last; by virtual token counters they run as soon
    as the heavy tenant's first two answers end (its counter is then ahead by their output)."""
    model_dir = model_dirs.get(TINY)
    stack = start_stack(
        model_dir,
        tmp_path,
        DUET_FAIRNESS="vtc",
        DUET_MAX_RUNNING="2",
        DUET_API_KEYS="key-heavy:heavy,key-light:light",
    )
    try:
        finished: list[str] = []

        async def one(api: openai.AsyncOpenAI, name: str) -> None:
            await api.completions.create(
                model=model_dir.name,
                prompt=f"{name}: once upon a time",
                max_tokens=FAIR_TOKENS,
                extra_body={"ignore_eos": True},
            )
            finished.append(name)

        async def run() -> None:
            clients = {
                tenant: openai.AsyncOpenAI(
                    base_url=stack.base_url, api_key=f"key-{tenant}", max_retries=0, timeout=120
                )
                for tenant in ("heavy", "light")
            }
            heavy = [asyncio.ensure_future(one(clients["heavy"], f"h{i}")) for i in range(6)]
            await asyncio.sleep(0.3)
            light = [one(clients["light"], f"l{i}") for i in range(2)]
            try:
                await asyncio.gather(*heavy, *light)
            finally:
                for api in clients.values():
                    await api.close()

        asyncio.run(run())
    finally:
        assert stop_stack(stack) == 0
    assert len(finished) == 8
    assert sorted(finished[2:4]) == ["l0", "l1"], finished
    log = (stack.var_dir / "logs" / "scheduler.log").read_text()
    assert "policy fcfs+vtc" in log
