# Two commands on a fresh machine with Python 3.10+ and pip: `make demo`, `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch first, pinned, so nothing later pulls a different (e.g. CUDA) build; a machine
# whose pip finds another build of this version gets that one.
TORCH ?= torch==2.13.0
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check

.PHONY: demo demo-avx2 test test-avx2 test-slow lint bench bench-dpo clean

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

# The suite with torch's kernels held to AVX2 (no AVX-512, no bf16/AMX instructions): the path
# of many laptops and cloud CPUs, where bf16 is emulated ~100x slower than fp32. MKL is held
# there too, since it picks its own kernels for fp32 matmuls.
AVX2 := ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2
test-avx2: $(VENV)/.dev
	$(AVX2) $(BIN)/python -m pytest

demo-avx2: $(VENV)/.core
	$(AVX2) $(BIN)/lmforge run configs/demo.yaml dir=runs/demo-avx2

test-slow: $(VENV)/.dev
	$(BIN)/python -m pytest -m slow

lint: $(VENV)/.dev
	$(BIN)/ruff check lmforge tests bench

bench: $(VENV)/.core
	$(BIN)/python bench/pretrain_throughput.py

# trl (and the datasets/pandas/pyarrow it pulls) is for this benchmark only: `make test` and
# `make demo` never install it
$(VENV)/.bench: $(VENV)/.core
	$(PIP) -e ".[bench]"
	@touch $@

bench-dpo: $(VENV)/.bench
	$(BIN)/python bench/dpo_vs_trl.py

clean:
	rm -rf runs .pytest_cache
