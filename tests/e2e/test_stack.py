"""The whole stack, end to end, through the official openai client."""

import asyncio
import json
import time
from pathlib import Path

import aiohttp
import openai
import pytest

from duetserve.common.block_hash import iter_block_keys
from duetserve.common.nats_bus import Bus
from duetserve.proto.codec import decode
from duetserve.proto.units import PREFIX_KEY_BYTES, UNITS_BUCKET, UnitCard, card_key
from duetserve.runtime.kv_pool import KVPool
from duetserve.runtime.loader import load_model
from duetserve.runtime.offline import OfflineEngine
from duetserve.runtime.sampling import SamplingParams
from duetserve.runtime.tokenizer import Tokenizer
from tests.e2e.conftest import Stack, shm_segments
from tests.e2e.kv_probe import allocated_blocks

PROMPTS = [
    "The quick brown fox jumps over the lazy dog",
    "def fibonacci(n):\n    return",
    "Grüße aus Köln — 東京へようこそ 🎉",
]


def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.base_url, api_key="unused", max_retries=0, timeout=60)


def offline_greedy(model_dir: Path, prompt: str, max_tokens: int) -> str:
    tokenizer = Tokenizer.from_dir(model_dir)
    model = load_model(model_dir)
    engine = OfflineEngine(model, KVPool.allocate(model.config, 64, 16), tokenizer.eos_token_ids)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    [out] = engine.generate([tokenizer.encode(prompt)], params)
    return tokenizer.decode(out.token_ids)


def assert_greedy_matches_the_runtime(stack: Stack, prompt: str) -> None:
    """The stack's greedy answer is the one the runtime gives run directly in one process:
    every mode must give it (so all modes give the same)."""
    result = client(stack).completions.create(
        model=stack.model_dir.name, prompt=prompt, max_tokens=24, temperature=0
    )
    assert result.choices[0].text == offline_greedy(stack.model_dir, prompt, 24)
    assert result.usage is not None and result.usage.completion_tokens > 0


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_output_equals_the_runtime_run_directly(stack: Stack, prompt: str) -> None:
    """Prefill and decode run in two processes on one pool; the result equals one process."""
    assert_greedy_matches_the_runtime(stack, prompt)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_stream_concatenates_to_the_whole_text(stack: Stack, seed: int) -> None:
    """Sampled (seeded) output of a random model is full of multi-byte characters split
    across tokens; the streamed pieces must join to exactly the non-streamed text."""
    api = client(stack)
    kwargs = dict(model=stack.model_dir.name, max_tokens=40, temperature=1.0, seed=seed)
    messages = [{"role": "user", "content": PROMPTS[2]}]
    whole = api.chat.completions.create(messages=messages, **kwargs)  # type: ignore[call-overload]
    stream = api.chat.completions.create(messages=messages, stream=True, **kwargs)  # type: ignore[call-overload]
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(pieces) == whole.choices[0].message.content


def test_32_concurrent_requests_all_complete(stack: Stack) -> None:
    async def run() -> list[openai.types.Completion]:
        api = openai.AsyncOpenAI(
            base_url=stack.base_url, api_key="unused", max_retries=0, timeout=60
        )
        return await asyncio.gather(
            *(
                api.completions.create(
                    model=stack.model_dir.name,
                    prompt=f"Request {i}: {PROMPTS[i % 3]}",
                    max_tokens=16 + i,
                    temperature=0.8,
                    seed=i,
                    extra_body={"ignore_eos": True},
                )
                for i in range(32)
            )
        )

    results = asyncio.run(run())
    assert [r.usage.completion_tokens for r in results if r.usage] == [16 + i for i in range(32)]


def test_seeded_sample_is_the_same_alone_and_under_load(stack: Stack) -> None:
    api = client(stack)
    request = dict(model=stack.model_dir.name, prompt=PROMPTS[0], max_tokens=20, seed=7)
    alone = api.completions.create(**request).choices[0].text  # type: ignore[call-overload]

    async def crowd() -> list[str]:
        a = openai.AsyncOpenAI(base_url=stack.base_url, api_key="unused", max_retries=0, timeout=60)
        others = [
            a.completions.create(model=stack.model_dir.name, prompt=p, max_tokens=30)
            for p in PROMPTS * 4
        ]
        mine = a.completions.create(**request)  # type: ignore[call-overload]
        results = await asyncio.gather(mine, *others)
        return [r.choices[0].text for r in results]

    assert asyncio.run(crowd())[0] == alone


