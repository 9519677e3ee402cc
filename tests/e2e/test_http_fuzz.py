"""Ingress's OpenAPI document turned into requests, valid and invalid, against the whole
stack: never a 500, a 429 or 503 only with Retry-After, every error in OpenAI's shape, every
success as documented; afterwards no service has restarted and the same greedy answer comes
back through the official client.

The short form (`make test`): a few hundred cases. The full run (`make fuzz-http`) is
loadtest/http_fuzz.py with 10,000. Bounded and loopback only."""

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from duetserve.loadtest.http_fuzz import FUZZ_MODEL, GREEDY, FuzzRun, run_fuzz
from duetserve.services.ingress.openapi import build_openapi
from tests.conftest import ModelDirs
from tests.e2e.conftest import Stack, assert_stops_cleanly, start_stack

CASES = 300


@pytest.fixture(scope="module")
def fuzzed_stack(
    model_dirs: ModelDirs, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    stack = start_stack(model_dirs.get(FUZZ_MODEL), tmp_path_factory.mktemp("var"))
    yield stack
    assert_stops_cleanly(stack)


def greedy(stack: Stack) -> str:
    api = openai.OpenAI(base_url=stack.base_url, api_key="x", max_retries=0, timeout=60)
    answer = api.completions.create(model=stack.model_dir.name, **GREEDY)
    return str(answer.choices[0].text)


def test_the_served_document_is_the_built_one(fuzzed_stack: Stack) -> None:
    root = fuzzed_stack.base_url.removesuffix("/v1")
    with urllib.request.urlopen(f"{root}/openapi.json", timeout=10) as response:
        assert json.load(response) == build_openapi(fuzzed_stack.model_dir.name)


def test_fuzzed_requests_get_answers_by_the_contract_and_crash_nothing(
    fuzzed_stack: Stack,
) -> None:
    stack = fuzzed_stack
    before_text, before_pids = greedy(stack), stack.service_pids()
    root = stack.base_url.removesuffix("/v1")
    run: FuzzRun = run_fuzz(root, stack.process.pid, stack.model_dir.name, CASES, seed=7)
    tally = run.tally
    assert tally.total >= CASES * 0.9
    assert tally.failures == []  # each: the request, the answer, what is wrong with it
    assert (tally.server_errors, tally.hangs, run.restarted) == (0, 0, [])
    assert stack.service_pids() == before_pids  # nothing crashed, nothing restarted
    for log in Path(stack.var_dir / "logs").glob("*.log"):
        assert '"request failed"' not in log.read_text(), log.name  # no 500 logged
    assert run.answers_as_before and greedy(stack) == before_text
