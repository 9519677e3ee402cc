"""KVShare served: with DUET_SPAN_REUSE, a prompt whose documents an earlier prompt held, in
another order and after another head, reuses their KV through the whole stack (cache_index
finds the spans, the scheduler hands them to the prefill worker, the worker places and
recomputes, the decode worker re-checks while it decodes), the client sees the placed tokens
as cached, other tenants see nothing, and every block comes back."""

import asyncio
import random
import urllib.request
from collections.abc import Iterator

import openai
import pytest

from duetserve.runtime.tokenizer import Tokenizer
from tests.conftest import ModelDirs
from tests.e2e.conftest import Stack, assert_stops_cleanly, start_stack
from tests.e2e.kv_probe import allocated_blocks
from tests.model_specs import TINY

KEYS = {"tenant-a": "key-of-a", "tenant-b": "key-of-b"}
WORDS = [
    "river",
    "stone",
    "lantern",
    "quiet",
    "harbor",
    "violet",
    "engine",
    "meadow",
    "copper",
    "signal",
    "orchard",
    "thunder",
    "marble",
    "canvas",
    "whisper",
    "silver",
    "garden",
    "rocket",
    "timber",
    "ocean",
    "falcon",
    "ember",
    "velvet",
    "crystal",
]


def document(seed: int, words: int = 140) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(words))


DOC_A, DOC_B = document(1), document(2)


@pytest.fixture(scope="module")
def reuse_stack(model_dirs: ModelDirs, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    keys = ",".join(f"{key}:{tenant}" for tenant, key in KEYS.items())
    stack = start_stack(
        model_dirs.get(TINY),
        tmp_path_factory.mktemp("var"),
        DUET_API_KEYS=keys,
        DUET_SPAN_REUSE="1",
        DUET_SPAN_RECOMPUTE="0.25",
        DUET_SPAN_RECHECK_INTERVAL="2",  # the decode stage runs within the 4 tokens asked for
        DUET_HIT_RATE_ORDER="1",  # each arrival's hit rate asked of cache_index
    )
    yield stack
    assert_stops_cleanly(stack)


def complete(stack: Stack, tenant: str, prompt: str) -> openai.types.Completion:
    api = openai.OpenAI(base_url=stack.base_url, api_key=KEYS[tenant], max_retries=0)
    return api.completions.create(
        model=stack.model_dir.name, prompt=prompt, max_tokens=4, temperature=0
    )


def reuse_metrics(stack: Stack) -> dict[str, float]:
    base = stack.base_url.removesuffix("/v1")
    text = urllib.request.urlopen(f"{base}/metrics", timeout=10).read().decode()
    found = {}
    for kind in ("prompt", "reused", "recomputed"):
        line = f'duet_kv_reuse_tokens{{kind="{kind}"}} '
        found[kind] = float(text.split(line)[1].split()[0]) if line in text else 0.0
    return found


def cached(done: openai.types.Completion) -> int:
    assert done.usage is not None and done.usage.prompt_tokens_details is not None
    return done.usage.prompt_tokens_details.cached_tokens or 0


def test_documents_in_another_order_reuse_their_kv_for_their_tenant_only(
    reuse_stack: Stack,
) -> None:
    tokenizer = Tokenizer.from_dir(reuse_stack.model_dir)
    first = f"Read these.\n{DOC_A}\n{DOC_B}\nWhat is first?"
    later = f"Compare the notes below, please.\n{DOC_B}\n{DOC_A}\nWhat is last?"
    assert cached(complete(reuse_stack, "tenant-a", first)) == 0
    before = reuse_metrics(reuse_stack)

    # Another tenant finds none of a's spans.
    assert cached(complete(reuse_stack, "tenant-b", later)) == 0
    assert reuse_metrics(reuse_stack) == before

    done = complete(reuse_stack, "tenant-a", later)
    after = reuse_metrics(reuse_stack)
    reused = after["reused"] - before["reused"]
    recomputed = after["recomputed"] - before["recomputed"]
    doc_tokens = len(tokenizer.encode(f"\n{DOC_B}\n{DOC_A}\n", add_special_tokens=False))
    assert reused >= 0.8 * doc_tokens, (reused, doc_tokens)
    assert recomputed == pytest.approx(reused * 0.25, abs=1.0)
    assert cached(done) == reused - recomputed
    assert after["prompt"] - before["prompt"] == len(tokenizer.encode(later))
    assert done.choices[0].text  # it answered

    # Every block comes back: only the prefix cache holds any once the requests are done.
    held = asyncio.run(allocated_blocks(reuse_stack.nats_url, settle_s=5.0))
    assert all(holder.startswith("cache_index") for holder in held), held