def test_repeated_prompt_reuses_its_prefix_and_answers_the_same(stack: Stack) -> None:
    api = client(stack)
    prompt = " ".join(PROMPTS * 3)
    first = api.completions.create(
        model=stack.model_dir.name, prompt=prompt, max_tokens=12, temperature=0
    )
    second = api.completions.create(
        model=stack.model_dir.name, prompt=prompt, max_tokens=12, temperature=0
    )
    assert second.choices[0].text == first.choices[0].text
    assert first.usage is not None and second.usage is not None
    details = second.usage.prompt_tokens_details
    assert details is not None and details.cached_tokens
    assert details.cached_tokens >= first.usage.prompt_tokens - 16


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"prompt": "hi", "max_tokens": -1}, 400),
        ({"prompt": "hi", "temperature": "hot"}, 400),
        ({"prompt": "hi", "n": 3}, 400),
        ({"prompt": [1, 2, 999999]}, 400),
        ({"prompt": "word " * 3000}, 400),
        ({"prompt": "hi", "model": "no-such-model"}, 404),
    ],
)
def test_bad_requests_get_4xx_and_the_stack_keeps_serving(
    stack: Stack, body: dict[str, object], status: int
) -> None:
    async def post() -> tuple[int, dict[str, object]]:
        async with aiohttp.ClientSession() as session:
            payload = {"model": stack.model_dir.name, **body}
            async with session.post(f"{stack.base_url}/completions", json=payload) as response:
                return response.status, await response.json()

    code, error = asyncio.run(post())
    assert code == status
    assert set(error["error"]) >= {"message", "type", "param", "code"}  # type: ignore[arg-type]
    ok = client(stack).completions.create(model=stack.model_dir.name, prompt="ok", max_tokens=2)
    assert ok.choices[0].finish_reason == "length"


def test_malformed_json_is_a_400(stack: Stack) -> None:
    async def post() -> int:
        url = f"{stack.base_url}/completions"
        async with aiohttp.ClientSession() as session, session.post(url, data=b"{") as response:
            return response.status

    assert asyncio.run(post()) == 400


def test_a_client_that_disconnects_leaves_no_blocks_behind(stack: Stack) -> None:
    async def read_then_leave() -> None:
        payload = {
            "model": stack.model_dir.name,
            "prompt": PROMPTS[0],
            "max_tokens": 1500,
            "ignore_eos": True,
            "stream": True,
        }
        url = f"{stack.base_url}/completions"
        async with aiohttp.ClientSession() as session, session.post(url, json=payload) as response:
            first = await response.content.readline()
            assert first.startswith(b"data: ")
            json.loads(first[6:])

    asyncio.run(read_then_leave())
    held = asyncio.run(allocated_blocks(stack.nats_url, settle_s=5.0))
    assert all(h.startswith("cache_index") for h in held), held


def test_metrics_expose_latency_histograms_and_scheduler_gauges(stack: Stack) -> None:
    client(stack).completions.create(model=stack.model_dir.name, prompt="hi", max_tokens=3)

    async def scrape() -> str:
        url = stack.base_url.removesuffix("/v1") + "/metrics"
        async with aiohttp.ClientSession() as session, session.get(url) as response:
            return await response.text()

    text = asyncio.run(scrape())
    for name in ("duet_ingress_ttft_seconds_count", "duet_ingress_tpot_seconds_count"):
        assert float(text.split(name)[1].split()[0]) >= 1
    assert 'duet_scheduler_requests{phase="waiting"}' in text
    total = float(text.split('duet_kv_blocks{state="total"}')[1].split()[0])
    assert total > 0
    # semi-pd: decode reads the prefill worker's blocks in place, nothing is copied
    assert "\nduet_kv_transfers 0.0\n" in text and "\nduet_kv_transfer_bytes 0.0\n" in text


