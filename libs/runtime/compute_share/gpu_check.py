"""`make gpu-check`: the GPU backends on a real GPU, with a line per check.

cuda-green: both workers' shares opened side by side in this process at prefill 0.6 / decode
0.4, then moved in place to 0.3 / 0.7. At each split: the SM counts match the plan, a matmul on
each green stream equals the same matmul on the default stream, and the SMs that each stream's
kernels ran on (read from %smid) are disjoint and no more than the share's count.
cuda-mps (when a control daemon runs): two child processes started at 30% and 70% each run a
matmul and report the SMs and time they saw.

Exit status: 0 when every check that could run passed, 1 when one failed, 2 without a GPU.
"""

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Literal, NamedTuple

import torch
import triton
import triton.language as tl

from duetserve.runtime.compute_share.cuda_green import GreenContextShare
from duetserve.runtime.compute_share.mps import mps_child_env, mps_pipe_dir
from duetserve.runtime.compute_share.probe import MachineProbe, probe_machine
from duetserve.runtime.compute_share.selection import availability
from duetserve.runtime.compute_share.sm_split import plan_sm_split

Status = Literal["PASS", "FAIL", "SKIP"]
_MPS_PERCENTS = (30, 70)
_MPS_CHILD = """
import json, time, torch
a = torch.randn(1024, 1024, device="cuda")
b = torch.randn(1024, 1024, device="cuda")
torch.cuda.synchronize()
start = time.perf_counter()
for _ in range(50):
    c = a @ b
torch.cuda.synchronize()
ms = (time.perf_counter() - start) * 1000 / 50
ok = torch.allclose(c.cpu(), a.cpu() @ b.cpu(), rtol=1e-3, atol=1e-2)
sms = torch.cuda.get_device_properties(0).multi_processor_count
print(json.dumps({"sms": sms, "ms": ms, "ok": bool(ok)}))
"""


class Check(NamedTuple):
    name: str
    status: Status
    detail: str


@triton.jit
def _sm_id_kernel(out_ptr):  # type: ignore[no-untyped-def]
    sm_id = tl.inline_asm_elementwise(
        "mov.u32 $0, %smid;", "=r", [], dtype=tl.int32, is_pure=False, pack=1
    )
    tl.store(out_ptr + tl.program_id(0), sm_id)


def _sm_ids(stream: torch.cuda.Stream, programs: int) -> set[int]:
    """The SMs that `programs` one-thread-block programs launched on `stream` ran on."""
    with torch.cuda.stream(stream):
        out = torch.full((programs,), -1, dtype=torch.int32, device="cuda")
        _sm_id_kernel[(programs,)](out)
    stream.synchronize()
    return set(out.tolist())


def _matmul_matches(stream: torch.cuda.Stream) -> bool:
    a = torch.randn(2048, 2048, device="cuda")
    b = torch.randn(2048, 2048, device="cuda")
    reference = a @ b
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out = a @ b
    stream.synchronize()
    return bool(torch.allclose(out, reference, rtol=1e-4, atol=1e-3))


def _attempt(name: str, run: Callable[[], tuple[bool, str]]) -> Check:
    try:
        passed, detail = run()
    except Exception as err:
        return Check(name, "FAIL", f"{type(err).__name__}: {err}")
    return Check(name, "PASS" if passed else "FAIL", detail)


def _green_split(
    prefill: GreenContextShare, decode: GreenContextShare, share: float
) -> list[Check]:
    label = f"cuda-green {share:g}/{1 - share:g}"
    mine = prefill.apply(share)
    theirs = decode.apply(1.0 - share)
    plan = plan_sm_split(share, prefill.layout)

    def counts() -> tuple[bool, str]:
        passed = (mine.amount, theirs.amount) == (plan.prefill_sms, plan.decode_sms)
        return passed, f"prefill {mine.amount} + decode {theirs.amount} SMs, planned {plan}"

    def matmuls() -> tuple[bool, str]:
        results = [_matmul_matches(prefill.stream), _matmul_matches(decode.stream)]
        return all(results), f"prefill stream {results[0]}, decode stream {results[1]}"

    def sm_ids() -> tuple[bool, str]:
        programs = 8 * prefill.layout.total
        seen = (_sm_ids(prefill.stream, programs), _sm_ids(decode.stream, programs))
        disjoint = not seen[0] & seen[1]
        bounded = len(seen[0]) <= mine.amount and len(seen[1]) <= theirs.amount
        return disjoint and bounded, (
            f"prefill ran on {len(seen[0])} SMs, decode on {len(seen[1])}, "
            f"shared {sorted(seen[0] & seen[1])}"
        )

    return [
        _attempt(f"{label} SM counts", counts),
        _attempt(f"{label} matmul on each green stream", matmuls),
        _attempt(f"{label} SM ids disjoint and within the share", sm_ids),
    ]


def check_green(probe: MachineProbe) -> list[Check]:
    found = availability("cuda-green", probe)
    if not found.available:
        return [Check("cuda-green", "SKIP", found.reason)]
    checks: list[Check] = []
    with contextlib.ExitStack() as opened:
        try:
            prefill = GreenContextShare("prefill")
            opened.callback(prefill.close)
            decode = GreenContextShare("decode")
            opened.callback(decode.close)
            checks.append(Check("cuda-green layout", "PASS", str(prefill.layout)))
            for share in (0.6, 0.3):  # the second moves the split in place
                checks.extend(_green_split(prefill, decode, share))
        except Exception as err:
            checks.append(Check("cuda-green", "FAIL", f"{type(err).__name__}: {err}"))
    return checks


def check_mps(probe: MachineProbe) -> list[Check]:
    found = availability("cuda-mps", probe)
    if not found.available:
        return [Check("cuda-mps", "SKIP", found.reason)]
    children = {
        percent: subprocess.Popen(
            [sys.executable, "-c", _MPS_CHILD],
            env=mps_child_env(percent / 100, os.environ, probe.mps.pipe_dir),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for percent in _MPS_PERCENTS
    }
    checks = []
    for percent, child in children.items():
        try:
            out, err = child.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            child.kill()
            checks.append(Check(f"cuda-mps {percent}%", "FAIL", "child timed out"))
            continue
        if child.returncode != 0:
            tail = err.strip().splitlines()[-1:] or ["no output"]
            checks.append(Check(f"cuda-mps {percent}%", "FAIL", tail[0]))
            continue
        report = json.loads(out.strip().splitlines()[-1])
        detail = f"{report['sms']} SMs visible, {report['ms']:.3f} ms per 1024^3 matmul"
        checks.append(Check(f"cuda-mps {percent}%", "PASS" if report["ok"] else "FAIL", detail))
    return checks


def main() -> int:
    probe = probe_machine(mps_pipe_dir(os.environ))
    if probe.cuda.devices < 1 or not probe.cuda.torch_cuda:
        print(
            f"gpu-check: needs a CUDA GPU and a CUDA build of torch: {probe.cuda.detail}; "
            f"torch {torch.__version__}",
            file=sys.stderr,
        )
        return 2
    checks = check_green(probe) + check_mps(probe)
    for check in checks:
        print(f"{check.status} {check.name}: {check.detail}")
    return 1 if any(check.status == "FAIL" for check in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
