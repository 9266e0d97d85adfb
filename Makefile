# Every target creates or updates .venv first (python3.11, pinned dependencies from pyproject.toml).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_HOME ?= .templar
DEMO_WINDOWS ?= 12

.PHONY: demo test venv bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/templar --home $(DEMO_HOME) init
	$(BIN)/templar --home $(DEMO_HOME) --hparams deploy/simulate-hparams.yaml simulate --miners 4 --windows $(DEMO_WINDOWS)

test: $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python bench/compression.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