def test_vllm_named_metrics_agree_with_what_the_responses_said(stack: Stack) -> None:
    """vLLM's dashboards on Duet: tokens, prefix-cache hits and finishes under vLLM's names
    are the sums of what the answers' usage said; queue, KV usage and preemptions are there."""
    model = stack.model_dir.name

    def scrape() -> dict[str, float]:
        async def get() -> str:
            url = stack.base_url.removesuffix("/v1") + "/metrics"
            async with aiohttp.ClientSession() as session, session.get(url) as response:
                return await response.text()

        rows = [line.rsplit(" ", 1) for line in asyncio.run(get()).splitlines()]
        return {name: float(v) for name, v in rows if name.startswith("vllm:")}

    label = f'{{model_name="{model}"}}'
    before = scrape()
    prompt = "A prompt long enough to fill a few blocks of the prefix cache: " * 4
    answers = [
        client(stack).completions.create(
            model=model, prompt=prompt, max_tokens=4, extra_body={"ignore_eos": True}
        )
        for _ in range(2)
    ]
    after = scrape()

    def delta(name: str) -> float:
        return after[name + label] - before.get(name + label, 0.0)

    usages = [a.usage for a in answers if a.usage is not None]
    assert len(usages) == 2
    cached = [
        u.prompt_tokens_details.cached_tokens or 0 if u.prompt_tokens_details else 0 for u in usages
    ]
    assert cached[1] > 0  # the second found the first's prompt in the prefix cache
    assert delta("vllm:prompt_tokens_total") == sum(u.prompt_tokens for u in usages)
    assert delta("vllm:prefix_cache_queries_total") == sum(u.prompt_tokens for u in usages)
    assert delta("vllm:prefix_cache_hits_total") == sum(cached)
    assert delta("vllm:generation_tokens_total") == 8
    assert delta("vllm:time_to_first_token_seconds_count") == 2
    assert 1 <= delta("vllm:inter_token_latency_seconds_count") <= 6
    reason = f'vllm:request_success_total{{finished_reason="length",model_name="{model}"}}'
    assert after[reason] - before.get(reason, 0.0) == 2
    assert 0.0 <= after["vllm:kv_cache_usage_perc" + label] <= 1.0
    assert after["vllm:num_requests_running" + label] >= 0
    assert after["vllm:num_requests_waiting" + label] >= 0
    assert "vllm:num_preemptions_total" + label in after


def test_ingress_follows_the_units_card_under_the_bus_permissions(stack: Stack) -> None:
    """The unit's scheduler writes its card to the registry and ingress reads it, each with
    only the permissions the bus gives its role: ingress counts one live unit, unit0."""

    async def scrape() -> str:
        url = stack.base_url.removesuffix("/v1") + "/metrics"
        async with aiohttp.ClientSession() as session, session.get(url) as response:
            return await response.text()

    deadline = time.monotonic() + 15
    text = asyncio.run(scrape())
    while "duet_units_live 1.0" not in text and time.monotonic() < deadline:
        time.sleep(0.5)
        text = asyncio.run(scrape())
    assert "duet_units_live 1.0" in text
    assert 'duet_unit_load{unit="unit0"}' in text
    log = (stack.var_dir / "logs" / "ingress.log").read_text()
    assert "not following the unit registry" not in log

    # The card lists the prefixes of the prompts the unit took lately (for routing by them).
    prompt = "The unit's card lists where this prompt's prefix is warm, " * 3
    client(stack).completions.create(model=stack.model_dir.name, prompt=prompt, max_tokens=1)
    ids = Tokenizer.from_dir(stack.model_dir).encode(prompt, add_special_tokens=True)

    async def card() -> UnitCard:
        bus = await Bus.connect(stack.nats_url, "card-probe")
        try:
            entry = await (await bus.js.key_value(UNITS_BUCKET)).get(card_key("unit0"))
            return decode(entry.value or b"", UnitCard)
        finally:
            await bus.close()

    deadline = time.monotonic() + 10
    while True:
        written = asyncio.run(card())
        keys = list(iter_block_keys("default", ids, written.block_size))
        if keys[0][:PREFIX_KEY_BYTES] in written.prefixes or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert written.block_size > 0 and len(keys) >= 2
    assert keys[0][:PREFIX_KEY_BYTES] in written.prefixes
    assert keys[1][:PREFIX_KEY_BYTES] in written.prefixes  # depth 2


