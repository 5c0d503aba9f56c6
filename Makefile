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
# cores), plot its curves, then continue two code prompts with the trained model (contrastive
# search: greedy decoding of so small a model repeats itself).
demo: $(VENV)/.base
	$(PY) scripts/train.py --config configs/tiny.py --workdir demo_out
	$(PY) scripts/plot_metrics.py --workdir demo_out
	$(PY) scripts/generate.py --model demo_out/export --max_new_tokens 48 \
		--penalty_alpha 0.6 --top_k 4 --prompt "def __init__(self" --prompt "import os"

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
