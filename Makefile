# The two commands a newcomer needs (see README): `make run` and `make test`.
# Both create an isolated virtual environment with the pinned, tested dependencies first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARGS ?=

.PHONY: setup run test lint
setup: $(VENV)/.installed

$(VENV)/.installed: requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.lock
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $@

run: setup
	$(BIN)/python -m ptq.run $(ARGS)

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check ptq tests scripts
	$(BIN)/ruff format --check ptq tests scripts
