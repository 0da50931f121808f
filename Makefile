# All targets work on a fresh machine: `make demo` and `make test` install first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Two stamps: what sdrecipe needs to run (`make demo`), and that plus the test
# tools and oracles (`make install`, `make test` and the rest).
RUNTIME_STAMP := $(VENV)/.runtime-installed
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench check-diffusers clean

install: $(STAMP)

# torch==2.13.0 first: the CPU wheel is local, and a bare `torch` would pull CUDA.
$(RUNTIME_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e .
	touch $(RUNTIME_STAMP)

$(STAMP): $(RUNTIME_STAMP)
	$(BIN)/pip install --quiet -e '.[dev,oracles]'
	touch $(STAMP)

demo: $(RUNTIME_STAMP)
	$(BIN)/python -m sdrecipe.synthetic demo build/demo
	$(BIN)/sdrecipe build recipes/demo_inpaint.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2

# Full-size benchmark against the peers; regenerates BENCHMARKS.md (see bench/run.py).
bench: $(STAMP)
	$(BIN)/python -m bench.run

# Loads the diffusers folders sdrecipe writes with diffusers itself, in a venv of its own.
DIFFUSERS_VENV := build/venv-diffusers
check-diffusers: $(STAMP)
	$(BIN)/python bench/diffusers_compat.py prepare build/diffusers-check
	test -x $(DIFFUSERS_VENV)/bin/python || ( $(PYTHON) -m venv $(DIFFUSERS_VENV) \
		&& $(DIFFUSERS_VENV)/bin/pip install --quiet torch==2.13.0 \
		&& $(DIFFUSERS_VENV)/bin/pip install --quiet diffusers==0.42.1 transformers==5.23.0 safetensors peft==0.21.2 )
	$(DIFFUSERS_VENV)/bin/python bench/diffusers_compat.py check build/diffusers-check
	rm -rf build/diffusers-check

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q -p no:xdist tests/test_layers.py

clean:
	rm -rf build cache/*.tmp
