# Two commands for a fresh machine: `make demo` (the main job) and `make test` (the suite).
# Each creates ./.venv and installs the project into it first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test lint format clean

$(VENV)/.base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.test: $(VENV)/.base
	$(PY) -m pip install -q -e ".[test]"
	touch $@

# The main job: train a small OPT on the standard library's sources (a few minutes on 2 CPU
# cores), plot its curves, then continue a code prompt with the trained model.
demo: $(VENV)/.base
	$(PY) scripts/train.py --config configs/tiny.py --workdir demo_out
	$(PY) scripts/plot_metrics.py --workdir demo_out
	$(PY) scripts/generate.py --model demo_out/export --max_new_tokens 48 \
		--prompt "def __init__(self" --prompt "import os"

lint: $(VENV)/.test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest

format: $(VENV)/.test
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) demo_out .pytest_cache .ruff_cache
