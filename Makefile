# Every target creates or updates .venv first (python3.11, pinned dependencies from pyproject.toml).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_WINDOWS ?= 8
DEMO_STRATEGY ?= sparseloco
# the share of scored files the demo's validator replays from the miners' committed states (templar_lib/spot_check.py)
DEMO_SPOT_CHECKS ?= 0.5
# a home is one network: the other strategy's demo (and its `make ui`) gets its own
DEMO_HOME ?= $(if $(filter sparseloco,$(DEMO_STRATEGY)),.templar,.templar/$(DEMO_STRATEGY))

.PHONY: demo test venv bench ui clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	TEMPLAR_HP_STRATEGY=$(DEMO_STRATEGY) TEMPLAR_HP_SPOT_CHECK_PROBABILITY=$(DEMO_SPOT_CHECKS) \
	  $(BIN)/templar --home $(DEMO_HOME) --hparams deploy/simulate-hparams.yaml local-network --miners 4 --windows $(DEMO_WINDOWS) \
	  --adversaries copy:1

test: $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python bench/compression.py
	$(BIN)/python bench/aggregation.py
	$(BIN)/python bench/wire.py --windows 0
	$(BIN)/python bench/miner_step.py
	$(BIN)/python bench/miner_window.py
	$(BIN)/python bench/state.py
	$(BIN)/python bench/window.py

ui: $(STAMP)
	DAGSTER_HOME=$(abspath $(DEMO_HOME))/dagster TEMPLAR_HOME=$(abspath $(DEMO_HOME)) \
	  $(BIN)/dagster dev -m templar_pipelines

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
