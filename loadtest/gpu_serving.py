"""`make gpu-check`, second half: the whole stack serving real requests on a GPU, in every mode.

For each mode (semi-pd, unified, disagg) the launcher starts the stack as `make run` does, with
the KV pool and the weights forced into CUDA IPC memory (DUET_STORAGE=cuda: a stack that cannot
share them over IPC does not start) and the default model in float32. Then, one line each:

- greedy: a few prompts sent one at a time, greedy, EOS ignored; each answer must equal the
  runtime's own offline engine run alone on the same GPU (same kernels, no serving path);
- burst: 16 requests at once; each must complete with every token asked for;
- split (semi-pd): each worker's log must show a compute share applied on the GPU (green
  contexts or MPS), not the CPU fallback;
- blocks: once the requests are done, no KV block is held by anything but the prefix cache.

Exit status: 0 when every check passed, 1 when one failed, 2 without a GPU (nothing checked).

    python -m duetserve.loadtest.gpu_serving [--modes semi-pd,unified,disagg] [--model DIR]
"""

import argparse
import asyncio
import json
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, NamedTuple

import torch

from duetserve.loadtest.faults import RunningStack, kv_health

Status = Literal["PASS", "FAIL", "SKIP"]
MODES = ("semi-pd", "unified", "disagg")
PROMPTS = (
    "The history of the lighthouse at the edge of the bay begins",
    "Write a short note to a friend about the weather this week.",
    "List three facts about the planet Mars.",
)
GREEDY_TOKENS = 24
BURST, BURST_TOKENS = 16, 32
RETRIES = 5  # a 429 or 503 with Retry-After is tried again this often
# How the GPU backends describe an applied share (compute_share/cuda_green.py, mps.py).
_GPU_SHARES = ("SMs in a green", "MPS active thread percentage")


class Check(NamedTuple):
    mode: str
    name: str
    status: Status
    detail: str


