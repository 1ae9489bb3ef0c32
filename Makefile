# Two commands on a fresh machine with Python 3.10+ and pip: `make demo`, `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch first, pinned, so nothing later pulls a different (e.g. CUDA) build; a machine
# whose pip finds another build of this version gets that one.
TORCH ?= torch==2.13.0
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check

.PHONY: demo test test-slow lint bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(VENV)/.core: $(BIN)/python pyproject.toml
	$(PIP) "$(TORCH)"
	$(PIP) -e .
	@touch $@

$(VENV)/.dev: $(VENV)/.core
	$(PIP) -e ".[dev,quant,metrics,code]"
	@touch $@

demo: $(VENV)/.core
	$(BIN)/lmforge run configs/demo.yaml

test: $(VENV)/.dev
	$(BIN)/python -m pytest

test-slow: $(VENV)/.dev
	$(BIN)/python -m pytest -m slow

lint: $(VENV)/.dev
	$(BIN)/ruff check lmforge tests bench

bench: $(VENV)/.core
	$(BIN)/python bench/pretrain_throughput.py

clean:
	rm -rf runs .pytest_cache
