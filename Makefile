# Two entry points, each doing its own setup on a fresh machine:
#   make demo   set up .venv, then run the main job (mechvlm report on the shipped toy model)
#   make test   set up .venv, then run the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test setup clean-report

$(BIN)/.mechvlm-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0  # CPU build from local disk; the pin avoids CUDA wheels
	$(BIN)/python -m pip install -q -e ".[dev,viz]"
	touch $@

setup: $(BIN)/.mechvlm-installed

demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/mechvlm report --out mechvlm-report

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

clean-report:
	rm -rf mechvlm-report
