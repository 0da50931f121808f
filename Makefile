# All targets work on a fresh machine: `make demo` and `make test` install first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Two stamps: what sdrecipe needs to run (`make demo`), and that plus the test
# tools and oracles (`make install`, `make test` and the rest).
RUNTIME_STAMP := $(VENV)/.runtime-installed
STAMP := $(VENV)/.installed

.PHONY: install install-browser demo test lint bench check-diffusers screenshots clean

install: $(STAMP)

# torch==2.13.0 first: the CPU wheel is local, and a bare `torch` would pull CUDA.
$(RUNTIME_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[serve]'
	touch $(RUNTIME_STAMP)

$(STAMP): $(RUNTIME_STAMP)
	$(BIN)/pip install --quiet -e '.[dev,oracles,serve]'
	touch $(STAMP)

# The web view's browser tests drive a real headless Chromium: Debian's, installed
# here when it is missing and this is root on a Debian-like system; the tests say
# why they are skipped when no Chromium can be had.
CHROMIUM ?= /usr/bin/chromium
install-browser:
	@test -x $(CHROMIUM) || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian's chromium for the browser tests"; \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 \
	    || { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1; } \
	    || echo "could not install chromium: the browser tests will be skipped"; \
	  else echo "no $(CHROMIUM) (install Debian's chromium as root): the browser tests will be skipped"; fi; }

demo: $(RUNTIME_STAMP)
	$(BIN)/python -m sdrecipe.synthetic demo build/demo
	$(BIN)/sdrecipe build recipes/demo_inpaint.yaml
	@echo
	@echo "See the demo in the web view (recipes, their DAGs, builds, heatmaps):"
	@echo "  $(BIN)/sdrecipe serve recipes --open"

test: $(STAMP) install-browser
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

# The web view's screenshots in docs/, from the demo models, in headless Chromium.
screenshots: $(STAMP) install-browser
	$(BIN)/python docs/screenshots.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q -p no:xdist tests/test_layers.py

clean:
	rm -rf build cache/*.tmp
