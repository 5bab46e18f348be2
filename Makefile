# The two commands of the README. Both set up .venv on first use (torch pinned from
# requirements/constraints.txt), then run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
GPU_CHECK_ARGS ?=

.PHONY: setup demo test lint gpu-check clean

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml requirements/constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c requirements/constraints.txt torch torchvision
	$(PY) -m pip install --quiet -c requirements/constraints.txt -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	OMP_NUM_THREADS=2 $(PY) launch/demo.py

lint: $(STAMP)
	$(VENV)/bin/ruff check dune_scale kernels launch tests

test: lint
	OMP_NUM_THREADS=1 $(PY) -m pytest -q $(PYTEST_ARGS) tests

# GPU acceptance on a machine with one GPU and the project's requirements (no venv, no DeepSpeed or
# Streaming needed): gpu tests, loss-kernel and step benchmarks → runs/gpu-check/gpu_check.{json,md}.
gpu-check:
	PYTHONPATH=$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH} $(PYTHON) launch/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf runs/demo .pytest_cache