def test_both_workers_map_the_same_pool_and_weights(stack: Stack) -> None:
    """One KV pool and one copy of the weights: both worker processes (and kv_manager) map
    the same /dev/shm segment, and neither holds a copy of it. Beside it, the workers share
    the 8 bytes that say which of them has work (compute_share/activity.py)."""
    pids = stack.service_pids()
    segments = [shm_segments(pids[n]) for n in ("kv_manager", "prefill_worker", "decode_worker")]
    regions = [{s for s in found if not s.endswith(".activity")} for found in segments]
    assert regions[0] and regions[0] == regions[1] == regions[2]
    activity = {f"{region}.activity" for region in regions[0]}
    assert segments[1] - regions[1] == segments[2] - regions[2] == activity


def test_a_cancel_that_overtakes_its_submit_still_cancels_the_request(stack: Stack) -> None:
    """Ingress publishes a cancel when its client goes away mid-submit; the scheduler may
    handle it before the submit itself (two subscriptions, no order between them). The
    request must not then run for nobody."""
    from duetserve.common.nats_bus import Bus
    from duetserve.proto import subjects
    from duetserve.proto.codec import decode, encode
    from duetserve.proto.common import ErrorReply
    from duetserve.proto.scheduling import (
        CancelReason,
        CancelRequest,
        Sampling,
        SubmitAccepted,
        SubmitRequest,
    )

    async def cancel_then_submit() -> SubmitAccepted | ErrorReply:
        bus = await Bus.connect(stack.nats_url, "overtaking-cancel")
        try:
            cancel = CancelRequest("cmpl-overtaken", CancelReason.CLIENT_GONE)
            await bus.publish(subjects.sched(subjects.DEFAULT_UNIT, "cancel"), encode(cancel))
            await bus.flush()
            await asyncio.sleep(0.2)  # the cancel is handled first
            submit = SubmitRequest(
                "cmpl-overtaken", "default", (5, 6, 7), Sampling(8), 0.0, "test-stream"
            )
            reply = await bus.request(
                subjects.sched(subjects.DEFAULT_UNIT, "submit"), encode(submit), timeout=5
            )
            return decode(reply.data, SubmitAccepted, ErrorReply)
        finally:
            await bus.close()

    reply = asyncio.run(cancel_then_submit())
    assert isinstance(reply, ErrorReply) and reply.code == "cancelled", reply


def test_a_late_admission_never_takes_blocks_its_scheduler_let_go(stack: Stack) -> None:
    """A hand-off whose answer came too late: the scheduler gave up and released the blocks,
    which may already be another request's. When the admission finally reaches the decode
    worker it must refuse it, not take the blocks and write its KV into them."""
    from duetserve.common.nats_bus import Bus
    from duetserve.proto import kv, subjects, workers
    from duetserve.proto.codec import decode, encode
    from duetserve.proto.scheduling import Sampling

    OTHER = "another-tenant/r-9"

    async def late_admission() -> workers.DecodeAdmitted:
        bus = await Bus.connect(stack.nats_url, "late-admission")
        try:  # blocks that now belong to someone else
            alloc = encode(kv.AllocateBlocks(OTHER, 2))
            reply = await bus.request(subjects.kv("unit0", "alloc"), alloc)
            blocks = decode(reply.data, kv.BlocksGranted).block_ids
            state = workers.SamplingState((5, 6, 7), (8,), Sampling(4), "nobody-listens")
            item = workers.DecodeItem("cmpl-late", blocks, state, owner="scheduler-old/cmpl-late")
            admit = encode(workers.DecodeAdmit((item,)))
            reply = await bus.request(workers.decode_admit_subject("unit0"), admit)
            answer = decode(reply.data, workers.DecodeAdmitted)
            await bus.request(subjects.kv("unit0", "release"), encode(kv.ReleaseBlocks(OTHER)))
            return answer
        finally:
            await bus.close()

    answer = asyncio.run(late_admission())
    assert answer.request_ids == ()
    [refusal] = answer.refused
    assert "no longer held by ['scheduler-old/cmpl-late']" in refusal.reason
    held = asyncio.run(allocated_blocks(stack.nats_url, settle_s=2.0))
    assert all(h.startswith("cache_index") for h in held), held
