"""The launcher supervises: a service (or nats-server) that is killed starts again, the restart
is counted at /metrics, and the stack serves again. kv_manager's death restarts the unit with
it. Each fault is caused (SIGKILL), on one stack in turn."""

import asyncio
import concurrent.futures
import os
import signal
import time
import urllib.request
from pathlib import Path

import openai

from duetserve.common.processes import launcher_children
from tests.e2e.conftest import Stack, alone_outputs, during_long_requests
from tests.e2e.kv_probe import allocated_blocks, kv_stats
from tests.processes import alive, wait_gone

RECOVERY_S = 60.0  # a bound for the test, not the target: the target is measured and printed
# during_long_requests' prompts (conftest.py), seed = index
LONG_PROMPTS = [f"Voyage {seed}: the ship left the harbour" for seed in range(3)]


def nats_pid(stack: Stack) -> int:
    return launcher_children(stack.process.pid)["nats-server"]


def complete(stack: Stack, timeout_s: float = 10.0) -> str:
    api = openai.OpenAI(base_url=stack.base_url, api_key="x", max_retries=0, timeout=timeout_s)
    answer = api.completions.create(model=stack.model_dir.name, prompt="Hello", max_tokens=4)
    return answer.choices[0].text


def serves_again_within(stack: Stack, bound_s: float) -> float:
    """Seconds from now until a completion succeeds (failing the test past `bound_s`)."""
    started = time.monotonic()
    last: Exception | None = None
    while time.monotonic() - started < bound_s:
        try:
            complete(stack, timeout_s=5.0)
            return time.monotonic() - started
        except (openai.APIError, openai.APIConnectionError) as err:
            last = err
            time.sleep(0.2)
    raise AssertionError(f"not serving {bound_s:g}s after the fault: {last!r}")


def restarts(stack: Stack) -> dict[str, float]:
    """duet_service_restarts_total by service, from ingress's /metrics."""
    url = stack.base_url.removesuffix("/v1") + "/metrics"
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    counts = {}
    for line in text.splitlines():
        if line.startswith("duet_service_restarts_total{"):
            labels, value = line.rsplit(" ", 1)
            counts[labels.split('"')[1]] = float(value)
    return counts


def wait_restarted(stack: Stack, service: str, old_pid: int) -> int:
    deadline = time.monotonic() + RECOVERY_S
    while time.monotonic() < deadline:
        pid = stack.service_pids().get(service)
        if pid is not None and pid != old_pid:
            return pid
        time.sleep(0.1)
    raise AssertionError(f"{service} was not started again")


def counted(stack: Stack, service: str, at_least: float) -> dict[str, float]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        counts = restarts(stack)
        if counts.get(service, 0) >= at_least:
            return counts
        time.sleep(0.2)
    raise AssertionError(f"restart of {service} not counted: {restarts(stack)}")


def test_a_killed_decode_worker_is_started_again_and_counted(stack: Stack) -> None:
    complete(stack)
    before = restarts(stack).get("decode_worker", 0)
    old = stack.service_pids()["decode_worker"]
    os.kill(old, signal.SIGKILL)
    wait_restarted(stack, "decode_worker", old)
    print(f"decode worker: serving again {serves_again_within(stack, RECOVERY_S):.1f}s later")
    counted(stack, "decode_worker", before + 1)


def test_a_killed_scheduler_is_started_again_its_requests_go_on_and_its_blocks_come_back(
    stack: Stack,
) -> None:
    """The scheduler holds a request's blocks while its prompt is prefilled. Killed then:
    - the request it held is submitted again by ingress, to its successor, and completes
      (before: the client waited for ever);
    - its successor does not inherit (and keep renewing) its lease: the blocks come back
      once the lease lapses."""
    pids = stack.service_pids()
    total = asyncio.run(kv_stats(stack.nats_url)).num_total
    api = openai.OpenAI(base_url=stack.base_url, api_key="x", max_retries=0, timeout=60)
    os.kill(pids["prefill_worker"], signal.SIGSTOP)  # the request stays in prefill
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        try:
            request = pool.submit(
                api.completions.create,
                model=stack.model_dir.name,
                prompt="Hi " * 200,
                max_tokens=4,
            )
            held = held_by_scheduler(stack)
            os.kill(pids["scheduler"], signal.SIGKILL)
            killed = time.monotonic()
        finally:
            os.kill(pids["prefill_worker"], signal.SIGCONT)
        answer = request.result(timeout=60)
    print(f"scheduler: its request completed {time.monotonic() - killed:.1f}s after the kill")
    assert answer.usage.completion_tokens == 4
    log = (stack.var_dir / "logs" / "ingress.log").read_text()
    assert "resubmitted" in log
    wait_restarted(stack, "scheduler", pids["scheduler"])
    print(f"scheduler: serving again {serves_again_within(stack, RECOVERY_S):.1f}s later")
    deadline = time.monotonic() + 15  # kv_manager's lease (5 s) and its sweep
    while time.monotonic() < deadline:
        stats = asyncio.run(kv_stats(stack.nats_url))
        if not any(h in held and n for h, n in stats.references_by_holder.items()):
            break
        time.sleep(0.2)
    assert not any(h in held and n for h, n in stats.references_by_holder.items()), stats
    held_now = stats.references_by_holder.items()
    cached = sum(n for h, n in held_now if h.startswith("cache_index"))
    assert stats.num_free + cached >= total - 1, stats  # only the cache's own blocks held
    counted(stack, "scheduler", 1)


