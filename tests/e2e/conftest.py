"""The whole stack, started the way `make run` starts it, once per test module."""

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from duetserve.common.nats_auth import operator_url
from duetserve.common.nats_server import free_port
from duetserve.common.processes import launcher_children
from duetserve.runtime.gguf_convert import SMOLLM2
from tests.conftest import ModelDirs
from tests.model_specs import TINY


@dataclass(frozen=True)
class Stack:
    base_url: str
    nats_url: str
    model_dir: Path
    process: subprocess.Popen[str]
    var_dir: Path
    startup: str = ""  # what the launcher printed until it served

    def service_pids(self) -> dict[str, int]:
        """pid of each service process, by service name (the launcher's children)."""
        children = launcher_children(self.process.pid)
        return {name: pid for name, pid in children.items() if name != "nats-server"}


def start_stack(
    model_dir: Path | None, var_dir: Path, unset: tuple[str, ...] = (), **env: str
) -> Stack:
    """The launcher serving `model_dir` (None: its default model) with `env` added to this
    environment and the variables in `unset` taken out of it."""
    port = free_port()
    environment = {
        **os.environ,
        "DUET_PORT": str(port),
        "DUET_NATS_PORT": "0",
        "DUET_VAR_DIR": str(var_dir),
        "DUET_KV_CACHE_MB": "64",
        **env,
    }
    if model_dir is not None:
        environment["DUET_MODEL"] = str(model_dir)
    for name in unset:
        environment.pop(name, None)
    process = subprocess.Popen(
        [sys.executable, "-m", "duetserve.services.launcher"],
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    nats_url, deadline, printed = "", time.monotonic() + 120, []
    assert process.stdout is not None
    for line in process.stdout:
        printed.append(line)
        if line.startswith("NATS on "):
            # The stack's tools and tests use the bus as its operator (common/nats_auth.py).
            nats_url = operator_url(line.split()[-1], var_dir / "credentials")
        if line.startswith("Duet is serving"):
            default = Path(environment.get("DUET_MODELS_DIR", "models")) / SMOLLM2.model_name
            served = model_dir or default
            startup = "".join(printed)
            return Stack(f"http://127.0.0.1:{port}/v1", nats_url, served, process, var_dir, startup)
        if time.monotonic() > deadline:
            break
    process.kill()
    logs = "\n".join(p.read_text()[-2000:] for p in (var_dir / "logs").glob("*.log"))
    raise RuntimeError(f"the stack did not start:\n{logs}")


def stop_stack(stack: Stack) -> int:
    stack.process.send_signal(signal.SIGTERM)
    return stack.process.wait(timeout=60)


def shm_segments(pid: int) -> set[str]:
    maps = Path(f"/proc/{pid}/maps").read_text()
    return {line.split()[-1] for line in maps.splitlines() if "/dev/shm/duet-" in line}


INTRUDER = "intruder"  # the connection name of tests that try what a role may not do


def bus_violations(var_dir: Path) -> list[str]:
    """Where nats-server refused a connection of the stack a subject its role may not use (a
    gap in nats_auth.permissions). Attempts by INTRUDER are left out."""
    lines = []
    for log in (var_dir / "nats").glob("nats-server-*.log"):
        for line in log.read_text(errors="replace").splitlines():
            if "Violation" in line and INTRUDER not in line:
                lines.append(line)
    return lines


def assert_stops_cleanly(stack: Stack) -> None:
    """SIGTERM to the launcher: exit 0, no service process left, the shm segment gone, and the
    bus refused none of the stack's own messages."""
    assert not bus_violations(stack.var_dir), "\n".join(bus_violations(stack.var_dir)[:20])
    pids = stack.service_pids()
    segments = shm_segments(pids["kv_manager"])
    assert stop_stack(stack) == 0
    left = [name for name, pid in pids.items() if Path(f"/proc/{pid}").exists()]
    assert not left, f"still running after stop: {left}"
    assert segments and not any(Path(s).exists() for s in segments)


@pytest.fixture(scope="module")
def stack(model_dirs: ModelDirs, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    running = start_stack(model_dirs.get(TINY), tmp_path_factory.mktemp("var"))
    yield running
    assert_stops_cleanly(running)


def alone_outputs(
    model_dir: Path, prompts: list[str], max_tokens: int, temperature: float
) -> list[str]:
    """Each prompt's seeded (seed = its index) output, EOS ignored, run alone in one process
    by the runtime: what the stack must give each of them under any load or split."""
    from duetserve.runtime.kv_pool import KVPool
    from duetserve.runtime.loader import load_model
    from duetserve.runtime.offline import OfflineEngine
    from duetserve.runtime.sampling import SamplingParams
    from duetserve.runtime.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(model_dir)
    model = load_model(model_dir)
    texts = []
    for seed, prompt in enumerate(prompts):
        blocks = max(64, -(-(len(tokenizer.encode(prompt)) + max_tokens) // 16))
        engine = OfflineEngine(model, KVPool.allocate(model.config, blocks, 16), frozenset())
        params = SamplingParams(
            max_tokens=max_tokens, temperature=temperature, seed=seed, ignore_eos=True
        )
        [out] = engine.generate([tokenizer.encode(prompt)], params)
        texts.append(tokenizer.decode(out.token_ids))
    return texts


async def seeded_completions(
    stack: Stack,
    prompts: list[str],
    max_tokens: int,
    temperature: float,
    stagger_s: float = 0.0,
) -> list[Any]:
    """The prompts sent at once (or `stagger_s` apart) with seed = index, EOS ignored."""
    import openai

    api = openai.AsyncOpenAI(base_url=stack.base_url, api_key="x", max_retries=0, timeout=120)

    async def one(seed: int, prompt: str) -> Any:
        await asyncio.sleep(stagger_s * seed)
        return await api.completions.create(
            model=stack.model_dir.name,
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=temperature,
            seed=seed,
            extra_body={"ignore_eos": True},
        )

    try:
        return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))))
    finally:
        await api.close()


def during_long_requests(stack: Stack, count: int, fault: Callable[[], None]) -> list[Any]:
    """`count` seeded requests of 1,800 tokens (EOS ignored), `fault()` once they are decoding
    (2 s in), then every request's outcome: its completion or the exception that ended it.
    Fails if any of them is still waiting a minute later."""
    import openai

    api = openai.AsyncOpenAI(base_url=stack.base_url, api_key="x", max_retries=0, timeout=120)

    async def one(seed: int) -> Any:
        return await api.completions.create(
            model=stack.model_dir.name,
            prompt=f"Voyage {seed}: the ship left the harbour",
            max_tokens=1800,
            seed=seed,
            extra_body={"ignore_eos": True},
        )

    async def run() -> list[Any]:
        requests = asyncio.gather(*(one(i) for i in range(count)), return_exceptions=True)
        await asyncio.sleep(2.0)
        fault()
        try:
            return list(await asyncio.wait_for(requests, timeout=60))
        finally:
            await api.close()

    return asyncio.run(run())
