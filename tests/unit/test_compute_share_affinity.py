"""The cpu-affinity backend: which cores and threads each worker gets, re-pinning in place, and
one real child process whose every thread is pinned."""

import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import pytest

from duetserve.runtime.compute_share.affinity import AffinityShare, pin_process, split_cores


class Recorder:
    def __init__(self, original: set[int]) -> None:
        self.original = original
        self.calls: list[tuple[int, set[int]]] = []
        self.threads: list[int] = []

    def set_affinity(self, tid: int, cores: Iterable[int]) -> None:
        self.calls.append((tid, set(cores)))

    def get_affinity(self, pid: int) -> set[int]:
        return set(self.original)


def fake_proc(tmp_path: Path, pid: int, tids: list[int]) -> Path:
    for tid in tids:
        (tmp_path / str(pid) / "task" / str(tid)).mkdir(parents=True)
    return tmp_path


def open_share(role: str, recorder: Recorder, proc: Path, cores: list[int]) -> AffinityShare:
    return AffinityShare(
        role,  # type: ignore[arg-type]
        cores,
        pid=100,
        proc_root=proc,
        set_affinity=recorder.set_affinity,
        get_affinity=recorder.get_affinity,
        set_threads=recorder.threads.append,
    )


def test_prefill_takes_the_first_cores_and_decode_the_rest(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, 100, [100])
    prefill_calls, decode_calls = Recorder({4, 5, 6, 7}), Recorder({4, 5, 6, 7})
    prefill = open_share("prefill", prefill_calls, proc, [4, 5, 6, 7])
    decode = open_share("decode", decode_calls, proc, [4, 5, 6, 7])
    mine, theirs = prefill.apply(0.75), decode.apply(0.25)
    assert prefill_calls.calls == [(100, {4, 5, 6})] and prefill_calls.threads == [3]
    assert decode_calls.calls == [(100, {7})] and decode_calls.threads == [1]
    assert (mine.given, mine.amount, mine.unit) == (0.75, 3, "cores")
    assert (theirs.given, theirs.amount) == (0.25, 1)


def test_repinning_in_place_and_close_restores_every_thread(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, 100, [100, 101, 102])
    recorder = Recorder({0, 1, 2, 3, 4, 5, 6, 7})
    share = open_share("prefill", recorder, proc, [0, 1, 2, 3])
    share.apply(0.75)
    share.apply(0.5)
    assert recorder.calls[-3:] == [(100, {0, 1}), (101, {0, 1}), (102, {0, 1})]
    assert recorder.threads == [3, 2]
    share.close()
    assert recorder.calls[-3:] == [(tid, set(range(8))) for tid in (100, 101, 102)]
    count = len(recorder.calls)
    share.close()
    assert len(recorder.calls) == count


def test_one_core_is_shared_and_two_cores_split_one_each(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, 100, [100])
    alone = open_share("decode", Recorder({0}), proc, [0]).apply(0.3)
    assert (alone.amount, alone.given) == (1, 1.0) and "shared" in alone.description
    for share in (0.1, 0.5, 0.9):
        recorder = Recorder({0, 1})
        applied = open_share("decode", recorder, proc, [0, 1]).apply(share)
        assert recorder.calls == [(100, {1})] and applied.given == 0.5


def test_pin_skips_a_thread_that_exited(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, 100, [100, 101, 102])
    pinned: list[int] = []

    def set_affinity(tid: int, cores: Iterable[int]) -> None:
        if tid == 101:
            raise ProcessLookupError(tid)
        pinned.append(tid)

    assert pin_process(100, {0}, proc, set_affinity) == 2
    assert pinned == [100, 102]


def test_real_child_has_every_thread_pinned_and_restored() -> None:
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        pytest.skip("needs two cores to give decode a core of its own")
    code = (
        "import threading, time\n"
        "for _ in range(3): threading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n"
        "print('ready', flush=True); time.sleep(60)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        tids = [int(tid) for tid in os.listdir(f"/proc/{child.pid}/task")]
        assert len(tids) == 4
        share = AffinityShare("decode", cores, pid=child.pid, set_threads=None)
        applied = share.apply(0.5)
        expected = set(split_cores(0.5, cores).decode)
        assert applied.amount == len(expected)
        assert all(os.sched_getaffinity(tid) == expected for tid in tids)
        share.close()
        assert all(os.sched_getaffinity(tid) == set(cores) for tid in tids)
    finally:
        child.kill()
        child.wait()
