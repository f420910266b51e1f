# Every target only calls `python -m pipeline` (or pytest); nothing here that the CLI cannot do.
PY      ?= .venv/bin/python
RECIPE  ?= recipes/tiny.yaml
ARGS    ?=
# <run.root>/<run.name> of RECIPE with ARGS (the demo's slices go there, not to a fixed runs/tiny)
RUN_DIR  = $(shell $(PY) -c 'import os, sys; from pipeline.config import load_recipe; r = load_recipe(sys.argv[1], sys.argv[2:]); print(os.path.join(r.run.root, r.run.name))' $(RECIPE) $(ARGS) 2>/dev/null)
DEMO_DIR = $(if $(RUN_DIR),$(RUN_DIR),$(error cannot resolve run.root / run.name of $(RECIPE) $(ARGS): python -m pipeline data --recipe $(RECIPE) $(ARGS) --dry-run says why))
# LAUNCHER: local (torchrun --standalone) | slurm (python -m launchers.slurm) | nemo (python -m launchers.nemo)
LAUNCHER ?= local
# NPROC: ranks on this machine (LAUNCHER=local, and nemo-run's local executor)
NPROC   ?= 1
# NEMO_EXECUTOR: slurm | local (LAUNCHER=nemo)
NEMO_EXECUTOR ?= slurm

# Stage targets: `make stage1 RECIPE=... LAUNCHER=slurm ARGS="key=value ..."`. A stage that pipeline/cli.py does
# not have yet fails with the CLI's own error. On SLURM and nemo-run, `all` submits one afterok chain.
STAGES   := data import importance pretrain stage1 stage2 evaluate qad export
PIPELINE := data import importance stage1 stage2 evaluate qad export

ifeq ($(filter $(LAUNCHER),local slurm nemo),)
$(error LAUNCHER=$(LAUNCHER): use local, slurm or nemo)
endif

launch_local = $(if $(filter 1,$(NPROC)),$(PY) -m pipeline,$(PY) -m torch.distributed.run --standalone \
	--nproc-per-node=$(NPROC) -m pipeline) $(1) --recipe $(RECIPE) $(ARGS)
launch_slurm = $(PY) -m launchers.slurm $(1) --recipe $(RECIPE) $(ARGS)
launch_nemo  = $(PY) -m launchers.nemo $(1) --recipe $(RECIPE) --executor $(NEMO_EXECUTOR) --nproc $(NPROC) $(ARGS)

.PHONY: setup test test-gpu demo params all $(STAGES)
.NOTPARALLEL:  # stages run one after another, even under make -j

setup:            ## make .venv and install the pinned CPU stack + the project (editable)
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "numpy<2.5" torch==2.13.0
	# megatron-core 0.19 declares Python >= 3.12 but runs on 3.11; only it gets --ignore-requires-python (on the
	# rest, the flag lets pip pick releases without 3.11 wheels and build them from source, e.g. scipy 1.18)
	$(PY) -m pip install -q --ignore-requires-python "megatron-core==0.19.2"
	$(PY) -m pip install -q -e ".[test,launch]"
	touch .venv/.installed

.venv/.installed:  # `make demo` / `make test` on a fresh clone set up first
	$(MAKE) setup

test: .venv/.installed  ## the CPU test suite (CI runs exactly this)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -x tests

test-gpu:         ## GPU tests (on a machine with CUDA + mamba-ssm)
	$(PY) -m pytest -q -m gpu tests

params:
	$(PY) -m pipeline params --recipe $(RECIPE) $(ARGS)

demo: .venv/.installed  ## the whole pipeline on the tiny recipe, on CPU: data -> pretrain -> importance -> stage1 -> stage2 -> qad -> export (bf16, fp8, nvfp4) -> slice -> evaluate -> budget-eval
	$(PY) -m pipeline data --recipe $(RECIPE) $(ARGS)
	$(PY) -m pipeline pretrain --recipe $(RECIPE) training.data=blend $(ARGS)
	$(PY) -m pipeline importance --recipe $(RECIPE) importance.data=blend $(ARGS)
	$(PY) -m pipeline stage1 --recipe $(RECIPE) training.data=blend $(ARGS)
	$(PY) -m pipeline stage2 --recipe $(RECIPE) training.data=blend $(ARGS)
	$(PY) -m pipeline qad --recipe $(RECIPE) training.data=blend qad.calibration_data=blend $(ARGS)
	$(PY) -m pipeline export --recipe $(RECIPE) --overwrite $(ARGS)
	$(PY) -m pipeline slice --recipe $(RECIPE) --budget small --out $(DEMO_DIR)/small --overwrite $(ARGS)
	$(PY) -m pipeline export --recipe $(RECIPE) --quant fp8 --overwrite $(ARGS)
	$(PY) -m pipeline export --recipe $(RECIPE) --quant nvfp4 --overwrite $(ARGS)
	$(PY) -m pipeline slice --recipe $(RECIPE) --checkpoint $(DEMO_DIR)/elastic-nvfp4 --budget small --out $(DEMO_DIR)/small-nvfp4 --overwrite $(ARGS)
	$(PY) -m pipeline evaluate --recipe $(RECIPE) training.data=blend $(ARGS)
	$(PY) -m pipeline budget-eval --recipe $(RECIPE) $(ARGS)

.PHONY: study
study:            ## the quality study (docs/quality.md): parent, elastic, independent prune + KD, untrained slices, PTQ / QAD, budget-eval -> runs/study/study/results.{json,md} + plots; resumable. CPU smoke: make study ARGS="--scale tiny"
	$(PY) bench/quality_study.py $(ARGS)

.PHONY: slice
BUDGET ?=
OUT    ?=
slice:            ## one budget of the run's elastic checkpoint as a standalone HF model: make slice BUDGET=medium OUT=runs/tiny/medium
	$(PY) -m pipeline slice --recipe $(RECIPE) --budget $(BUDGET) --out $(OUT) $(ARGS)

# ---- stage targets (launchers/: docs/launching.md)
$(STAGES):
	$(call launch_$(LAUNCHER),$@)

ifeq ($(LAUNCHER),local)
all: $(PIPELINE)  ## every stage in order
else
all:
	$(call launch_$(LAUNCHER),$(PIPELINE))
endif
