# make demo: set up .venv, train the quickstart model on synthetic nuclei, evaluate it, print the metrics.
# make test: set up .venv with the test extra and run the test suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.nucjax-installed
WORKDIR ?= runs/quickstart
PYTEST_ARGS ?=

BUDGET ?= cpu
STUDY_DIR ?= runs/study-$(BUDGET)

.PHONY: demo test bench study clean-venv

$(STAMP): setup.py
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m nucjax.train --config configs/quickstart.py --workdir $(WORKDIR)
	$(BIN)/python -m nucjax.evaluate --checkpoint $(WORKDIR) --split validation --json $(WORKDIR)/validation.json

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 $(PYTEST_ARGS) tests

study: $(STAMP)
	$(BIN)/python -m experiments.study --budget $(BUDGET) --workdir $(STUDY_DIR)

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[bench]'

clean-venv:
	rm -rf $(VENV)
