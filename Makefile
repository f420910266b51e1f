# Every target only calls `python -m pipeline` (or pytest); nothing here that the CLI cannot do.
PY      ?= .venv/bin/python
RECIPE  ?= recipes/tiny.yaml
ARGS    ?=

.PHONY: setup test test-gpu demo params

setup:            ## make .venv and install the pinned CPU stack + the project (editable)
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "numpy<2.5" torch==2.13.0
	$(PY) -m pip install -q --ignore-requires-python "megatron-core==0.19.2"
	$(PY) -m pip install -q --ignore-requires-python -e ".[test,launch]"

test:             ## the CPU test suite (CI runs exactly this)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -x tests; rc=$$?; [ $$rc -eq 5 ] && exit 0 || exit $$rc

test-gpu:         ## GPU tests (on a machine with CUDA + mamba-ssm)
	$(PY) -m pytest -q -m gpu tests

params:
	$(PY) -m pipeline params --recipe $(RECIPE) $(ARGS)

demo:             ## the whole pipeline on the tiny recipe, on CPU
	$(PY) -m pipeline pretrain --recipe $(RECIPE) $(ARGS)
