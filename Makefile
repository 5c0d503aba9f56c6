# Two commands for a fresh machine: `make demo` (the main job) and `make test` (the suite).
# Each creates ./.venv and installs the project into it first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test lint format clean

# pip's output (and setuptools' notes on editable installs) goes to a log, shown on failure.
INSTALL = $(PY) -m pip install -q
LOG = $(VENV)/install.log

$(VENV)/.base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	@echo "installing opt_jax into $(VENV) (log: $(LOG))"
	@$(INSTALL) --upgrade pip > $(LOG) 2>&1 || (cat $(LOG); exit 1)
	@$(INSTALL) -e . >> $(LOG) 2>&1 || (cat $(LOG); exit 1)
	touch $@

$(VENV)/.test: $(VENV)/.base
	@echo "installing the test dependencies (log: $(LOG))"
	@$(INSTALL) -e ".[test]" >> $(LOG) 2>&1 || (cat $(LOG); exit 1)
	touch $@

# The main job: train a small OPT on the standard library's sources (a few minutes on 2 CPU
# cores), plot its curves, then continue two code prompts with the trained model (contrastive
# search: greedy decoding of so small a model repeats itself).
demo: $(VENV)/.base
	$(PY) scripts/train.py --config configs/tiny.py --workdir demo_out
	$(PY) scripts/plot_metrics.py --workdir demo_out
	$(PY) scripts/generate.py --model demo_out/export --max_new_tokens 40 \
		--repetition_penalty 1.3 --prompt "def __init__(self" --prompt "    def __repr__(self):"
	@echo "(600 steps of a 4.3M model learn Python's layout and idioms, not yet meaning; a real"
	@echo " OPT checkpoint continues English prose fluently: see the README's 'Loading ...')"

lint: $(VENV)/.test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest -n auto --dist loadfile --durations=25

format: $(VENV)/.test
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) demo_out .pytest_cache .ruff_cache