def complete(base_url: str, model: str, prompt: str, max_tokens: int) -> dict[str, object]:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
    }
    request = urllib.request.Request(
        f"{base_url}/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    for attempt in range(RETRIES + 1):
        try:
            with urllib.request.urlopen(request, timeout=300) as response:
                answer: dict[str, object] = json.load(response)
            return answer
        except urllib.error.HTTPError as err:
            said = err.read().decode(errors="replace")
            retry_after = err.headers.get("Retry-After")
            # Refused for now (admission, a restart): come back when told, as clients do.
            if err.code in (429, 503) and retry_after is not None and attempt < RETRIES:
                time.sleep(min(float(retry_after), 10.0))
                continue
            raise RuntimeError(f"HTTP {err.code}: {said}") from None
    raise AssertionError("unreachable")


def reference_texts(
    model_dir: Path, prompts: Sequence[str], max_tokens: int, device: str = "cuda"
) -> list[str]:
    """Each prompt's greedy answer from the offline engine alone on `device`, in float32."""
    from duetserve.runtime.kv_pool import KVPool
    from duetserve.runtime.loader import load_model
    from duetserve.runtime.offline import OfflineEngine
    from duetserve.runtime.sampling import SamplingParams
    from duetserve.runtime.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(model_dir)
    model = load_model(model_dir, "float32", device)
    texts = []
    for prompt in prompts:
        ids = tokenizer.encode(prompt)
        pool = KVPool.allocate(model.config, 64, 16, torch.float32, device)
        engine = OfflineEngine(model, pool, frozenset())
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        [out] = engine.generate([ids], params)
        texts.append(tokenizer.decode(out.token_ids))
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return texts


def text_of(answer: dict[str, object]) -> str:
    choices = answer["choices"]
    assert isinstance(choices, list) and len(choices) == 1
    return str(choices[0]["text"])


def completion_tokens(answer: dict[str, object]) -> int:
    usage = answer["usage"]
    assert isinstance(usage, dict)
    return int(usage["completion_tokens"])


def check_mode(
    mode: str, model_dir: Path, references: list[str], var: Path, device: str = "cuda"
) -> list[Check]:
    """The checks of one mode. `device="cpu"` runs the same checks on the CPU's shared memory
    (no split check): how the check itself is tested on a machine without a GPU."""
    env = {"DUET_MODE": mode, "DUET_DTYPE": "float32", "DUET_STORAGE": device}
    memory = "CUDA IPC memory" if device == "cuda" else "CPU shared memory"
    try:
        stack = RunningStack(var, model_dir, env)
    except RuntimeError as err:
        return [Check(mode, "start", "FAIL", f"{err} (storage forced to {memory})")]
    checks = [Check(mode, "start", "PASS", f"KV pool and weights in {memory}")]
    try:
        model = model_dir.name
        served = [complete(stack.base_url, model, p, GREEDY_TOKENS) for p in PROMPTS]
        differ = [i for i, a in enumerate(served) if text_of(a) != references[i]]
        checks.append(
            Check(
                mode,
                "greedy",
                "FAIL" if differ else "PASS",
                f"{len(PROMPTS) - len(differ)}/{len(PROMPTS)} equal the offline engine"
                + (f"; prompt {differ[0]}: {text_of(served[differ[0]])!r}" if differ else ""),
            )
        )
        checks.append(burst(mode, stack.base_url, model))
        if mode == "semi-pd" and device == "cuda":
            checks.append(split_applied(mode, var / "logs"))
        leaked, stale = asyncio.run(kv_health(stack.nats_url, settle_s=20.0))
        checks.append(
            Check(
                mode,
                "blocks",
                "PASS" if leaked == 0 and stale == 0 else "FAIL",
                f"{leaked} references left, {stale} stale writes",
            )
        )
    except Exception as err:  # a request that failed: this mode fails, the next one runs
        checks.append(Check(mode, "serve", "FAIL", repr(err)))
    finally:
        stack.stop()
    return checks


def burst(mode: str, base_url: str, model: str) -> Check:
    async def run() -> list[dict[str, object] | BaseException]:
        prompts = [f"Request {i}: tell me about the sea." for i in range(BURST)]
        return await asyncio.gather(
            *(asyncio.to_thread(complete, base_url, model, p, BURST_TOKENS) for p in prompts),
            return_exceptions=True,
        )

    answers = asyncio.run(run())
    complete_ones = [
        a for a in answers if isinstance(a, dict) and completion_tokens(a) == BURST_TOKENS
    ]
    failed = [a for a in answers if isinstance(a, BaseException)]
    status: Status = "PASS" if len(complete_ones) == BURST else "FAIL"
    detail = f"{len(complete_ones)}/{BURST} complete with {BURST_TOKENS} tokens"
    return Check(mode, "burst", status, detail + (f"; {failed[0]!r}" if failed else ""))


def split_applied(mode: str, logs: Path) -> Check:
    """Each worker's log shows a compute share applied by a GPU backend."""
    found = {}
    for worker in ("prefill_worker", "decode_worker"):
        lines = (logs / f"{worker}.log").read_text(errors="replace").splitlines()
        applied = [line for line in lines if "compute share applied" in line]
        found[worker] = applied[-1] if applied else ""
    on_gpu = all(any(s in line for s in _GPU_SHARES) for line in found.values())
    detail = "; ".join(f"{w}: {line[-120:] or 'none applied'}" for w, line in found.items())
    return Check(mode, "split", "PASS" if on_gpu else "FAIL", detail)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m duetserve.loadtest.gpu_serving", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--model", type=Path, help="model directory (default: SmolLM2)")
    parser.add_argument("--models-dir", type=Path, default=Path("models"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("SKIP  gpu-serving  no CUDA device here: nothing was checked")
        return 2
    model_dir = args.model
    if model_dir is None:
        from duetserve.runtime.gguf_convert import SMOLLM2, ensure_model

        model_dir = ensure_model(SMOLLM2, args.models_dir).model_dir
    references = reference_texts(model_dir, PROMPTS, GREEDY_TOKENS)
    checks: list[Check] = []
    with tempfile.TemporaryDirectory(prefix="duet-gpu-serving-") as tmp:
        for mode in args.modes.split(","):
            for check in check_mode(mode, model_dir, references, Path(tmp) / mode):
                print(f"{check.status:<5} {check.mode:<8} {check.name:<7} {check.detail}")
                checks.append(check)
    return 1 if any(c.status == "FAIL" for c in checks) else 0


if __name__ == "__main__":
    raise SystemExit(main())
