# lightning-clip: `make ablate` (the main job) and `make test` on a fresh clone; `make help` lists targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON3 ?= python3
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
# torch and torchvision must be a matching pair (timm imports torchvision). This pair is the one this
# project is tested with; override for another CUDA/CPU build, e.g. `make install TORCH_SPEC="torch torchvision"`.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

ABLATION ?=
SEEDS    ?=
QUICK    ?=
JOBS     ?= 2

ARGS     ?=
RUN      ?=
SPLIT    ?=
CONFIG   ?= experiments/base.yaml
TB_PORT  ?= 6006

.PHONY: help install data train smoke eval ablate convergence test test-slow tensorboard bench bench-gpu clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'
	@echo "  variables: ABLATION=<name> SEEDS=<n> (3; 1 with QUICK) QUICK=1 ARGS='--trainer.max_steps=50' CONFIG=experiments/base.yaml"

install: $(STAMP)  ## create .venv and install the package with its dev, bench and eval extras (idempotent)
$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON3) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[dev,bench,eval]'
	touch $@

data: install  ## generate the default synthetic world into data/synthetic48 (skipped when present)
	$(PY) -m lightning_clip.data.synthetic --out data/synthetic48 --image-size 48

train: install  ## one training run: make train CONFIG=... ARGS='--model.loss=siglip'
	$(PY) -m lightning_clip fit --config $(CONFIG) $(ARGS)

smoke: install  ## a few steps of tiny everything (< 1 min)
	$(PY) -m lightning_clip fit --config experiments/base.yaml --config experiments/smoke.yaml $(ARGS)

eval: install  ## the evaluation suite on a run's checkpoint: make eval RUN=runs/losses/infonce/seed_0 [SPLIT=test]
	@test -n "$(RUN)" || { echo 'make eval needs RUN=<run folder or checkpoint>'; exit 2; }
	$(PY) -m lightning_clip eval --ckpt_path=$(RUN) $(if $(SPLIT),--split=$(SPLIT))

ablate: install  ## run the ablation grid into runs/ and write results/ (ABLATION=, SEEDS=3, QUICK=1, EXECUTOR=slurm, STAGES=grid,tune,confirm)
	$(PY) -m lightning_clip.ablate $(if $(ABLATION),--ablation $(ABLATION)) $(if $(SEEDS),--seeds $(SEEDS)) $(if $(QUICK),--quick) --jobs $(JOBS) $(if $(EXECUTOR),--executor $(EXECUTOR)) $(if $(STAGES),--stages $(STAGES))

convergence: install  ## the convergence study that sets base.yaml's budget (every family at 3,200 steps; 32 min on 2 cores)
	$(PY) -m lightning_clip.ablate --ablation convergence --jobs $(JOBS)

test: install  ## the test suite without the slow end-to-end tests (< 5 min)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -m "not slow" -q

test-slow: install  ## only the slow end-to-end tests
	HF_HUB_OFFLINE=1 $(PY) -m pytest -m slow -q

tensorboard: install  ## TensorBoard over runs/, or runs/[quick/]$(ABLATION): that ablation's comparison page (QUICK=1 for its quick runs)
	@echo "the comparison: http://localhost:$(TB_PORT)/#custom_scalars (README: Comparing in TensorBoard)"
	$(VENV)/bin/tensorboard --logdir runs/$(if $(QUICK),quick/)$(ABLATION) --port $(TB_PORT) --bind_all

bench: install  ## the benchmark scripts (figures go to stdout; see BENCHMARKS.md)
	$(PY) benchmarks/loss_memory.py --sizes 4096 8192 16384
	$(PY) benchmarks/data_throughput.py
	$(PY) benchmarks/train_throughput.py --steps 40
	$(PY) benchmarks/tower_layout.py
	$(PY) benchmarks/tower_precision.py

bench-gpu: install  ## our training step at CLIP size vs open_clip's on a GPU (see BENCHMARKS.md)
	$(PY) benchmarks/gpu_train_step.py

clean:  ## remove runs, results of quick runs, caches (keeps .venv and data)
	rm -rf runs lightning_logs .pytest_cache results/quick
	find . -name __pycache__ -prune -exec rm -rf {} +