def held_by_scheduler(stack: Stack) -> dict[str, int]:
    """Block references held by the scheduler, once it holds some (a prompt admitted)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        stats = asyncio.run(kv_stats(stack.nats_url))
        held = {h: n for h, n in stats.references_by_holder.items() if h.startswith("scheduler")}
        if sum(held.values()) > 0:
            return held
        time.sleep(0.05)
    raise AssertionError(f"the scheduler never held the prompt's blocks: {stats}")


def test_requests_on_a_killed_decode_worker_go_on_elsewhere_with_the_same_output(
    stack: Stack,
) -> None:
    """SIGKILL of the decode worker under load: its lease lapses, each of its requests
    migrates (the client's tokens so far become its prompt, its seeded sampling unchanged),
    and every client gets one uninterrupted answer, equal to an undisturbed run's."""
    killed = stack.service_pids()["decode_worker"]
    ended = during_long_requests(stack, 3, lambda: os.kill(killed, signal.SIGKILL))
    texts = [r.choices[0].text if not isinstance(r, Exception) else repr(r) for r in ended]
    assert texts == alone_outputs(stack.model_dir, LONG_PROMPTS, 1800, 1.0)
    wait_restarted(stack, "decode_worker", killed)
    held = asyncio.run(allocated_blocks(stack.nats_url, settle_s=10.0))
    assert all(h.startswith("cache_index") for h in held), held
    log = (stack.var_dir / "logs" / "ingress.log").read_text()
    assert log.count("worker lost; resuming") >= 3


def test_a_decode_worker_frozen_past_its_lease_is_stopped_before_its_blocks_are_reused(
    stack: Stack,
) -> None:
    """SIGSTOP of the decode worker under load: its lease lapses, kv_manager kills it before
    freeing its blocks (resumed, it would write blocks given away), its requests go on
    elsewhere with the same output (none hangs), and the launcher starts a new one."""
    frozen = stack.service_pids()["decode_worker"]
    ended = during_long_requests(stack, 3, lambda: os.kill(frozen, signal.SIGSTOP))
    texts = [r.choices[0].text if not isinstance(r, Exception) else repr(r) for r in ended]
    assert texts == alone_outputs(stack.model_dir, LONG_PROMPTS, 1800, 1.0)
    assert not alive(frozen) or not wait_gone([frozen], 10)  # killed, not resumed
    wait_restarted(stack, "decode_worker", frozen)
    took = serves_again_within(stack, RECOVERY_S)
    print(f"frozen decode worker: serving again {took:.1f}s later")
    held = asyncio.run(allocated_blocks(stack.nats_url, settle_s=10.0))
    assert all(h.startswith("cache_index") for h in held), held


def test_a_killed_nats_server_is_started_again_and_the_stack_serves_within_10s(
    stack: Stack,
) -> None:
    old = nats_pid(stack)
    os.kill(old, signal.SIGKILL)
    took = serves_again_within(stack, RECOVERY_S)
    print(f"nats-server: serving again {took:.1f}s later")
    assert took <= 10.0
    assert nats_pid(stack) != old
    counted(stack, "nats-server", 1)


def test_a_killed_kv_manager_restarts_the_unit_and_leaves_no_segment(stack: Stack) -> None:
    pids = stack.service_pids()
    segments = [p for p in Path("/dev/shm").glob("duet-*") if str(pids["kv_manager"]) in p.name]
    assert segments
    os.kill(pids["kv_manager"], signal.SIGKILL)
    took = serves_again_within(stack, RECOVERY_S)
    print(f"kv_manager: the unit serves again {took:.1f}s later")
    now = stack.service_pids()
    for service in ("kv_manager", "cache_index", "scheduler", "prefill_worker", "decode_worker"):
        assert now[service] != pids[service], service  # the unit started again
        assert not alive(pids[service]) or not wait_gone([pids[service]], 10), service
    assert now["ingress"] == pids["ingress"]  # the API stayed up
    assert not any(p.exists() for p in segments)
    counted(stack, "kv_manager", 1)
