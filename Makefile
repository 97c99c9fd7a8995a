# Two commands for a fresh machine (Python 3.11 with venv):
#   make demo   set up .venv and run the local multi-site simulation on built-in synthetic data
#   make test   set up .venv and run the test suite (two workers: tests/conftest.py says how they share it)
#   make test-fast  the suite without the tests that start processes or run a federation (under two minutes)
#   make lint   ruff (lint and format check) and mypy, as CI runs them before the tests
# torch is installed as torch==2.13.0 first: any other spec pulls a multi-GB CUDA build.
# Every other package is installed at the version in constraints.txt, the versions CI tested.

VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fedseg-installed
PYTHON ?= python3

LINTED := common server client simulations benchmarks tests

.PHONY: demo test test-fast lint setup

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fedseg-sim --config simulations/demo.yaml

test: $(STAMP)
	$(PY) -m pytest -n 2 --no-loadscope-reorder

test-fast: $(STAMP)
	$(PY) -m pytest -m "not processes and not simulation"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy $(LINTED)
