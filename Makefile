# The README's two commands: `make demo` and `make test`. Both set up first (idempotent).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU wheel of torch: an unpinned torch pulls a multi-GB CUDA build.
TORCH_PIN := torch==2.13.0

.PHONY: setup demo test lint clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PIN)
	$(PY) -m pip install --quiet -e ".[dev]"
	# `memedit lab train` reads the CLIP BPE vocabulary shipped inside open_clip's wheel; without
	# --no-deps its requirements would pull a CUDA torch
	$(PY) -m pip install --quiet --no-deps open_clip_torch==3.3.0
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/memedit demo

test: setup
	$(VENV)/bin/ruff check memedit tests benchmarks
	bash scripts/run_tests.sh $(PY)

lint: setup
	$(VENV)/bin/ruff check memedit tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info
