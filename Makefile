# make run: create .venv, install frog (CPU torch pinned) and run the main job.
# make test: same install, then the test suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install run test bench

$(BIN)/.frog-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

install: $(BIN)/.frog-installed

run: install
	$(BIN)/frog reproduce --quick --out runs/reproduce

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python benchmarks/engines.py
