# The two set-up commands of the README: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install -q -c constraints.txt

.PHONY: run test install lint

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

install: $(BIN)/python
	$(PIP) -e '.[dev]'

run: install
	$(BIN)/plerec demo

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check src tests
